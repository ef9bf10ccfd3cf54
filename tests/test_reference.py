"""Every SN/SM optimizer against the independent NumPy reference.

One run per case drives a pytree of tall, wide and square kernels, a vector
(plain rule) and a stack of three kernels (scanned layers) for 30 steps with a
projector gap of 10 (refreshes at steps 1, 10, 20 and 30). Each update must
equal, at float32 tolerance, the official optimizer applied to the PyTorch
weight ``K.T`` (layer by layer for the stack).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lean
from optax_lean import DimensionNumbers
from tests.reference import GenericOptimReference

STEPS, GAP, RANK = 30, 10, 3
LR, WD = 0.05, 0.1
SHAPES = {
  'tall': (6, 10),  # Flax (in, out); PyTorch (10, 6): tall
  'wide': (10, 6),  # PyTorch (6, 10): wide
  'square': (8, 8),
  'vector': (7,),
  'stack': (3, 6, 10),  # three scanned (in, out) layers
}
MASK = {'tall': True, 'wide': True, 'square': True, 'vector': False, 'stack': True}
DIMS = {
  'tall': DimensionNumbers(),
  'wide': DimensionNumbers(),
  'square': DimensionNumbers(),
  'vector': None,
  'stack': DimensionNumbers(1, 2),
}
RULES = {'heuristic': 'heuristics', 5: 5, -2: -2}


def torch_matrices(name, x):
  """The PyTorch-oriented matrices of a leaf (one per layer of a stack)."""
  x = np.asarray(x, np.float64)
  if name == 'vector':
    return [x]
  if name == 'stack':
    return [layer.T for layer in x]
  return [x.T]


def given_projector(projector, name, layer, kind):
  """Our projector, in the reference's orientation, to replay a random draw."""
  state = projector[name]
  if kind == 'random':
    size = min(SHAPES[name][-2:])
    state = optax_lean.RandomProjector().basis(state, (*SHAPES[name][:-2], size, RANK), jnp.float32)
  state = np.asarray(state, np.float64)
  if name == 'stack':
    state = state[layer]
  if kind == 'uniform':
    return state.astype(int)
  n_in, n_out = SHAPES[name][-2:]
  return state.T if n_out >= n_in else state  # B (r, in) rows, or A (out, r)


def given_by(projector_of, kind):
  """Replays our random draws in the reference: ``given(state, name, layer)``."""
  if kind not in ('uniform', 'random', 'randomized_svd'):
    return None
  return lambda state, name, layer: (
    given_projector(projector_of(state), name, layer, kind) if MASK[name] else None
  )


def run_against_reference(
  tx, make_reference, given=None, *, learning_rate=LR, decay_after=True, dtype=jnp.float32
):
  """Drives ``tx`` and the references with the same gradients, step by step.

  ``given(state, name, layer)``, if set, is passed to each reference step (a
  projector to use at a refresh). Weight decay is applied after the update
  (Hugging Face order) or, with ``decay_after=False``, to the pre-update
  parameters (PyTorch/optax order). Parameters and gradients are ``dtype``.

  The float32 tolerance, rtol 1e-5, is set by what float32 cannot represent,
  the same on every machine: ``0.999`` rounds to 0.99900001, so ``1 - b2`` is
  off by 1.3e-5 and the first updates (a square root of it) by 6.4e-6. On top
  of that, the SVD bases of these random Gaussian gradients, whose top
  singular values are well separated, carry rounding of float32 eps over the
  relative gap, a few ulps. The worst comparison measured uses 0.62 of the
  bound (``test_rmsprop_sn``, the ``b2`` rounding alone). Runs whose
  conditioning is worse (LDAdam's per-step power iteration) pass
  ``dtype=jnp.float64``.
  """
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in SHAPES.items()}
  refs = {k: [make_reference(k, m.shape) for m in torch_matrices(k, v)] for k, v in params.items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(STEPS):
    lr = learning_rate(step) if callable(learning_rate) else learning_rate
    grads = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in SHAPES.items()}
    updates, state = update(grads, state, params)
    for name in SHAPES:
      got = torch_matrices(name, updates[name])
      for layer, (ref, g, p) in enumerate(
        zip(refs[name], torch_matrices(name, grads[name]), torch_matrices(name, params[name]))
      ):
        u = -lr * (ref.step(g) if given is None else ref.step(g, given(state, name, layer)))
        expected = u - lr * WD * (p + u) if decay_after else u - lr * WD * p
        np.testing.assert_allclose(
          got[layer], expected, rtol=1e-5, atol=1e-6, err_msg=f'{name}[{layer}] t={step + 1}'
        )
    params = optax.apply_updates(params, updates)


def reference_factory(
  *,
  momentum,
  second_moment,
  subset_size='heuristics',
  proj_type='svd',
  policy='official',
  b1=0.9,
  b2=0.999,
  correct_bias=True,
):
  def make(name, shape):
    special = MASK[name]
    return GenericOptimReference(
      shape,
      b1=b1,
      b2=b2,
      correct_bias=correct_bias,
      momentum=momentum if (special or momentum != 'sm') else 'ema',
      second_moment=second_moment if (special or second_moment != 'sn') else 'ema',
      subset_size=subset_size,
      rank=RANK,
      gap=GAP,
      proj_type=proj_type,
      policy=policy,
    )

  return make


sm_projector = lambda state: state[0].numerator.projector


@pytest.mark.parametrize('subset_size', list(RULES))
@pytest.mark.parametrize('projector', ['svd', 'topk', 'uniform', 'random', 'randomized_svd'])
def test_adamsnsm(subset_size, projector):
  tx = optax_lean.adamsnsm(
    LR,
    weight_decay=WD,
    rank=RANK,
    update_proj_gap=GAP,
    projector=projector,
    subset_size=subset_size,
    mask=MASK,
    dimension_numbers=DIMS,
  )
  proj_type = 'given' if projector in ('random', 'randomized_svd') else projector
  make = reference_factory(
    momentum='sm', second_moment='sn', subset_size=RULES[subset_size], proj_type=proj_type
  )
  run_against_reference(tx, make, given_by(sm_projector, projector))


@pytest.mark.parametrize('policy', ['official', 'keep', 'reset', 'rotate'])
@pytest.mark.parametrize('projector', ['svd', 'topk'])
def test_momentum_on_refresh(policy, projector):
  tx = optax_lean.adamsnsm(
    LR,
    weight_decay=WD,
    rank=RANK,
    update_proj_gap=GAP,
    projector=projector,
    mask=MASK,
    dimension_numbers=DIMS,
    momentum_on_refresh=policy,
  )
  make = reference_factory(momentum='sm', second_moment='sn', proj_type=projector, policy=policy)
  run_against_reference(tx, make)


@pytest.mark.parametrize('subset_size', list(RULES))
def test_adamsn(subset_size):
  tx = optax_lean.adamsn(
    LR, weight_decay=WD, subset_size=subset_size, mask=MASK, dimension_numbers=DIMS
  )
  run_against_reference(
    tx, reference_factory(momentum='ema', second_moment='sn', subset_size=RULES[subset_size])
  )


def test_adamsn_without_momentum_is_bias_corrected_rmsprop_sn():
  tx = optax_lean.adamsn(LR, b1=0.0, weight_decay=WD, mask=MASK, dimension_numbers=DIMS)
  run_against_reference(tx, reference_factory(momentum='none', second_moment='sn', b1=0.0))


def test_rmsprop_sn():
  tx = optax_lean.rmsprop_sn(LR, weight_decay=WD, subset_size=-2, mask=MASK, dimension_numbers=DIMS)
  run_against_reference(
    tx,
    reference_factory(
      momentum='none', second_moment='sn', subset_size=-2, b1=0.0, correct_bias=False
    ),
  )


def test_adagrad_sn():
  tx = optax_lean.adagrad_sn(LR, weight_decay=WD, mask=MASK, dimension_numbers=DIMS)
  run_against_reference(
    tx, reference_factory(momentum='ema', second_moment='sn', b2=1.0, correct_bias=False)
  )


def test_adagrad_snsm():
  tx = optax_lean.adagrad_snsm(
    LR, weight_decay=WD, rank=RANK, update_proj_gap=GAP, mask=MASK, dimension_numbers=DIMS
  )
  run_against_reference(
    tx, reference_factory(momentum='sm', second_moment='sn', b2=1.0, correct_bias=False)
  )


def test_sgd_sm():
  tx = optax_lean.sgd_sm(
    LR, weight_decay=WD, rank=RANK, update_proj_gap=GAP, mask=MASK, dimension_numbers=DIMS
  )
  run_against_reference(
    tx, reference_factory(momentum='sm', second_moment='none', correct_bias=False)
  )


def test_sgd_sm_momentum_in_subspace_only():
  """sgd_sm's projector field is its own state's, not a ratio's."""
  tx = optax_lean.sgd_sm(LR, rank=RANK, update_proj_gap=GAP, mask=MASK, dimension_numbers=DIMS)
  state = tx.init({k: jnp.zeros(s) for k, s in SHAPES.items()})
  assert state[0].mu['tall'].shape == (RANK, 10)
  assert state[0].mu['wide'].shape == (10, RANK)
  assert state[0].mu['stack'].shape == (3, RANK, 10)
  assert state[0].projector['vector'] is None
