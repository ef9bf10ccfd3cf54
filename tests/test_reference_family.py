"""The GaLore family, APOLLO, SCALE and SUMO against independent NumPy references.

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
  ApolloReference,
  GaLoreAdamWReference,
  LDAdamWReference,
  OnlineSubspaceDescentReference,
  RandomSubspaceReference,
  ScaleReference,
  SumoReference,
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


@pytest.mark.parametrize('mini', [False, True])
@pytest.mark.parametrize('rule', ['official', 'paper'])
def test_apollo(mini, rule):
  if mini:
    common = {k: v for k, v in COMMON.items() if k != 'rank'}  # Mini's rank, 1
    tx = optax_lean.apollo_mini(LR, update_proj_gap=GAP, rule=rule, **common)
    rank, options = 1, dict(scale=128.0, scale_type='tensor', rule=rule)
  else:
    tx = optax_lean.apollo(LR, update_proj_gap=GAP, rule=rule, **COMMON)
    rank, options = RANK, dict(rule=rule)

  def given(state, name, layer):
    if not MASK[name]:
      return None
    torch_shape = SHAPES[name][-2:][::-1]  # (out, in) of the PyTorch weight
    size = min(torch_shape)  # the smaller axis is sketched (a square one's in axis)
    key = state[0][0].projector[name]
    sketch = optax_lean.GaussianProjector().basis(key, (*key.shape[:-1], size, rank), jnp.float32)
    sketch = np.asarray(sketch, np.float64)
    return sketch[layer] if name == 'stack' else sketch

  make = lambda name, shape: ApolloReference(shape, gap=GAP, projected=MASK[name], **options)
  run_against_reference(tx, make, given, decay_after=rule == 'official')


def test_apollo_sketch_is_gaussian_of_variance_one_over_rank_and_redrawn_at_refreshes():
  tx = optax_lean.scale_by_apollo(rank=64, update_proj_gap=2)
  params = {'w': jnp.zeros((512, 1024))}
  state = tx.init(params)
  keys = []
  for _ in range(4):
    _, state = tx.update({'w': jnp.ones((512, 1024))}, state)
    keys.append(np.asarray(state.projector['w']))
  assert (keys[0] == keys[1]).all() and (keys[2] == keys[3]).all()  # kept between refreshes
  assert not (keys[1] == keys[2]).all()  # redrawn at the refresh
  sketch = optax_lean.GaussianProjector().basis(state.projector['w'], (512, 64), jnp.float32)
  # 32768 draws: the sample variance is within 4 standard errors (sqrt(2/N) = 0.8%).
  np.testing.assert_allclose(np.var(sketch) * 64, 1.0, rtol=0.032)
  np.testing.assert_allclose(np.mean(sketch), 0.0, atol=4 / np.sqrt(32768 * 64))


# A small LLaMA-like model in Flax's layout: an embedding (vocabulary 12), a
# scanned stack of two square kernels, a wide and a tall kernel, a norm scale
# and the output head.
SCALE_SHAPES = {
  'embed': {'embedding': (12, 6)},
  'layers': {'attn': {'kernel': (2, 6, 6)}},
  'mlp': {'up': {'kernel': (6, 10)}, 'down': {'kernel': (10, 6)}},
  'norm': {'scale': (6,)},
  'lm_head': {'kernel': (6, 12)},
}


def to_torch(path, x):
  """A Flax leaf in PyTorch's layout: kernels ``(…, in, out)`` become ``(…, out, in)``."""
  return np.swapaxes(x, -1, -2) if optax_lean_names(path)[-1] == 'kernel' else x


def optax_lean_names(path):
  return [getattr(k, 'key', None) for k in path]


@pytest.mark.parametrize('layout', ['flax', 'torch'])
def test_scale(layout):
  """SCALE's update on every kind of leaf equals the official step, in either layout.

  The PyTorch layout reads its ``(…, out, in)`` kernels with
  ``DimensionNumbers(-1, -2)``; its embedding is the same ``(vocabulary,
  features)`` table as Flax's, read with the default.
  """
  lr, adam_lr, steps = 0.02, 0.005, 12
  is_shape = lambda x: isinstance(x, tuple) and all(isinstance(n, int) for n in x)
  rng = np.random.default_rng(0)
  draw = lambda: jax.tree_util.tree_map_with_path(
    lambda path, s: to_torch(path, rng.normal(size=s)) if layout == 'torch' else rng.normal(size=s),
    SCALE_SHAPES,
    is_leaf=is_shape,
  )
  kernel = (
    optax_lean.DimensionNumbers(-1, -2) if layout == 'torch' else optax_lean.DimensionNumbers()
  )
  dims = jax.tree_util.tree_map_with_path(
    lambda path, s: (
      kernel if optax_lean_names(path)[-1] == 'kernel' else optax_lean.DimensionNumbers()
    ),
    SCALE_SHAPES,
    is_leaf=is_shape,
  )
  mask = jax.tree.map(lambda s: len(s) > 1, SCALE_SHAPES, is_leaf=is_shape)
  options = dict(dimension_numbers=dims, mask=mask)
  tx = optax_lean.scale(lr, weight_decay=WD, adam_learning_rate=adam_lr, **options)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), draw())
  with_paths = jax.tree_util.tree_flatten_with_path(params)[0]

  def reference(path, p):
    names = optax_lean_names(path)
    if p.ndim == 1:
      return ScaleReference('oned')
    if names[0] == 'embed':
      return ScaleReference('main', col_dim=0)
    return ScaleReference('secondary' if names[0] == 'lm_head' else 'main', col_dim=1)

  # In PyTorch's layout a stack of weights is one reference per layer.
  refs = [
    [reference(path, p)] if p.ndim < 3 else [reference(path, p) for _ in p]
    for path, p in with_paths
  ]
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(steps):
    grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), draw())
    updates, state = update(grads, state, params)
    leaves = zip(jax.tree.leaves(updates), jax.tree.leaves(grads), jax.tree.leaves(params), refs)
    for (path, _), got, g, p, layer_refs in zip(with_paths, *zip(*leaves)):
      g, p, got = (np.asarray(x, np.float64) for x in (g, p, got))
      if layout == 'flax' and optax_lean_names(path)[-1] == 'kernel':  # the reference's layout
        g, p, got = (np.swapaxes(x, -1, -2) for x in (g, p, got))
      rate = adam_lr if p.ndim == 1 else lr
      layers = zip(layer_refs, g, p, got) if p.ndim == 3 else [(layer_refs[0], g, p, got)]
      for ref, g_l, p_l, got_l in layers:
        expected = -rate * (ref.step(g_l) + WD * p_l)
        np.testing.assert_allclose(
          got_l,
          expected,
          rtol=1e-5,
          atol=1e-7,
          err_msg=f'{jax.tree_util.keystr(path)} t={step + 1}',
        )
    params = optax.apply_updates(params, updates)


@pytest.mark.parametrize(
  'momentum, nesterov, policy, consistent_rms, residual',
  [
    (0.9, False, 'keep', 0.2, 'gradient'),  # the official code without its Nesterov
    (0.95, True, 'keep', 0.2, 'gradient'),  # the official defaults: an EMA of decay 0.95**2
    (0.9, False, 'rotate', None, 'gradient'),  # Algorithm 1: rotated, no RMS matching
    (0.9, False, 'keep', 0.2, 'subset_norm'),  # the variant: AdamSNSM's residual
  ],
)
def test_sumo(momentum, nesterov, policy, consistent_rms, residual):
  b1 = momentum**2 if nesterov else momentum
  tx = optax_lean.sumo(
    LR,
    b1,
    update_proj_gap=GAP,
    projector='svd',
    momentum_on_refresh=policy,
    consistent_rms=consistent_rms,
    residual=residual,
    **COMMON,
  )
  make = lambda name, shape: SumoReference(
    shape,
    momentum=momentum,
    nesterov=nesterov,
    rank=RANK,
    gap=GAP,
    consistent_rms=consistent_rms,
    policy=policy,
    residual=residual,
    projected=MASK[name],
  )
  # The polar factor moves by about eps / sigma_min of the momentum; these momenta (rank 3)
  # stay within a condition number of 6 (measured), so float32 holds: the worst comparison
  # uses 0.27 of the tolerance (the subset-norm variant's b2 rounding).
  run_against_reference(tx, make)
