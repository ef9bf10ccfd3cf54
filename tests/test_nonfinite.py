"""Non-finite gradients and failed refreshes never corrupt what must survive.

Behaviour (documented in the README): the transformations do not filter
gradients themselves. Wrapped in ``optax.apply_if_finite`` a non-finite step
leaves parameters and state untouched. Unwrapped, a non-finite gradient
poisons the moments as in any Adam; only the projector is protected: a refresh
whose gradient or basis is not finite (or whose gradient is all zeros) keeps
the previous projector.
"""

import dataclasses
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_lean

GAP = 4


def grads_at(step, shape=(6, 4)):
  return {'w': jnp.asarray(np.random.default_rng(step).normal(size=shape), jnp.float32)}


def test_apply_if_finite_leaves_state_untouched():
  tx = optax.apply_if_finite(optax_lean.adamsnsm(1e-2, rank=2, update_proj_gap=GAP), 3)
  params = {'w': jnp.ones((6, 4))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(1, 2 * GAP + 2):
    g = grads_at(step)
    if step in (GAP, GAP + 1):  # one bad step at a refresh, one just after
      g = {'w': g['w'].at[0, 0].set(jnp.nan if step == GAP else jnp.inf)}
      before = state
      updates, state = update(g, state, params)
      chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
      chex.assert_trees_all_equal(state.inner_state, before.inner_state)
      assert int(state.notfinite_count) >= 1
    else:
      updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.inner_state))
  assert int(state.notfinite_count) == 0


def projector_after(tx, grads):
  params = jax.tree.map(jnp.zeros_like, grads[0])
  state = tx.init(params)
  for g in grads:
    _, state = jax.jit(tx.update)(g, state, params)
  return state.projector['w']


def test_refresh_on_zero_or_nonfinite_gradient_keeps_the_projector():
  tx = optax_lean.scale_by_subspace_momentum(0.9, rank=2, update_proj_gap=GAP)
  history = [grads_at(t) for t in range(1, GAP)]
  kept = projector_after(tx, history)
  assert bool(jnp.all(jnp.isfinite(kept))) and bool(jnp.any(kept != 0))
  for bad in (jnp.zeros((6, 4)), jnp.full((6, 4), jnp.inf), jnp.full((6, 4), jnp.nan)):
    chex.assert_trees_all_equal(projector_after(tx, [*history, {'w': bad}]), kept)
  assert not np.allclose(projector_after(tx, [*history, grads_at(99)]), kept)


@dataclasses.dataclass(frozen=True)
class FailingSVD(optax_lean.SVDProjector):
  """An SVD that fails (returns NaN) on every refresh after the first."""

  name: ClassVar[str] = 'failing_svd'

  def compute(self, g_a, rank, key):
    fresh = super().compute(g_a, rank, key)
    return jnp.where(jnp.abs(g_a[..., :1, :1]) < 1e3, fresh, jnp.nan)


def test_failed_svd_keeps_the_previous_projector_per_layer():
  tx = optax_lean.scale_by_subspace_momentum(
    0.9,
    rank=2,
    update_proj_gap=GAP,
    projector=FailingSVD(),
    mask={'w': True},
    dimension_numbers=optax_lean.DimensionNumbers(1, 2),
  )
  first = [grads_at(t, (2, 6, 4)) for t in range(1, GAP)]
  kept = projector_after(tx, first)
  poisoned = grads_at(GAP, (2, 6, 4))['w'].at[1, 0, 0].set(1e4)  # layer 1's SVD "fails"
  refreshed = projector_after(tx, [*first, {'w': poisoned}])
  np.testing.assert_array_equal(refreshed[1], kept[1])
  assert not np.allclose(refreshed[0], kept[0])
  assert bool(jnp.all(jnp.isfinite(refreshed)))
