"""Non-finite gradients and failed refreshes never corrupt what must survive.

Behaviour (documented in docs/guide.md): the transformations do not filter
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
import pytest

import optax_lean
from optax_lean._src.projectors import PROJECTORS

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


def cast(grads, dtype):
  return jax.tree.map(lambda g: g.astype(dtype), grads)


def projector_after(tx, grads):
  params = jax.tree.map(jnp.zeros_like, grads[0])
  state = tx.init(params)
  for g in grads:
    _, state = jax.jit(tx.update)(g, state, params)
  return state.projector['w']


BAD_GRADIENTS = {
  'zeros': lambda g: jnp.zeros_like(g),
  'inf': lambda g: jnp.full_like(g, jnp.inf),
  'minus_inf': lambda g: jnp.full_like(g, -jnp.inf),
  'nan': lambda g: jnp.full_like(g, jnp.nan),
  'one_nan': lambda g: g.at[2, 1].set(jnp.nan),
}


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
@pytest.mark.parametrize('projector', list(PROJECTORS))
def test_refresh_on_zero_or_nonfinite_gradient_keeps_the_projector(projector, dtype):
  tx = optax_lean.scale_by_subspace_momentum(0.9, rank=2, update_proj_gap=GAP, projector=projector)
  history = [cast(grads_at(t), dtype) for t in range(1, GAP)]
  kept = projector_after(tx, history)
  fresh = projector_after(tx, [*history, cast(grads_at(99), dtype)])
  assert not np.array_equal(fresh, kept)  # a sound refresh changes it
  for bad, make in BAD_GRADIENTS.items():
    poisoned = projector_after(tx, [*history, {'w': make(history[0]['w'])}])
    # A projector that reads the gradient keeps its state; one drawn from a
    # key alone cannot be spoilt by it and refreshes as usual.
    expected = kept if PROJECTORS[projector].reads_gradient else fresh
    np.testing.assert_array_equal(poisoned, expected, err_msg=bad)


@pytest.mark.parametrize('magnitude', [1e30, 3e38])
@pytest.mark.parametrize('projector', list(PROJECTORS))
def test_refresh_on_huge_gradients_gives_an_orthonormal_basis(projector, magnitude):
  tx = optax_lean.scale_by_subspace_momentum(0.9, rank=2, update_proj_gap=GAP, projector=projector)
  history = [grads_at(t) for t in range(1, GAP)]
  signs = jnp.sign(grads_at(99)['w'])
  state = projector_after(tx, [*history, {'w': signs * magnitude}])
  basis = PROJECTORS[projector]().basis(state, (6, 2), jnp.float32)
  np.testing.assert_allclose(basis.T @ basis, np.eye(2), atol=1e-5)
  # Refreshes are scale-free: the basis of the same gradient at size 1, or,
  # where the arithmetic overflows (randomized_svd at 3e38), the old one.
  unit = projector_after(tx, [*history, {'w': signs}])
  kept = projector_after(tx, history)
  assert np.allclose(state, unit, atol=1e-5) or np.array_equal(state, kept)


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
