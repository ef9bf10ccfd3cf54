"""GaLore, LDAdam, Online Subspace Descent and RSO against independent NumPy references.

The same harness as ``test_reference.py``: tall, wide and square kernels, a
vector (plain rule) and a stack of three kernels, 30 steps with gap 10
(refreshes at 0-based steps 0, 10 and 20; LDAdam and OSD move their subspace
every step). Each update must equal, at float32 tolerance, the official
optimizer applied to the PyTorch weight ``K.T`` (layer by layer for the stack).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lean
from tests.reference_family import (
  GaLoreAdamWReference,
  LDAdamWReference,
  OnlineSubspaceDescentReference,
  RandomSubspaceReference,
)
from tests.test_reference import (
  DIMS,
  GAP,
  LR,
  MASK,
  RANK,
  SHAPES,
  WD,
  given_by,
  run_against_reference,
)

COMMON = dict(weight_decay=WD, rank=RANK, mask=MASK, dimension_numbers=DIMS)


@pytest.mark.parametrize('projector', ['svd', 'random'])
def test_galore(projector):
  tx = optax_lean.galore(LR, update_proj_gap=GAP, scale=0.25, projector=projector, **COMMON)
  proj_type = 'given' if projector == 'random' else 'svd'
  make = lambda name, shape: GaLoreAdamWReference(
    shape, rank=RANK, gap=GAP, scale=0.25, projected=MASK[name], proj_type=proj_type
  )
  run_against_reference(tx, make, given_by(lambda state: state[0].projector, projector))


@pytest.mark.parametrize(
  'projector, error_feedback',
  [('power_iteration', True), ('power_iteration', False), ('svd', True)],
)
def test_ldadam(projector, error_feedback):
  tx = optax_lean.ldadam(LR, error_feedback=error_feedback, projector=projector, **COMMON)
  make = lambda name, shape: LDAdamWReference(
    shape,
    rank=RANK,
    error_feedback=error_feedback,
    lowrank=MASK[name],
    proj_method=projector,
  )
  # The comparison runs in float64, refreshes included. At k = 1 the
  # projection-aware second moment subtracts two equal numbers (v / (1 - b2)
  # and (m / (1 - b1))^2), and one power iteration per step on random
  # gradients, whose top singular values lie close together, amplifies a
  # basis's rounding by 1 / (relative gap); in float32 that left 0.6% between
  # machines with different vector units. In float64 both stay far below the
  # float32 tolerance asserted.
  with jax.enable_x64(True):
    run_against_reference(tx, make, decay_after=False, dtype=jnp.float64)


@pytest.mark.parametrize('scheduled, penalty', [(False, 0.0), (True, 0.5)])
def test_online_subspace_descent(scheduled, penalty):
  base = 0.1
  schedule = optax.linear_schedule(base, base / 10, 30)
  learning_rate = schedule if scheduled else LR
  tx = optax_lean.online_subspace_descent(
    learning_rate,
    update_proj_gap=GAP,
    base_learning_rate=base if scheduled else None,
    orthogonality_penalty=penalty,
    **COMMON,
  )
  ratio = (lambda k: float(schedule(k)) / base) if scheduled else (lambda k: 1.0)
  make = lambda name, shape: OnlineSubspaceDescentReference(
    shape, rank=RANK, gap=GAP, projected=MASK[name], lr_ratio=ratio, penalty=penalty
  )
  run_against_reference(tx, make, learning_rate=learning_rate)


def test_rso():
  tx = optax_lean.rso(LR, update_proj_gap=GAP, **COMMON)

  def given(state, name, layer):
    if not MASK[name]:
      return None
    shape = (*SHAPES[name][:-1], RANK)  # (…, in, r): the input side
    basis = optax_lean.RandomProjector().basis(state[0].projector[name], shape, jnp.float32)
    basis = np.asarray(basis, np.float64)
    return basis[layer] if name == 'stack' else basis

  make = lambda name, shape: RandomSubspaceReference(shape, gap=GAP, projected=MASK[name])
  run_against_reference(tx, make, given, decay_after=False)


@pytest.mark.parametrize('shape', [(10, 6), (6, 10), (8, 8)])
def test_reference_pca_gradient_is_the_loss_gradient(shape):
  """The reference's closed form, against central finite differences."""
  rng = np.random.default_rng(0)
  g = rng.normal(size=shape)
  ref = OnlineSubspaceDescentReference(shape, rank=RANK, penalty=0.3)
  proj = ref.new_projector(g, None) + 0.1 * rng.normal(size=ref.new_projector(g, None).shape)
  numeric = np.zeros_like(proj)
  for index in np.ndindex(proj.shape):
    delta = np.zeros_like(proj)
    delta[index] = 1e-6
    numeric[index] = (ref.pca_loss(proj + delta, g) - ref.pca_loss(proj - delta, g)) / 2e-6
  np.testing.assert_allclose(ref.pca_gradient(proj, g), numeric, rtol=1e-6, atol=1e-8)


def test_library_pca_gradient_is_the_loss_gradient():
  """The library's closed form, against ``jax.grad`` of the loss (stacked)."""
  from optax_lean._src.online_subspace import pca_loss_gradient

  rng = np.random.default_rng(1)
  g = jnp.asarray(rng.normal(size=(2, 9, 5)), jnp.float32)
  basis = jnp.asarray(rng.normal(size=(2, 9, 3)), jnp.float32)

  def loss(p):
    g_hat = g / jnp.linalg.norm(g, axis=(-2, -1), keepdims=True)
    residual = p @ (jnp.swapaxes(p, -1, -2) @ g_hat) - g_hat
    gram = jnp.swapaxes(p, -1, -2) @ p - jnp.eye(3)[None]
    return jnp.sum(residual**2) + 0.3 * jnp.sum(gram**2)

  np.testing.assert_allclose(
    pca_loss_gradient(basis, g, 0.3), jax.grad(loss)(basis), rtol=1e-4, atol=1e-5
  )
