"""Identities the SN/SM rules must satisfy, whatever the implementation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lean
from optax_lean import DimensionNumbers

SHAPES = {'tall': (5, 9), 'wide': (9, 5), 'square': (6, 6), 'stack': (2, 5, 9)}
DIMS = {
  'tall': DimensionNumbers(),
  'wide': DimensionNumbers(),
  'square': DimensionNumbers(),
  'stack': DimensionNumbers(1, 2),
}
ALL = jax.tree.map(lambda _: True, SHAPES, is_leaf=lambda x: isinstance(x, tuple))
NONE = jax.tree.map(lambda _: False, SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def gradient_stream(steps, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
    for _ in range(steps)
  ]


def outputs(tx, grads, params=None):
  """The updates of a jitted run over the list ``grads`` (params fixed, zeros by default)."""
  params = jax.tree.map(jnp.zeros_like, grads[0]) if params is None else params
  state = tx.init(params)
  update = jax.jit(tx.update)
  result = []
  for g in grads:
    u, state = update(g, state, params)
    result.append(u)
  return result, state


def full_rank_rotating(projector, **options):
  """Subspace momentum over the whole smaller axis of every leaf, rotated at each refresh."""
  return optax_lean.scale_by_subspace_momentum(
    0.9,
    rank=9,
    update_proj_gap=4,
    projector=projector,
    momentum_on_refresh='rotate',
    mask=ALL,
    dimension_numbers=DIMS,
    **options,
  )


@pytest.mark.parametrize('projector', ['svd', 'randomized_svd', 'random'])
def test_full_rank_rotate_equals_full_momentum(projector):
  grads = gradient_stream(16)
  lean = full_rank_rotating(projector, bias_correction=True)
  full = optax_lean.scale_by_subspace_momentum(0.9, mask=NONE, bias_correction=True)
  with pytest.warns(UserWarning, match='exceeds'):  # rank 9 is clipped to 6 and 5
    got, _ = outputs(lean, grads)
  want, _ = outputs(full, grads)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def polar(x):
  """``U V^T`` of each matrix of ``x`` (float64 NumPy)."""
  u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  return u @ vt


@pytest.mark.parametrize('bias_correction', [False, True])
@pytest.mark.parametrize('projector', ['svd', 'random'])
def test_full_rank_orthogonalised_momentum_is_the_polar_factor_of_full_momentum(
  projector, bias_correction
):
  # A subspace of the whole smaller axis leaves no residual, and rotating keeps the momentum
  # whole: Q polar(Q^T M) = polar(M) for an orthogonal Q. So SUMO at full rank is Muon with
  # an exact polar factor, which a bias correction (of the residual alone) leaves as it is.
  grads = gradient_stream(12)
  lean = full_rank_rotating(projector, orthogonalize=True, bias_correction=bias_correction)
  with pytest.warns(UserWarning, match='exceeds'):
    got, _ = outputs(lean, grads)
  momentum = jax.tree.map(jnp.zeros_like, grads[0])
  for g, u in zip(grads, got):
    momentum = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, momentum, g)
    want = jax.tree.map(polar, momentum)
    chex.assert_trees_all_close(u, want, rtol=1e-4, atol=1e-5)


def test_orthogonal_factor_drops_the_null_directions():
  from optax_lean._src.projectors import orthogonal_factor

  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(5, 1)), rng.normal(size=(1, 8))
  rank_one = orthogonal_factor(jnp.asarray(a @ b, jnp.float32))
  np.testing.assert_allclose(rank_one, a @ b / np.linalg.norm(a) / np.linalg.norm(b), atol=1e-6)
  assert not np.any(orthogonal_factor(jnp.zeros((5, 8))))
  full = orthogonal_factor(jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32))
  np.testing.assert_allclose(
    full @ np.swapaxes(full, -1, -2), np.broadcast_to(np.eye(5), (3, 5, 5)), atol=1e-5
  )


@pytest.mark.parametrize('projector', ['svd', 'topk', 'uniform', 'random', 'randomized_svd'])
def test_policies_agree_without_refresh(projector):
  grads = gradient_stream(12)
  results = [
    outputs(
      optax_lean.scale_by_subspace_momentum(
        0.9,
        rank=2,
        update_proj_gap=100,
        projector=projector,
        momentum_on_refresh=policy,
        mask=ALL,
        dimension_numbers=DIMS,
      ),
      grads,
    )[0]
    for policy in ('official', 'reset', 'keep', 'rotate')
  ]
  for other in results[1:]:
    chex.assert_trees_all_close(other, results[0], rtol=1e-6, atol=1e-7)


def test_policies_differ_after_a_refresh():
  grads = gradient_stream(6)
  results = {
    policy: outputs(
      optax_lean.scale_by_subspace_momentum(
        0.9, rank=2, update_proj_gap=3, momentum_on_refresh=policy, mask=ALL, dimension_numbers=DIMS
      ),
      grads,
    )[0][-1]['tall']
    for policy in ('official', 'reset', 'keep', 'rotate')
  }
  values = list(results.values())
  for i, a in enumerate(values):
    for b in values[i + 1 :]:
      assert not np.allclose(a, b)


def test_subset_size_one_is_coordinatewise_adam():
  grads = gradient_stream(10)
  sn = optax_lean.adamsn(1e-2, eps=0.0, subset_size=1, mask=ALL, dimension_numbers=DIMS)
  adam = optax.adam(1e-2, eps=0.0)
  got, _ = outputs(sn, grads)
  want, _ = outputs(adam, grads)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-8)


def test_plain_leaves_are_huggingface_adam():
  """Without SN, eps sits on the uncorrected root: Adam with eps/sqrt(1-b2^t)."""
  grads = gradient_stream(5)
  got, _ = outputs(optax_lean.adamsn(1e-2, eps=1e-3, mask=NONE), grads)
  for t, g in enumerate(grads, start=1):
    tx = optax.adam(1e-2, eps=1e-3 / np.sqrt(1 - 0.999**t))
    want, _ = outputs(tx, grads[:t])
    chex.assert_trees_all_close(got[t - 1], want[-1], rtol=1e-5)
    del g


@pytest.mark.parametrize(
  'factory',
  [
    lambda: optax_lean.adamsnsm(1e-2, b1=0.0, rank=2, dimension_numbers=DIMS),
    lambda: optax_lean.sgd_sm(1e-2, b1=0.0, rank=2, dimension_numbers=DIMS),
    lambda: optax_lean.adamsn(1e-2, b1=0.0, dimension_numbers=DIMS),
    lambda: optax_lean.adagrad_sn(1e-2, b1=0.0, dimension_numbers=DIMS),
  ],
)
def test_no_momentum_state_when_b1_is_zero(factory):
  state = factory().init({k: jnp.zeros(s) for k, s in SHAPES.items()})
  kinds = optax_lean.state_bytes_by_kind(state)
  assert 'mu' not in kinds and 'ema' not in kinds and 'projector' not in kinds


def test_stack_equals_layer_by_layer():
  grads = gradient_stream(12)
  stacked = optax_lean.adamsnsm(1e-2, rank=2, update_proj_gap=5, mask=ALL, dimension_numbers=DIMS)
  got, _ = outputs(stacked, grads)
  for layer in range(2):
    single = optax_lean.adamsnsm(1e-2, rank=2, update_proj_gap=5)
    per_layer = [{'w': g['stack'][layer]} for g in grads]
    want, _ = outputs(single, per_layer)
    for a, b in zip(got, want):
      np.testing.assert_allclose(a['stack'][layer], b['w'], rtol=1e-5, atol=1e-7)


def test_transposed_layout_equals_its_transpose():
  """A kernel stored (out, in) with dimension numbers equals the (in, out) one."""
  grads = gradient_stream(12)
  tx = optax_lean.adamsnsm(1e-2, rank=2, update_proj_gap=5, subset_size=-2)
  flipped = optax_lean.adamsnsm(
    1e-2, rank=2, update_proj_gap=5, subset_size=-2, dimension_numbers=DimensionNumbers(1, 0)
  )
  got, _ = outputs(flipped, [{'w': g['tall'].T} for g in grads])
  want, _ = outputs(tx, [{'w': g['tall']} for g in grads])
  for a, b in zip(got, want):
    np.testing.assert_allclose(a['w'].T, b['w'], rtol=1e-5, atol=1e-7)


def test_merged_axes_equal_a_reshaped_kernel():
  """An attention kernel (embed, heads, head_dim) reads as (embed, heads * head_dim)."""
  grads = gradient_stream(12)
  tx = optax_lean.adamsnsm(1e-2, rank=2, update_proj_gap=5, subset_size=4)
  attn = optax_lean.adamsnsm(
    1e-2,
    rank=2,
    update_proj_gap=5,
    subset_size=4,
    mask={'w': True},
    dimension_numbers=DimensionNumbers(0, (1, 2)),
  )
  got, _ = outputs(attn, [{'w': g['wide'].reshape(9, 5, 1)} for g in grads])
  want, _ = outputs(tx, [{'w': g['wide']} for g in grads])
  for a, b in zip(got, want):
    np.testing.assert_allclose(a['w'].reshape(9, 5), b['w'], rtol=1e-5, atol=1e-7)
