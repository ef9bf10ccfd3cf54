"""Which leaves get a matrix rule, and how each of them reads as a matrix.

With no ``mask`` and no ``dimension_numbers``, every optimizer reads the tree
it is given, leaf by leaf:

- never a matrix: a vector or an empty leaf, a leaf named ``bias``, ``scale``,
  ``offset`` or ``embedding`` (or Haiku's bias ``b`` beside its ``w``), or one
  whose path contains ``embed``;
- a leaf of a node that knows its layout (an Equinox layer, a Linen or NNX
  parameter with axis names, a haliax array; ``library_layouts``) reads as
  that node says;
- otherwise the leaf's own axes (without the axes ``hk.layer_stack`` or a
  named stack added) read as ``(in, out)`` when there are two, and as a
  sibling bias singles out when there are more; other leaves are undecided,
  and the optimizer warns, naming the helper for the tree it sees.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import jax

from optax_lean._src import warn as warn_lib
from optax_lean._src.axis_names import AXIS_ROLES
from optax_lean._src.dimension_numbers import (
  DimensionNumbers,
  DimensionNumbersOrFn,
  MaskOrFn,
  MatrixLayout,
  axes_field,
  broadcast_to_leaves,
  is_embedding,
  is_spec_leaf,
  is_tree_function,
  path_names,
  path_str,
  placed,
)
from optax_lean._src.library_layouts import (
  is_known_node,
  layer_stack_axes,
  node_readings,
)

NOT_MATRICES = ('bias', 'scale', 'offset', 'embedding')
BIASES = ('bias', 'b')  # Haiku's hk.Linear and hk.Conv name theirs 'b', beside 'w'


def never_a_matrix(names: tuple[str, ...], leaf: Any, embeddings: bool = False) -> bool:
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


def _without(shape: tuple[int, ...], axes: set[int]) -> tuple[int, ...]:
  return tuple(size for axis, size in enumerate(shape) if axis not in axes)


def _plain_reading(
  shape: tuple[int, ...], bias: tuple[int, ...] | None, stack: set[int]
) -> DimensionNumbers | None:
  """A kernel's reading from its own axes (``shape`` without the ``stack`` axes) and bias."""
  own_axes = [axis for axis in range(len(shape)) if axis not in stack]
  if len(own_axes) < 2:
    return None
  if len(own_axes) == 2:
    own = DimensionNumbers(0, 1)
  elif bias is None:
    return None
  else:
    own = _read_from_bias(_without(shape, stack), _without(bias, stack))
    if own is None:
      return None
  return placed(own.reduction_axis, own.output_axis, own_axes)


def _flatten_known(tree: Any) -> list[tuple[tuple[Any, ...], Any, Any]]:
  """``(path, leaf, reading)`` of each leaf; ``reading`` is ``None`` outside a known node."""
  entries = []
  for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_known_node)[0]:
    if not is_known_node(node):
      entries.append((path, node, None))
      continue
    readings = node_readings(node, AXIS_ROLES)
    for (sub, leaf), reading in zip(jax.tree_util.tree_flatten_with_path(node)[0], readings):
      entries.append((path + sub, leaf, reading))
  return entries


def _hint(tree: Any, named: bool) -> str:
  """The helper that reads the leaves of ``tree`` the default cannot."""
  if named:
    return (
      'map its axis names to roles with dimension_numbers='
      'optax_lean.axis_names_dimension_numbers(names, roles={...})'
    )
  nnx = sys.modules.get('flax.nnx')
  if nnx is not None:
    is_variable = lambda x: isinstance(x, nnx.Variable)
    if any(map(is_variable, jax.tree.leaves(tree, is_leaf=is_variable))):
      return 'pass dimension_numbers=optax_lean.nnx_dimension_numbers(model)'
  return (
    "pass dimension_numbers=optax_lean.stacked_dimension_numbers({'<name>': <axis>}) with the "
    'name on its path that its layers are stacked under'
  )


def infer(
  tree: Any, embeddings: bool = False, stacks: Mapping[str, int] | None = None
) -> tuple[list[DimensionNumbers | None], list[tuple[str, bool]]]:
  """The default reading of each leaf, and the leaves it cannot read.

  Args:
    tree: Parameters or updates.
    embeddings: Whether 2-D embedding tables read as ``(vocabulary, features)``.
    stacks: Names on a leaf's path, mapped to the axis their layers stack on.

  Returns:
    ``(readings, undecided)``: a ``DimensionNumbers`` or ``None`` per leaf, and
    ``(description, named)`` of each leaf that looks like a matrix but does
    not read as one (``named``: its axis names are known but do not read).
  """
  entries = _flatten_known(tree)
  names = [path_names(path) for path, _, _ in entries]
  parents = {}
  for name, (_, leaf, _) in zip(names, entries):
    parents.setdefault(name[:-1], {})[name[-1] if name else ''] = leaf
  readings, undecided = [], []
  for name, (path, leaf, known) in zip(names, entries):
    siblings = parents[name[:-1]]
    haiku_bias = bool(name) and name[-1] == 'b' and 'w' in siblings
    if never_a_matrix(name, leaf, embeddings) or haiku_bias:
      readings.append(None)
      continue
    shape = tuple(leaf.shape)
    reading = None if known is None else known.dimension_numbers
    if known is not None and known.embedding and not embeddings:
      reading = None
    elif known is None or known.undecided:  # axis names that do not read fall back to the shape
      scopes = {scope for key in name[:-1] for scope in key.split('/')}  # Haiku's 'a/b' scopes
      stack = set(range(layer_stack_axes(name)))
      stack.update(axis for key, axis in (stacks or {}).items() if key in scopes)
      bias = next((siblings[b] for b in BIASES if b in siblings and siblings[b] is not leaf), None)
      bias_shape = None if bias is None else tuple(getattr(bias, 'shape', ()))
      reading = _plain_reading(shape, bias_shape, stack)
      if reading is None:
        undecided.append((f'{path_str(path)} {shape}', known is not None))
    readings.append(reading)
  return readings, undecided


def default_mask(params: Any) -> Any:
  """The default choice of leaves for the special (SN/SM, subspace) rule.

  Every leaf read as a matrix by default: the 2-D leaves; the kernels of more
  axes whose sibling ``bias`` tells how they read (stacks of ``nnx.Linear``,
  ``nnx.MultiHeadAttention``, ``nnx.LinearGeneral``, ``nnx.Conv``); the weights
  of Equinox's ``Linear`` and ``Conv`` (stacked by ``eqx.filter_vmap`` or not);
  Haiku's ``w`` under ``hk.layer_stack``; and parameters whose axis names read
  as a matrix (Linen's ``nn.Partitioned`` boxes as MaxText builds them, NNX's
  ``out_sharding`` metadata, haliax's ``NamedArray``; see
  ``axis_names_dimension_numbers``). Never a leaf named ``bias``, ``scale``,
  ``offset`` or ``embedding``, nor one whose path contains ``embed``
  (case-insensitive, as in the official code), nor a vector or an empty leaf.
  Other kernels of more than 2 axes are left out (optimizers warn, naming them
  and the helper that reads them: ``nnx_dimension_numbers``,
  ``stacked_dimension_numbers`` or ``axis_names_dimension_numbers``).

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
  readings, _ = infer(params)
  treedef = jax.tree.structure(params)
  return jax.tree.unflatten(treedef, [reading is not None for reading in readings])


def stacked_dimension_numbers(stacks: Mapping[str, int]) -> Any:
  """The default reading, with the layers stacked under the named modules.

  A scanned model keeps each block parameter as one leaf with a layer axis,
  which its shape alone does not show: a bias-free ``(layers, in, out)`` looks
  like an attention kernel ``(in, heads, head_dim)``. Flax Linen's ``nn.scan``
  puts the layer axis where ``variable_axes={'params': axis}`` says, under the
  scanned module's name; ``hk.vmap`` and hand-written stacks do the same. Name
  that module here, and each leaf under it reads as the default reads the same
  leaf without those axes: ``(in, out)`` for a 2-D kernel, as a sibling bias
  singles out for more axes.

  Args:
    stacks: A mapping from a name on the leaves' path (a module, a
      collection) to the axis their layers are stacked on (non-negative; a
      leaf under several names has several stack axes).

  Returns:
    A callable from a parameter tree to a tree of ``DimensionNumbers`` or
    ``None``, for ``dimension_numbers=``; leaves it reads as ``None`` get the
    plain rule.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> params = {'layers': {'Dense_0': {'kernel': jnp.zeros((3, 8, 4))}},
    ...           'head': {'kernel': jnp.zeros((4, 10))}}
    >>> fn = optax_lean.stacked_dimension_numbers({'layers': 0})
    >>> fn(params)['layers']['Dense_0']['kernel']
    DimensionNumbers(reduction_axis=1, output_axis=2)
    >>> tx = optax_lean.adamsnsm(1e-2, rank=2, dimension_numbers=fn)
    >>> state = tx.init(params)
    >>> state[0].numerator.projector['layers']['Dense_0']['kernel'].shape  # a basis per layer
    (3, 4, 2)
  """
  if not isinstance(stacks, Mapping) or not all(
    isinstance(axis, int) and axis >= 0 for axis in stacks.values()
  ):
    raise ValueError(
      f'stacks must map names to non-negative axes, like {{"layers": 0}}; got {stacks!r}.'
    )
  stacks = dict(stacks)

  def dimension_numbers(tree: Any) -> Any:
    readings, _ = infer(tree, stacks=stacks)
    return jax.tree.unflatten(jax.tree.structure(tree), readings)

  return dimension_numbers


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
    dims, undecided = infer(tree, embeddings)
    if mask is None:
      selected = [dim is not None for dim in dims]
      for leaf, named in undecided if warn else ():
        warn_lib.warn(
          f'optax_lean: cannot tell how the leaf {leaf} reads as a matrix (stacked '
          'layers, attention and convolution kernels look alike without a bias), so it '
          f'gets the plain rule; {_hint(tree, named)}, or pass mask= and dimension_numbers=.'
        )
    dims = [DimensionNumbers() if dim is None else dim for dim in dims]
  else:
    if is_tree_function(dimension_numbers):
      dimension_numbers = dimension_numbers(tree)
    dims = broadcast_to_leaves('dimension_numbers', dimension_numbers, tree, is_leaf=is_spec_leaf)
    if mask is None:
      selected = [
        dim is not None and not never_a_matrix(path_names(path), leaf, embeddings)
        for dim, (path, leaf) in zip(dims, with_paths)
      ]
  if mask is not None:
    mask_tree = mask(tree) if is_tree_function(mask) else mask
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
  complement: bool = False,
) -> Any:
  """A pytree of bools shaped like ``tree``: the leaves ``resolve_layouts`` reads as matrices.

  For chaining a transformation onto exactly the leaves a matrix rule took
  (``optax.masked``, or another rule's ``mask``), or, with ``complement``, onto
  the others.
  """
  layouts = resolve_layouts(tree, mask, dimension_numbers, embeddings=embeddings)
  chosen = [(layout is not None) != complement for layout in layouts]
  return jax.tree.unflatten(jax.tree.structure(tree), chosen)
