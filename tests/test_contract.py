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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_lean
from tests.family import FAMILY, REAL_ONLY

GAP = 5


def eight_bit(factory):
  """``factory`` with its moments in 8 bits, however small (``quantize_state``)."""

  def make_8bit(
    learning_rate: optax.ScalarOrSchedule, rank: int, update_proj_gap: int
  ) -> optax.GradientTransformationExtraArgs:
    inner = factory(learning_rate, rank=rank, update_proj_gap=update_proj_gap)
    return optax_lean.quantize_state(inner, min_size=1)

  return make_8bit


# Every optimizer of the family at the contract's size, and variants of it.
BASE = {
  name: (member.factory, dict(learning_rate=member.learning_rate, **member.sizes(gap=GAP)))
  for name, member in FAMILY.items()
}
VARIANTS = {
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
  'scale_head': (optax_lean.scale, dict(learning_rate=1e-2, output_layer='kernel')),
  'sumo_subset_norm': (
    optax_lean.sumo,
    dict(learning_rate=1e-2, rank=2, update_proj_gap=GAP, residual='subset_norm'),
  ),
  'adamsnsm_8bit_states': (
    eight_bit(optax_lean.adamsnsm),
    dict(learning_rate=1e-2, rank=2, update_proj_gap=GAP),
  ),
  'galore_8bit_states': (
    eight_bit(optax_lean.galore),
    dict(learning_rate=1e-2, rank=2, update_proj_gap=GAP),
  ),
}
ALIASES = {**BASE, **VARIANTS}
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


def conj_grad(loss, p):
  """The descent direction of a real loss: the conjugate of JAX's complex gradient."""
  return jax.tree.map(jnp.conj, jax.grad(loss)(p))


def run(tx, params, loss, steps, jit=True):
  def step(carry, _):
    p, s = carry
    updates, s = tx.update(conj_grad(loss, p), s, p)
    return (optax.apply_updates(p, updates), s), None

  carry = (params, tx.init(params))
  if jit:
    return jax.jit(lambda c: jax.lax.scan(step, c, length=steps)[0])(carry)
  for _ in range(steps):
    carry, _ = step(carry, None)
  return carry


def abs_sq(x):
  return jnp.real(x * jnp.conj(x))


def quadratic(target):
  return lambda p: sum(
    jnp.sum(abs_sq(a - b)) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target))
  )


def rosenbrock(p):
  """|1 - x|^2 + 100 |y - x^2|^2: minimum 0 at (1, 1), for real or complex (x, y)."""
  return abs_sq(1 - p[0]) + 100 * abs_sq(p[1] - p[0] ** 2)


def problems(dtype):
  """(start, loss, solution) of the parabola, Rosenbrock and a matrix parabola."""
  matrix = np.random.default_rng(1).normal(size=(6, 4))
  if jnp.issubdtype(dtype, jnp.complexfloating):
    matrix = matrix + 1j * np.random.default_rng(2).normal(size=(6, 4))
  parabola_end = jnp.array([1.0, -1.0, 1.0], dtype)
  return {
    'parabola': (jnp.array([-1.0, 10.0, 1.0], dtype), quadratic(parabola_end), parabola_end),
    'rosenbrock': (jnp.zeros(2, dtype), rosenbrock, jnp.ones(2, dtype)),
    'matrix': (jnp.zeros((6, 4), dtype), quadratic(jnp.asarray(matrix, dtype)), matrix),
  }


# Rosenbrock's curvature (about 1000 near the minimum) needs smaller steps for
# the plain-gradient and AdaGrad rules; the others keep their contract rate.
ROSENBROCK_LR = {'sgd_sm': 1e-3, 'adagrad_sn': 0.1, 'adagrad_snsm': 0.1}
CHUNK, CHUNKS = 500, 20


def converge_cases():
  for dtype in (jnp.float32, jnp.complex64):
    for problem in ('parabola', 'rosenbrock', 'matrix'):
      for name in BASE:
        if jnp.issubdtype(dtype, jnp.complexfloating) and problem == 'matrix' and name in REAL_ONLY:
          continue
        yield pytest.param(name, problem, dtype, id=f'{name}-{problem}-{jnp.dtype(dtype).name}')


@pytest.mark.parametrize('name, problem, dtype', list(converge_cases()))
def test_converges_without_recompiling(name, problem, dtype):
  start, loss, solution = problems(dtype)[problem]
  overrides = (
    {'learning_rate': ROSENBROCK_LR[name]}
    if problem == 'rosenbrock' and name in ROSENBROCK_LR
    else {}
  )
  tx = make(name, **overrides)

  def step(carry, _):
    p, s = carry
    updates, s = tx.update(conj_grad(loss, p), s, p)
    return (optax.apply_updates(p, updates), s), None

  chunk = jax.jit(lambda c: jax.lax.scan(step, c, length=CHUNK)[0])
  carry = (start, tx.init(start))
  for _ in range(CHUNKS):
    carry = chunk(carry)
  assert chunk._cache_size() == 1
  assert carry[0].dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(carry[0], solution, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize('name', list(ALIASES))
def test_jit_and_no_jit_agree(name):
  """Compiled and op-by-op runs agree to float64 rounding.

  In float32 the two orders of rounding drift apart by more than any fixed
  tolerance where the subspace moves every step: LDAdam's power iteration on
  nearly tied singular values, and OSD's AdamW step on the PCA-loss gradient,
  whose components inside span(P) vanish in exact arithmetic, so Adam
  normalises their float32 rounding noise (1e-7, above eps = 1e-8) into full
  steps. In float64 that noise (1e-16) sits far below eps and is scaled by at
  most 1 / eps; six steps of well-conditioned random 6x4 matrices then leave
  the runs within 1e-9 of each other, the bound asserted here.
  """
  with jax.enable_x64(True):
    params = mixed_params(jnp.float64)
    loss = quadratic(jax.tree.map(jnp.zeros_like, params))
    jitted = run(make(name), params, loss, steps=GAP + 1, jit=True)
    eager = run(make(name), params, loss, steps=GAP + 1, jit=False)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-9, atol=1e-12)


def stability_cases():
  dtypes = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64, jnp.complex64, jnp.complex128)
  for dtype in dtypes:
    for name in BASE:
      if not (jnp.issubdtype(dtype, jnp.complexfloating) and name in REAL_ONLY):
        yield pytest.param(name, dtype, id=f'{name}-{jnp.dtype(dtype).name}')


@pytest.mark.parametrize('name, dtype', list(stability_cases()))
def test_state_shape_dtype_and_sharding_are_stable(name, dtype):
  """After any number of steps the state has the type it started with.

  On an Explicit mesh a type includes the sharding, and ``lax.cond`` demands
  identical types from both branches, so a step whose state changed shape,
  dtype or sharding fails to trace.
  """
  wide = dtype in (jnp.float64, jnp.complex128)
  mesh = jax.make_mesh((2,), ('fsdp',), axis_types=(jax.sharding.AxisType.Explicit,))
  specs = {'kernel': P('fsdp', None), 'wide': P(None, 'fsdp'), 'bias': P()}
  with jax.enable_x64(wide), jax.set_mesh(mesh):
    rng = np.random.default_rng(0)
    shapes = {'kernel': (8, 4), 'wide': (4, 8), 'bias': (4,)}
    params = {
      k: jax.device_put(jnp.asarray(rng.normal(size=v), dtype), NamedSharding(mesh, specs[k]))
      for k, v in shapes.items()
    }
    loss = quadratic(jax.tree.map(jnp.zeros_like, params))
    tx = make(name)
    state = tx.init(params)
    initial = jax.tree.map(jax.typeof, state)

    @jax.jit
    def step(params, state):
      updates, new_state = tx.update(conj_grad(loss, params), state, params)
      keep = jax.random.bernoulli(jax.random.key(0))
      return jax.lax.cond(
        keep, lambda: (params, state), lambda: (optax.apply_updates(params, updates), new_state)
      )

    for _ in range(GAP + 1):
      params, state = step(params, state)
    assert jax.tree.map(jax.typeof, state) == initial
    assert all(p.dtype == jnp.dtype(dtype) for p in jax.tree.leaves(params))


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


@pytest.mark.parametrize('name', list(BASE))
def test_gradient_accumulation_equals_a_step_on_the_mean_gradient(name):
  """``optax.MultiSteps`` over k micro-batches is one step on their mean, refreshes included.

  In float64: the running mean and the plain mean round differently, and an
  SVD refresh passes that difference on amplified by 1 / (spectral gap).
  """
  k, steps = 4, GAP + 1
  with jax.enable_x64(True):
    params = mixed_params(jnp.float64)
    rng = np.random.default_rng(3)
    micro = [
      jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
      for _ in range(k * steps)
    ]
    accumulated = optax.MultiSteps(make(name), every_k_schedule=k, accumulator_dtype=jnp.float64)
    state, acc_params = accumulated.init(params), params
    for g in micro:
      updates, state = jax.jit(accumulated.update)(g, state, acc_params)
      acc_params = optax.apply_updates(acc_params, updates)
    plain = make(name)
    state, plain_params = plain.init(params), params
    for i in range(steps):
      mean = jax.tree.map(lambda *gs: sum(gs) / k, *micro[i * k : (i + 1) * k])
      updates, state = jax.jit(plain.update)(mean, state, plain_params)
      plain_params = optax.apply_updates(plain_params, updates)
  chex.assert_trees_all_close(acc_params, plain_params, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('name', list(BASE))
def test_explicit_state_dtypes_are_kept(name):
  """``mu_dtype``, ``nu_dtype``, ``projector_dtype``: the state stores them; updates keep f32."""
  accepted = inspect.signature(ALIASES[name][0]).parameters
  requested = {
    k: jnp.bfloat16 for k in ('mu_dtype', 'nu_dtype', 'projector_dtype') if k in accepted
  }
  tx = make(name, **requested)
  params = mixed_params()
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(jax.tree.map(jnp.cos, params), state, params)
  assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
  by_kind = {}
  for path, leaf in jax.tree.leaves_with_path(new_state):
    kind = next(
      (getattr(key, 'name', None) for key in reversed(path) if hasattr(key, 'name')), None
    )
    by_kind.setdefault(kind, set()).add(leaf.dtype)
  for field in ('mu', 'nu', 'projector'):
    if f'{field}_dtype' in requested and field in by_kind:
      assert by_kind[field] == {jnp.dtype(jnp.bfloat16)}, (field, by_kind[field])
  assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)


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
  'norm_growth_limit': lambda: optax_lean.scale_by_norm_growth_limit(1.01),
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
