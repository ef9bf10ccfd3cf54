"""Two-dimensional meshes: every low-rank optimizer agrees with one device; jaxlib's deadlock.

A ``data=2, fsdp=4`` mesh puts collectives over sub-groups of the devices
beside ones over all of them. Each low-rank engine's update on such a mesh,
scanned and unscanned, equals its one-device update (``mesh_updates.py``, run
in a subprocess so that a deadlock fails the test instead of hanging the
suite). The refresh never hands LAPACK more than one matrix per device: with
jax 0.10.2, a batched decomposition on every device at once can deadlock
XLA's CPU runtime (docs/guide.md, "Sharding"), which the second test
reproduces without optax_lean.
"""

import subprocess
import sys
import textwrap

import pytest

from tests import cli


def test_every_low_rank_engine_agrees_on_a_2d_mesh(cli_env):
  done = subprocess.run(
    [sys.executable, '-m', 'tests.mesh_updates'],
    cwd=cli.ROOT,
    env=cli_env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stdout + done.stderr


# jax 0.10.2's LAPACK kernels (jaxlib/cpu/lapack_kernels.cc, ParallelBatchMap)
# split a batch of matrices into tasks on the CPU client's thread pool and
# block a pool thread until they finish. The pool has max(cores, PJRT_NPROC,
# devices) threads; with PJRT_NPROC at the device count and a batched SVD on
# every device at once, all threads block on tasks no thread is left to run.
# A batch of one matrix runs inline. Fixed in jax after 0.11.0 (commit
# 859992407d, "Don't try to parallelize LAPACK kernels in opensource builds");
# the test fails once the fix lands here.
DEADLOCK = textwrap.dedent(
  """
  import jax, jax.numpy as jnp
  jax.config.update('jax_num_cpu_devices', 8)
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(AxisType.Auto,) * 2)
  xs = [jax.device_put(jnp.arange(1024.0).reshape(32, 32) % (5 + i),
                       NamedSharding(mesh, P('fsdp', None))) for i in range(4)]
  side = [jnp.zeros((32, 4)) for _ in range(4)]

  @jax.jit
  def f(xs, side):  # two matrices per device in one SVD, and an independent chain
    y = jax.lax.with_sharding_constraint(jnp.stack(xs), NamedSharding(mesh, P('data')))
    return jnp.linalg.svd(y)[0][..., :4] + jnp.stack(side)

  for _ in range(200):
    jax.block_until_ready(f(xs, side))
  """
)


@pytest.mark.xfail(
  reason='jax 0.10.2: batched LAPACK calls on every device deadlock the CPU runtime',
  raises=subprocess.TimeoutExpired,
  strict=True,
)
def test_jaxlib_batched_lapack_deadlock(cli_env):
  env = {**cli_env, 'PJRT_NPROC': '8'}  # the pool as small on any machine as on 8 cores
  subprocess.run([sys.executable, '-c', DEADLOCK], env=env, capture_output=True, timeout=30)
