"""A refresh shares its decompositions out over the mesh, and changes nothing else.

Stacked kernels ``(layers, in, out)`` sharded on a matrix axis over ``fsdp=8``,
as the example trainer shards them: each device decomposes one layer of each
stack (read off the compiled program), and the run over several refreshes
equals the unsharded one, for every projector, on Auto meshes (traced under
the mesh as context) and Explicit ones.

The gradients have well-separated singular values (ratio 0.7 between
neighbours), so a top-``r`` basis moves by about float32's rounding over the
gap, far below the tolerance; every other difference is the summation order
of sharded contractions, as in ``test_sharding``.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_lean

LAYERS, RANK, GAP, STEPS = 8, 4, 2, 6
SPECS = {
  'attn': ((LAYERS, 32, 16), P(None, 'fsdp', None)),
  'mlp': ((LAYERS, 16, 48), P(None, None, 'fsdp')),
  'head': ((16, 64), P(None, 'fsdp')),
}
MASK = {name: True for name in SPECS}
DIMS = {name: optax_lean.DimensionNumbers() for name in SPECS}
COMMON = dict(rank=RANK, mask=MASK, dimension_numbers=DIMS)
OPTIMIZERS = {
  **{
    f'adamsnsm_{name}': lambda name=name: optax_lean.adamsnsm(
      1e-2, update_proj_gap=GAP, projector=name, **COMMON
    )
    for name in ('svd', 'randomized_svd', 'random', 'power_iteration')
  },
  'galore_randomized_oversampled': lambda: optax_lean.galore(
    1e-2,
    update_proj_gap=GAP,
    projector=optax_lean.RandomizedSVDProjector(oversample=2, power_iterations=1),
    **COMMON,
  ),
  'ldadam': lambda: optax_lean.ldadam(1e-2, **COMMON),
  'online_subspace_descent': lambda: optax_lean.online_subspace_descent(
    1e-2, update_proj_gap=GAP, **COMMON
  ),
}


def separated(rng, shape):
  """A stack of matrices with singular values 0.7 apart (ratio), random vectors."""
  *batch, m, n = shape
  k = min(m, n)
  u = np.linalg.qr(rng.normal(size=(*batch, m, k)))[0]
  v = np.linalg.qr(rng.normal(size=(*batch, n, k)))[0]
  return (u * 0.7 ** np.arange(k)) @ np.swapaxes(v, -1, -2)


def gradients(step):
  rng = np.random.default_rng(step)
  return {k: jnp.asarray(separated(rng, shape), jnp.float32) for k, (shape, _) in SPECS.items()}


def run(tx, mesh=None):
  """``STEPS`` updates from all-ones parameters; the last updates and the jitted step."""
  params = {k: jnp.ones(shape) for k, (shape, _) in SPECS.items()}

  def step(g, state, p):
    if mesh is None:
      return tx.update(g, state, p)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return tx.update(g, state, p)

  if mesh is None:
    jitted, state, put = jax.jit(step), tx.init(params), lambda x: x
  else:
    param_shd = {k: NamedSharding(mesh, spec) for k, (_, spec) in SPECS.items()}
    state_shd = optax_lean.state_sharding(tx, params, param_shd)
    put = lambda tree: jax.device_put(tree, param_shd)
    params = put(params)
    jitted = jax.jit(step, out_shardings=(param_shd, state_shd))
    state = jax.jit(tx.init, out_shardings=state_shd)(params)
  history = []
  for index in range(1, STEPS + 1):
    # Each step waits for the last, so that no one-device program is queued
    # among the eight-device ones on a machine with fewer cores than devices.
    updates, state = jax.block_until_ready(jitted(put(gradients(index)), state, params))
    history.append(updates)
  return history, jitted, (put(gradients(1)), state, params)


def decomposed_batches(compiled_text):
  """The leading (batch) extent of every SVD and QR custom call in per-device HLO."""
  found = []
  for line in compiled_text.splitlines():
    target = re.search(r'custom_call_target="[^"]*(gesdd|gesvd|geqrf)', line)
    if 'custom-call(' in line and target:
      dims = re.search(r'\[([\d,]*)\]', line.split('=', 1)[1]).group(1).split(',')
      found.append(int(dims[0]) if len(dims) == 3 else None)
  return found


@pytest.mark.parametrize('axis_type', [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_shared_refresh_equals_unsharded(name, axis_type):
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(axis_type,))
  want, _, _ = run(OPTIMIZERS[name]())
  got, jitted, args = run(OPTIMIZERS[name](), mesh)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  assert jitted._cache_size() == 1

  batches = decomposed_batches(jitted.lower(*args).compile().as_text())
  if name != 'adamsnsm_random':  # its refresh draws a key; its QR runs every step
    assert batches, 'the refresh decomposes nothing'
  # Every stack's decomposition covers one layer per device; only the single
  # 'head' matrix (no batch axis) is decomposed whole on every device.
  assert all(batch in (1, None) for batch in batches), batches


def test_refresh_without_a_mesh_context_is_shared_too():
  """Under an Auto mesh and no context mesh, the mesh is read off the inputs' types."""
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(AxisType.Auto,))
  tx = OPTIMIZERS['adamsnsm_svd']()
  params = {k: jnp.ones(shape) for k, (shape, _) in SPECS.items()}
  param_shd = {k: NamedSharding(mesh, spec) for k, (_, spec) in SPECS.items()}
  state_shd = optax_lean.state_sharding(tx, params, param_shd)
  state = jax.eval_shape(tx.init, params)
  jitted = jax.jit(tx.update, in_shardings=(param_shd, state_shd, param_shd))
  batches = decomposed_batches(jitted.lower(params, state, params).compile().as_text())
  assert batches and all(batch in (1, None) for batch in batches), batches


def test_random_projector_basis_is_drawn_per_device():
  """The random projector's per-step QR, too, runs on each device's own layers."""
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(AxisType.Explicit,))
  tx = optax.chain(optax_lean.scale_by_subspace_momentum(projector='random', **COMMON))
  _, jitted, args = run(tx, mesh)
  text = jitted.lower(*args).compile().as_text()
  qr = [b for b in decomposed_batches(text) if b is not None]
  assert qr and all(batch == 1 for batch in qr), qr
