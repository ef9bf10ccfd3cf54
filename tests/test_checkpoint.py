"""Every optimizer state survives an orbax round-trip and continues bit-exactly."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_lean
from tests.family import FAMILY

GAP = 3
SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 20)
# Each member of the family, some with a schedule or weight decay in its state.
WITH = {
  'adamsn': dict(weight_decay=0.1),
  'sgd_sm': dict(learning_rate=SCHEDULE),
  'galore': dict(weight_decay=0.1),
  'ldadam': dict(weight_decay=0.1),
  'online_subspace_descent': dict(
    learning_rate=SCHEDULE, base_learning_rate=0.1, orthogonality_penalty=0.1
  ),
  'scale': dict(output_layer='kernel', weight_decay=0.1, adam_learning_rate=SCHEDULE),
}
OPTIMIZERS = {
  **{
    name: functools.partial(member.make, gap=GAP, **WITH.get(name, {}))
    for name, member in FAMILY.items()
  },
  'sumo_subset_norm': lambda: optax_lean.sumo(
    1e-2, rank=2, update_proj_gap=GAP, residual='subset_norm'
  ),
  'adamsnsm_random': lambda: optax_lean.adamsnsm(
    1e-2, rank=2, update_proj_gap=GAP, projector='random'
  ),
  'adamsnsm_uniform': lambda: optax_lean.adamsnsm(
    1e-2, rank=2, update_proj_gap=GAP, projector='uniform', subset_size=-2
  ),
  'adamsnsm_bf16_states': lambda: optax_lean.adamsnsm(
    1e-2,
    rank=2,
    update_proj_gap=GAP,
    mu_dtype=jnp.bfloat16,
    nu_dtype=jnp.bfloat16,
    projector_dtype=jnp.bfloat16,
  ),
  'galore_random_bf16_states': lambda: optax_lean.galore(
    1e-2,
    rank=2,
    update_proj_gap=GAP,
    projector='random',
    mu_dtype=jnp.bfloat16,
    nu_dtype=jnp.bfloat16,
  ),
  'ldadam_svd_no_error_feedback': lambda: optax_lean.ldadam(
    1e-2, rank=2, projector='svd', error_feedback=False
  ),
  'adamw_8bit_states': lambda: optax_lean.quantize_state(optax.adamw(1e-2), min_size=4),
  'adamsnsm_8bit_states': lambda: optax_lean.quantize_state(
    optax_lean.adamsnsm(1e-2, rank=2, update_proj_gap=GAP), min_size=4
  ),
}


def grads_at(step):
  rng = np.random.default_rng(step)
  return {
    'kernel': jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
    'embed': jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
    'scale': jnp.asarray(rng.normal(size=(4,)), jnp.float32),
  }


def train(tx, params, state, steps):
  update = jax.jit(tx.update)
  for step in steps:
    updates, state = update(grads_at(step), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_round_trip_continues_bit_exactly(name, tmp_path):
  tx = OPTIMIZERS[name]()
  params = jax.tree.map(jnp.zeros_like, grads_at(0))
  params, state = train(tx, params, tx.init(params), range(4))

  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(4, args=ocp.args.StandardSave({'params': params, 'opt_state': state}))
    manager.wait_until_finished()
  abstract = jax.eval_shape(lambda: {'params': params, 'opt_state': tx.init(params)})
  with ocp.CheckpointManager(tmp_path) as manager:
    restored = manager.restore(4, args=ocp.args.StandardRestore(abstract))

  assert jax.tree.structure(restored['opt_state']) == jax.tree.structure(state)
  chex.assert_trees_all_equal(restored['opt_state'], state)
  resumed = train(tx, restored['params'], restored['opt_state'], range(4, 10))
  straight = train(tx, params, state, range(4, 10))
  chex.assert_trees_all_equal(resumed, straight)
