"""Fake CPU devices for the benchmarks that build a mesh on one machine."""

from __future__ import annotations

import math
import os


def count(mesh: str) -> int:
  """The number of devices of a mesh written as ``name=size,...`` (``fsdp=8``)."""
  return math.prod(int(part.split('=')[1]) for part in mesh.split(','))


def use(devices: int) -> None:
  """Gives JAX ``devices`` CPU devices; call it before anything touches a device.

  LAPACK (OpenBLAS) is kept to one thread per call, as each fake device is a
  thread already: its worker threads spin while they wait, and on a machine
  with fewer cores than devices that spinning costs more CPU time than the
  decompositions themselves, differently from run to run.
  """
  os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
  import jax

  jax.config.update('jax_num_cpu_devices', devices)
