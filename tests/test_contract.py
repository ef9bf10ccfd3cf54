"""The optax contract, for every optax_lean optimizer.

In the spirit of ``optax/contrib/_common_test.py``: each alias converges on
small problems, gives the same result with and without ``jit``, keeps its
state's types, shapes and dtypes, works under ``inject_hyperparams``,
``MultiSteps``, ``masked``/``partition`` and ``tree_map_params``, preserves
bf16, initialises under ``jax.eval_shape`` and compiles its update once, across
projector refreshes.
"""

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lean

GAP = 5
ALIASES = {
  'adamsnsm': (optax_lean.adamsnsm, dict(learning_rate=1e-2, rank=2, update_proj_gap=GAP)),
  'adamsnsm_randomized': (
    optax_lean.adamsnsm,
    dict(learning_rate=1e-2, rank=2, update_proj_gap=GAP, projector='randomized_svd'),
  ),
  'adamsnsm_random': (
    optax_lean.adamsnsm,
    dict(learning_rate=1e-2, rank=2, update_proj_gap=GAP, projector='random'),
  ),
  'adamsnsm_topk_rotate': (
    optax_lean.adamsnsm,
    dict(
      learning_rate=1e-2,
      rank=2,
      update_proj_gap=GAP,
      projector='topk',
      momentum_on_refresh='rotate',
    ),
  ),
  'adamsnsm_uniform_chunks': (
    optax_lean.adamsnsm,
    dict(learning_rate=1e-2, rank=2, update_proj_gap=GAP, projector='uniform', subset_size=-2),
  ),
  'adamsn': (optax_lean.adamsn, dict(learning_rate=1e-2)),
  'rmsprop_sn': (optax_lean.rmsprop_sn, dict(learning_rate=1e-2)),
  'adagrad_sn': (optax_lean.adagrad_sn, dict(learning_rate=0.3)),
  'adagrad_snsm': (optax_lean.adagrad_snsm, dict(learning_rate=0.3, rank=2, update_proj_gap=GAP)),
  'sgd_sm': (optax_lean.sgd_sm, dict(learning_rate=1e-2, rank=2, update_proj_gap=GAP)),
  'galore': (optax_lean.galore, dict(learning_rate=1e-2, rank=2, update_proj_gap=GAP)),
  'ldadam': (optax_lean.ldadam, dict(learning_rate=1e-2, rank=2)),
  'online_subspace_descent': (
    optax_lean.online_subspace_descent,
    dict(learning_rate=1e-2, rank=2, update_proj_gap=GAP, base_learning_rate=1e-2),
  ),
  'rso': (optax_lean.rso, dict(learning_rate=1e-2, rank=2, update_proj_gap=GAP)),
}
STATIC_ARGS = ('rank', 'update_proj_gap', 'subset_size', 'projector', 'momentum_on_refresh')


def make(name, **overrides):
  factory, kwargs = ALIASES[name]
  return factory(**{**kwargs, **overrides})


def mixed_params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {
    'kernel': jnp.asarray(rng.normal(size=(6, 4)), dtype),
    'wide': jnp.asarray(rng.normal(size=(4, 6)), dtype),
    'bias': jnp.asarray(rng.normal(size=(4,)), dtype),
  }


def quadratic(target):
  return lambda p: sum(
    jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target))
  )


def run(tx, params, loss, steps, jit=True):
  def step(carry, _):
    p, s = carry
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, updates), s), None

  carry = (params, tx.init(params))
  if jit:
    return jax.jit(lambda c: jax.lax.scan(step, c, length=steps)[0])(carry)
  for _ in range(steps):
    carry, _ = step(carry, None)
  return carry


TARGETS = {
  'parabola': (jnp.array([-1.0, 10.0, 1.0]), jnp.array([1.0, -1.0, 1.0])),
  'matrix': (
    jnp.zeros((6, 4)),
    jnp.asarray(np.random.default_rng(1).normal(size=(6, 4)), jnp.float32),
  ),
  'mixed': (
    (jnp.zeros(3), jnp.zeros((4, 6))),
    (
      jnp.array([1.0, -1.0, 2.0]),
      jnp.asarray(np.random.default_rng(2).normal(size=(4, 6)), jnp.float32),
    ),
  ),
}


@pytest.mark.parametrize('target', list(TARGETS))
@pytest.mark.parametrize('name', list(ALIASES))
def test_converges(name, target):
  start, end = TARGETS[target]
  params, _ = run(make(name), start, quadratic(end), steps=5000)
  chex.assert_trees_all_close(params, end, rtol=3e-2, atol=3e-2)


# Where the subspace moves every step, float32 rounding differences between
# compiled and op-by-op execution grow in the states: LDAdam's per-step power
# iteration on nearly tied singular values, and OSD's AdamW step on the
# PCA-loss gradient, whose components inside span(P) vanish in exact
# arithmetic, so Adam normalises their rounding noise into full steps.
# Parameters agree to 1e-6 all the same.
STATE_RTOL = {'ldadam': 1e-3, 'online_subspace_descent': 1e-2}


@pytest.mark.parametrize('name', list(ALIASES))
def test_jit_and_no_jit_agree(name):
  params = mixed_params()
  loss = quadratic(jax.tree.map(jnp.zeros_like, params))
  jitted = run(make(name), params, loss, steps=GAP + 1, jit=True)
  eager = run(make(name), params, loss, steps=GAP + 1, jit=False)
  chex.assert_trees_all_close(jitted[0], eager[0], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jitted[1], eager[1], rtol=STATE_RTOL.get(name, 1e-5), atol=1e-6)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize('name', list(ALIASES))
def test_state_types_shapes_dtypes_are_stable(name, dtype):
  tx = make(name)
  params = mixed_params(dtype)
  loss = quadratic(jax.tree.map(jnp.zeros_like, params))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, new_state = tx.update(jax.grad(loss)(params), state, params)
    # lax.cond demands identical types from both branches.
    keep = jax.random.bernoulli(jax.random.key(0))
    return jax.lax.cond(
      keep, lambda: (params, state), lambda: (optax.apply_updates(params, updates), new_state)
    )

  for _ in range(GAP + 1):
    params, state = step(params, state)
  assert jax.tree.map(lambda x: x.dtype, params) == jax.tree.map(lambda x: dtype, params)


@pytest.mark.parametrize('name', list(ALIASES))
def test_single_compile_across_refreshes(name):
  tx = make(name)
  params = mixed_params()
  loss = quadratic(jax.tree.map(jnp.zeros_like, params))
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  state = tx.init(params)
  for _ in range(3 * GAP + 1):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert step._cache_size() == 1


@pytest.mark.parametrize('name', list(ALIASES))
def test_inject_hyperparams(name):
  factory, kwargs = ALIASES[name]
  static = tuple(a for a in STATIC_ARGS if a in kwargs)
  tx = factory(**kwargs)
  injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
  params = mixed_params()
  grads = jax.tree.map(lambda x: jnp.cos(x) + 0.5, params)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  updates_i, state_i = jax.jit(injected.update)(grads, injected.init(params), params)
  chex.assert_trees_all_close(updates_i, updates, rtol=1e-5)
  chex.assert_trees_all_close(state_i.inner_state, state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', list(ALIASES))
def test_learning_rate_schedule_equals_constant(name):
  assert inspect.signature(ALIASES[name][0]).parameters['learning_rate'].annotation in (
    optax.ScalarOrSchedule,
    'optax.ScalarOrSchedule',
  )
  params = mixed_params()
  loss = quadratic(jax.tree.map(jnp.zeros_like, params))
  constant = run(make(name, learning_rate=1e-3), params, loss, steps=GAP + 2)
  scheduled = run(
    make(name, learning_rate=optax.constant_schedule(1e-3)), params, loss, steps=GAP + 2
  )
  chex.assert_trees_all_close(constant[0], scheduled[0], rtol=1e-6)


@pytest.mark.parametrize(
  ('dtype', 'state_dtype'),
  [(jnp.bfloat16, None), (jnp.float32, None), (jnp.bfloat16, jnp.float32)],
)
@pytest.mark.parametrize('name', list(ALIASES))
def test_updates_keep_param_dtype(name, dtype, state_dtype):
  accepted = inspect.signature(ALIASES[name][0]).parameters
  state_dtypes = {k: state_dtype for k in ('mu_dtype', 'nu_dtype') if k in accepted}
  tx = make(name, **(state_dtypes if state_dtype else {}))
  params = mixed_params(dtype)
  grads = jax.tree.map(jnp.cos, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)


@pytest.mark.parametrize('name', list(ALIASES))
def test_multi_steps_accumulates(name):
  tx = optax.MultiSteps(make(name), every_k_schedule=4)
  params = mixed_params()
  grads = jax.tree.map(jnp.cos, params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(8):
    updates, state = update(grads, state, params)
    zero = jax.tree.map(jnp.zeros_like, updates)
    if i % 4 < 3:
      chex.assert_trees_all_equal(updates, zero)
    else:
      assert any(jnp.any(u != 0) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize('name', list(ALIASES))
def test_masked_and_partition(name):
  params = mixed_params()
  grads = jax.tree.map(jnp.cos, params)
  labels = {'kernel': 'lean', 'wide': 'adam', 'bias': 'adam'}
  partitioned = optax.partition({'lean': make(name), 'adam': optax.adam(1e-3)}, labels)
  updates, _ = jax.jit(partitioned.update)(grads, partitioned.init(params), params)
  alone, _ = make(name).update(
    {'kernel': grads['kernel']},
    make(name).init({'kernel': params['kernel']}),
    {'kernel': params['kernel']},
  )
  chex.assert_trees_all_close(updates['kernel'], alone['kernel'], rtol=1e-6)

  masked = optax.masked(make(name), {'kernel': True, 'wide': False, 'bias': True})
  updates, _ = jax.jit(masked.update)(grads, masked.init(params), params)
  chex.assert_trees_all_equal(updates['wide'], grads['wide'])


@pytest.mark.parametrize('name', list(ALIASES))
def test_tree_map_params_and_eval_shape(name):
  tx = make(name)
  params = mixed_params()
  state = tx.init(params)
  mapped = optax.tree.map_params(tx, lambda v: v, state)
  chex.assert_trees_all_equal(mapped, state)
  abstract = jax.eval_shape(
    tx.init,
    jax.tree.map(jax.ShapeDtypeStruct.from_array, params)
    if hasattr(jax.ShapeDtypeStruct, 'from_array')
    else jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params),
  )
  assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
    lambda a: (a.shape, a.dtype), state
  )


@pytest.mark.parametrize('name', list(ALIASES))
def test_accepts_extra_args(name):
  tx = make(name)
  params = mixed_params()
  grads = jax.tree.map(jnp.cos, params)
  tx.update(grads, tx.init(params), params, unexpected_extra_arg=1)


CORE = {
  'subset_norm_heuristic': lambda: optax_lean.scale_by_subset_norm(0.99, bias_correction=True),
  'subset_norm_chunks': lambda: optax_lean.scale_by_subset_norm(0.99, subset_size=-2),
  'subspace_momentum': lambda: optax_lean.scale_by_subspace_momentum(
    0.9, 2, GAP, momentum_on_refresh='rotate', bias_correction=True
  ),
  'ratio': lambda: optax_lean.scale_by_ratio(
    optax_lean.scale_by_subspace_momentum(0.9, 2, GAP, 'randomized_svd'),
    optax_lean.scale_by_subset_norm(0.99),
  ),
  'galore': lambda: optax_lean.scale_by_galore(rank=2, update_proj_gap=GAP),
  'ldadam': lambda: optax_lean.scale_by_ldadam(rank=2),
  'online_subspace_descent': lambda: optax_lean.scale_by_online_subspace_descent(
    rank=2, orthogonality_penalty=0.1
  ),
  'random_subspace': lambda: optax_lean.scale_by_random_subspace(rank=2, update_proj_gap=GAP),
}


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize('name', list(CORE))
def test_core_transforms_under_strict_dtype_promotion(name, dtype):
  """No implicit promotion anywhere in the core maths, for bf16 and f32."""
  tx = CORE[name]()
  params = mixed_params(dtype)
  loss = quadratic(jax.tree.map(jnp.zeros_like, params))
  with jax.numpy_dtype_promotion('strict'):
    state = tx.init(params)
    step = jax.jit(functools.partial(tx.update, params=None))
    for _ in range(GAP + 1):
      updates, state = step(jax.grad(loss)(params), state)
      params = jax.tree.map(lambda p, u: p - jnp.asarray(1e-2, p.dtype) * u, params, updates)
  assert all(p.dtype == dtype for p in jax.tree.leaves(params))
