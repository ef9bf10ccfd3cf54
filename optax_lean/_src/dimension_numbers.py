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


DimensionNumbersOrFn = DimensionNumbers | Any | Callable[[Any], Any]
MaskOrFn = Any | Callable[[Any], Any]


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


def default_mask(params: Any) -> Any:
  """The default choice of leaves for the special (SN/SM, subspace) rule.

  Every 2-D leaf whose path does not contain ``embed`` (case-insensitive), as
  in the official code, which gives all ``nn.Linear`` weights (the output head
  included) the special rule and embeddings and norms the plain one. Stacked
  (scanned) kernels have 3 axes, so they need an explicit ``mask``.

  Args:
    params: A pytree of arrays or ``jax.ShapeDtypeStruct``.

  Returns:
    A pytree of bools with the structure of ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> optax_lean.default_mask({
    ...     'embed': jnp.zeros((10, 4)),
    ...     'dense': {'kernel': jnp.zeros((4, 4)), 'bias': jnp.zeros(4)}})
    {'dense': {'bias': False, 'kernel': True}, 'embed': False}
  """

  def select(path, leaf):
    name = jax.tree_util.keystr(path).lower()
    return getattr(leaf, 'ndim', 0) == 2 and 'embed' not in name

  return jax.tree_util.tree_map_with_path(select, params)


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, DimensionNumbers)


def _broadcast_to_leaves(prefix: Any, tree: Any, is_leaf=None) -> list[Any]:
  """Broadcasts a prefix tree onto the leaves of ``tree``, in leaf order."""
  full = jax.tree.map(lambda p, sub: jax.tree.map(lambda _: p, sub), prefix, tree, is_leaf=is_leaf)
  return jax.tree.structure(tree).flatten_up_to(full)


def resolve_layouts(
  tree: Any,
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  *,
  allow_vectors: bool = False,
) -> list[MatrixLayout | None]:
  """The layout of each leaf of ``tree`` that gets the special rule.

  Args:
    tree: Parameters or updates (arrays or shape-dtype structs).
    mask: Which leaves get the special rule: a pytree (or prefix) of bools or
      a callable returning one. ``None`` means ``default_mask``.
    dimension_numbers: How selected leaves read as matrices: one
      ``DimensionNumbers`` for all, a pytree (or prefix) of them, or a callable
      returning one. ``None`` means the last two axes, any others batch.
    allow_vectors: Whether a selected 1-D leaf is read as one ``(1, n)``
      matrix (for rules that only need its flattened order) rather than
      rejected.

  Returns:
    A list aligned with ``jax.tree.leaves(tree)``: a ``MatrixLayout`` for each
    selected leaf and ``None`` for the others.
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return []
  mask = default_mask if mask is None else mask
  mask_tree = mask(tree) if callable(mask) else mask
  selected = _broadcast_to_leaves(mask_tree, tree)
  if dimension_numbers is None:
    dimension_numbers = DimensionNumbers()
  if callable(dimension_numbers) and not isinstance(dimension_numbers, DimensionNumbers):
    dimension_numbers = dimension_numbers(tree)
  dims = _broadcast_to_leaves(dimension_numbers, tree, is_leaf=_is_spec_leaf)
  layouts = []
  for leaf, chosen, dim in zip(leaves, selected, dims):
    if not chosen or dim is None:
      layouts.append(None)
    elif allow_vectors and leaf.ndim == 1:
      layouts.append(MatrixLayout.vector(tuple(leaf.shape)))
    else:
      layouts.append(MatrixLayout.from_dimension_numbers(tuple(leaf.shape), dim))
  return layouts
