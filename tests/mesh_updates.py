"""Every low-rank optimizer of the trainer on a 2-D mesh: its update equals the unsharded one.

Run as ``python -m tests.mesh_updates`` (``test_mesh.py`` runs it in a
subprocess, so that a deadlock fails the test instead of hanging the suite).
For the toy model, scanned and unscanned, with the trainer's FSDP shardings
on a ``data=2, fsdp=4`` mesh of 8 fake CPU devices, each optimizer of the
registry that keeps low-rank state, each engine once (with a stored and a
drawn basis), takes three updates, through two projector refreshes, and is
compared with the same updates on one device. Exits non-zero, naming the optimizer, on a mismatch.

The gradients have well-separated singular values (ratio 0.7 between
neighbours), so a top-``r`` basis moves by about float32's rounding over the
gap: the tolerance of ``test_shared_refresh.py``.
"""

from __future__ import annotations

import sys

import jax

jax.config.update('jax_num_cpu_devices', 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from examples.llama import mesh as mesh_lib  # noqa: E402
from examples.llama import optimizers  # noqa: E402
from examples.llama.configs import get_config  # noqa: E402
from examples.llama.model import Llama  # noqa: E402

STEPS, GAP, RANK = 3, 2, 4
# Each engine once (adagrad_snsm and sgd_sm are adamsnsm's), and a drawn basis.
CASES = [
  ('adamsnsm', 'svd'),
  ('adamsnsm', 'random'),
  ('galore', 'svd'),
  ('ldadam', 'power_iteration'),
  ('online_subspace_descent', 'svd'),
  ('rso', 'random'),
]


def separated(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Matrices (or a vector) with singular values 0.7 apart (ratio), random vectors."""
  if len(shape) < 2:
    return rng.normal(size=shape)
  *batch, m, n = shape
  k = min(m, n)
  u = np.linalg.qr(rng.normal(size=(*batch, m, k)))[0]
  v = np.linalg.qr(rng.normal(size=(*batch, n, k)))[0]
  return (u * 0.7 ** np.arange(k)) @ np.swapaxes(v, -1, -2)


def updates(tx, params, shardings, device_mesh) -> list:
  """``STEPS`` updates of ``tx`` from ``params``, sharded as ``shardings`` on ``device_mesh``."""
  put = lambda tree: tree if shardings is None else jax.device_put(tree, shardings)

  def step(g, state, p):
    if device_mesh is None:
      return tx.update(g, state, p)
    with jax.sharding.use_abstract_mesh(device_mesh.abstract_mesh):
      return tx.update(g, state, p)

  params, state, out = put(params), jax.jit(tx.init)(put(params)), []
  jitted = jax.jit(step)
  for index in range(STEPS):
    rng = np.random.default_rng(index)
    leaves, treedef = jax.tree.flatten(params)
    grads = treedef.unflatten([jnp.asarray(separated(rng, p.shape), p.dtype) for p in leaves])
    update, state = jitted(put(grads), state, params)
    out.append(jax.device_get(update))
  return out


def main() -> int:
  device_mesh = mesh_lib.make_mesh('data=2,fsdp=4', 8)
  failures = []
  for scan in (False, True):
    config = get_config('toy', scan_layers=scan)
    params = nnx.to_pure_dict(nnx.state(Llama(config, nnx.Rngs(0)), nnx.Param))
    shardings = jax.tree.map(
      lambda p, scan=scan: NamedSharding(device_mesh, mesh_lib.fsdp_spec(p.shape, 4, scan)),
      params,
    )
    for name, projector in CASES:
      hparams = optimizers.Hyperparameters(rank=RANK, update_proj_gap=GAP, projector=projector)
      tx = optimizers.REGISTRY[name].build(1e-2, hparams)
      want = updates(tx, params, None, None)
      got = updates(tx, params, shardings, device_mesh)
      label = f'{name} ({projector}, {"scanned" if scan else "unscanned"})'
      try:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
      except AssertionError as error:
        failures.append(f'{label}: {error}')
      print(f'{label}: {"MISMATCH" if failures and label in failures[-1] else "ok"}', flush=True)
  for failure in failures:
    print(failure, file=sys.stderr)
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
