"""Bad hyperparameters fail early, with a ValueError naming the argument and range."""

import jax.numpy as jnp
import optax
import pytest

import optax_lean
from optax_lean import DimensionNumbers

PARAMS = {'w': jnp.ones((4, 6)), 'b': jnp.ones(6)}

AT_CONSTRUCTION = [
  (lambda: optax_lean.adamsnsm(1e-2, rank=0), r'rank must be an int >= 1, got 0'),
  (lambda: optax_lean.adamsnsm(1e-2, rank=-3), r'rank must be an int >= 1'),
  (lambda: optax_lean.adamsnsm(1e-2, rank=2.5), r'rank must be an int >= 1'),
  (lambda: optax_lean.sgd_sm(1e-2, update_proj_gap=0), r'update_proj_gap must be an int >= 1'),
  (lambda: optax_lean.adamsnsm(1e-2, b1=1.0), r'b1 must be in \[0.0, 1.0\), got 1.0'),
  (lambda: optax_lean.adamsn(1e-2, b1=-0.1), r'b1 must be in \[0.0, 1.0\)'),
  (lambda: optax_lean.adamsnsm(1e-2, b2=1.5), r'b2 must be in \[0.0, 1.0'),
  (lambda: optax_lean.scale_by_subset_norm(b2=-0.5), r'b2 must be in \[0.0, 1.0\]'),
  (lambda: optax_lean.adamsnsm(1e-2, b2=1.0), r'b2 must be in \[0.0, 1.0\), got 1.0'),
  (
    lambda: optax_lean.scale_by_subset_norm(b2=1.0, bias_correction=True),
    r'b2 must be < 1 with bias_correction',
  ),
  (lambda: optax_lean.adamsnsm(1e-2, eps=-1e-8), r'eps must be >= 0'),
  (lambda: optax_lean.rmsprop_sn(1e-2, eps=-1.0), r'eps must be >= 0'),
  (lambda: optax_lean.adamsn(1e-2, subset_size=0), r"subset_size must be 'heuristic' or a non"),
  (lambda: optax_lean.adamsn(1e-2, subset_size='rows'), r"subset_size must be 'heuristic'"),
  (lambda: optax_lean.adamsnsm(1e-2, projector='qr'), r"projector must be 'auto', one of \["),
  (
    lambda: optax_lean.adamsnsm(1e-2, momentum_on_refresh='drop'),
    r"momentum_on_refresh must be one of \('official', 'reset', 'keep', 'rotate'\)",
  ),
  (lambda: optax_lean.adamsn(1e-2, weight_decay=-0.1), r'weight_decay must be >= 0'),
  (lambda: optax_lean.galore(1e-2, rank=0), r'rank must be an int >= 1, got 0'),
  (lambda: optax_lean.galore(1e-2, update_proj_gap=0), r'update_proj_gap must be an int >= 1'),
  (lambda: optax_lean.galore(1e-2, b1=1.0), r'b1 must be in \[0.0, 1.0\), got 1.0'),
  (lambda: optax_lean.galore(1e-2, b2=-0.1), r'b2 must be in \[0.0, 1.0\), got -0.1'),
  (lambda: optax_lean.galore(1e-2, eps=-1e-6), r'eps must be >= 0'),
  (lambda: optax_lean.galore(1e-2, weight_decay=-0.1), r'weight_decay must be >= 0'),
  (lambda: optax_lean.galore(1e-2, projector='qr'), r"projector must be 'auto', one of \["),
  (lambda: optax_lean.ldadam(1e-2, rank=0), r'rank must be an int >= 1, got 0'),
  (lambda: optax_lean.ldadam(1e-2, b2=1.0), r'b2 must be in \[0.0, 1.0\), got 1.0'),
  (lambda: optax_lean.ldadam(1e-2, rho=1.0), r'rho must be in \[0.0, 1.0\), got 1.0'),
  (lambda: optax_lean.ldadam(1e-2, weight_decay=-1.0), r'weight_decay must be >= 0'),
  (
    lambda: optax_lean.ldadam(1e-2, projector='random'),
    r"projector must be one of \('power_iteration', 'svd'\), got 'random'",
  ),
  (
    lambda: optax_lean.online_subspace_descent(1e-2, update_proj_gap=0),
    r'update_proj_gap must be an int >= 1',
  ),
  (
    lambda: optax_lean.online_subspace_descent(1e-2, projector_b1=1.0),
    r'projector_b1 must be in \[0.0, 1.0\), got 1.0',
  ),
  (
    lambda: optax_lean.online_subspace_descent(1e-2, projector_weight_decay=-0.1),
    r'projector_weight_decay must be >= 0',
  ),
  (
    lambda: optax_lean.online_subspace_descent(1e-2, orthogonality_penalty=-1.0),
    r'orthogonality_penalty must be >= 0',
  ),
  (
    lambda: optax_lean.online_subspace_descent(optax.constant_schedule(1e-2)),
    r'base_learning_rate must be given with a learning-rate schedule',
  ),
  (lambda: optax_lean.rso(1e-2, update_proj_gap=0), r'update_proj_gap must be an int >= 1'),
  (lambda: optax_lean.rso(1e-2, eps=-1.0), r'eps must be >= 0'),
  (
    lambda: optax_lean.rso(1e-2, side='left'),
    r"side must be one of \('smaller', 'larger', 'in', 'out'\), got 'left'",
  ),
  (
    lambda: optax_lean.SVDProjector(square_side='rows'),
    r"square_side must be 'in' or 'out', got 'rows'",
  ),
]


@pytest.mark.parametrize('factory, message', AT_CONSTRUCTION)
def test_raises_at_construction(factory, message):
  with pytest.raises(ValueError, match=message):
    factory()


AT_INIT = [
  (lambda: optax_lean.adamsn(1e-2, subset_size=25), r'subset_size must be at most the size'),
  (
    lambda: optax_lean.adamsnsm(1e-2, rank=2, dimension_numbers=DimensionNumbers(0, 2)),
    r'dimension_numbers: axis 2 is out of range for a leaf of shape \(4, 6\)',
  ),
  (
    lambda: optax_lean.adamsnsm(1e-2, rank=2, dimension_numbers=DimensionNumbers(0, 0)),
    r'must be non-empty and disjoint',
  ),
  (
    lambda: optax_lean.adamsnsm(1e-2, rank=2, mask={'w': True, 'b': True}),
    r'a leaf of shape \(6,\) has fewer than 2 axes',
  ),
  (
    lambda: optax_lean.ldadam(1e-2, rank=2, mask={'w': True, 'b': True}),
    r'a leaf of shape \(6,\) has fewer than 2 axes',
  ),
  (
    lambda: optax_lean.galore(1e-2, rank=2, dimension_numbers=DimensionNumbers(0, 2)),
    r'dimension_numbers: axis 2 is out of range for a leaf of shape \(4, 6\)',
  ),
]


@pytest.mark.parametrize('factory, message', AT_INIT)
def test_raises_at_init(factory, message):
  tx = factory()
  with pytest.raises(ValueError, match=message):
    tx.init(PARAMS)


def test_rank_above_the_matrix_is_clipped_with_a_warning():
  tx = optax_lean.adamsnsm(1e-2, rank=16)
  with pytest.warns(UserWarning, match=r'rank 16 exceeds .* shape \(4, 6\); using rank 4'):
    state = tx.init(PARAMS)
  assert state[0].numerator.mu['w'].shape == (4, 6)  # (rank, out)
  assert state[0].numerator.projector['w'].shape == (4, 4)  # (in, rank)


@pytest.mark.parametrize(
  'factory',
  [optax_lean.galore, optax_lean.ldadam, optax_lean.online_subspace_descent, optax_lean.rso],
)
def test_family_rank_above_the_matrix_is_clipped_with_a_warning(factory):
  tx = factory(1e-2, rank=16)
  with pytest.warns(UserWarning, match=r'rank 16 exceeds .* shape \(4, 6\); using rank 4'):
    state = tx.init(PARAMS)
  moments = getattr(state[0], 'subspace_adam', state[0])  # OSD's weights' Adam
  assert moments.mu['w'].shape == (4, 6)  # every rule projects the input axis here


def test_integer_subsets_apply_to_selected_vectors():
  tx = optax_lean.adamsn(1e-2, subset_size=-2, mask={'w': True, 'b': True})
  state = tx.init(PARAMS)
  assert state[0].denominator.nu['b'].shape == (6, 1)  # int(sqrt(6) / 2) = 1
