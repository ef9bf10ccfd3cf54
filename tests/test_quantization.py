"""8-bit states: the dynamic tree map, block-wise quantisation, and ``quantize_state``.

The map is checked against a reference that decodes every 8-bit pattern as the
paper describes the data type (sign bit, decimal exponent in leading zeros,
indicator bit, linear fraction). The wrapper is checked on ``optax.adamw`` and on
optax_lean optimizers: which leaves it quantises, the bytes it saves, one
compile, training next to float32 states, sharding and an orbax round trip.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_lean
from optax_lean._src.quantization import QuantizedArray, dequantize, dynamic_map, quantize


def decoded_patterns(signed: bool) -> list[float]:
  """The value of each 8-bit pattern of the dynamic tree data type (Dettmers et al., §2.2).

  After the sign bit (if any), ``k`` leading zeros make the exponent ``10^-k``;
  the first one bit is the indicator, and the ``b`` bits after it index ``2^b``
  equal bins of ``[0.1, 1]``, each standing for its midpoint. All zeros is 0.
  """
  width = 7 if signed else 8
  values = []
  for pattern in range(256):
    sign = -1.0 if signed and pattern >> 7 else 1.0
    bits = format(pattern & ((1 << width) - 1), f'0{width}b')
    if '1' not in bits:
      values.append(0.0)
      continue
    k = bits.index('1')
    fraction = bits[k + 1 :]
    bins = 2 ** len(fraction)
    index = int(fraction, 2) if fraction else 0
    values.append(sign * 10.0**-k * (0.1 + (index + 0.5) * 0.9 / bins))
  return values


@pytest.mark.parametrize('signed', [True, False])
def test_dynamic_map_is_the_tree_data_type_with_one_made_exact(signed):
  reference = set(np.float32(decoded_patterns(signed)).tolist())
  table = dynamic_map(signed)
  # The map spends the one redundant pattern (signed: -0; unsigned: the 10^-7 decade, whose
  # single bin is below anything a block's scale keeps) on 1.0, a block's largest magnitude.
  assert set(table.tolist()) - reference == {1.0}
  extra = reference - set(table.tolist())
  assert extra == (set() if signed else {np.float32(0.55e-7).item()})
  assert np.all(np.diff(table) > 0)


def test_quantize_is_nearest_value_per_block_and_dequantize_is_exact():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 700)) * np.logspace(-5, 0, 700)
  for signed, data in ((True, x), (False, np.abs(x))):
    q = quantize(jnp.asarray(data, jnp.float32), signed=signed, block_size=256)
    assert q.codes.shape == data.shape and q.codes.dtype == jnp.uint8
    assert q.scales.shape == (3, 3)  # ceil(700 / 256) blocks per row
    table = dynamic_map(signed)
    padded = np.pad(data, [(0, 0), (0, 3 * 256 - 700)]).reshape(3, 3, 256)
    scales = np.abs(padded).max(-1)
    normalised = (padded / scales[..., None]).reshape(3, -1)[:, :700]
    nearest = np.abs(normalised[..., None] - table).argmin(-1)
    np.testing.assert_allclose(q.scales, scales, rtol=1e-6)
    # Ties between two map values are measure-zero for normal draws; float32 rounding of the
    # normalised value can still pick the neighbour when the two are within an ulp.
    assert np.mean(np.asarray(q.codes) == nearest) > 0.999
    restored = dequantize(q, 256)
    expected = table[np.asarray(q.codes)] * np.repeat(scales, 256, axis=-1)[:, :700]
    np.testing.assert_allclose(restored, expected, rtol=1e-6)
    again = quantize(restored, signed=signed, block_size=256)
    np.testing.assert_array_equal(again.codes, q.codes)


def quantized_leaves(state) -> dict[str, bool]:
  """Path -> signed of each quantised leaf of ``state``."""
  is_quantized = lambda x: isinstance(x, QuantizedArray)
  leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_quantized)[0]
  return {jax.tree_util.keystr(path): leaf.signed for path, leaf in leaves if is_quantized(leaf)}


def test_quantize_state_keeps_moments_in_bytes_and_the_rest_as_is():
  params = {'w': jnp.ones((64, 256)), 'b': jnp.ones(64)}
  inner = optax_lean.adamsnsm(1e-2, rank=8)
  state = optax_lean.quantize_state(inner, min_size=256).init(params)
  # the subspace momentum (8, 256) and the subset norms (1, 256); not the basis, nor the vectors
  assert quantized_leaves(state) == {
    ".inner[0].numerator.mu['w']": True,
    ".inner[0].denominator.nu['w']": False,
  }
  codes, scales = 8 * 256 + 256, 4 * (8 + 1)
  unquantized = optax_lean.state_bytes(inner.init(params)) - 4 * (8 * 256 + 256)
  assert optax_lean.state_bytes(state) == unquantized + codes + scales


def test_optax_ema_moments_are_quantised_like_mu():
  # optax.ema names its moment `ema`: adafactor's momentum and sumo's AdamW leaves keep one.
  params = {'w': jnp.ones((64, 256)), 'b': jnp.ones(64)}
  inner = optax.adafactor(1e-2, momentum=0.9)
  state = optax_lean.quantize_state(inner, min_size=256).init(params)
  assert quantized_leaves(state) == {".inner[4].ema['w']": True}


def regression(params, x):
  return jnp.mean((jnp.tanh(x @ params['w1']) @ params['w2'] - jnp.sin(x[:, :16])) ** 2)


def train_loss(tx, steps=60):
  key_1, key_2 = jax.random.split(jax.random.key(0))
  params = {
    'w1': jax.random.normal(key_1, (64, 256)) / 8,
    'w2': jax.random.normal(key_2, (256, 16)) / 16,
  }
  state = tx.init(params)

  @jax.jit
  def step(params, state, i):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(1), i), (32, 64))
    loss, grads = jax.value_and_grad(regression)(params, x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for i in range(steps):
    params, state, loss = step(params, state, i)
    losses.append(float(loss))
  assert step._cache_size() == 1  # one compile, quantised state and all
  return losses[0], np.mean(losses[-10:])


@pytest.mark.parametrize(
  'make',
  [
    lambda: optax.adamw(3e-3),
    lambda: optax_lean.adamsnsm(3e-2, rank=8, update_proj_gap=20),
    lambda: optax_lean.galore(1e-2, rank=8, update_proj_gap=20),
  ],
  ids=['adamw', 'adamsnsm', 'galore'],
)
def test_training_with_8bit_states_follows_float32_states(make):
  first, float32 = train_loss(make())
  _, eight_bit = train_loss(optax_lean.quantize_state(make(), min_size=256))
  assert float32 < 0.6 * first  # it trains
  # Each stored moment is within 0.7% of its block's largest magnitude (half the widest gap of
  # the map); over 60 steps the losses stay within 1% (they differ by about 0.1% here).
  assert abs(eight_bit - float32) < 0.01 * float32


def test_8bit_state_round_trips_through_orbax(tmp_path):
  tx = optax_lean.quantize_state(optax_lean.adamsnsm(1e-2, rank=4), min_size=64)
  params = {'w': jnp.ones((16, 64))}
  grads = {'w': jnp.linspace(-1.0, 1.0, 16 * 64).reshape(16, 64)}
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
  with ocp.CheckpointManager(tmp_path) as manager:
    restored = manager.restore(1, args=ocp.args.StandardRestore(jax.eval_shape(lambda: state)))
  assert quantized_leaves(restored) == quantized_leaves(state) != {}
  chex.assert_trees_all_equal(restored, state)


def test_8bit_state_is_sharded_like_the_float_state():
  mesh = jax.make_mesh((8,), ('fsdp',))
  params = {'w': jnp.ones((16, 512))}
  shardings = {'w': NamedSharding(mesh, P('fsdp', None))}
  inner = optax.adamw(1e-3)
  tx = optax_lean.quantize_state(inner)
  state_shardings = optax_lean.state_sharding(tx, params, shardings)
  float_shardings = optax_lean.state_sharding(inner, params, shardings)
  assert state_shardings.inner[0].mu['w'].codes.spec == float_shardings[0].mu['w'].spec
  assert state_shardings.inner[0].nu['w'].scales.spec == P('fsdp', None)
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  assert state.inner[0].mu['w'].codes.addressable_shards[0].data.shape == (2, 512)


def test_quantize_state_refuses_bad_arguments_in_one_line():
  with pytest.raises(ValueError, match='block_size'):
    optax_lean.quantize_state(optax.adamw(1e-3), block_size=0)
  with pytest.raises(ValueError, match=r"fields \['mu'\] are both signed and unsigned"):
    optax_lean.quantize_state(optax.adamw(1e-3), unsigned_fields=('mu', 'nu'))


def test_every_input_kind_is_quantised_or_kept_as_is():
  params = {
    'complex': jnp.ones((3, 4), jnp.complex64),
    'half': jnp.ones((3, 4), jnp.float16),
    'bf16': jnp.ones((3, 4), jnp.bfloat16),
    'empty': jnp.ones((0, 4)),
    'scalar': jnp.float32(2.0),
  }
  tx = optax_lean.quantize_state(optax.adamw(1e-2), min_size=1)
  grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.5, params)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert jax.tree.map(lambda x: x.dtype, updates) == jax.tree.map(lambda x: x.dtype, params)
  assert set(quantized_leaves(state)) == {
    f".inner[0].{field}['{name}']" for field in ('mu', 'nu') for name in ('half', 'bf16')
  }
  mu = state.inner[0].mu
  assert mu['half'].dtype == 'float16' and mu['complex'].dtype == jnp.complex64
  reference = optax.adamw(1e-2).update(grads, optax.adamw(1e-2).init(params), params)[0]
  # One step of equal gradients: every moment is its block's largest, which the map keeps exactly.
  chex.assert_trees_all_close(updates, reference, rtol=1e-6)


def test_a_layer_of_a_quantised_stack_stays_quantised():
  # The stack has 128 numbers per moment (quantised), one layer 32 (below min_size):
  # the per-layer update keeps the state's structure, as a scan over layers needs.
  tx = optax_lean.quantize_state(optax.adam(1e-2), min_size=64)
  params = {'w': jnp.ones((4, 4, 8))}
  grads = {'w': jnp.cos(jnp.arange(128.0)).reshape(4, 4, 8)}
  axes = optax_lean.layer_axes(tx, params)
  per_layer, shared = optax_lean.split_layers(tx.init(params), axes)
  layer = lambda tree: jax.tree.map(lambda x: x[1], tree)
  updates, new_layer, _ = optax_lean.update_layer(
    tx, layer(grads), layer(per_layer), shared, axes, layer(params)
  )
  assert jax.tree.structure(new_layer) == jax.tree.structure(layer(per_layer))
  assert isinstance(new_layer.inner[0].mu['w'], QuantizedArray)
  whole, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], whole['w'][1], rtol=1e-6)
