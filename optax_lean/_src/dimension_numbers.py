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


def placed(in_axes: Axes, out_axes: Axes, axes: Sequence[int]) -> DimensionNumbers:
  """The reading of a leaf whose own axes ``0, 1, …`` are its axes ``axes``.

  ``in_axes`` and ``out_axes`` index the leaf's own axes (a layer's kernel);
  ``axes`` says where each of them sits in the stored leaf, whose other axes
  (the layers of a stack) are batch axes.
  """
  where = lambda own: axes_field(tuple(axes[a] for a in ((own,) if isinstance(own, int) else own)))
  return DimensionNumbers(where(in_axes), where(out_axes))


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


def is_tree_function(x: Any) -> bool:
  """Whether a ``mask`` or ``dimension_numbers`` argument is a function of the params.

  A callable that is itself a pytree (an Equinox module holding a mask, which
  is callable for its ``__call__``) is a tree, not a function.
  """
  return callable(x) and jax.tree_util.treedef_is_leaf(jax.tree.structure(x))


def is_spec_leaf(x: Any) -> bool:
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
