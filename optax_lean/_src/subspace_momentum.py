"""Subspace-Momentum (SM): momentum kept only inside a rank-r subspace.

Nguyen & Nguyen, `Lean and Mean Adaptive Optimization via Subset-Norm and
Subspace-Momentum with Convergence Guarantees <https://arxiv.org/abs/2411.07120>`_,
ICML 2025; official code https://github.com/timmytonga/sn-sm
(``subspace_momentum.py``, ``projectors/``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax
from optax import tree as otu

from optax_lean._src import checks, dtypes, leafwise, sharding, walk
from optax_lean._src import projectors as proj_lib
from optax_lean._src.dimension_numbers import DimensionNumbersOrFn, MaskOrFn
from optax_lean._src.subspace import (
  OnRefresh,
  RefreshSchedule,
  SubspacePlan,
  plan_subspaces,
  refresh_due,
  refresh_projectors,
)

# What the leaves without a subspace get: a full momentum, or nothing.
OtherLeaves = Literal['momentum', 'pass']


class ScaleBySubspaceMomentumState(NamedTuple):
  """State of ``scale_by_subspace_momentum``.

  Attributes:
    count: Number of updates so far (``shape=(), dtype=int32``).
    mu: Per leaf, the momentum. For a leaf with the rule it lives in the
      subspace: its ``(…, in, out)`` view with the projected axis shrunk to the
      rank. Other leaves keep a full exponential moving average.
    projector: Per leaf with the rule, the projector's state (a basis, a PRNG
      key or indices, see ``Projector``); ``None`` for the other leaves.
  """

  count: jax.Array
  mu: optax.Updates
  projector: optax.Updates


def momentum_step(
  g_a: jax.Array,
  mu_a: jax.Array,
  basis: jax.Array,
  b1: jax.typing.ArrayLike,
  reset: jax.Array,
  orthogonal_scale: jax.typing.ArrayLike | None = None,
  divide_residual: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
  r"""One matrix's subspace-momentum step.

  .. math::
    R = B^\top G_a, \qquad m \leftarrow \beta_1 m + (1 - \beta_1) R,
    \qquad N = G_a + B (m - R),

  the momentum inside the subspace and the gradient outside it. With an
  ``orthogonal_scale`` :math:`c`, the momentum's place in the subspace goes to
  :math:`c` times its polar factor (``projectors.orthogonal_factor``, SUMO's
  exact orthogonalisation): :math:`N = G_a + B (c\,U V^\top - R)` where
  :math:`m = U \Sigma V^\top`; ``divide_residual`` then divides the part
  outside the subspace alone: :math:`N = c\,B U V^\top + D(G_a - B R)`.

  Args:
    g_a: The gradient in the rows view ``(…, size, c)``.
    mu_a: The momentum ``(…, r, c)``, in its storage dtype.
    basis: The basis ``(…, size, r)``, in the gradient's dtype.
    b1: Momentum decay.
    reset: Whether the stored momentum is zeroed after this step (the
      official code's refresh quirk).
    orthogonal_scale: ``None`` (the momentum itself), or the factor on the
      momentum's polar factor.
    divide_residual: With ``orthogonal_scale``, a function applied to
      :math:`G_a - B R` (in the rows view) before the polar part is added.

  Returns:
    ``(N, m)``: the numerator and the new momentum (zero where ``reset``), in
    the compute dtype.
  """
  dtype = dtypes.compute_dtype(g_a.dtype, mu_a.dtype)
  projected = proj_lib.project(g_a, basis, dtype, like=mu_a)
  decay = jnp.asarray(b1, dtypes.real_dtype(dtype)).astype(dtype)
  momentum = decay * mu_a.astype(dtype) + (1 - decay) * projected
  back = lambda x: proj_lib.back_project(x.astype(g_a.dtype), basis, g_a, dtype)
  if orthogonal_scale is None:
    numerator = g_a.astype(dtype) + back(momentum - projected)
  else:
    polar = jnp.asarray(orthogonal_scale, dtype) * proj_lib.orthogonal_factor(momentum)
    if divide_residual is None:
      numerator = g_a.astype(dtype) + back(polar - projected)
    else:
      residual = divide_residual(g_a.astype(dtype) - back(projected))
      numerator = residual.astype(dtype) + back(polar)
  return numerator, jnp.where(reset, jnp.zeros_like(momentum), momentum)


def rotate_momentum(
  plan: SubspacePlan, g: jax.Array, mu: jax.Array, old: jax.Array, new: jax.Array
) -> jax.Array:
  r"""A leaf's low-rank momentum carried from the ``old`` basis to the ``new`` one.

  :math:`m \leftarrow B_{new}^\top B_{old} m`, one matrix at a time; ``g``
  only lends its shape and layout to the bases.
  """

  def matrix(g_m, mu_m, old_m, new_m):
    g_a, mu_a = plan.matrix_rows(g_m), plan.matrix_rows(mu_m)
    dtype = dtypes.compute_dtype(g.dtype, mu.dtype)
    rotation = proj_lib.change_of_basis(
      plan.basis(new_m, g_a, dtype), plan.basis(old_m, g_a, dtype), dtype
    )
    rotated = proj_lib.rotate(rotation, mu_a.astype(dtype), like=mu_a)
    return (plan.matrix_rows(rotated.astype(mu.dtype)),)

  operands = (plan.layout.to_matrix(g), mu, old, new)
  return walk.map_matrices(matrix, plan.layout.batch_shape, operands, into={0: 1})[0]


def scale_by_subspace_momentum(
  b1: jax.typing.ArrayLike = 0.9,
  rank: int | None = None,
  update_proj_gap: int | RefreshSchedule = 200,
  projector: str | proj_lib.Projector = 'auto',
  *,
  momentum_on_refresh: OnRefresh = 'official',
  bias_correction: bool = False,
  orthogonalize: bool = False,
  consistent_rms: jax.typing.ArrayLike | None = None,
  other_leaves: OtherLeaves = 'momentum',
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  projector_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Momentum inside a rank-``r`` subspace, plain gradient outside it.

  For a matrix gradient :math:`G_t` and a basis :math:`B` (``size x r``,
  orthonormal columns) of one of its axes, refreshed every
  ``update_proj_gap`` steps:

  .. math::
    R_t = B^\top G_t, \qquad m_t = \beta_1 m_{t-1} + (1 - \beta_1) R_t,
    \qquad N_t = B m_t + (G_t - B R_t).

  The momentum costs :math:`r \cdot \max(m, n)` numbers instead of
  :math:`mn`; the orthogonal complement gets plain SGD. With
  ``bias_correction`` the whole :math:`N_t` is divided by
  :math:`1 - \beta_1^t`, as in the official code. Leaves without the rule
  (see ``mask``) get a full momentum :math:`N_t = m_t`, or pass unchanged
  with no state (``other_leaves='pass'``, for another transformation to
  take them).

  With ``orthogonalize`` (SUMO), the momentum's place in the subspace goes to
  its polar factor, computed exactly by the SVD of the small ``r x n``
  matrix: :math:`N_t = c\,B\,U V^\top + (G_t - B R_t)` where :math:`m_t = U
  \Sigma V^\top`, and :math:`c = \rho \sqrt{\max(m, n)}` with
  ``consistent_rms`` :math:`\rho` (Moonlight's matching of AdamW's update
  RMS), or 1.

  The step count ``t`` starts at 1. The projector is refreshed at ``t = 1``
  and whenever ``t % update_proj_gap == 0``, inside ``jax.lax.cond`` on the
  scalar count. What the momentum does at a refresh (``momentum_on_refresh``):

  - ``'official'``: the official code's quirk. At a refresh with ``t > 1``
    this step's numerator still uses the old momentum (whose coordinates
    belong to the old basis), and the stored momentum is then zeroed.
  - ``'reset'``: zeroed before this step's update.
  - ``'keep'``: carried over unchanged (the official ``overlap_state``).
  - ``'rotate'``: carried into the new basis, :math:`m \leftarrow
    B_{new}^\top B_{old} m`. With a full rank this equals momentum without
    projection.

  Args:
    b1: Momentum decay, in ``[0, 1)``. With ``b1 = 0`` (and no
      ``orthogonalize``) there is no state and the gradient passes through.
    rank: ``None`` (default: 128) or the subspace rank ``r >= 1``, clipped
      (with a warning) to what each matrix allows: ``min(in, out)`` for the
      SVD family, ``max(in, out)`` for coordinate subsets.
    update_proj_gap: Steps between refreshes, ``>= 1``, or a
      schedule: a function of the 0-based step count (``t - 1``) that says
      whether to refresh (the first step always does).
    projector: ``'auto'`` (default: ``'svd'`` on CPU, ``'randomized_svd'``
      on GPU and TPU, see ``get_projector``), ``'svd'`` (exact,
      sign-canonicalised), ``'randomized_svd'`` (a range finder, much
      cheaper), ``'random'`` (a seeded orthonormal
      Gaussian basis; only a key is stored), ``'uniform'`` or ``'topk'``
      (coordinate subsets of the larger axis), or a ``Projector``.
    momentum_on_refresh: ``'official'``, ``'reset'``, ``'keep'`` or
      ``'rotate'`` (see above).
    bias_correction: Divide by :math:`1 - \beta_1^t` (with ``orthogonalize``,
      the part outside the subspace only, as a divisor of ``scale_by_ratio``).
    orthogonalize: Replace the momentum in the subspace by its polar factor.
    consistent_rms: With ``orthogonalize``, :math:`\rho > 0` of the factor
      :math:`\rho \sqrt{\max(m, n)}` on the polar factor; ``None``: 1.
    other_leaves: What leaves without the rule get: ``'momentum'`` (a full
      momentum) or ``'pass'`` (unchanged, no state).
    mask: Which leaves get the subspace: a pytree (or prefix) of bools, or a
      callable returning one. Default: ``default_mask``, the linear
      kernels.
    dimension_numbers: How selected leaves read as ``(…, in, out)``; see
      ``DimensionNumbers``. Default: the last two axes, leading axes batch.
    mu_dtype: Dtype of the momentum; default: the leaf's dtype.
    projector_dtype: Dtype of a stored basis; default: the leaf's dtype.
    seed: Seed of the randomized projectors.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_lean
    >>> tx = optax.chain(
    ...     optax_lean.scale_by_subspace_momentum(rank=2, update_proj_gap=10),
    ...     optax.scale_by_learning_rate(0.1))
    >>> state = tx.init({'w': jnp.ones((4, 6))})
    >>> state[0].mu['w'].shape, state[0].projector['w'].shape
    ((2, 6), (4, 2))

  References:
    Nguyen & Nguyen, `Lean and Mean Adaptive Optimization via Subset-Norm and
    Subspace-Momentum with Convergence Guarantees
    <https://arxiv.org/abs/2411.07120>`_, ICML 2025
  """
  rank = 128 if rank is None else rank
  checks.in_interval('b1', b1, 0.0, 1.0)
  checks.positive_int('rank', rank)
  checks.refresh_gap('update_proj_gap', update_proj_gap)
  checks.one_of('momentum_on_refresh', momentum_on_refresh, get_args(OnRefresh))
  checks.one_of('other_leaves', other_leaves, get_args(OtherLeaves))
  if consistent_rms is not None:
    if not orthogonalize:
      raise ValueError('consistent_rms scales the polar factor: it needs orthogonalize=True')
    checks.positive('consistent_rms', consistent_rms)
  projector = proj_lib.get_projector(projector)
  if checks.is_zero(b1) and not orthogonalize:
    return optax.identity()

  def plans(tree, warn=False):
    return plan_subspaces(tree, projector, rank, mask, dimension_numbers, warn=warn)

  def init_fn(params):
    params = dtypes.as_arrays(params)
    leaves, treedef = jax.tree.flatten(params)
    mus, projs = [], []
    for p, plan in zip(leaves, plans(params, warn=True)):
      dtype = p.dtype if mu_dtype is None else mu_dtype
      if plan is None:
        mus.append(otu.zeros_like(p, dtype=dtype) if other_leaves == 'momentum' else None)
        projs.append(None)
        continue
      mus.append(plan.lowrank_zeros(p, dtype))
      projs.append(plan.projector_zeros(p, projector_dtype))
    return ScaleBySubspaceMomentumState(
      count=jnp.zeros([], jnp.int32),
      mu=jax.tree.unflatten(treedef, mus),
      projector=jax.tree.unflatten(treedef, projs),
    )

  def refresh(gradients, mus, projs, leaf_plans, count_inc, layer):
    """New bases for every leaf (one round-robin walk), and the momenta rotated into them.

    Only ``'rotate'`` changes the momenta here (``mus`` is ``None`` otherwise):
    a momentum that is kept or reset does not pass through the refresh's
    ``jax.lax.cond``, whose outputs would be copies of it.
    """
    new_projs = refresh_projectors(gradients, projs, leaf_plans, seed, count_inc, layer)
    if mus is not None:
      mus = [
        mu if plan is None else rotate_momentum(plan, g, mu, old, new)
        for g, mu, old, new, plan in zip(gradients, mus, projs, new_projs, leaf_plans)
      ]
    return mus, new_projs

  def finish(numerator, count_inc, dtype, divisor, *matrix):
    """The numerator with its bias correction, divided by ``divisor`` if one is given.

    As stored between the two transformations of ``scale_by_ratio``: cast to
    the gradient's ``dtype`` before the division. ``matrix`` (one matrix's
    denominators and layout) divides one matrix of a walk.
    """
    if bias_correction:
      real = dtypes.real_dtype(numerator.dtype)
      numerator = otu.bias_correction(numerator, jnp.asarray(b1, real), count_inc.astype(real))
    if divisor is None:
      return numerator
    return divisor.divide(dtypes.store(numerator, dtype), *matrix)

  def update_leaf(g, mu, proj_state, plan, count_inc, divisor, refreshed):
    """A selected leaf's output and momentum, one matrix at a time.

    With a ``divisor`` whose matrices are the plan's, each matrix is divided
    as it is formed, and the quotient overwrites the gradient. ``refreshed``
    says whether this step refreshed the bases.
    """
    # The official order resets at every refresh but the first.
    reset = refreshed & (count_inc > 1)
    if momentum_on_refresh != 'official':
      reset = jnp.zeros([], bool)
    fused = divisor is not None and divisor.layout == plan.layout
    if orthogonalize and divisor is not None and not fused:
      raise ValueError(
        'orthogonalize with a denominator: the denominator must read each selected leaf '
        'as the subspace does (the same mask and dimension_numbers)'
      )

    def matrix(g_m, mu_m, state_m, den_m, basis=None):
      g_a, mu_a = plan.matrix_rows(g_m), plan.matrix_rows(mu_m)
      if momentum_on_refresh == 'reset':
        mu_a = jnp.where(refreshed, jnp.zeros_like(mu_a), mu_a)
      if basis is None:
        basis = plan.basis(state_m, g_a, g.dtype)
      scale = None
      if orthogonalize:
        scale = 1.0 if consistent_rms is None else consistent_rms * max(g_a.shape[-2:]) ** 0.5
      denominators = (den_m, divisor.matrix_layout) if fused else ()
      divide = None
      if orthogonalize and (fused or bias_correction):
        # A polar factor has no scale: the correction and the divisor act outside the subspace.
        divide = lambda x: plan.matrix_rows(
          finish(plan.matrix_rows(x), count_inc, g.dtype, divisor, *denominators)
        )
      numerator, momentum = momentum_step(g_a, mu_a, basis, b1, reset, scale, divide)
      numerator = plan.matrix_rows(numerator)
      if fused and not orthogonalize:
        numerator = finish(numerator, count_inc, g.dtype, divisor, *denominators)
      return numerator, plan.matrix_rows(momentum.astype(mu.dtype))

    # The output overwrites the gradient when it is stored in the gradient's
    # dtype (a quotient always is), and the momentum its old value.
    in_place = fused or dtypes.compute_dtype(g.dtype, mu.dtype) == g.dtype
    output, mu = walk.map_matrices(
      matrix,
      plan.layout.batch_shape,
      (plan.layout.to_matrix(g), mu, proj_state, divisor.denominator if fused else None),
      into={0: 0, 1: 1} if in_place else {1: 1},
      per_round=plan.drawn_bases(g.dtype, states=2),
      devices=sharding.device_count(g),
    )
    output = plan.layout.from_matrix(output)
    done = fused or orthogonalize  # already corrected and divided, matrix by matrix
    return output if done else finish(output, count_inc, g.dtype, divisor), mu

  def update_fn(updates, state, params=None, *, layer=None, divisors=None, **extra_args):
    del params, extra_args
    updates = dtypes.as_arrays(updates)
    count_inc = optax.safe_increment(state.count)
    leaf_plans = plans(updates)
    leaves, treedef = jax.tree.flatten(updates)
    mus, projs = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.projector)
    # One refresh of the whole tree: the bases (and momenta, if rotated).
    selected = [plan is not None for plan in leaf_plans]
    pick = lambda xs: [x if chosen else None for x, chosen in zip(xs, selected)]
    refreshed = refresh_due(count_inc - 1, update_proj_gap, offset=1)
    rotated_mus, projs = jax.lax.cond(
      refreshed,
      lambda operands: refresh(leaves, *operands, leaf_plans, count_inc, layer),
      lambda operands: operands,
      (pick(mus) if momentum_on_refresh == 'rotate' else None, projs),
    )
    if rotated_mus is not None:
      mus = [new if chosen else old for new, old, chosen in zip(rotated_mus, mus, selected)]
    divisors = [None] * len(leaves) if divisors is None else divisors

    def update_leaf_or_plain(index, g, mu, proj_state, plan):
      if plan is not None:
        output, new_mu = update_leaf(g, mu, proj_state, plan, count_inc, divisors[index], refreshed)
        return output, new_mu, proj_state
      if other_leaves == 'pass':
        return g, None, proj_state
      dtype = dtypes.compute_dtype(g.dtype, mu.dtype)
      decay = jnp.asarray(b1, dtypes.real_dtype(dtype)).astype(dtype)
      new_mu = decay * mu.astype(dtype) + (1 - decay) * g.astype(dtype)
      return finish(new_mu, count_inc, g.dtype, divisors[index]), new_mu, proj_state

    unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
    outputs, (mu, projector_state) = leafwise.map_leaves(
      update_leaf_or_plain,
      updates,
      (unflatten(mus), unflatten(projs)),
      leaf_plans,
      in_sequence=leafwise.gated(leaf_plans),
    )
    return outputs, ScaleBySubspaceMomentumState(count=count_inc, mu=mu, projector=projector_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
