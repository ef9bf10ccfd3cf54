"""Sharded runs on 8 fake CPU devices equal unsharded ones, with sharded states.

Both mesh flavours are covered: Auto (shardings outside the types, states
placed through ``state_sharding``) and Explicit (sharding in types, where SVD,
QR, reshapes and contractions over sharded axes need explicit shardings).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_lean
from optax_lean import DimensionNumbers
from tests.family import FAMILY

GAP, STEPS = 3, 8
SPECS = {
  'w': ((16, 32), P('data', 'model')),
  'wide': ((32, 8), P('data', 'model')),
  'stack': ((2, 16, 32), P('data', None, 'model')),
  'embed': ((24, 16), P(None, 'model')),
  'b': ((32,), P('model')),
}
MASK = {'w': True, 'wide': True, 'stack': True, 'embed': False, 'b': False}
DIMS = {
  'w': DimensionNumbers(),
  'wide': DimensionNumbers(),
  'stack': DimensionNumbers(1, 2),
  'embed': None,
  'b': None,
}
# Every optimizer of the family (with weight decay where it has a rule for
# it), variants of AdamSNSM's projector and subsets, and AdamW.
OPTIMIZERS = {
  **{
    name: functools.partial(
      member.make,
      rank=4,
      gap=GAP,
      mask=MASK,
      dimension_numbers=DIMS,
      **({'weight_decay': 0.1} if name in ('adamsnsm', 'galore', 'ldadam') else {}),
    )
    for name, member in FAMILY.items()
  },
  'scale_head': lambda: optax_lean.scale(
    1e-2,
    weight_decay=0.1,
    output_layer='wide',
    dimension_numbers={**DIMS, 'embed': DimensionNumbers()},  # the table normalised too
  ),
  'sumo_subset_norm_rotate': lambda: optax_lean.sumo(
    1e-2,
    rank=4,
    update_proj_gap=GAP,
    momentum_on_refresh='rotate',
    residual='subset_norm',
    mask=MASK,
    dimension_numbers=DIMS,
  ),
  'adamsnsm_randomized_rotate': lambda: optax_lean.adamsnsm(
    1e-2,
    rank=4,
    update_proj_gap=GAP,
    projector='randomized_svd',
    momentum_on_refresh='rotate',
    mask=MASK,
    dimension_numbers=DIMS,
  ),
  'adamsnsm_topk_chunks': lambda: optax_lean.adamsnsm(
    1e-2,
    rank=4,
    update_proj_gap=GAP,
    projector='topk',
    subset_size=-2,
    mask=MASK,
    dimension_numbers=DIMS,
  ),
  'adamsnsm_random': lambda: optax_lean.adamsnsm(
    1e-2, rank=4, update_proj_gap=GAP, projector='random', mask=MASK, dimension_numbers=DIMS
  ),
  'adamsn_chunks': lambda: optax_lean.adamsn(
    1e-2, subset_size=64, mask=MASK, dimension_numbers=DIMS
  ),
  'norm_growth_limit': lambda: optax.chain(
    optax_lean.scale_by_norm_growth_limit(mask=MASK, dimension_numbers=DIMS), optax.sgd(1e-2)
  ),
  'adamw': lambda: optax.adamw(1e-2),
  'adamw_8bit_states': lambda: optax_lean.quantize_state(optax.adamw(1e-2), min_size=16),
  'adamsnsm_8bit_states': lambda: optax_lean.quantize_state(
    optax_lean.adamsnsm(1e-2, rank=4, update_proj_gap=GAP, mask=MASK, dimension_numbers=DIMS),
    min_size=16,
  ),
}


def make_mesh(axis_type):
  return jax.make_mesh((2, 4), ('data', 'model'), axis_types=(axis_type,) * 2)


def grads_at(step):
  rng = np.random.default_rng(step)
  return {k: jnp.asarray(rng.normal(size=shape), jnp.float32) for k, (shape, _) in SPECS.items()}


def train(tx, params, grads, param_shd=None, state_shd=None):
  step_fn = lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p))
  if param_shd is None:
    step = jax.jit(step_fn)
    state = tx.init(params)
  else:
    step = jax.jit(step_fn, out_shardings=(param_shd, state_shd), donate_argnums=(0, 1))
    state = jax.jit(tx.init, out_shardings=state_shd)(params)
  states = [state]
  for g in grads:
    if param_shd is not None:
      g = jax.device_put(g, param_shd)
    params, state = step(params, state, g)
    states.append(state)
  return params, states, step


def shardings(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


@pytest.mark.parametrize('axis_type', [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_sharded_equals_unsharded(name, axis_type):
  tx = OPTIMIZERS[name]()
  mesh = make_mesh(axis_type)
  param_shd = {k: NamedSharding(mesh, spec) for k, (_, spec) in SPECS.items()}
  params = jax.tree.map(jnp.ones_like, grads_at(0))
  grads = [grads_at(step) for step in range(1, STEPS + 1)]
  want, _, _ = train(tx, params, grads)

  state_shd = optax_lean.state_sharding(tx, params, param_shd)
  got, states, step = train(tx, jax.device_put(params, param_shd), grads, param_shd, state_shd)

  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  assert step._cache_size() == 1
  assert (
    shardings(states[-1])
    == shardings(states[0])
    == jax.tree.map(lambda s: s, state_shd, is_leaf=lambda x: isinstance(x, NamedSharding))
  )
  if axis_type == AxisType.Explicit:
    assert jax.tree.map(jax.typeof, states[-1]) == jax.tree.map(jax.typeof, states[0])


def large_leaves(state):
  """State leaves of at least 32 entries, by path."""
  return {
    jax.tree_util.keystr(path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
    if leaf.size >= 32
  }


@pytest.mark.parametrize('axis_type', [AxisType.Auto, AxisType.Explicit])
def test_large_states_are_sharded(axis_type):
  tx = OPTIMIZERS['adamsnsm']()
  mesh = make_mesh(axis_type)
  param_shd = {k: NamedSharding(mesh, spec) for k, (_, spec) in SPECS.items()}
  params = jax.device_put(jax.tree.map(jnp.ones_like, grads_at(0)), param_shd)
  state = jax.jit(tx.init, out_shardings=optax_lean.state_sharding(tx, params))(params)
  leaves = large_leaves(state)
  expected = {
    "[0].numerator.mu['w']": (2, 8),  # (rank@data, out@model): 'data' left the projected in
    "[0].numerator.projector['w']": (8, 1),  # (in@data, rank@model)
    "[0].numerator.mu['wide']": (16, 1),  # (in@data, rank@model)
    "[0].numerator.mu['stack']": (1, 4, 8),  # (layer@data, rank, out@model)
    "[0].denominator.nu['w']": (1, 8),  # one scalar per output unit
    "[0].denominator.nu['embed']": (24, 4),  # plain Adam, like the param
  }
  for path, shard_shape in expected.items():
    leaf = leaves[path]
    assert leaf.sharding.shard_shape(leaf.shape) == shard_shape, path
  unsharded = [p for p, x in leaves.items() if x.sharding.shard_shape(x.shape) == x.shape]
  assert not unsharded, unsharded


@pytest.mark.parametrize('axis_type', [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize('name', ['galore', 'ldadam', 'online_subspace_descent', 'rso'])
def test_large_family_states_are_sharded(name, axis_type):
  tx = OPTIMIZERS[name]()
  mesh = make_mesh(axis_type)
  param_shd = {k: NamedSharding(mesh, spec) for k, (_, spec) in SPECS.items()}
  params = jax.device_put(jax.tree.map(jnp.ones_like, grads_at(0)), param_shd)
  state = jax.jit(tx.init, out_shardings=optax_lean.state_sharding(tx, params))(params)
  leaves = large_leaves(state)
  unsharded = [p for p, x in leaves.items() if x.sharding.shard_shape(x.shape) == x.shape]
  assert not unsharded, unsharded
  if name == 'ldadam':  # the full-size error buffer is sharded like its parameter
    assert leaves["[0].error['w']"].sharding.shard_shape((16, 32)) == (8, 8)


def test_explicit_mesh_eager_init_is_already_sharded():
  tx = OPTIMIZERS['adamsnsm_topk_chunks']()
  mesh = make_mesh(AxisType.Explicit)
  param_shd = {k: NamedSharding(mesh, spec) for k, (_, spec) in SPECS.items()}
  params = jax.device_put(jax.tree.map(jnp.ones_like, grads_at(0)), param_shd)
  state = tx.init(params)
  expected = optax_lean.state_sharding(tx, params)
  for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    if leaf.ndim:  # eager scalars (counts) live on one device until first use
      assert leaf.sharding == want


def shard_bytes(tree, shardings) -> int:
  """Bytes one device holds of the abstract ``tree`` under ``shardings``."""
  return sum(
    int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
  )


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize(
  'name', ['adamw', 'adamsn', 'adamsnsm', 'galore', 'ldadam', 'online_subspace_descent', 'rso']
)
def test_fsdp_splits_every_state_at_1b(name, scan_layers):
  """LLaMA-1B under the trainer's FSDP layout on 8 devices: each holds about 1/8 of the state.

  The trainer shards each kernel's largest axis that 8 divides; low-rank
  moments, subset norms and bases that reduce that axis move its mesh axis to
  one they keep (or to the rank axis). Only step counts, PRNG keys and the
  subset norms of the 5461-wide MLP axis (which 8 does not divide) stay whole.
  Nothing is allocated: the state is traced with ``jax.eval_shape``.
  """
  from flax import nnx

  from examples.llama import configs, model, optimizers
  from examples.llama.mesh import fsdp_spec

  config = configs.get_config('1b', scan_layers=scan_layers)
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: model.Llama(config, nnx.Rngs(0)))))
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(AxisType.Auto,))
  param_shd = jax.tree.map(
    lambda p: NamedSharding(mesh, fsdp_spec(p.shape, 8, scan_layers)), abstract
  )
  tx = optimizers.build(name, optax.constant_schedule(1e-3), optimizers.Hyperparameters(rank=512))
  state = jax.eval_shape(tx.init, abstract)
  per_device = shard_bytes(state, optax_lean.state_sharding(tx, abstract, param_shd))
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert per_device <= 0.135 * total, per_device / total
