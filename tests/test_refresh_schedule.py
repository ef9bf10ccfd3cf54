"""``update_proj_gap`` as a refresh schedule: a function of the 0-based step count.

An integer gap keeps each method's official steps (GaLore and APOLLO at
0-based ``0, T, 2T, ...``; SN-SM at 1-based ``1, T, 2T, ...``); the schedule
that names the same steps must give the same run, and an irregular schedule
must refresh the bases at exactly the steps it names.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lean

STEPS = 7
GAP = 3
# An irregular schedule; step 0 refreshes whatever it says.
IRREGULAR = (2, 3, 6)
LAYOUT = dict(
  mask={'w': True, 'stack': True, 'b': False},
  dimension_numbers={
    'w': optax_lean.DimensionNumbers(),
    'stack': optax_lean.DimensionNumbers(1, 2),
    'b': None,
  },
)


def tree():
  return {'w': jnp.zeros((6, 4)), 'stack': jnp.zeros((2, 5, 3)), 'b': jnp.zeros((4,))}


def gradients(step):
  keys = jax.random.split(jax.random.key(step), 3)
  return {
    name: jax.random.normal(key, leaf.shape)
    for key, (name, leaf) in zip(keys, sorted(tree().items()))
  }


def run(tx):
  """Updates and projector states of ``STEPS`` jitted steps."""
  params = tree()
  state = tx.init(params)
  update = jax.jit(tx.update)
  updates, projectors = [], []
  for step in range(STEPS):
    out, state = update(gradients(step), state, params)
    updates.append(out)
    projectors.append(projector_state(state))
  return updates, projectors


def projector_state(state):
  """The first ``projector`` field found in a (chained) state."""
  found = []
  for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, 'projector')):
    if hasattr(s, 'projector'):
      found.append(s.projector)
  return found[0]


# name -> (constructor, the schedule naming the same steps as GAP)
METHODS = {
  'galore': (
    lambda gap: optax_lean.galore(1e-2, rank=2, update_proj_gap=gap, projector='svd', **LAYOUT),
    lambda count: count % GAP == 0,
  ),
  'apollo': (
    lambda gap: optax_lean.apollo(1e-2, rank=2, update_proj_gap=gap, **LAYOUT),
    lambda count: count % GAP == 0,
  ),
  'adamsnsm': (
    lambda gap: optax_lean.adamsnsm(1e-2, rank=2, update_proj_gap=gap, projector='svd', **LAYOUT),
    lambda count: (count + 1) % GAP == 0,
  ),
}


@pytest.mark.parametrize('name', METHODS)
def test_schedule_of_the_gaps_steps_gives_the_same_run(name):
  make, schedule = METHODS[name]
  by_gap, _ = run(make(GAP))
  by_schedule, _ = run(make(schedule))
  for a, b in zip(by_gap, by_schedule):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize('name', METHODS)
def test_irregular_schedule_refreshes_at_its_steps(name):
  make, _ = METHODS[name]
  steps = jnp.asarray(IRREGULAR)
  _, projectors = run(make(lambda count: jnp.any(count == steps)))
  changed = [
    step
    for step in range(1, STEPS)
    if any(
      not np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(projectors[step - 1]), jax.tree.leaves(projectors[step]))
    )
  ]
  assert changed == list(IRREGULAR)


def test_schedule_under_inject_hyperparams():
  schedule = lambda count: count % GAP == 0
  injected = optax.inject_hyperparams(optax_lean.galore, static_args=('rank', 'update_proj_gap'))
  tx = injected(learning_rate=1e-2, rank=2, update_proj_gap=schedule, projector='svd', **LAYOUT)
  expected, _ = run(optax_lean.galore(1e-2, rank=2, update_proj_gap=GAP, projector='svd', **LAYOUT))
  got, _ = run(tx)
  for a, b in zip(expected, got):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
  # Not declared static, inject_hyperparams evaluates the schedule into an array.
  unstatic = optax.inject_hyperparams(optax_lean.galore, static_args=('rank',))
  with pytest.raises(ValueError, match=r"update_proj_gap.*static_args=\('update_proj_gap',\)"):
    unstatic(learning_rate=1e-2, rank=2, update_proj_gap=schedule, **LAYOUT).init(tree())


@pytest.mark.parametrize(
  'make',
  [
    # A fresh Adam per subspace counts its steps from the last refresh: a period.
    lambda gap: optax_lean.rso(1e-2, rank=2, update_proj_gap=gap),
    # The gap sets the projector's step size.
    lambda gap: optax_lean.online_subspace_descent(1e-2, rank=2, update_proj_gap=gap),
  ],
  ids=['rso', 'online_subspace_descent'],
)
def test_methods_that_need_a_period_refuse_a_schedule(make):
  with pytest.raises(ValueError, match='update_proj_gap must be an int'):
    make(lambda count: count % GAP == 0)


def test_schedule_must_return_a_scalar():
  tx = optax_lean.galore(1e-2, rank=2, update_proj_gap=lambda count: jnp.zeros(2, bool), **LAYOUT)
  with pytest.raises(ValueError, match='update_proj_gap: a refresh schedule must return a scalar'):
    tx.update(gradients(0), tx.init(tree()), tree())
