"""Every input optax accepts: handled as optax does, or refused in one line naming it.

Complex parameters (subset norms of ``|g|^2``, Adam as optax, conjugate
projections), half precision on CPU, ``optax.inject_hyperparams`` without
``static_args``, zero-size and Python-number leaves, updates without params,
``learning_rate=None``, masks of the wrong structure, keyword-only arguments.
"""

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lean
from optax_lean import DimensionNumbers
from tests.family import FAMILY, LOW_RANK, REAL_ONLY
from tests.test_invariants import outputs

GAP = 3
FACTORIES = list(FAMILY)
COMPLEX = [name for name in FAMILY if FAMILY[name].complex_leaves]
DECAY_AFTER = [name for name in FAMILY if FAMILY[name].decays_after_update]
SHAPES = {'tall': (10, 6), 'wide': (6, 10), 'square': (8, 8), 'stack': (2, 10, 6), 'vector': (6,)}
DIMS = {
  'tall': DimensionNumbers(),
  'wide': DimensionNumbers(),
  'square': DimensionNumbers(),
  'stack': DimensionNumbers(1, 2),
  'vector': None,
}


def make(name, learning_rate=1e-2, **overrides):
  member = FAMILY[name]
  kwargs = {'dimension_numbers': DIMS, **member.sizes(gap=GAP), **overrides}
  return member.factory(learning_rate, **kwargs)


def draw(shapes, dtype, seed):
  rng = np.random.default_rng(seed)
  real = {k: rng.normal(size=s) for k, s in shapes.items()}
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return {k: jnp.asarray(v + 1j * rng.normal(size=v.shape), dtype) for k, v in real.items()}
  return {k: jnp.asarray(v, dtype) for k, v in real.items()}


def run_updates(tx, params, grads):
  """The updates of a jitted run over the list ``grads`` (params fixed)."""
  return outputs(tx, grads, params)[0]


# Complex parameters.


@pytest.mark.parametrize('name', COMPLEX)
def test_complex_updates_are_phase_equivariant(name):
  """Multiplying every gradient by e^{i theta} multiplies every update by it.

  Subset norms and second moments see ``|g|^2``, invariant; a sign-canonical
  complex basis of ``e^{i theta} G`` is that of ``G``; so the whole update turns
  with the gradient. A method that dropped imaginary parts, or used ``g^2`` or a
  plain transpose, breaks this. Run in complex128: SVD bases are then exact to
  1e-13 or so for these well-separated random spectra.
  """
  phase = np.exp(0.7j)
  with jax.enable_x64(True):
    params = draw(SHAPES, jnp.complex128, 0)
    grads = [draw(SHAPES, jnp.complex128, 1 + step) for step in range(2 * GAP)]
    plain = run_updates(make(name), params, grads)
    turned = run_updates(make(name), params, [jax.tree.map(lambda g: phase * g, g) for g in grads])
  for a, b in zip(plain, turned):
    jax.tree.map(
      lambda x, y: np.testing.assert_allclose(phase * np.asarray(x), y, rtol=1e-8, atol=1e-12), a, b
    )
    assert any(np.any(np.abs(np.imag(x)) > 1e-6) for x in jax.tree.leaves(a))


@pytest.mark.parametrize('name', COMPLEX)
def test_complex_leaves_with_real_values_update_as_real_ones(name):
  """On real-valued complex leaves the complex maths reduces to the real maths."""
  with jax.enable_x64(True):
    params = draw(SHAPES, jnp.float64, 0)
    grads = [draw(SHAPES, jnp.float64, 1 + step) for step in range(2 * GAP)]
    as_complex = lambda tree: jax.tree.map(lambda x: x.astype(jnp.complex128), tree)
    real = run_updates(make(name), params, grads)
    complex_ = run_updates(make(name), as_complex(params), [as_complex(g) for g in grads])
  for a, b in zip(real, complex_):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-8, atol=1e-12), a, b)


def test_complex_vector_matches_optax_adam():
  """A gradient of 1+1j: the first step is lr (1+1j)/sqrt(2), as optax.adamw takes it."""
  params = {'v': jnp.zeros(3, jnp.complex64)}
  grads = {'v': jnp.full(3, 1 + 1j, jnp.complex64)}
  expected, _ = optax.adamw(1e-2, eps=1e-12, weight_decay=0.0).update(
    grads, optax.adamw(1e-2).init(params), params
  )
  for name in ('adamsnsm', 'adamsn', 'galore', 'rso'):
    tx = make(name, eps=1e-12, dimension_numbers=None)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates['v'], expected['v'], rtol=1e-5)
  np.testing.assert_allclose(expected['v'], -0.01 * (1 + 1j) / np.sqrt(2), rtol=1e-5)


@pytest.mark.parametrize('name', REAL_ONLY)
def test_complex_matrices_are_refused_where_unsupported(name):
  params = {'w': jnp.full((6, 4), 1 + 1j, jnp.complex64), 'v': jnp.full(4, 1 + 1j, jnp.complex64)}
  with pytest.raises(ValueError, match=r'selected leaf w is complex64; leave it out with `mask`'):
    make(name, dimension_numbers=None).init(params)
  tx = make(name, dimension_numbers=None, mask={'w': False, 'v': False})
  updates, _ = tx.update(params, tx.init(params), params)
  assert jnp.all(jnp.imag(updates['w']) != 0)


# Half precision on CPU.


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize('name', FACTORIES)
def test_half_precision_runs_jitted_and_keeps_dtypes(name, dtype):
  """Tall, wide, square and stacked leaves at rank 4, through refreshes."""
  kwargs = {'rank': 4} if FAMILY[name].low_rank else {}
  tx = make(name, **kwargs)
  params = draw({'tall': (16, 8), 'wide': (8, 16), 'square': (8, 8), 'stack': (2, 16, 8)}, dtype, 0)
  dims = {k: DimensionNumbers(1, 2) if k == 'stack' else DimensionNumbers() for k in params}
  tx = make(name, dimension_numbers=dims, **kwargs)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(2 * GAP + 1):
    updates, new_state = update(draw(jax.tree.map(jnp.shape, params), dtype, step), state, params)
    assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)
    assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    state = new_state


# optax.inject_hyperparams.


@pytest.mark.filterwarnings('ignore:rank 1[26]8? exceeds')
@pytest.mark.parametrize('name', FACTORIES)
def test_inject_hyperparams_without_static_args(name):
  """``inject_hyperparams(alias)(learning_rate=...)`` equals the alias itself."""
  factory, extra = FAMILY[name].factory, FAMILY[name].options
  injected = optax.inject_hyperparams(factory)(learning_rate=1e-2, **extra)
  plain = factory(1e-2, **extra)
  params = draw({'w': (6, 4), 'v': (4,)}, jnp.float32, 0)
  grads = [draw({'w': (6, 4), 'v': (4,)}, jnp.float32, 1 + step) for step in range(3)]
  for a, b in zip(run_updates(injected, params, grads), run_updates(plain, params, grads)):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


@pytest.mark.parametrize('name', LOW_RANK)
def test_inject_hyperparams_says_how_to_keep_rank_static(name):
  member = FAMILY[name]
  factory, kwargs = member.factory, member.sizes(gap=GAP)
  tx = optax.inject_hyperparams(factory)(learning_rate=1e-2, **kwargs)
  static_args = ('rank', 'update_proj_gap') if member.refresh_gap else ('rank',)
  with pytest.raises(ValueError, match=re.escape(f'static_args={static_args!r}')):
    tx.init({'w': jnp.ones((6, 4))})
  static = optax.inject_hyperparams(factory, static_args=static_args)
  static(learning_rate=1e-2, **kwargs).init({'w': jnp.ones((6, 4))})


def test_update_proj_gap_is_an_injectable_hyperparameter():
  """A traced gap refreshes on the same steps as the Python int."""
  injected = optax.inject_hyperparams(optax_lean.adamsnsm, static_args=('rank',))
  tx = injected(learning_rate=1e-2, rank=2, update_proj_gap=GAP)
  params = draw({'w': (6, 4)}, jnp.float32, 0)
  grads = [draw({'w': (6, 4)}, jnp.float32, 1 + step) for step in range(2 * GAP + 1)]
  plain = optax_lean.adamsnsm(1e-2, rank=2, update_proj_gap=GAP)
  for a, b in zip(run_updates(tx, params, grads), run_updates(plain, params, grads)):
    np.testing.assert_allclose(a['w'], b['w'], rtol=1e-6, atol=1e-7)


def test_subset_size_array_says_how_to_keep_it_static():
  tx = optax.inject_hyperparams(optax_lean.adamsn)(learning_rate=1e-2, subset_size=4)
  with pytest.raises(ValueError, match=re.escape("static_args=('subset_size',)")):
    tx.init({'w': jnp.ones((6, 4))})


# Other inputs optax accepts.


@pytest.mark.parametrize('name', FACTORIES)
def test_zero_size_leaves(name):
  # 'w' stays leaf 0, so random projectors draw the same basis for it.
  shapes = {'w': (6, 4), 'x_empty': (0, 4), 'y_empty': (0,)}
  params, grads = draw(shapes, jnp.float32, 0), draw(shapes, jnp.float32, 1)
  (got,) = run_updates(make(name, dimension_numbers=None), params, [grads])
  (alone,) = run_updates(
    make(name, dimension_numbers=None), {'w': params['w']}, [{'w': grads['w']}]
  )
  assert got['x_empty'].shape == (0, 4) and got['y_empty'].shape == (0,)
  np.testing.assert_allclose(got['w'], alone['w'], rtol=1e-6)


@pytest.mark.parametrize('name', FACTORIES)
def test_python_float_leaves(name):
  tx = make(name, dimension_numbers=None)
  params = {'a': 1.0, 'w': jnp.ones((6, 4))}
  grads = {'a': 0.5, 'w': jnp.full((6, 4), 0.5)}
  updates, _ = tx.update(grads, tx.init(params), params)
  as_arrays = {'a': jnp.asarray(1.0), 'w': params['w']}
  expected, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(as_arrays), as_arrays)
  np.testing.assert_allclose(updates['a'], expected['a'])
  assert updates['a'].dtype == expected['a'].dtype


@pytest.mark.parametrize('name', FACTORIES)
def test_update_without_params_when_there_is_no_weight_decay(name):
  params = draw(SHAPES, jnp.float32, 0)
  grads = draw(SHAPES, jnp.float32, 1)
  tx = make(name)
  without, _ = jax.jit(tx.update)(grads, tx.init(params))
  with_params, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, without, with_params)
  decaying = make(name, weight_decay=0.1)
  with pytest.raises(ValueError, match='params'):
    decaying.update(grads, decaying.init(params))


@pytest.mark.parametrize('name', FACTORIES)
def test_learning_rate_none_gives_the_unscaled_direction(name):
  """As ``optax.adamw(None)``: no scaling, so the update is ``-1`` times lr 1's."""
  extra = {'base_learning_rate': 1.0} if name == 'online_subspace_descent' else {}
  params, grads = draw(SHAPES, jnp.float32, 0), [draw(SHAPES, jnp.float32, 1 + s) for s in range(4)]
  unscaled = run_updates(make(name, None, **extra), params, grads)
  unit = run_updates(make(name, 1.0, **extra), params, grads)
  for a, b in zip(unscaled, unit):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, -y, rtol=1e-6), a, b)


@pytest.mark.parametrize('name', DECAY_AFTER)
def test_learning_rate_none_with_decay_after_the_update_is_refused(name):
  extra = {'base_learning_rate': 1.0} if name == 'online_subspace_descent' else {}
  with pytest.raises(ValueError, match=r'^learning_rate=None .* needs weight_decay=0'):
    make(name, None, weight_decay=0.1, **extra)


@pytest.mark.parametrize('name', FACTORIES)
def test_mask_of_another_structure_is_refused_in_one_line(name):
  tx = make(name, dimension_numbers=None, mask={'w': True})
  with pytest.raises(ValueError, match=r'^mask must be a pytree prefix of the params') as error:
    tx.init({'w': jnp.ones((6, 4)), 'v': jnp.ones(4)})
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('name', FACTORIES)
def test_arguments_after_weight_decay_are_keyword_only(name):
  parameters = list(inspect.signature(FAMILY[name].factory).parameters.values())
  names = [p.name for p in parameters]
  after = parameters[names.index('weight_decay') + 1 :]
  assert after and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in after)
