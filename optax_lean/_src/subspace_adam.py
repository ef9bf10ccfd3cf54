"""The subspace-Adam engine: Adam on each selected matrix's projection onto a subspace.

GaLore (Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient
Low-Rank Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024; official
code https://github.com/jiaweizzhao/GaLore), Online Subspace Descent (a
learned projector) and the random-subspace method of RSO (a resampled random
projector with restarted moments) are configurations of
``scale_by_subspace_adam``: a projector, a refresh schedule, Adam's flavour
and what the moments do at a refresh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax
from optax import tree as otu

from optax_lean._src import checks, dtypes, leafwise, sharding, walk
from optax_lean._src import projectors as proj_lib
from optax_lean._src.adam import Flavour, adam_step, validate_adam
from optax_lean._src.dimension_numbers import DimensionNumbersOrFn, MaskOrFn
from optax_lean._src.subspace import (
  RefreshSchedule,
  SubspacePlan,
  plan_subspaces,
  refresh_due,
  refresh_projectors,
)


class ScaleBySubspaceAdamState(NamedTuple):
  """State of the subspace-Adam engine (``scale_by_galore``, ``scale_by_random_subspace``).

  Attributes:
    count: Number of updates so far (``shape=(), dtype=int32``).
    mu: Per leaf, Adam's first moment. For a leaf with a subspace it is the
      ``(…, in, out)`` view with the projected axis shrunk to the rank; other
      leaves keep a full moment.
    nu: Per leaf, Adam's second moment, shaped like ``mu``.
    projector: Per leaf with a subspace, the projector's state (a basis, or a
      PRNG key for ``'random'``); ``None`` for the other leaves.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  projector: optax.Updates


def adam_states(
  params: optax.Params,
  plans: list,
  mu_dtype: jax.typing.DTypeLike | None,
  nu_dtype: jax.typing.DTypeLike | None,
  projector_dtype: jax.typing.DTypeLike | None,
) -> tuple[list, list, list]:
  """Per leaf: Adam's two moments and the projector state, as flat lists.

  The moments are low-rank where ``plans`` has a subspace and full
  elsewhere; the projector state is ``None`` where there is no subspace.
  """
  mus, nus, projs = [], [], []
  for p, plan in zip(jax.tree.leaves(params), plans):
    m_dtype = p.dtype if mu_dtype is None else mu_dtype
    v_dtype = dtypes.second_moment_dtype(p.dtype, nu_dtype)
    if plan is None:
      mus.append(otu.zeros_like(p, dtype=m_dtype))
      nus.append(otu.zeros_like(p, dtype=v_dtype))
      projs.append(None)
    else:
      mus.append(plan.lowrank_zeros(p, m_dtype))
      nus.append(plan.lowrank_zeros(p, v_dtype))
      projs.append(plan.projector_zeros(p, projector_dtype))
  return mus, nus, projs


def adam_matrix_step(
  g_a: jax.Array,
  mu_a: jax.Array,
  nu_a: jax.Array,
  basis: jax.Array,
  count_inc: jax.Array,
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  flavour: Flavour,
  scale: jax.typing.ArrayLike,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""One matrix's subspace-Adam step.

  .. math::
    R = B^\top G_a, \qquad (d, m, v) = \mathrm{Adam}(R, m, v), \qquad
    u = \alpha B d.

  Args:
    g_a: The gradient in the rows view ``(…, size, c)``.
    mu_a: First moment ``(…, r, c)``, in its storage dtype.
    nu_a: Second moment, shaped like ``mu_a``.
    basis: The basis ``(…, size, r)``, in the gradient's dtype.
    count_inc: The 1-based step of Adam's bias corrections.
    b1: First-moment decay.
    b2: Second-moment decay.
    eps: Adam's offset.
    flavour: ``'hf'`` or ``'torch'`` (``adam.adam_step``).
    scale: :math:`\alpha`.

  Returns:
    ``(u, m, v)`` in the compute dtype.
  """
  dtype = dtypes.compute_dtype(g_a.dtype, mu_a.dtype, nu_a.dtype)
  projected = proj_lib.project(g_a, basis, dtype, like=mu_a)
  direction, mu_a, nu_a = adam_step(projected, mu_a, nu_a, count_inc, b1, b2, eps, flavour)
  full = proj_lib.back_project(direction.astype(g_a.dtype), basis, g_a, dtype)
  return jnp.asarray(scale, dtype) * full, mu_a, nu_a


Output = Literal['back_project', 'channel', 'tensor']


def scaled_gradient_step(
  g_a: jax.Array,
  mu_a: jax.Array,
  nu_a: jax.Array,
  basis: jax.Array,
  count_inc: jax.Array,
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  flavour: Flavour,
  output: Output,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""One matrix's step that scales the full gradient by ratios estimated in the subspace.

  With :math:`R = B^\top G_a`, Adam's moments of :math:`R` and their
  direction :math:`\tilde R`,

  .. math::
    s_j = \frac{\|\tilde R_{:, j}\|}{\|R_{:, j}\| + 10^{-8}}, \qquad
    u = G_a \,\mathrm{diag}(s)

  for ``'channel'`` (one factor per column of the rows view, the axis the
  subspace keeps), or one factor :math:`\|\tilde R\|_F / (\|R\|_F + 10^{-8})`
  for ``'tensor'``: APOLLO's and APOLLO-Mini's rule. The ``'hf'`` flavour
  takes :math:`\tilde R = m / (\sqrt{v} + \epsilon)` uncorrected, its bias
  correction folded into a step size the caller applies (the official code);
  ``'torch'`` takes the bias-corrected direction (the paper's AdamW).

  Args:
    g_a: The gradient in the rows view ``(…, size, c)``.
    mu_a: First moment ``(…, r, c)``, in its storage dtype.
    nu_a: Second moment, shaped like ``mu_a``.
    basis: The basis ``(…, size, r)``, in the gradient's dtype.
    count_inc: The 1-based step of the bias corrections.
    b1: First-moment decay.
    b2: Second-moment decay.
    eps: Adam's offset, in the ``flavour``'s place.
    flavour: ``'hf'`` (uncorrected ratios) or ``'torch'`` (corrected).
    output: ``'channel'`` or ``'tensor'``.

  Returns:
    ``(u, m, v)`` in the compute dtype.
  """
  dtype = dtypes.compute_dtype(g_a.dtype, mu_a.dtype, nu_a.dtype)
  real = dtypes.real_dtype(dtype)
  projected = proj_lib.project(g_a, basis, dtype, like=mu_a)
  direction, mu_a, nu_a = adam_step(
    projected, mu_a, nu_a, count_inc, b1, b2, eps, flavour, correct_bias=flavour == 'torch'
  )
  axes = (-2,) if output == 'channel' else (-2, -1)
  norm = lambda x: jnp.sqrt(jnp.sum(dtypes.abs_sq(x), axis=axes, keepdims=True))
  factor = norm(direction) / (norm(projected) + jnp.asarray(1e-8, real))
  return g_a.astype(dtype) * factor.astype(dtype), mu_a, nu_a


# A per-matrix reading of the gradient taken during the walk, before the
# gradient's buffer takes the update: ``(g_a, basis, projector_state) -> array``.
Observe = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SubspaceAdam:
  """The subspace-Adam engine: its configuration, ``init`` and ``update``.

  ``scale_by_subspace_adam`` wraps it as an optax transformation; a method
  that reads more of each matrix (Online Subspace Descent's online PCA)
  calls ``update`` with an ``observe`` function.
  """

  b1: jax.typing.ArrayLike
  b2: jax.typing.ArrayLike
  eps: jax.typing.ArrayLike
  rank: int
  update_proj_gap: int | RefreshSchedule | None
  scale: jax.typing.ArrayLike
  projector: proj_lib.Projector
  flavour: Flavour = 'hf'
  moments_on_refresh: Literal['keep', 'reset'] = 'keep'
  output: Output = 'back_project'
  mask: MaskOrFn | None = None
  dimension_numbers: DimensionNumbersOrFn | None = None
  mu_dtype: jax.typing.DTypeLike | None = None
  nu_dtype: jax.typing.DTypeLike | None = None
  projector_dtype: jax.typing.DTypeLike | None = None
  seed: int = 0
  real_only: str | None = None

  def plans(self, tree: Any, warn: bool = False) -> list[SubspacePlan | None]:
    return plan_subspaces(
      tree,
      self.projector,
      self.rank,
      self.mask,
      self.dimension_numbers,
      warn=warn,
      real_only=self.real_only,
    )

  def refreshes(self, count: jax.Array) -> jax.Array:
    """Whether the projectors refresh at the step with 0-based ``count``."""
    if self.update_proj_gap is None:
      return count == 0
    return refresh_due(count, self.update_proj_gap)

  def init(self, params: optax.Params) -> ScaleBySubspaceAdamState:
    params = dtypes.as_arrays(params)
    states = adam_states(
      params, self.plans(params, warn=True), self.mu_dtype, self.nu_dtype, self.projector_dtype
    )
    treedef = jax.tree.structure(params)
    return ScaleBySubspaceAdamState(
      jnp.zeros([], jnp.int32), *(jax.tree.unflatten(treedef, xs) for xs in states)
    )

  def update(
    self,
    updates: optax.Updates,
    state: ScaleBySubspaceAdamState,
    *,
    layer: jax.Array | None = None,
    observe: Observe | None = None,
  ) -> tuple[optax.Updates, ScaleBySubspaceAdamState, list[jax.Array | None]]:
    """The updates, the new state, and per leaf what ``observe`` read of it (or ``None``).

    The projectors of the whole tree refresh in one ``jax.lax.cond``; then
    each selected leaf is walked matrix by matrix, its update overwriting
    its gradient where the dtypes allow.
    """
    updates = dtypes.as_arrays(updates)
    count, count_inc = state.count, optax.safe_increment(state.count)
    restart = self.moments_on_refresh == 'reset'
    leaf_plans = self.plans(updates)
    leaves, treedef = jax.tree.flatten(updates)
    flat = lambda tree: treedef.flatten_up_to(tree)
    mus, nus, projs = flat(state.mu), flat(state.nu), flat(state.projector)
    # Only the bases go through the cond: moments passed through it would be
    # copied; a reset happens matrix by matrix in the walk below.
    refreshed = self.refreshes(count)
    projs = jax.lax.cond(
      refreshed,
      lambda projs: refresh_projectors(leaves, projs, leaf_plans, self.seed, count_inc, layer),
      lambda projs: projs,
      projs,
    )
    # A fresh Adam per subspace counts its steps from the last refresh.
    adam_count = count % self.update_proj_gap + 1 if restart else count_inc
    observed = [None] * len(leaves)

    def update_leaf(index, g, mu, nu, proj_state, plan):
      if plan is None:
        return (*adam_step(g, mu, nu, count_inc, self.b1, self.b2, self.eps, self.flavour), None)

      def matrix(g_m, mu_m, nu_m, state_m, basis=None):
        g_a, mu_a, nu_a = (plan.matrix_rows(x) for x in (g_m, mu_m, nu_m))
        if basis is None:
          basis = plan.basis(state_m, g_a, g.dtype)
        if restart:
          mu_a, nu_a = (jnp.where(refreshed, jnp.zeros_like(x), x) for x in (mu_a, nu_a))
        if self.output == 'back_project':
          config = (self.b1, self.b2, self.eps, self.flavour, self.scale)
          update, mu_a, nu_a = adam_matrix_step(g_a, mu_a, nu_a, basis, adam_count, *config)
        else:
          config = (self.b1, self.b2, self.eps, self.flavour, self.output)
          update, mu_a, nu_a = scaled_gradient_step(g_a, mu_a, nu_a, basis, adam_count, *config)
        outputs = (
          plan.matrix_rows(update),
          plan.matrix_rows(mu_a.astype(mu.dtype)),
          plan.matrix_rows(nu_a.astype(nu.dtype)),
        )
        return outputs if observe is None else (*outputs, observe(g_a, basis, state_m))

      in_place = dtypes.compute_dtype(g.dtype, mu.dtype, nu.dtype) == g.dtype
      update, mu, nu, *seen = walk.map_matrices(
        matrix,
        plan.layout.batch_shape,
        (plan.layout.to_matrix(g), mu, nu, proj_state),
        into={0: 0, 1: 1, 2: 2} if in_place else {1: 1, 2: 2},
        per_round=plan.drawn_bases(g.dtype, states=3),
        devices=sharding.device_count(g),
      )
      if seen:
        observed[index] = seen[0]
      return plan.layout.from_matrix(update), mu, nu, proj_state

    unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
    outputs, fields = leafwise.map_leaves(
      update_leaf,
      updates,
      tuple(map(unflatten, (mus, nus, projs))),
      leaf_plans,
      in_sequence=leafwise.gated(leaf_plans),
    )
    return outputs, ScaleBySubspaceAdamState(count_inc, *fields), observed


def subspace_adam(
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  rank: int,
  update_proj_gap: int | RefreshSchedule | None,
  scale: jax.typing.ArrayLike,
  projector: proj_lib.Projector,
  **options: Any,
) -> SubspaceAdam:
  """The engine of ``scale_by_subspace_adam`` (same arguments), validated."""
  checks.positive_int('rank', rank)
  moments_on_refresh = options.get('moments_on_refresh', 'keep')
  checks.one_of('moments_on_refresh', moments_on_refresh, ('keep', 'reset'))
  checks.one_of('output', options.get('output', 'back_project'), get_args(Output))
  if moments_on_refresh == 'reset':
    # A fresh Adam per subspace counts its steps from the last refresh: a period.
    checks.positive_count('update_proj_gap', update_proj_gap)
  elif update_proj_gap is not None:
    checks.refresh_gap('update_proj_gap', update_proj_gap)
  validate_adam(b1, b2, eps)
  return SubspaceAdam(b1, b2, eps, rank, update_proj_gap, scale, projector, **options)


def scale_by_subspace_adam(
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  rank: int,
  update_proj_gap: int | RefreshSchedule | None,
  scale: jax.typing.ArrayLike,
  projector: proj_lib.Projector,
  *,
  flavour: Flavour = 'hf',
  moments_on_refresh: Literal['keep', 'reset'] = 'keep',
  output: Output = 'back_project',
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  projector_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
  real_only: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Adam inside a subspace of each selected matrix, plain Adam elsewhere.

  The shared engine of ``scale_by_galore``, ``scale_by_random_subspace`` and
  ``scale_by_online_subspace_descent``: for a selected leaf, the projector is
  refreshed (under one ``jax.lax.cond`` on the scalar count, for the whole
  tree) at 0-based steps ``0, T, 2T, ...`` (only step 0 when
  ``update_proj_gap`` is ``None``), Adam runs on :math:`R = B^\top G`
  (``adam_matrix_step``, one matrix at a time), and the direction is
  ``scale * B d``.

  Args:
    b1: First-moment decay.
    b2: Second-moment decay.
    eps: Adam's offset, in the ``flavour``'s place.
    rank: The subspace rank (clipped, with a warning, to each matrix's limit).
    update_proj_gap: Steps between refreshes, a schedule (a function of the
      0-based step count that says whether to refresh; not with
      ``moments_on_refresh='reset'``), or ``None`` for a projector set at the
      first step only.
    scale: Factor on the back-projected direction of selected leaves.
    projector: A ``Projector``.
    flavour: ``'hf'`` or ``'torch'`` Adam (see ``optax_lean._src.adam``).
    moments_on_refresh: ``'keep'`` the moments as they are when the basis
      changes (GaLore), or ``'reset'`` them to zero and restart their bias
      correction: a fresh Adam per subspace (RSO). The names are those of
      ``scale_by_subspace_momentum``'s ``momentum_on_refresh``.
    output: What a selected matrix's update is: ``'back_project'``, the
      direction ``scale * B d`` (GaLore), or the full gradient scaled by ratios
      estimated in the subspace (``scaled_gradient_step``), one per
      ``'channel'`` or one per ``'tensor'`` (APOLLO, APOLLO-Mini; with the
      ``'hf'`` flavour the caller applies the bias correction).
    mask: Leaves that get a subspace (default: ``default_mask``).
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: First-moment dtype (default: the leaf's).
    nu_dtype: Second-moment dtype (default: the leaf's, real for
      complex leaves).
    projector_dtype: Stored-basis dtype (default: the leaf's).
    seed: Seed of random projectors.
    real_only: The name of a method whose subspace rule needs real matrices:
      a selected complex leaf is then refused with a ``ValueError`` naming it.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  engine = subspace_adam(
    b1,
    b2,
    eps,
    rank,
    update_proj_gap,
    scale,
    projector,
    flavour=flavour,
    moments_on_refresh=moments_on_refresh,
    output=output,
    mask=mask,
    dimension_numbers=dimension_numbers,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
    projector_dtype=projector_dtype,
    seed=seed,
    real_only=real_only,
  )

  def update_fn(updates, state, params=None, *, layer=None, **extra_args):
    del params, extra_args
    outputs, state, _ = engine.update(updates, state, layer=layer)
    return outputs, state

  return optax.GradientTransformationExtraArgs(engine.init, update_fn)
