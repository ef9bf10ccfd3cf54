"""Where each leaf's subspace sits, and the per-leaf operations every method shares.

Subspace-Momentum, GaLore, LDAdam, Online Subspace Descent and the random
subspace method all keep some state for a rank-``r`` subspace of one axis of
each selected matrix. A ``SubspacePlan`` resolves, once per leaf and at trace
time, the leaf's layout, the projector, the projected axis and the (clipped)
rank, and provides the operations they all need: low-rank and projector states
created with the right shardings, the move between a leaf and its
"projected-rows" view ``G_a`` (the projected axis first among the matrix
axes), the dense basis, and a keyed refresh.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal, TypeAlias

import jax
import jax.numpy as jnp

from optax_lean._src import dtypes, sharding, walk
from optax_lean._src import projectors as proj_lib
from optax_lean._src import warn as warn_lib
from optax_lean._src.dimension_numbers import (
  DimensionNumbersOrFn,
  MaskOrFn,
  MatrixLayout,
  path_str,
)
from optax_lean._src.selection import resolve_layouts

# What moments do when the basis changes, one vocabulary for every engine:
# 'keep' them, 'reset' them to zero, 'rotate' them into the new basis, or the
# released SN-SM code's 'official' order (``scale_by_subspace_momentum``).
OnRefresh = Literal['official', 'reset', 'keep', 'rotate']

# When the bases refresh, as optax takes a schedule: a traceable function of
# the 0-based step count returning a scalar bool. The first step always
# refreshes (the bases start at zero).
RefreshSchedule: TypeAlias = Callable[[jax.Array], jax.typing.ArrayLike]


@dataclasses.dataclass(frozen=True)
class SubspacePlan:
  """Where a leaf's subspace sits: its layout, projector, projected axis and rank."""

  layout: MatrixLayout
  projector: proj_lib.Projector
  axis: int
  rank: int

  @classmethod
  def resolve(cls, layout: MatrixLayout, projector: proj_lib.Projector, rank: int) -> SubspacePlan:
    n_in, n_out = layout.in_size, layout.out_size
    return cls(
      layout,
      projector,
      projector.axis(n_in, n_out),
      min(rank, projector.max_rank(n_in, n_out)),
    )

  @property
  def size(self) -> int:
    """Length of the projected axis."""
    return self.layout.matrix_shape[self.axis]

  def lowrank_shape(self) -> tuple[int, ...]:
    """The ``(…, in, out)`` view with the projected axis shrunk to the rank."""
    shape = list(self.layout.matrix_shape)
    shape[self.axis] = self.rank
    return tuple(shape)

  def _matrix_spec(self, like: jax.Array) -> tuple:
    return tuple(self.layout.matrix_spec(sharding.spec_of(like)))

  def lowrank_zeros(self, like: jax.Array, dtype: jax.typing.DTypeLike) -> jax.Array:
    """A zero low-rank state for the leaf ``like``, sharded over all of its mesh axes.

    The kept axis keeps its sharding; a mesh axis of the projected one (or of a
    merged group of axes) moves to the kept axis if it divides it, else to the
    rank axis, so each device holds about ``1 / N`` of the state.
    """
    shape = self.lowrank_shape()
    spec = list(self._matrix_spec(like))
    spec[self.axis] = None
    ndim = len(shape)
    projected, kept = ndim + self.axis, ndim - 3 - self.axis
    order = (kept, projected, *range(ndim - 2))
    spec = sharding.with_spare_axes(tuple(spec), shape, like, order)
    return sharding.zeros(shape, dtype, like, spec)

  def projector_zeros(
    self, like: jax.Array, dtype: jax.typing.DTypeLike | None = None
  ) -> jax.Array:
    """A zero projector state (or one shaped like it, e.g. its optimizer's moments).

    ``dtype`` defaults to ``like``'s; projectors that store integers or keys
    keep their own dtype.
    """
    shape, state_dtype = self.projector.state_shape(self.layout.batch_shape, self.size, self.rank)
    if state_dtype is None:
      state_dtype = like.dtype if dtype is None else dtype
    spec = self._matrix_spec(like)
    state_spec = self.projector.state_spec(spec[:-2], spec[self.axis])
    if self.projector.splits_state:
      order = tuple(range(len(self.layout.batch_shape), len(shape)))
      state_spec = sharding.with_spare_axes(state_spec, shape, like, order)
    return sharding.zeros(shape, state_dtype, like, state_spec)

  def rows(self, g: jax.Array) -> jax.Array:
    """The leaf ``g`` as ``G_a``: ``(…, size, c)`` with the projected axis first."""
    return self.matrix_rows(self.layout.to_matrix(g))

  def unrows(self, g_a: jax.Array) -> jax.Array:
    """The inverse of ``rows``: back to the leaf's own shape."""
    return self.layout.from_matrix(self.matrix_rows(g_a))

  def matrix_rows(self, x: jax.Array) -> jax.Array:
    """A matrix view ``(…, in, out)`` (or a low-rank state) in (or back from) the rows view.

    The projected axis moves to the rows: ``(…, size, c)``, or ``(…, r, c)``
    for a low-rank state. Its own inverse.
    """
    return proj_lib.to_projected_rows(x, self.axis)

  lowrank_rows = matrix_rows

  def basis(self, state: jax.Array, like_a: jax.Array, dtype: jax.typing.DTypeLike) -> jax.Array:
    """The dense basis ``(…, size, r)`` of ``like_a``'s matrices, sharded like their rows.

    ``like_a`` is in the rows view ``(…, size, c)``: the whole leaf, or one
    matrix of a stack with ``state`` its slice.
    """
    spec = sharding.spec_of(like_a)
    basis = self.projector.basis(state, (*like_a.shape[:-2], self.size, self.rank), dtype)
    return sharding.reshard(basis, (*spec[:-2], spec[-2], None))

  def drawn_bases(self, dtype: jax.typing.DTypeLike, states: int):
    """For ``walk.map_matrices``' ``per_round``: the bases of a round, if they are drawn.

    A projector whose basis is a decomposition of a drawn matrix (``'random'``)
    draws the bases of a round of matrices together, one per device; ``None``
    for the others, whose bases are read from their states. The walk's first
    operand is the leaf's matrices and operand ``states`` their projector
    states.
    """
    if not self.projector.basis_is_drawn:
      return None

    def bases(*operands):
      return (self.basis(operands[states], self.matrix_rows(operands[0]), dtype),)

    return bases

  def keys(
    self, seed: int, leaf_index: int, count: jax.Array, layer: jax.Array | None = None
  ) -> jax.Array:
    """One PRNG key per matrix of the leaf (the shape of its batch), unique to leaf and step.

    The key of a stack's matrix folds in its (row-major) position in the
    stack, so a layer updated alone (``update_layer``, whose index is
    ``layer``) draws what it draws in the stack.
    """
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), leaf_index), count)
    batch = self.layout.batch_shape
    count_in_slice = math.prod(batch)
    first = 0 if layer is None else layer * count_in_slice
    if not batch:
      return key if layer is None else jax.random.fold_in(key, first)
    positions = first + jnp.arange(count_in_slice)
    return jax.vmap(lambda p: jax.random.fold_in(key, p))(positions).reshape(batch)

  def refresh(self, g_a: jax.Array, state: jax.Array, keys: jax.Array) -> jax.Array:
    """The projector's new state from ``G_a`` (one key per matrix, see ``keys``)."""
    return self.projector.refresh(g_a, state, self.rank, keys)


def plan_subspaces(
  tree,
  projector: proj_lib.Projector,
  rank: int,
  mask: MaskOrFn | None,
  dimension_numbers: DimensionNumbersOrFn | None,
  *,
  warn: bool = False,
  real_only: str | None = None,
) -> list[SubspacePlan | None]:
  """The subspace plan of each leaf of ``tree`` (``None``: no subspace).

  A rank larger than a matrix allows is clipped, as the official code's
  reduced SVD does. With ``warn`` (at ``init``), that and every leaf the
  default rule cannot read give a ``UserWarning`` naming the leaf, attributed
  to the user's call. ``real_only`` names a method whose subspace rule is
  defined for real matrices only: a complex selected leaf is then refused with
  a ``ValueError`` naming it.
  """
  plans = []
  with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  layouts = resolve_layouts(tree, mask, dimension_numbers, warn=warn)
  for (path, leaf), layout in zip(with_paths, layouts):
    plan = None if layout is None else SubspacePlan.resolve(layout, projector, rank)
    if plan is not None and real_only and dtypes.is_complex(leaf.dtype):
      raise ValueError(
        f'{real_only} supports only real matrices, but the selected leaf '
        f'{path_str(path)} is {leaf.dtype}; leave it out with `mask`.'
      )
    if warn and plan is not None and plan.rank < rank:
      warn_lib.warn(
        f'rank {rank} exceeds what the {projector.name!r} projector allows for the '
        f'leaf {path_str(path)} of shape {layout.shape}; using rank {plan.rank}.'
      )
    plans.append(plan)
  return plans


def refresh_projectors(
  gradients: list[jax.Array],
  states: list[jax.Array | None],
  plans: list[SubspacePlan | None],
  seed: int,
  count: jax.Array,
  layer: jax.Array | None = None,
) -> list[jax.Array | None]:
  """Every leaf's new projector state, the decompositions shared out in rounds.

  Projectors that read the gradient refresh through ``walk.refresh_in_rounds``:
  the selected matrices of the tree, one per device at a time, so that one
  round's gathered matrices and workspace are live at once. The others (keys,
  random coordinates) draw their states for a whole leaf at once. Each matrix
  draws from its own key (``SubspacePlan.keys``, of ``seed``, the leaf's
  position, ``count`` and, for one layer of a stack, ``layer``).

  Args:
    gradients: The gradient leaves (or whatever each projector reads).
    states: Their projector states (``None`` where there is no subspace).
    plans: Their plans.
    seed: The optimizer's seed.
    count: The step folded into the keys.
    layer: The index of a stack's layer updated alone (``update_layer``).

  Returns:
    The new states, in the layouts of the old ones.
  """
  new_states = list(states)
  items, positions = [], []
  devices = max([sharding.device_count(g) for g in gradients] + [1])
  for index, (g, state, plan) in enumerate(zip(gradients, states, plans)):
    if plan is None:
      continue
    keys = plan.keys(seed, index, count, layer)
    g_a = plan.rows(g)
    if not plan.projector.reads_gradient:
      new_states[index] = plan.refresh(g_a, state, keys)
      continue
    batch = len(plan.layout.batch_shape)
    group = (
      plan.projector,
      plan.rank,
      g_a.shape[batch:],
      g_a.dtype,
      state.shape[batch:],
      state.dtype,
    )
    items.append(walk.RefreshItem(g_a, state, keys, plan.refresh, group))
    positions.append(index)
  for index, new in zip(positions, walk.refresh_in_rounds(items, devices)):
    new_states[index] = new
  return new_states


def refresh_due(
  count: jax.Array, update_proj_gap: int | jax.Array | RefreshSchedule, *, offset: int = 0
) -> jax.Array:
  """Whether the projector refreshes at the step with 0-based ``count``.

  At the first step, and then: for an integer gap, whenever
  ``(count + offset) % update_proj_gap == 0``; for a schedule (``RefreshSchedule``),
  whenever it returns true for ``count`` (``offset`` does not apply).
  ``offset=0`` is GaLore's schedule (0-based steps 0, T, 2T, ...: the
  projector sees the counter before its increment); ``offset=1`` is SN-SM's
  (1-based steps 1, T, 2T, ...: the counter after its increment).
  """
  if callable(update_proj_gap):
    due = jnp.asarray(update_proj_gap(count))
    if due.shape != ():
      raise ValueError(
        f'update_proj_gap: a refresh schedule must return a scalar, got shape {due.shape}.'
      )
    return (count == 0) | due.astype(bool)
  return (count == 0) | ((count + offset) % update_proj_gap == 0)
