"""Which leaves are matrices, and how to read them as ``(*batch, in, out)``.

Every matrix rule in optax_lean (subset norms, subspace projections) is
written once, for a canonical view of a leaf: its batch axes first, then the
flattened input (reduction) axes, then the flattened output axes. This is a
Flax kernel ``(in, out)``, the transpose of a PyTorch ``nn.Linear.weight``.
Stacked layers from ``nnx.scan`` are ``(layers, in, out)`` with the layer axis
as a batch axis; the result of any rule is then the same as applying it to each
layer on its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import optax
from jax.sharding import PartitionSpec

from optax_lean._src import warn as warn_lib

Axes = int | Sequence[int]


class DimensionNumbers(NamedTuple):
  """Which axes of a leaf form the input and output sides of a matrix.

  All axes named in neither field are batch axes: the leaf is read as a stack
  of independent matrices, as ``optax.contrib.MuonDimensionNumbers`` does.

  A Flax kernel ``(in, out)`` is ``DimensionNumbers(0, 1)``; scanned layers
  ``(layers, in, out)`` are ``DimensionNumbers(1, 2)``; both are the default
  ``DimensionNumbers()`` (the last two axes, leading axes batch). An
  attention kernel ``(embed, heads, head_dim)`` is
  ``DimensionNumbers(0, (1, 2))``: its output side is ``heads * head_dim``.

  Attributes:
    reduction_axis: Axis or axes contracted with the layer's input (``in``).
    output_axis: Axis or axes of the layer's output (``out``).

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> params = {'qkv': jnp.ones((16, 4, 8))}  # (embed, heads, head_dim)
    >>> tx = optax_lean.scale_by_subset_norm(
    ...     mask={'qkv': True},
    ...     dimension_numbers=optax_lean.DimensionNumbers(0, (1, 2)))
    >>> tx.init(params).nu['qkv'].shape  # one subset per output unit
    (1, 32)
  """

  reduction_axis: Axes = -2
  output_axis: Axes = -1


# A tree (or prefix) of DimensionNumbers and None, or a function of the params giving one.
DimensionNumbersOrFn = DimensionNumbers | optax.Params | Callable[[optax.Params], optax.Params]
# A tree (or prefix) of bools, or a function of the params giving one.
MaskOrFn = bool | optax.Params | Callable[[optax.Params], optax.Params]


def axes_field(axes: tuple[int, ...]) -> Axes:
  """``axes`` as a ``DimensionNumbers`` field: a single axis as an int."""
  return axes[0] if len(axes) == 1 else axes


def _as_axes(axes: Axes, ndim: int, shape: tuple[int, ...]) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  for axis in axes:
    if not -ndim <= axis < ndim:
      raise ValueError(
        f'dimension_numbers: axis {axis} is out of range for a leaf of '
        f'shape {shape}; valid axes are {-ndim}..{ndim - 1}.'
      )
  return tuple(axis % ndim for axis in axes)


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
  """A leaf's shape with its batch, input and output axes resolved.

  ``to_matrix`` gives the canonical ``(*batch, in, out)`` view and
  ``from_matrix`` undoes it. For the common layouts (``(in, out)`` and
  ``(*batch, in, out)``) both are the identity.
  """

  shape: tuple[int, ...]
  batch_axes: tuple[int, ...]
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]

  @classmethod
  def vector(cls, shape: tuple[int, ...]) -> MatrixLayout:
    """A 1-D leaf read as a single ``(1, n)`` matrix (a torch ``(n, 1)``)."""
    return cls(tuple(shape), (), (), (0,))

  @classmethod
  def from_dimension_numbers(cls, shape: tuple[int, ...], dims: DimensionNumbers) -> MatrixLayout:
    ndim = len(shape)
    if ndim < 2:
      raise ValueError(
        f'dimension_numbers: a leaf of shape {shape} has fewer than 2 axes '
        'and cannot be read as a matrix; leave it out with `mask`.'
      )
    in_axes = _as_axes(dims.reduction_axis, ndim, shape)
    out_axes = _as_axes(dims.output_axis, ndim, shape)
    if not in_axes or not out_axes or set(in_axes) & set(out_axes):
      raise ValueError(
        f'dimension_numbers: reduction_axis {dims.reduction_axis} and '
        f'output_axis {dims.output_axis} must be non-empty and disjoint '
        f'for a leaf of shape {shape}.'
      )
    batch_axes = tuple(a for a in range(ndim) if a not in in_axes and a not in out_axes)
    return cls(tuple(shape), batch_axes, in_axes, out_axes)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch_axes)

  @property
  def in_size(self) -> int:
    return math.prod(self.shape[a] for a in self.in_axes)

  @property
  def out_size(self) -> int:
    return math.prod(self.shape[a] for a in self.out_axes)

  @property
  def matrix_shape(self) -> tuple[int, ...]:
    return (*self.batch_shape, self.in_size, self.out_size)

  @property
  def _permutation(self) -> tuple[int, ...]:
    return self.batch_axes + self.in_axes + self.out_axes

  @property
  def is_identity(self) -> bool:
    return (
      self._permutation == tuple(range(len(self.shape)))
      and len(self.in_axes) == 1
      and len(self.out_axes) == 1
    )

  def matrix_spec(self, spec: PartitionSpec) -> PartitionSpec:
    """The sharding of the matrix view, given the leaf's ``spec``.

    A merged group of axes keeps a sharding only when it is a single axis;
    merged groups are gathered first (see ``to_matrix``).
    """
    spec = tuple(spec) + (None,) * (len(self.shape) - len(spec))
    group = lambda axes: spec[axes[0]] if len(axes) == 1 else None
    return PartitionSpec(
      *(spec[a] for a in self.batch_axes),
      group(self.in_axes),
      group(self.out_axes),
    )

  def gather_spec(self, spec: PartitionSpec) -> PartitionSpec:
    """``spec`` with every axis of a merged group unsharded."""
    spec = tuple(spec) + (None,) * (len(self.shape) - len(spec))
    merged = set()
    for axes in (self.in_axes, self.out_axes):
      if len(axes) > 1:
        merged.update(axes)
    return PartitionSpec(*(None if a in merged else s for a, s in enumerate(spec)))

  def to_matrix(self, x: jax.Array) -> jax.Array:
    if self.is_identity:
      return x
    return x.transpose(self._permutation).reshape(self.matrix_shape)

  def from_matrix(self, y: jax.Array) -> jax.Array:
    if self.is_identity:
      return y
    permuted = tuple(self.shape[a] for a in self._permutation)
    inverse = tuple(sorted(range(len(self.shape)), key=self._permutation.__getitem__))
    return y.reshape(permuted).transpose(inverse)


NOT_MATRICES = ('bias', 'scale', 'embedding')


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """The names along a key path, without the ``.value`` of an NNX ``Variable``.

  ``nnx.State`` paths end in the attribute ``value`` of each variable; pure
  dictionaries (``nnx.to_pure_dict``, Flax linen) do not. Both give the same
  names, so rules written on names hold for either.
  """
  names = []
  for key in path:
    for field in ('key', 'name', 'idx'):
      if hasattr(key, field):
        names.append(str(getattr(key, field)))
        break
    else:
      names.append(str(key))
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == 'value':
    names.pop()
  return tuple(names)


def path_str(path: tuple[Any, ...]) -> str:
  """A leaf's path as ``a/b/kernel``, for messages."""
  return '/'.join(path_names(path)) or '<root>'


def is_embedding(names: tuple[str, ...]) -> bool:
  """Whether a leaf's path names an embedding table (``embed`` in a name, as official codes)."""
  return any('embed' in name.lower() for name in names)


def _never_a_matrix(names: tuple[str, ...], leaf: Any, embeddings: bool = False) -> bool:
  """Leaves no default reads as a matrix: vectors, empty leaves, biases, scales, embeddings.

  With ``embeddings``, a 2-D embedding table is a matrix ``(vocabulary,
  features)``: its input side is the token.
  """
  shape = tuple(getattr(leaf, 'shape', ()))
  if len(shape) < 2 or math.prod(shape) == 0:
    return True
  if embeddings and is_embedding(names):
    return len(shape) != 2
  if names and names[-1] in NOT_MATRICES:
    return True
  return is_embedding(names)


def _read_from_bias(shape: tuple[int, ...], bias: tuple[int, ...]) -> DimensionNumbers | None:
  """The reading of a kernel ``shape`` that its sibling ``bias`` singles out, if one does.

  A bias has the kernel's batch axes followed by its output axes, so every
  split ``shape = batch + in + out`` with ``bias = batch + out`` is a reading;
  exactly one must exist (``(L, in, out)`` with bias ``(L, out)``; attention's
  ``(in, heads, head_dim)`` with ``(heads, head_dim)``; a convolution's
  ``(kh, kw, in, out)`` with ``(out,)``).
  """
  ndim = len(shape)
  readings = []
  for n_batch in range(len(bias)):
    n_out = len(bias) - n_batch
    n_in = ndim - n_batch - n_out
    if n_in >= 1 and bias == shape[:n_batch] + shape[ndim - n_out :]:
      readings.append((n_batch, n_in))
  if len(readings) != 1:
    return None
  n_batch, n_in = readings[0]
  return DimensionNumbers(
    axes_field(tuple(range(n_batch, n_batch + n_in))),
    axes_field(tuple(range(n_batch + n_in, ndim))),
  )


def _infer(tree: Any, embeddings: bool = False) -> tuple[list[DimensionNumbers | None], list[str]]:
  """The default reading of each leaf, and the paths of leaves it cannot read.

  Leaves that are never matrices read as ``None``; a 2-D leaf as ``(in, out)``;
  a leaf of more axes as its sibling ``bias`` singles out. A leaf of more axes
  without one is undecidable: stacked layers ``(L, in, out)``, attention
  kernels ``(in, heads, head_dim)`` and convolutions ``(k, in, out)`` all look
  alike.
  """
  with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [path_names(path) for path, _ in with_paths]
  biases = {
    name[:-1]: tuple(leaf.shape)
    for name, (_, leaf) in zip(names, with_paths)
    if name and name[-1] == 'bias' and hasattr(leaf, 'shape')
  }
  readings, undecided = [], []
  for name, (path, leaf) in zip(names, with_paths):
    if _never_a_matrix(name, leaf, embeddings):
      readings.append(None)
    elif leaf.ndim == 2:
      readings.append(DimensionNumbers())
    else:
      bias = biases.get(name[:-1])
      reading = None if bias is None else _read_from_bias(tuple(leaf.shape), bias)
      if reading is None:
        undecided.append(f'{path_str(path)} {tuple(leaf.shape)}')
      readings.append(reading)
  return readings, undecided


def default_mask(params: Any) -> Any:
  """The default choice of leaves for the special (SN/SM, subspace) rule.

  Every leaf read as a matrix by default: the 2-D leaves and the kernels of more
  axes whose sibling ``bias`` tells how they read (stacks of ``nnx.Linear``,
  ``nnx.MultiHeadAttention``, ``nnx.LinearGeneral``, ``nnx.Conv``). Never a
  leaf named ``bias``, ``scale`` or ``embedding``, nor one whose path contains
  ``embed`` (case-insensitive, as in the official code), nor a vector or an empty
  leaf. Kernels of more than 2 axes without a bias are left out (optimizers warn,
  naming them): read an NNX model's with ``nnx_dimension_numbers``, or pass
  ``mask`` and ``dimension_numbers``.

  Args:
    params: A pytree of arrays or ``jax.ShapeDtypeStruct``.

  Returns:
    A pytree of bools with the structure of ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> mask = optax_lean.default_mask({
    ...     'embed': jnp.zeros((10, 4)),
    ...     'dense': {'kernel': jnp.zeros((4, 4)), 'bias': jnp.zeros(4)},
    ...     'stack': {'kernel': jnp.zeros((3, 4, 4)), 'bias': jnp.zeros((3, 4))}})
    >>> mask['dense'], mask['embed'], mask['stack']
    ({'bias': False, 'kernel': True}, False, {'bias': False, 'kernel': True})
  """
  readings, _ = _infer(params)
  treedef = jax.tree.structure(params)
  return jax.tree.unflatten(treedef, [reading is not None for reading in readings])


# Names of a language model's output layer in Flax, Equinox, Haiku and MaxText stacks.
OUTPUT_LAYER_NAMES = (
  'lm_head',
  'head',
  'unembed',
  'unembedding',
  'logits',
  'logits_dense',
  'output',
)


def find_output_layer(
  tree: Any, layouts: Sequence[MatrixLayout | None]
) -> tuple[list[int], list[int]]:
  """The flat indices of the output layer among the matrices ``layouts`` reads.

  A single matrix (no batch axes, not an embedding) named like an output layer
  (``OUTPUT_LAYER_NAMES``, any name on its path); else the single one whose
  output side is an embedding table's vocabulary. Several candidates raise a
  ``ValueError`` naming them.

  Args:
    tree: Parameters or updates.
    layouts: ``resolve_layouts``' result for ``tree``.

  Returns:
    ``(found, candidates)``: at most one index into ``jax.tree.leaves(tree)``,
    and the indices of every matrix that could have been it.
  """
  with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [path_names(path) for path, _ in with_paths]
  embeddings = [i for i, layout in enumerate(layouts) if layout and is_embedding(names[i])]
  candidates = [
    i
    for i, layout in enumerate(layouts)
    if layout is not None and not layout.batch_axes and i not in embeddings
  ]
  vocabularies = {layouts[i].in_size for i in embeddings}
  for rule, found in (
    ('named like one', [i for i in candidates if set(OUTPUT_LAYER_NAMES) & set(names[i])]),
    ('mapping to the vocabulary', [i for i in candidates if layouts[i].out_size in vocabularies]),
  ):
    if len(found) > 1:
      listed = ', '.join(path_str(with_paths[i][0]) for i in found)
      raise ValueError(
        f'output_layer: several leaves could be the output layer ({rule}): {listed}; '
        'name it with output_layer=.'
      )
    if found:
      return found, candidates
  return [], candidates


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, DimensionNumbers)


def broadcast_to_leaves(name: str, prefix: Any, tree: Any, is_leaf=None) -> list[Any]:
  """Broadcasts a prefix tree onto the leaves of ``tree``, in leaf order."""
  try:
    full = jax.tree.map(
      lambda p, sub: jax.tree.map(lambda _: p, sub), prefix, tree, is_leaf=is_leaf
    )
    return jax.tree.structure(tree).flatten_up_to(full)
  except (ValueError, TypeError) as error:
    structure = jax.tree.structure(prefix, is_leaf=is_leaf)
    raise ValueError(
      f'{name} must be a pytree prefix of the params (or a callable returning one); '
      f'got {structure} for params {jax.tree.structure(tree)}.'
    ) from error


def resolve_layouts(
  tree: Any,
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  *,
  allow_vectors: bool = False,
  embeddings: bool = False,
  warn: bool = False,
) -> list[MatrixLayout | None]:
  """The layout of each leaf of ``tree`` that gets the special rule.

  Args:
    tree: Parameters or updates (arrays or shape-dtype structs).
    mask: Which leaves get the special rule: a pytree (or prefix) of bools or
      a callable returning one. ``None``: the leaves ``dimension_numbers``
      reads as matrices when it is given (never biases, scales, embeddings,
      vectors or empty leaves), else ``default_mask``.
    dimension_numbers: How selected leaves read as matrices: one
      ``DimensionNumbers`` for all, a pytree (or prefix) of them (``None``: not
      a matrix), or a callable returning one. ``None`` means the default
      reading (``default_mask``); selected leaves it cannot read take the last
      two axes, any others batch.
    allow_vectors: Whether a selected 1-D leaf is read as one ``(1, n)``
      matrix (for rules that only need its flattened order) rather than
      rejected.
    embeddings: Whether the default selection reads 2-D embedding tables as
      ``(vocabulary, features)`` matrices rather than leaving them out.
    warn: Warn once about each leaf that the default rule cannot read and so
      leaves out (at ``init``).

  Returns:
    A list aligned with ``jax.tree.leaves(tree)``: a ``MatrixLayout`` for each
    selected leaf and ``None`` for the others.
  """
  with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not with_paths:
    return []
  if dimension_numbers is None:
    dims, undecided = _infer(tree, embeddings)
    if mask is None:
      selected = [dim is not None for dim in dims]
      for leaf in undecided if warn else ():
        warn_lib.warn(
          f'optax_lean: cannot tell how the leaf {leaf} reads as a matrix (stacked '
          'layers, attention and convolution kernels look alike without a bias), so it '
          'gets the plain rule; pass dimension_numbers=optax_lean.nnx_dimension_numbers(model) '
          'for an NNX model, or mask= and dimension_numbers=.'
        )
    dims = [DimensionNumbers() if dim is None else dim for dim in dims]
  else:
    if callable(dimension_numbers) and not isinstance(dimension_numbers, DimensionNumbers):
      dimension_numbers = dimension_numbers(tree)
    dims = broadcast_to_leaves('dimension_numbers', dimension_numbers, tree, is_leaf=_is_spec_leaf)
    if mask is None:
      selected = [
        dim is not None and not _never_a_matrix(path_names(path), leaf, embeddings)
        for dim, (path, leaf) in zip(dims, with_paths)
      ]
  if mask is not None:
    mask_tree = mask(tree) if callable(mask) else mask
    selected = broadcast_to_leaves('mask', mask_tree, tree)
  layouts = []
  for (path, leaf), chosen, dim in zip(with_paths, selected, dims):
    shape = tuple(getattr(leaf, 'shape', ()))
    if not chosen or dim is None or math.prod(shape) == 0:
      layouts.append(None)
    elif allow_vectors and len(shape) == 1:
      layouts.append(MatrixLayout.vector(shape))
    else:
      try:
        layouts.append(MatrixLayout.from_dimension_numbers(shape, dim))
      except ValueError as error:
        raise ValueError(f'leaf {path_str(path)}: {error}') from None
  return layouts


def selection_mask(
  tree: Any,
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  *,
  embeddings: bool = False,
) -> Any:
  """A pytree of bools shaped like ``tree``: the leaves ``resolve_layouts`` reads as matrices.

  For chaining a transformation onto exactly the leaves a matrix rule took
  (``optax.masked``, or another rule's ``mask``).
  """
  layouts = resolve_layouts(tree, mask, dimension_numbers, embeddings=embeddings)
  return jax.tree.unflatten(jax.tree.structure(tree), [layout is not None for layout in layouts])
