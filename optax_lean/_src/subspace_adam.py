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

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree as otu

from optax_lean._src import checks, dtypes, leafwise
from optax_lean._src import projectors as proj_lib
from optax_lean._src.adam import Flavour, adam_step, validate_adam
from optax_lean._src.dimension_numbers import DimensionNumbersOrFn, MaskOrFn
from optax_lean._src.subspace import plan_subspaces, refresh_due


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


def scale_by_subspace_adam(
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  rank: int,
  update_proj_gap: int | None,
  scale: jax.typing.ArrayLike,
  projector: proj_lib.Projector,
  *,
  flavour: Flavour = 'hf',
  moments_on_refresh: Literal['keep', 'reset'] = 'keep',
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
  refreshed (under ``jax.lax.cond`` on the scalar count) at 0-based steps
  ``0, T, 2T, ...`` (only step 0 when ``update_proj_gap`` is ``None``), Adam
  runs on :math:`R = B^\\top G`, and the direction is ``scale * B d``.

  Args:
    b1: First-moment decay.
    b2: Second-moment decay.
    eps: Adam's offset, in the ``flavour``'s place.
    rank: The subspace rank (clipped, with a warning, to each matrix's limit).
    update_proj_gap: Steps between refreshes, or ``None`` for a projector
      set at the first step only.
    scale: Factor on the back-projected direction of selected leaves.
    projector: A ``Projector``.
    flavour: ``'hf'`` or ``'torch'`` Adam (see ``optax_lean._src.adam``).
    moments_on_refresh: ``'keep'`` the moments as they are when the basis
      changes (GaLore), or ``'reset'`` them to zero and restart their bias
      correction: a fresh Adam per subspace (RSO). The names are those of
      ``scale_by_subspace_momentum``'s ``momentum_on_refresh``.
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
  checks.positive_int('rank', rank)
  checks.one_of('moments_on_refresh', moments_on_refresh, ('keep', 'reset'))
  restart = moments_on_refresh == 'reset'
  if update_proj_gap is not None or restart:
    checks.positive_count('update_proj_gap', update_proj_gap)
  validate_adam(b1, b2, eps)

  def plans(tree, warn=False):
    return plan_subspaces(
      tree, projector, rank, mask, dimension_numbers, warn=warn, real_only=real_only
    )

  def refreshes(count):
    if update_proj_gap is None:
      return count == 0
    return refresh_due(count, update_proj_gap)

  def init_fn(params):
    params = dtypes.as_arrays(params)
    states = adam_states(params, plans(params, warn=True), mu_dtype, nu_dtype, projector_dtype)
    treedef = jax.tree.structure(params)
    return ScaleBySubspaceAdamState(
      jnp.zeros([], jnp.int32), *(jax.tree.unflatten(treedef, xs) for xs in states)
    )

  def update_matrix(g, mu, nu, proj_state, plan, leaf_index, count, layer):
    dtype = dtypes.compute_dtype(g.dtype, mu.dtype, nu.dtype)
    count_inc = optax.safe_increment(count)
    g_a = plan.rows(g)

    def on_refresh(operands):
      moments, old = operands
      if restart:
        moments = jax.tree.map(jnp.zeros_like, moments)
      return moments, plan.refresh(g_a, old, seed, leaf_index, count_inc, layer)

    moments = (plan.lowrank_rows(mu), plan.lowrank_rows(nu))
    (mu_a, nu_a), proj_state = jax.lax.cond(
      refreshes(count), on_refresh, lambda operands: operands, (moments, proj_state)
    )
    basis = plan.basis(proj_state, g_a, g.dtype)
    projected = proj_lib.project(g_a, basis, dtype, like=mu_a)
    # A fresh Adam per subspace counts its steps from the last refresh.
    adam_count = count % update_proj_gap + 1 if restart else count_inc
    direction, mu_a, nu_a = adam_step(projected, mu_a, nu_a, adam_count, b1, b2, eps, flavour)
    full = proj_lib.back_project(direction.astype(g.dtype), basis, g_a, dtype)
    update = jnp.asarray(scale, dtype) * plan.unrows(full)
    return update, plan.lowrank_rows(mu_a), plan.lowrank_rows(nu_a), proj_state

  def update_fn(updates, state, params=None, *, layer=None, **extra_args):
    del params, extra_args
    updates = dtypes.as_arrays(updates)
    count_inc = optax.safe_increment(state.count)

    def update_leaf(index, g, mu, nu, proj_state, plan):
      if plan is None:
        return (*adam_step(g, mu, nu, count_inc, b1, b2, eps, flavour), None)
      return update_matrix(g, mu, nu, proj_state, plan, index, state.count, layer)

    outputs, fields = leafwise.map_leaves(
      update_leaf, updates, (state.mu, state.nu, state.projector), plans(updates)
    )
    return outputs, ScaleBySubspaceAdamState(count_inc, *fields)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
