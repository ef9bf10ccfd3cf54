"""``scale_by_norm_growth_limit`` against a NumPy reference of APOLLO's official limiter."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_lean
from optax_lean import DimensionNumbers

SHAPES = {'tall': (10, 6), 'wide': (6, 10), 'square': (8, 8), 'stack': (3, 10, 6), 'vector': (6,)}
DIMS = {
  'tall': DimensionNumbers(),
  'wide': DimensionNumbers(),
  'square': DimensionNumbers(),
  'stack': DimensionNumbers(1, 2),
  'vector': None,
}


def reference_limiter(matrices, gamma=1.01, eps=1e-8):
  """APOLLO's ``AdamW.step`` limiter (apollo_torch/apollo.py), one matrix over the steps."""
  previous, out, limited = None, [], []
  for u in matrices:
    norm = np.linalg.norm(u)
    if previous is None:
      previous = norm
      out.append(u)
      limited.append(False)
      continue
    limiter = max(norm / (previous + eps), gamma) / gamma
    out.append(u / limiter)
    previous = norm / limiter
    limited.append(limiter > 1)
  return out, limited


def test_limits_each_matrix_as_the_official_code():
  # Updates whose norms grow fast on some steps and shrink on others.
  rng = np.random.default_rng(0)
  growth = [1.0, 1.5, 1.005, 0.5, 3.0, 1.0, 0.9, 2.0]
  steps = [
    {k: rng.normal(size=s) * np.prod(growth[: t + 1]) for k, s in SHAPES.items()}
    for t in range(len(growth))
  ]
  with jax.enable_x64(True):
    tx = optax_lean.scale_by_norm_growth_limit(dimension_numbers=DIMS)
    state = tx.init(jax.tree.map(jnp.asarray, steps[0]))
    update = jax.jit(tx.update)
    got = []
    for u in steps:
      out, state = update(jax.tree.map(jnp.asarray, u), state)
      got.append(jax.tree.map(np.asarray, out))
  seen_limited = set()
  for key in ('tall', 'wide', 'square'):
    want, limited = reference_limiter([u[key] for u in steps])
    seen_limited |= set(limited)
    for t in range(len(steps)):
      np.testing.assert_allclose(got[t][key], want[t], rtol=1e-12)
  for layer in range(3):  # each layer of the stack on its own
    want, limited = reference_limiter([u['stack'][layer] for u in steps])
    seen_limited |= set(limited)
    for t in range(len(steps)):
      np.testing.assert_allclose(got[t]['stack'][layer], want[t], rtol=1e-12)
  for t in range(len(steps)):
    np.testing.assert_array_equal(got[t]['vector'], steps[t]['vector'])
  assert seen_limited == {True, False}  # both branches of the limiter ran


def test_chains_and_keeps_float32_dtypes():
  tx = optax.chain(optax_lean.scale_by_norm_growth_limit(1.01), optax.scale(-0.1))
  params = {'w': jnp.ones((4, 6)), 'b': jnp.ones(6)}
  state = tx.init(params)
  for scale in (1.0, 4.0):
    updates, state = jax.jit(tx.update)({k: scale * p for k, p in params.items()}, state)
  np.testing.assert_allclose(jnp.linalg.norm(updates['w']), 0.1 * 1.01 * jnp.sqrt(24.0), rtol=1e-6)
  np.testing.assert_array_equal(updates['b'], -0.4 * params['b'])
  assert updates['w'].dtype == jnp.float32
