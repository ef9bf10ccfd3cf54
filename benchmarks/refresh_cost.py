"""The projector refresh on a mesh: work per device, CPU time, traffic, compile time.

    python -m benchmarks.refresh_cost --sizes 60m,1b --mesh fsdp=8 [--json out.json]

A refresh recomputes the projector of every projected kernel of a LLaMA model
with scanned layers (``(layers, in, out)`` stacks, sharded as the example
trainer shards them: the largest axis divisible by ``fsdp``). What is measured
is the refresh alone, as each method calls it (``Projector.refresh``, with the
method's projector, side, mask and the papers' rank for the size), from a
gradient in the parameter's sharding to a new state in the sharding
``optax_lean.state_sharding`` gives it, traced on the trainer's Auto mesh. For
each method and projector it reports:

- ``refresh_flops_per_device``: the decompositions of one device's SPMD program,
  counted from its compiled HLO with the standard flop formulas (``hlo.py``;
  ``cost_analysis()`` counts them as zero), plus the rest of the program
  (matmuls, elementwise), which ``cost_analysis()`` counts; beside it the share
  of the same on one device (i.e. of all the work), for the whole refresh and
  for the decompositions alone, and how many matrices each device decomposes.
- ``refresh_cpu_ratio``: process CPU seconds (all threads) of one refresh on
  ``N`` fake devices over those on one device. It runs for real, so it is
  timed on a slice of the model (``--time-layers`` layers of the first
  attention and the first MLP kernel; default: one layer per device).
- ``refresh_comm_bytes``: what the refresh's collectives produce per device.
- ``amortised_fraction``: the refresh's flops per device spread over the
  method's default ``update_proj_gap``, over the flops per device of a train
  step at the papers' batch (512 sequences of 256 tokens): ``6 N`` per token
  for ``N`` parameters plus ``12 L d T`` for attention (``L`` layers, width
  ``d``, ``T`` tokens per sequence). ``cost_analysis()`` cannot give it: it
  counts a scanned stack's loop body once. LDAdam refreshes every step;
  Online Subspace Descent takes its SVD once, at the first step (0).
- ``compile_s``: the compile time of the trainer's train step with the method
  and projector, beside AdamW's (``--no-compile`` skips it).

The ``random`` projector stores only a key and rebuilds its basis (a Gaussian
draw and a thin QR) at every step: its rows measure that, with a gap of 1.
Methods whose refresh is the same computation (one projector on one set of
kernels) share one measurement, and methods with one projector share its CPU
times (the timed slice does not depend on the mask).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import sys
import tempfile
import time

from benchmarks import cpu_devices

GIB = 2**30
PAPER_RANK = {'60m': 128, '130m': 256, '350m': 256, '1b': 512, '7b': 1024}
PAPER_BATCH, SEQ_LEN = 512, 256  # sequences per step (GaLore, SN-SM), tokens per sequence
GALORE_FAMILY_PROJECTORS = ('svd', 'randomized_svd', 'random')
# method -> (its projectors, the trainer's mask of projected leaves, its refresh gap).
METHODS = {
  'adamsnsm': (GALORE_FAMILY_PROJECTORS, 'linear_kernels', 'update_proj_gap'),
  'galore': (GALORE_FAMILY_PROJECTORS, 'attn_mlp_kernels', 'update_proj_gap'),
  'online_subspace_descent': (('svd',), 'attn_mlp_kernels', None),
  'ldadam': (('power_iteration',), 'attn_mlp_kernels', 1),
}


def projector_of(method: str, name: str):
  """The projector ``method`` refreshes with ``name`` (LDAdam's side rule: square -> out)."""
  import optax_lean

  projector = optax_lean.get_projector(name)
  if method == 'ldadam':
    return dataclasses.replace(projector, square_side='out')
  return projector


def refresh_gap(method: str, projector_name: str) -> int | None:
  """The method's default number of steps per refresh (``None``: a single one).

  A projector that rebuilds its basis at every step pays that every step.
  """
  import optax_lean

  if regenerates_basis(projector_of(method, projector_name)):
    return 1
  gap = METHODS[method][2]
  if isinstance(gap, str):
    return inspect.signature(getattr(optax_lean, method)).parameters[gap].default
  return gap


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One projected stack ``(layers, in, out)`` and where it lives."""

  path: str
  shape: tuple[int, ...]
  spec: tuple


def projected_kernels(size: str, mask: str, devices: int, separate: int = 0) -> list[Kernel]:
  """The kernels ``mask`` projects, with the trainer's specs.

  The scanned model's stacks, or with ``separate`` the kernels of its first
  ``separate`` blocks as separate leaves (a model without ``nnx.scan``).
  """
  import jax
  from flax import nnx

  from examples.llama import optimizers
  from examples.llama.configs import get_config
  from examples.llama.mesh import fsdp_spec
  from examples.llama.model import Llama

  config = get_config(size, scan_layers=not separate)
  if separate:
    config = dataclasses.replace(config, n_layers=separate)
  model = nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if separate:  # the blocks alone: the output head is not part of the setting
    params = {'blocks': params['blocks']}
  chosen = jax.tree.leaves(getattr(optimizers, mask)(params))
  kernels = []
  for (path, leaf), selected in zip(jax.tree_util.tree_flatten_with_path(params)[0], chosen):
    if selected:
      stacked = leaf.ndim == 3
      spec = tuple(fsdp_spec(leaf.shape, devices, stacked)) + (None,) * leaf.ndim
      kernels.append(Kernel(jax.tree_util.keystr(path), leaf.shape, spec[: leaf.ndim]))
  return kernels


def regenerates_basis(projector) -> bool:
  """Whether ``projector`` stores a key and rebuilds its basis (a QR) at every step."""
  import optax_lean

  return isinstance(projector, optax_lean.RandomProjector)


def projector_sharding(kernel: Kernel, projector, rank: int, mesh):
  """The projector state's sharding and shape under ``state_sharding``."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  import optax_lean

  param = jax.ShapeDtypeStruct(kernel.shape, jnp.float32)
  tx = optax_lean.scale_by_subspace_momentum(
    rank=rank, projector=projector, mask=True, dimension_numbers=optax_lean.DimensionNumbers()
  )
  shardings = optax_lean.state_sharding(
    tx, {'k': param}, {'k': NamedSharding(mesh, PartitionSpec(*kernel.spec))}
  )
  return shardings.projector['k'], jax.eval_shape(tx.init, {'k': param}).projector['k']


def refresh_program(kernels: list[Kernel], projector, rank: int, mesh):
  """The jitted refresh of ``kernels`` on ``mesh`` and its abstract arguments.

  The refresh is the library's own (``refresh_projectors``: every matrix of
  the tree, one per device at a time). A projector that rebuilds its basis
  at every step (``regenerates_basis``) is measured by what it does at every
  step instead: its new bases.
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  import optax_lean
  from optax_lean._src import subspace

  dense = optax_lean.SVDProjector(side=projector.side, square_side=projector.square_side)
  rebuilds = regenerates_basis(projector)
  params = [jax.ShapeDtypeStruct(kernel.shape, jnp.float32) for kernel in kernels]
  plans = subspace.plan_subspaces(params, projector, rank, True, optax_lean.DimensionNumbers())
  g_shd, state_shd, out_shd, state_abs = [], [], [], []
  for kernel, plan in zip(kernels, plans):
    sharding, state = projector_sharding(kernel, projector, plan.rank, mesh)
    g_shd.append(NamedSharding(mesh, PartitionSpec(*kernel.spec)))
    state_shd.append(sharding)
    out_shd.append(projector_sharding(kernel, dense, plan.rank, mesh)[0] if rebuilds else sharding)
    state_abs.append(state)

  def refresh(gradients, states):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      new = subspace.refresh_projectors(gradients, states, plans, 0, jnp.zeros([], jnp.int32))
      if rebuilds:
        new = [
          plan.basis(fresh, plan.rows(g), g.dtype) for fresh, plan, g in zip(new, plans, gradients)
        ]
      return new

  program = jax.jit(refresh, in_shardings=(g_shd, state_shd), out_shardings=out_shd)
  return program, (params, state_abs), (g_shd, state_shd)


@dataclasses.dataclass
class Refresh:
  flops_per_device: float
  flops_one_device: float
  decomposition_flops_per_device: float
  decomposition_flops_one_device: float
  decompositions_per_device: int
  decompositions_one_device: int
  comm_bytes: int
  cpu_s_devices: float
  cpu_s_one_device: float


def compiled_work(kernels, projector, rank, mesh) -> tuple[float, float, int, int]:
  """Per-device flops (all, decompositions), matrices and collective bytes of a refresh."""
  from benchmarks import hlo

  program, args, _ = refresh_program(kernels, projector, rank, mesh)
  compiled = program.lower(*args).compile()
  text = compiled.as_text()
  work = hlo.decomposition_work(text)
  counted = compiled.cost_analysis().get('flops', 0.0)
  comm = sum(hlo.collective_bytes(text).values())
  return work.flops + counted, work.flops, sum(work.matrices.values()), comm


def cpu_seconds(kernels, projector, rank, mesh, repeats: int) -> float:
  """Least process CPU seconds (all threads) of one refresh, run on random data."""
  import jax
  import numpy as np

  program, (g_abs, state_abs), (g_shd, state_shd) = refresh_program(kernels, projector, rank, mesh)
  rng = np.random.default_rng(0)

  def draw(a, shd):
    if a.dtype == np.uint32:  # a PRNG key
      return jax.device_put(np.zeros(a.shape, a.dtype), shd)
    return jax.device_put(rng.normal(size=a.shape).astype(a.dtype), shd)

  g_as = [draw(a, s) for a, s in zip(g_abs, g_shd)]
  states = [draw(a, s) for a, s in zip(state_abs, state_shd)]
  compiled = program.lower(g_as, states).compile()
  jax.block_until_ready(compiled(g_as, states))  # warm-up
  best = math.inf
  for _ in range(repeats):
    start = time.process_time()
    jax.block_until_ready(compiled(g_as, states))
    best = min(best, time.process_time() - start)
  return best


def timed_slice(kernels: list[Kernel], layers: int) -> list[Kernel]:
  """The first ``layers`` layers of the first attention and the first MLP stack.

  Separate (2-D) kernels are all timed.
  """
  if all(len(kernel.shape) == 2 for kernel in kernels):
    return kernels
  picked = []
  for part in ("['attn']", "['mlp']"):
    stack = next((k for k in kernels if part in k.path and len(k.shape) == 3), None)
    if stack is not None:
      picked.append(dataclasses.replace(stack, shape=(layers, *stack.shape[1:])))
  return picked


def measure_refresh(size, method, projector_name, devices, args, timings: dict) -> Refresh:
  """One refresh of ``method`` with ``projector_name``; CPU times cached in ``timings``.

  The timed slice is the same for every mask, so methods with one projector
  share its CPU times.
  """
  import jax

  projector = projector_of(method, projector_name)
  rank = PAPER_RANK[size]
  kernels = projected_kernels(size, METHODS[method][1], devices, args.separate)
  meshes = [
    jax.make_mesh(
      (n,), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
    )
    for n in (devices, 1)
  ]
  (flops, decomposed, matrices, comm), (flops_one, decomposed_one, matrices_one, _) = (
    compiled_work(kernels, projector, rank, mesh) for mesh in meshes
  )
  if args.time_layers and projector not in timings:
    timed = timed_slice(kernels, args.time_layers)
    timings[projector] = [cpu_seconds(timed, projector, rank, m, args.repeats) for m in meshes]
  cpu = timings.get(projector, [math.nan, math.nan])
  return Refresh(flops, flops_one, decomposed, decomposed_one, matrices, matrices_one, comm, *cpu)


def train_flops_per_device(size: str, devices: int) -> float:
  """Flops per device of a train step at the papers' batch (forward and backward)."""
  import jax
  from flax import nnx

  from examples.llama.configs import get_config
  from examples.llama.model import Llama

  config = get_config(size)
  model = nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0)))
  params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  per_token = 6 * params + 12 * config.n_layers * config.dim * SEQ_LEN
  return per_token * PAPER_BATCH * SEQ_LEN / devices


def compile_seconds(size, method, projector_name, mesh, data) -> float:
  """Compile seconds of the trainer's train step (one sequence per device)."""
  import jax

  from examples.llama import run as run_lib
  from examples.llama.train_config import TrainConfig

  cfg = TrainConfig(
    model=size,
    optimizer=method,
    projector=projector_name or 'svd',
    rank=PAPER_RANK[size],
    batch_size=cpu_devices.count(mesh),
    seq_len=SEQ_LEN,
    mesh=mesh,
    scan_layers=True,
    data=data,
    progress=False,
  )
  run = run_lib.build(cfg)
  batch = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), 'int32', sharding=run.batch_sharding)
  start = time.perf_counter()
  run.step_fn.lower(run.restore_target(), batch, batch).compile()
  return time.perf_counter() - start


def ratio(part: float, whole: float) -> float | None:
  return part / whole if whole else None


def row(method, projector_name, refresh, train_flops, compile_s, adamw_compile_s) -> dict:
  gap = refresh_gap(method, projector_name)
  amortised = 0.0 if gap is None else refresh.flops_per_device / gap / train_flops
  return {
    'refresh_flops_per_device': refresh.flops_per_device,
    'refresh_flops_one_device': refresh.flops_one_device,
    'refresh_share': ratio(refresh.flops_per_device, refresh.flops_one_device),
    'decomposition_flops_per_device': refresh.decomposition_flops_per_device,
    'decomposition_share': ratio(
      refresh.decomposition_flops_per_device, refresh.decomposition_flops_one_device
    ),
    'decompositions_per_device': refresh.decompositions_per_device,
    'decompositions_one_device': refresh.decompositions_one_device,
    'refresh_cpu_s': refresh.cpu_s_devices,
    'refresh_cpu_s_one_device': refresh.cpu_s_one_device,
    'refresh_cpu_ratio': ratio(refresh.cpu_s_devices, refresh.cpu_s_one_device),
    'refresh_comm_bytes': refresh.comm_bytes,
    'update_proj_gap': gap,
    'amortised_fraction': amortised,
    'compile_s': compile_s,
    'adamw_compile_s': adamw_compile_s,
  }


def percent(fraction: float | None) -> str:
  return '—' if fraction is None else f'{100 * fraction:.2g}%'


def table(size: str, mesh: str, rows: dict, separate: int = 0) -> str:
  fmt = lambda x, spec: '—' if x is None or x != x else format(x, spec)
  layout = f'{separate} blocks as separate leaves' if separate else 'scanned layers'

  lines = [
    f'**{size}**, mesh {mesh}, {layout}, rank {PAPER_RANK[size]}; flops per device of '
    'one refresh (all matrices), CPU seconds of a refresh of the timed slice, amortised over '
    "the gap against a train step at the papers' batch",
    '',
    '| method | projector | refresh GFLOP / device | of 1 device | decompositions: of 1 device | '
    'matrices / device | '
    'CPU s, N devices | CPU s, 1 device | CPU ratio | comm MiB / device | gap | '
    'amortised | compile s (adamw) |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for method, by_projector in rows.items():
    for name, r in by_projector.items():
      lines.append(
        f'| {method} | {name} | {r["refresh_flops_per_device"] / 1e9:.1f} | '
        f'{fmt(r["refresh_share"], ".3f")} | {fmt(r["decomposition_share"], ".3f")} | '
        f'{r["decompositions_per_device"]} of '
        f'{r["decompositions_one_device"]} | {fmt(r["refresh_cpu_s"], ".2f")} | '
        f'{fmt(r["refresh_cpu_s_one_device"], ".2f")} | {fmt(r["refresh_cpu_ratio"], ".2f")} | '
        f'{r["refresh_comm_bytes"] / 2**20:.1f} | {r["update_proj_gap"] or "once"} | '
        f'{percent(r["amortised_fraction"])} | {fmt(r["compile_s"], ".0f")} '
        f'({fmt(r["adamw_compile_s"], ".0f")}) |'
      )
  return '\n'.join(lines)


def measure_size(size: str, args: argparse.Namespace, data: str) -> dict:
  """``{method: {projector: row}}`` at one size."""
  devices = cpu_devices.count(args.mesh)
  wanted = None if args.projectors is None else set(args.projectors.split(','))

  def compile_s(method: str, projector_name: str | None) -> float | None:
    if args.no_compile:
      return None
    return compile_seconds(size, method, projector_name, args.mesh, data)

  adamw = compile_s('adamw', None)
  train_flops = train_flops_per_device(size, devices)
  shared, timings, rows = {}, {}, {}
  for method in args.methods.split(','):
    for name in METHODS[method][0]:
      if wanted is not None and name not in wanted:
        continue
      key = (projector_of(method, name), METHODS[method][1])
      if key not in shared:
        shared[key] = measure_refresh(size, method, name, devices, args, timings)
      rows.setdefault(method, {})[name] = row(
        method, name, shared[key], train_flops, compile_s(method, name), adamw
      )
      print(f'{size} {method} {name}: {rows[method][name]}', file=sys.stderr, flush=True)
  return rows


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sizes', default='60m,1b', help='comma-separated sizes (default 60m,1b)')
  parser.add_argument('--mesh', default='fsdp=8', help='fake CPU devices, as fsdp=N (default 8)')
  parser.add_argument('--methods', default=','.join(METHODS), help='comma-separated methods')
  parser.add_argument('--projectors', default=None, help='only these projectors (default all)')
  parser.add_argument(
    '--time-layers', type=int, default=None, help='layers of the timed slice (default N; 0: none)'
  )
  parser.add_argument('--repeats', type=int, default=1, help='timed runs, least kept (default 1)')
  parser.add_argument(
    '--separate',
    type=int,
    default=0,
    help='the first K blocks unscanned, each kernel a leaf of its own (default: scanned stacks)',
  )
  parser.add_argument('--no-compile', action='store_true', help='skip the train-step compiles')
  parser.add_argument('--json', default=None, help='write {model: {method: {projector: ...}}}')
  parser.add_argument('--out', default=None, help='write the markdown tables here')
  args = parser.parse_args(argv)
  devices = cpu_devices.count(args.mesh)
  if args.time_layers is None:
    args.time_layers = devices
  cpu_devices.use(devices)  # before JAX starts
  from benchmarks import report

  results, sections = {}, []
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, 'text.txt')
    with open(data, 'w') as f:
      f.write('the quick brown fox jumps over the lazy dog. ' * 20000)
    for size in args.sizes.split(','):
      results[size] = measure_size(size, args, data)
      sections.append(table(size, args.mesh, results[size], args.separate))
      print(sections[-1] + '\n', flush=True)
  report.save(sections, args.out, results, args.json)


if __name__ == '__main__':
  main()
