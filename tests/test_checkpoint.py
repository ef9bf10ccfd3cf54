"""Every optimizer state survives an orbax round-trip and continues bit-exactly."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_lean

GAP = 3
OPTIMIZERS = {
  'adamsnsm': lambda: optax_lean.adamsnsm(1e-2, rank=2, update_proj_gap=GAP),
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
  'adamsn': lambda: optax_lean.adamsn(1e-2, weight_decay=0.1),
  'rmsprop_sn': lambda: optax_lean.rmsprop_sn(1e-2),
  'adagrad_sn': lambda: optax_lean.adagrad_sn(1e-1),
  'adagrad_snsm': lambda: optax_lean.adagrad_snsm(1e-1, rank=2, update_proj_gap=GAP),
  'sgd_sm': lambda: optax_lean.sgd_sm(
    optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 20), rank=2, update_proj_gap=GAP
  ),
  'galore': lambda: optax_lean.galore(1e-2, rank=2, update_proj_gap=GAP, weight_decay=0.1),
  'galore_random_bf16_states': lambda: optax_lean.galore(
    1e-2,
    rank=2,
    update_proj_gap=GAP,
    projector='random',
    mu_dtype=jnp.bfloat16,
    nu_dtype=jnp.bfloat16,
  ),
  'ldadam': lambda: optax_lean.ldadam(1e-2, rank=2, weight_decay=0.1),
  'ldadam_svd_no_error_feedback': lambda: optax_lean.ldadam(
    1e-2, rank=2, projector='svd', error_feedback=False
  ),
  'online_subspace_descent': lambda: optax_lean.online_subspace_descent(
    optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 20),
    rank=2,
    update_proj_gap=GAP,
    base_learning_rate=0.1,
    orthogonality_penalty=0.1,
  ),
  'rso': lambda: optax_lean.rso(1e-2, rank=2, update_proj_gap=GAP),
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
