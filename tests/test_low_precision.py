"""Low-precision parameters: stochastic rounding, Kahan summation and a float32 master copy.

Each transformation is checked against a NumPy reference of its rule, run in
``ml_dtypes.bfloat16`` and float32: the master copy and Kahan's compensation
step for step, stochastic rounding by its two neighbours and by the frequency
of rounding up, which must match the fraction of the spacing within a bound
from the binomial's variance. Beside them: leaves of float32 or wider pass
through, one compile, per-layer draws, sharding (Auto and Explicit) and an
orbax round trip.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_lean
from optax_lean._src.low_precision import round_stochastically

BF16 = ml_dtypes.bfloat16
TRANSFORMS = {
  'stochastic_rounding': optax_lean.stochastic_rounding,
  'kahan_summation': optax_lean.kahan_summation,
  'master_weights': optax_lean.master_weights,
}


def spacing_above(x: np.ndarray) -> np.ndarray:
  """The distance from each bfloat16 value to the next larger one, in float32."""
  x = x.astype(BF16)
  return (np.nextafter(x, np.array(np.inf, BF16)).astype(np.float32) - x.astype(np.float32)).astype(
    np.float32
  )


def run_sgd(transform, grads, params, learning_rate=1.0):
  """Parameters after SGD steps on the fixed ``grads``, through ``transform``, jitted once."""
  tx = optax.chain(optax.sgd(learning_rate), transform)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  state = tx.init(params)
  for g in grads:
    params, state = step(params, state, g)
  assert step._cache_size() == 1
  return params, state


def test_stochastic_rounding_picks_a_neighbour_with_the_probability_of_its_distance():
  n, fraction = 1 << 16, 0.3
  base = np.linspace(0.5, 3.0, n).astype(BF16)
  x = base.astype(np.float32) + fraction * spacing_above(base)
  rounded = np.asarray(round_stochastically(jnp.asarray(x), jnp.bfloat16, jax.random.key(3)))
  up = rounded.astype(np.float32) > base.astype(np.float32)
  assert np.all((rounded == base) | up)  # only the two neighbours
  assert np.all(
    rounded[up].astype(np.float32) == (base.astype(np.float32) + spacing_above(base))[up]
  )
  # The count of round-ups is Binomial(n, fraction): six standard deviations.
  assert abs(up.mean() - fraction) < 6 * np.sqrt(fraction * (1 - fraction) / n)
  exact = base.astype(np.float32)
  kept = round_stochastically(jnp.asarray(exact), jnp.bfloat16, jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(kept), base)  # representable values stay


def test_stochastic_rounding_keeps_the_mean_of_steps_below_the_spacing():
  # 1 + k/10 of bfloat16's spacing at 1 (2^-7): nearest rounding never moves.
  n, steps = 4096, 20
  params = {'w': jnp.ones(n, jnp.bfloat16)}
  grads = [{'w': jnp.full(n, -0.1 * 2.0**-7)}] * steps
  sr, _ = run_sgd(optax_lean.stochastic_rounding(seed=1), grads, params)
  nearest, _ = run_sgd(optax.identity(), grads, params)
  np.testing.assert_array_equal(np.asarray(nearest['w']), np.ones(n, BF16))
  # Each coordinate is 1 + K * 2^-7 with K ~ Binomial(20, 0.1) (a sum of
  # independent unbiased roundings): its mean over n coordinates is 2 in steps.
  k = (np.asarray(sr['w']).astype(np.float64) - 1) / 2.0**-7
  assert abs(k.mean() - steps * 0.1) < 6 * np.sqrt(steps * 0.1 * 0.9 / n)


def numpy_kahan(params, grads):
  """Kahan's compensated sum in bfloat16 parameters and compensation (float32 arithmetic)."""
  p, c = params.astype(BF16), np.zeros_like(params, BF16)
  for g in grads:
    y = -g.astype(np.float32) + c.astype(np.float32)
    new_p = (p.astype(np.float32) + y).astype(BF16)
    c = (y - (new_p.astype(np.float32) - p.astype(np.float32))).astype(BF16)
    p = new_p
  return p


def numpy_master(params, grads):
  master = params.astype(np.float32)
  for g in grads:
    master = master - g.astype(np.float32)
  return master.astype(BF16)


@pytest.mark.parametrize(
  'name, reference', [('kahan_summation', numpy_kahan), ('master_weights', numpy_master)]
)
def test_compensated_updates_follow_their_numpy_reference(name, reference):
  rng = np.random.default_rng(0)
  start = rng.normal(size=(6, 5)).astype(BF16)
  grads = [(1e-3 * rng.normal(size=(6, 5))).astype(np.float32) for _ in range(30)]
  params, _ = run_sgd(
    TRANSFORMS[name](), [{'w': jnp.asarray(g)} for g in grads], {'w': jnp.asarray(start)}
  )
  np.testing.assert_array_equal(np.asarray(params['w']), reference(start, grads))
  # The float32 sum, rounded once, is what both track: no step is lost.
  exact = numpy_master(start, grads).astype(np.float32)
  assert np.all(np.abs(np.asarray(params['w']).astype(np.float32) - exact) <= spacing_above(exact))


@pytest.mark.parametrize('name', list(TRANSFORMS))
def test_wide_and_complex_leaves_pass_through_without_state(name):
  params = {
    'f32': jnp.ones((2, 3)),
    'complex': jnp.ones(3, jnp.complex64),
    'empty': jnp.ones((0, 4), jnp.bfloat16),
    'scalar': jnp.bfloat16(1.0),
    'half': jnp.ones(4, jnp.float16),
  }
  updates = jax.tree.map(lambda p: (jnp.ones_like(p) * 0.25).astype(p.dtype), params)
  tx = TRANSFORMS[name]()
  state = tx.init(params)
  out, _ = jax.jit(tx.update)(updates, state, params)
  for key in ('f32', 'complex'):
    assert out[key] is not None and out[key].dtype == params[key].dtype
    np.testing.assert_array_equal(out[key], updates[key])
  for key in ('empty', 'scalar', 'half'):
    assert out[key].dtype == jnp.float32 and out[key].shape == params[key].shape
    landed = optax.apply_updates(params, out)[key]
    np.testing.assert_array_equal(landed, (params[key] + updates[key]).astype(params[key].dtype))
  if name != 'stochastic_rounding':
    buffers = state[0]
    assert buffers['f32'] is None and buffers['complex'] is None and buffers['half'] is not None


@pytest.mark.parametrize('name', list(TRANSFORMS))
def test_refuses_a_call_without_params_and_bad_arguments_in_one_line(name):
  tx = TRANSFORMS[name]()
  params = {'w': jnp.ones(3, jnp.bfloat16)}
  with pytest.raises(ValueError, match=f'{name}: update needs the parameters'):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match='stochastic_rounding: seed must be an int'):
    optax_lean.stochastic_rounding(seed=0.5)
  with pytest.raises(ValueError, match='kahan_summation: compensation_dtype'):
    optax_lean.kahan_summation(jnp.int8)
  with pytest.raises(ValueError, match='master_weights: dtype'):
    optax_lean.master_weights(jnp.int32)


def test_each_layer_of_a_stack_draws_its_own_rounding():
  tx = optax_lean.stochastic_rounding()
  params = {'w': jnp.ones((2, 512), jnp.bfloat16)}
  updates = {'w': jnp.full((2, 512), 0.5 * 2.0**-7)}
  axes = optax_lean.layer_axes(tx, params)
  per_layer, shared = optax_lean.split_layers(tx.init(params), axes)
  layer = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
  rounded = [
    optax_lean.update_layer(
      tx, layer(updates, i), per_layer, shared, axes, layer(params, i), index=i
    )[0]['w']
    for i in (0, 1)
  ]
  assert not np.array_equal(rounded[0], rounded[1])
  again = optax_lean.update_layer(
    tx, layer(updates, 1), per_layer, shared, axes, layer(params, 1), index=1
  )[0]['w']
  np.testing.assert_array_equal(again, rounded[1])


@pytest.mark.parametrize('axis_type', [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize('name', list(TRANSFORMS))
def test_sharded_equals_unsharded(name, axis_type):
  mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(axis_type,) * 2)
  rng = np.random.default_rng(1)
  params = {'w': jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16), 'b': jnp.zeros(16)}
  grads = [{'w': jnp.asarray(1e-3 * rng.normal(size=(8, 16))), 'b': jnp.ones(16)} for _ in range(3)]
  expected, _ = run_sgd(TRANSFORMS[name](), grads, params)
  param_shd = {'w': NamedSharding(mesh, P('data', 'model')), 'b': NamedSharding(mesh, P('model'))}
  tx = optax.chain(optax.sgd(1.0), TRANSFORMS[name]())
  state_shd = optax_lean.state_sharding(tx, params, param_shd)
  step = jax.jit(
    lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)),
    out_shardings=(param_shd, state_shd),
  )
  sharded = jax.device_put(params, param_shd)
  state = jax.jit(tx.init, out_shardings=state_shd)(sharded)
  for g in grads:
    sharded, state = step(sharded, state, jax.device_put(g, param_shd))
  chex.assert_trees_all_equal(sharded, expected)
  assert sharded['w'].sharding.spec == P('data', 'model')


@pytest.mark.parametrize('name', list(TRANSFORMS))
def test_state_round_trips_through_orbax(name, tmp_path):
  params = {'w': jnp.ones((4, 8), jnp.bfloat16), 'f': jnp.ones(3)}
  grads = [{'w': jnp.full((4, 8), 1e-3), 'f': jnp.ones(3)}] * 2
  _, state = run_sgd(TRANSFORMS[name](), grads, params)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'state', state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(
      tmp_path / 'state', jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    )
  chex.assert_trees_all_equal(restored, state)
