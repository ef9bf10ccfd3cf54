"""The device mesh of a run and the FSDP layout of its parameters.

``--mesh data=N,fsdp=M`` names a mesh of up to two axes: ``data`` splits each
batch, ``fsdp`` splits each parameter along its largest axis that ``M``
divides. Without ``--mesh`` every device is on ``data``.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P


def parse_mesh(spec: str | None) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """The axis names and sizes of ``--mesh``; ``ValueError`` if the devices cannot hold it."""
  devices = len(jax.devices())
  if spec is None:
    return ('data',), (devices,)
  names, sizes = [], []
  for part in spec.split(','):
    name, _, size = part.partition('=')
    if name not in ('data', 'fsdp') or name in names or not size.isdigit() or int(size) < 1:
      raise ValueError(f"--mesh must look like 'data=N,fsdp=M', got {spec!r}")
    names.append(name)
    sizes.append(int(size))
  if devices % math.prod(sizes):
    raise ValueError(
      f'--mesh {spec} needs {math.prod(sizes)} devices, which does not divide '
      f'the {devices} available'
    )
  if jax.process_count() > 1 and math.prod(sizes) != devices:
    raise ValueError(
      f'--mesh {spec} uses {math.prod(sizes)} of the {devices} devices; a multi-process '
      'run must use all of them'
    )
  return tuple(names), tuple(sizes)


def mesh_problems(spec: str | None) -> list[str]:
  """Problems with ``--mesh`` on the devices at hand (starts the JAX backend)."""
  try:
    parse_mesh(spec)
  except ValueError as e:
    return [str(e)]
  return []


def make_mesh(spec: str | None, batch_size: int) -> jax.sharding.Mesh:
  """The mesh of ``--mesh`` on the first devices; ``ValueError`` if it cannot split the batch."""
  names, sizes = parse_mesh(spec)
  devices = math.prod(sizes)
  if batch_size % devices:
    raise ValueError(
      f'--batch-size {batch_size} is not divisible by the {devices} devices of the mesh'
    )
  return jax.make_mesh(
    sizes,
    names,
    axis_types=(jax.sharding.AxisType.Auto,) * len(names),
    devices=jax.devices()[:devices],
  )


def fsdp_spec(shape: tuple[int, ...], fsdp: int, stacked: bool) -> P:
  """Shards the largest axis divisible by the FSDP size (not a layer axis)."""
  if fsdp == 1:
    return P()
  candidates = [a for a in range(1 if stacked else 0, len(shape)) if shape[a] % fsdp == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda a: shape[a])
  return P(*[('fsdp' if a == axis else None) for a in range(len(shape))])
