"""Subspace-Momentum (SM): momentum kept only inside a rank-r subspace.

Nguyen & Nguyen, `Lean and Mean Adaptive Optimization via Subset-Norm and
Subspace-Momentum with Convergence Guarantees <https://arxiv.org/abs/2411.07120>`_,
ICML 2025; official code https://github.com/timmytonga/sn-sm
(``subspace_momentum.py``, ``projectors/``).
"""

from __future__ import annotations

from typing import NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax
from optax import tree as otu

from optax_lean._src import checks, dtypes, leafwise
from optax_lean._src import projectors as proj_lib
from optax_lean._src.dimension_numbers import DimensionNumbersOrFn, MaskOrFn
from optax_lean._src.subspace import OnRefresh, plan_subspaces, refresh_due


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


def scale_by_subspace_momentum(
  b1: jax.typing.ArrayLike = 0.9,
  rank: int | None = None,
  update_proj_gap: int = 200,
  projector: str | proj_lib.Projector = 'auto',
  *,
  momentum_on_refresh: OnRefresh = 'official',
  bias_correction: bool = False,
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
  (see ``mask``) get a full momentum :math:`N_t = m_t`.

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
    b1: Momentum decay, in ``[0, 1)``. With ``b1 = 0`` there is no state and
      the gradient passes through.
    rank: ``None`` (default: 128) or the subspace rank ``r >= 1``, clipped
      (with a warning) to what each matrix allows: ``min(in, out)`` for the
      SVD family, ``max(in, out)`` for coordinate subsets.
    update_proj_gap: Steps between refreshes, ``>= 1``.
    projector: ``'auto'`` (default: ``'svd'`` on CPU, ``'randomized_svd'``
      on GPU and TPU, see ``get_projector``), ``'svd'`` (exact,
      sign-canonicalised), ``'randomized_svd'`` (a range finder, much
      cheaper), ``'random'`` (a seeded orthonormal
      Gaussian basis; only a key is stored), ``'uniform'`` or ``'topk'``
      (coordinate subsets of the larger axis), or a ``Projector``.
    momentum_on_refresh: ``'official'``, ``'reset'``, ``'keep'`` or
      ``'rotate'`` (see above).
    bias_correction: Divide by :math:`1 - \beta_1^t`.
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
  checks.positive_count('update_proj_gap', update_proj_gap)
  checks.one_of('momentum_on_refresh', momentum_on_refresh, get_args(OnRefresh))
  projector = proj_lib.get_projector(projector)
  if checks.is_zero(b1):
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
        mus.append(otu.zeros_like(p, dtype=dtype))
        projs.append(None)
        continue
      mus.append(plan.lowrank_zeros(p, dtype))
      projs.append(plan.projector_zeros(p, projector_dtype))
    return ScaleBySubspaceMomentumState(
      count=jnp.zeros([], jnp.int32),
      mu=jax.tree.unflatten(treedef, mus),
      projector=jax.tree.unflatten(treedef, projs),
    )

  def update_matrix(g, mu, proj_state, plan, leaf_index, count_inc, layer):
    dtype = dtypes.compute_dtype(g.dtype, mu.dtype)
    g_a = plan.rows(g)
    mu_a = plan.lowrank_rows(mu)

    def on_refresh(operands):
      mu_a, old = operands
      new = plan.refresh(g_a, old, seed, leaf_index, count_inc, layer)
      if momentum_on_refresh == 'reset':
        mu_a = jnp.zeros_like(mu_a)
      elif momentum_on_refresh == 'rotate':
        rotation = proj_lib.change_of_basis(
          plan.basis(new, g_a, dtype), plan.basis(old, g_a, dtype), dtype
        )
        mu_a = proj_lib.rotate(rotation, mu_a.astype(dtype), like=mu_a).astype(mu_a.dtype)
      return mu_a, new

    mu_a, proj_state = jax.lax.cond(
      refresh_due(count_inc - 1, update_proj_gap, offset=1),
      on_refresh,
      lambda operands: operands,
      (mu_a, proj_state),
    )
    basis = plan.basis(proj_state, g_a, g.dtype)
    projected = proj_lib.project(g_a, basis, dtype, like=mu_a)
    decay = jnp.asarray(b1, dtypes.real_dtype(dtype)).astype(dtype)
    momentum = decay * mu_a.astype(dtype) + (1 - decay) * projected
    numerator = g_a.astype(dtype) + proj_lib.back_project(
      (momentum - projected).astype(g.dtype), basis, g_a, dtype
    )
    if momentum_on_refresh == 'official':
      reset = (count_inc > 1) & (count_inc % update_proj_gap == 0)
      momentum = jnp.where(reset, jnp.zeros_like(momentum), momentum)
    return plan.unrows(numerator), plan.lowrank_rows(momentum), proj_state

  def update_fn(updates, state, params=None, *, layer=None, **extra_args):
    del params, extra_args
    updates = dtypes.as_arrays(updates)
    count_inc = optax.safe_increment(state.count)

    def update_leaf(index, g, mu, proj_state, plan):
      if plan is None:
        dtype = dtypes.compute_dtype(g.dtype, mu.dtype)
        decay = jnp.asarray(b1, dtypes.real_dtype(dtype)).astype(dtype)
        numerator = new_mu = decay * mu.astype(dtype) + (1 - decay) * g.astype(dtype)
      else:
        numerator, new_mu, proj_state = update_matrix(
          g, mu, proj_state, plan, index, count_inc, layer
        )
      if bias_correction:
        real = dtypes.real_dtype(numerator.dtype)
        numerator = otu.bias_correction(numerator, jnp.asarray(b1, real), count_inc.astype(real))
      return numerator, new_mu, proj_state

    outputs, (mu, projector_state) = leafwise.map_leaves(
      update_leaf, updates, (state.mu, state.projector), plans(updates)
    )
    return outputs, ScaleBySubspaceMomentumState(count=count_inc, mu=mu, projector=projector_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
