"""Running the trainer as several processes that form one JAX cluster.

Every process runs the same program. ``jax.distributed.initialize`` joins them
(process 0 hosts the coordinator); afterwards ``jax.devices()`` lists the
devices of all processes, the trainer's mesh spans them, and every jitted step
is one global computation whose collectives cross processes (gloo on CPU,
NCCL on GPU, ICI/DCN on TPU). Each process materialises only the rows of the
global batch that its own devices hold, so the loss curve is that of a single
process with the same global batch.

A cluster is described by three values, taken from the command line or else
from the environment: ``JAX_COORDINATOR_ADDRESS`` (which JAX itself also
reads), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. Values left unset are
detected by JAX on SLURM, Open MPI, Cloud TPU and Kubernetes; ``--distributed``
joins a cluster even when none is set, for exactly those environments.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import numpy as np

ENVIRONMENT = {
  'coordinator': 'JAX_COORDINATOR_ADDRESS',
  'num_processes': 'JAX_NUM_PROCESSES',
  'process_id': 'JAX_PROCESS_ID',
}


@dataclasses.dataclass(frozen=True)
class Cluster:
  """What ``jax.distributed.initialize`` needs; ``None`` lets JAX detect it."""

  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto: bool = False  # join a cluster even when nothing is set (JAX detects all)

  @property
  def wanted(self) -> bool:
    """Whether this process should join a cluster at all."""
    return self.auto or any(
      v is not None for v in (self.coordinator, self.num_processes, self.process_id)
    )


def cluster_from(
  coordinator: str | None,
  num_processes: int | None,
  process_id: int | None,
  auto: bool = False,
  environ: Mapping[str, str] = os.environ,
) -> tuple[Cluster, list[str]]:
  """The cluster the flags (else the environment) describe, and its problems.

  Returns the cluster and a list of one-line problems (empty when usable):
  a malformed address or number, or a process id outside ``[0, N)``.
  """
  values = {'coordinator': coordinator, 'num_processes': num_processes, 'process_id': process_id}
  problems = []
  for name, variable in ENVIRONMENT.items():
    text = environ.get(variable)
    if values[name] is not None or not text:
      continue
    if name == 'coordinator':
      values[name] = text
    elif text.strip().isdigit():
      values[name] = int(text)
    else:
      problems.append(f'{variable} must be a non-negative integer, got {text!r}')
  cluster = Cluster(**values, auto=auto)
  return cluster, problems + cluster_problems(cluster)


def cluster_problems(cluster: Cluster) -> list[str]:
  """One-line problems with an address, a process count or a process id."""
  problems = []
  if cluster.coordinator is not None:
    host, _, port = cluster.coordinator.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      problems.append(f"--coordinator must look like 'HOST:PORT', got {cluster.coordinator!r}")
  if cluster.num_processes is not None and cluster.num_processes < 1:
    problems.append(f'--num-processes must be >= 1, got {cluster.num_processes}')
  index, count = cluster.process_id, cluster.num_processes
  if index is not None and count is None and index < 0:
    problems.append(f'--process-id must be >= 0, got {index}')
  if index is not None and count is not None and not 0 <= index < count:
    problems.append(f'--process-id must be in [0, {count}), got {index}')
  return problems


def join(cluster: Cluster) -> None:
  """Joins the cluster (blocks until every process has); a no-op if none is wanted.

  Must run before anything touches a JAX device.
  """
  if cluster.wanted:
    jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id)


def is_primary() -> bool:
  """Whether this is process 0, the one that prints and writes metrics."""
  return jax.process_index() == 0


def local_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> slice:
  """The rows of a global array (sharded on axis 0) held by this process's devices.

  ``ValueError`` if they are not one contiguous block, which a mesh whose
  devices are listed process by process (``jax.make_mesh`` on ``jax.devices()``)
  never gives for an axis-0 sharding.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    rows.update(range(*index[0].indices(global_shape[0])))
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo:
    raise ValueError(f'this process holds rows {sorted(rows)}, not one contiguous block')
  return slice(lo, hi)


def global_array(
  sharding: jax.sharding.Sharding, local: np.ndarray, global_shape: tuple[int, ...]
) -> jax.Array:
  """The global array of which this process holds ``local`` (its ``local_rows``)."""
  return jax.make_array_from_process_local_data(sharding, local, global_shape)
