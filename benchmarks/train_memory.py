"""Per-device memory of the example trainer's whole train step, from the compiler.

    python -m benchmarks.train_memory --sizes 1b,7b --mesh fsdp=8 [--json out.json]

The trainer's jitted step (forward, backward, global-norm clipping, update) is
built by ``examples.llama.run.build`` on ``N`` fake CPU devices (``--mesh
fsdp=N``), lowered with abstract inputs (``jax.ShapeDtypeStruct`` with the
trainer's shardings) and compiled; it never runs and nothing is allocated.
From ``compiled.memory_analysis()`` (one device's share of the SPMD program)
it reports argument, output, temporary and alias bytes, the peak (arguments +
outputs + temporaries - aliases) and the compile time. The state columns count
each optimizer-state leaf's shard under the trainer's ``state_sharding``: per
device, and in total. A check column confirms that the argument bytes are the
parameter, state and batch shard bytes.

The default batch is 1 x 256 tokens per device, so that activations stay small
beside parameters, gradients and states; ``--paper-batch`` adds the rows at the
papers' batch (512 sequences of 256 tokens in all). Labels are registry
optimizers with suffixes: ``+bf16_states`` (every state in bfloat16, the
trainer's ``--state-dtype bfloat16``), ``+scan`` (``--scan-layers``),
``+remat`` (``--scan-layers --remat``: each block recomputed in the backward
pass) and ``+layerwise`` (``--scan-layers --layerwise``: per-layer updates).
Low-rank optimizers use the paper's rank for the size; ``adamsnsm`` the SVD
projector, ``adamsnsm_random`` the seeded random one.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time

from benchmarks import cpu_devices

GIB = 2**30
PAPER_RANK = {'60m': 128, '130m': 256, '350m': 256, '1b': 512, '7b': 1024}
PAPER_BATCH = 512  # sequences of 256 tokens (GaLore, SN-SM)
# label -> (registry optimizer, TrainConfig overrides)
LABELS = {
  'adamw': ('adamw', {}),
  'adamsn': ('adamsn', {}),
  'adamsnsm': ('adamsnsm', {'projector': 'svd'}),
  'adamsnsm_random': ('adamsnsm', {'projector': 'random'}),
  'galore': ('galore', {}),
  'ldadam': ('ldadam', {}),
  'online_subspace_descent': ('online_subspace_descent', {}),
  'rso': ('rso', {}),
}
DEFAULT_LABELS = ','.join(
  (
    *LABELS,
    'adamw+bf16_states',
    'adamsnsm+bf16_states',
    'adamw+scan',
    'adamsnsm+scan',
    'adamw+remat',
    'adamsnsm+remat',
    'adamw+layerwise',
    'adamsnsm+layerwise',
    'adamsnsm+bf16_states+layerwise',
    'galore+layerwise',
  )
)


@dataclasses.dataclass(frozen=True)
class Measurement:
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  peak_bytes: int
  compile_s: float
  state_bytes_per_device: int
  state_bytes_total: int
  arguments_match_shards: bool


def shard_bytes(tree, shardings) -> int:
  """Bytes one device holds of ``tree`` (abstract arrays) under ``shardings``."""
  import jax

  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
  return total


def total_bytes(tree) -> int:
  import jax

  return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def config_for(size: str, label: str, mesh: str, batch: int, data: str):
  """The trainer's config of one label at one size."""
  from examples.llama.train_config import TrainConfig

  base, _, suffixes = label.partition('+')
  optimizer, overrides = LABELS[base]
  flags = set(suffixes.split('+')) if suffixes else set()
  unknown = flags - {'bf16_states', 'scan', 'remat', 'layerwise'}
  if unknown:
    raise ValueError(f'unknown label suffix {sorted(unknown)} in {label!r}')
  return TrainConfig(
    model=size,
    optimizer=optimizer,
    batch_size=batch,
    seq_len=256,
    mesh=mesh,
    rank=PAPER_RANK.get(size),
    scan_layers=bool(flags & {'scan', 'remat', 'layerwise'}),
    remat='remat' in flags,
    layerwise='layerwise' in flags,
    state_dtype='bfloat16' if 'bf16_states' in flags else None,
    data=data,
    progress=False,
    **overrides,
  )


def measure(cfg) -> Measurement:
  import jax

  from examples.llama import run as run_lib

  run = run_lib.build(cfg)
  target = run.restore_target()
  batch = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), 'int32', sharding=run.batch_sharding)
  start = time.perf_counter()
  compiled = run.step_fn.lower(target, batch, batch).compile()
  compile_s = time.perf_counter() - start
  stats = compiled.memory_analysis()
  peak = (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    + stats.temp_size_in_bytes
    - stats.alias_size_in_bytes
  )
  state = run.abstract_state
  held = shard_bytes(state, run.state_sharding) + 2 * shard_bytes(batch, run.batch_sharding)
  return Measurement(
    argument_bytes=stats.argument_size_in_bytes,
    output_bytes=stats.output_size_in_bytes,
    temp_bytes=stats.temp_size_in_bytes,
    alias_bytes=stats.alias_size_in_bytes,
    peak_bytes=peak,
    compile_s=compile_s,
    state_bytes_per_device=shard_bytes(state.opt_state, run.state_sharding.opt_state),
    state_bytes_total=total_bytes(state.opt_state),
    arguments_match_shards=held == stats.argument_size_in_bytes,
  )


def table(size: str, mesh: str, batch: int, rows: dict[str, Measurement]) -> str:
  gib = lambda n: f'{n / GIB:.3f}'
  adamw = rows.get('adamw')
  lines = [
    f'**{size}**, mesh {mesh}, batch {batch} x 256 tokens ({batch // cpu_devices.count(mesh)} per '
    'device), float32 parameters, per device (GiB)',
    '',
    '| label | state / device | state total | share | arguments | outputs | temporaries | '
    'aliases | peak | peak vs adamw | compile (s) | args = shards |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for label, m in rows.items():
    versus = f'{m.peak_bytes / adamw.peak_bytes:.0%}' if adamw else '—'
    lines.append(
      f'| {label} | {gib(m.state_bytes_per_device)} | {gib(m.state_bytes_total)} | '
      f'{m.state_bytes_per_device / m.state_bytes_total:.3f} | {gib(m.argument_bytes)} | '
      f'{gib(m.output_bytes)} | {gib(m.temp_bytes)} | {gib(m.alias_bytes)} | '
      f'{gib(m.peak_bytes)} | {versus} | {m.compile_s:.0f} | '
      f'{"yes" if m.arguments_match_shards else "NO"} |'
    )
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sizes', default='1b', help='comma-separated model sizes (default 1b)')
  parser.add_argument('--mesh', default='fsdp=8', help='the FSDP mesh (default fsdp=8)')
  parser.add_argument('--labels', default=DEFAULT_LABELS, help='comma-separated labels')
  parser.add_argument('--scan-layers', action='store_true', help='also the +scan labels')
  parser.add_argument('--paper-batch', action='store_true', help="also the papers' batch")
  parser.add_argument('--json', default=None, help='write {model: {label: {...}}} here')
  parser.add_argument('--out', default=None, help='write the markdown tables here')
  args = parser.parse_args(argv)
  cpu_devices.use(cpu_devices.count(args.mesh))  # before JAX starts
  from benchmarks import report

  devices = cpu_devices.count(args.mesh)
  labels = args.labels.split(',')
  if args.scan_layers:
    labels += [f'{label}+scan' for label in labels if '+scan' not in label]
  batches = [devices] + ([max(PAPER_BATCH, devices)] if args.paper_batch else [])
  results, sections = {}, []
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, 'text.txt')
    with open(data, 'w') as f:
      # Enough bytes for the validation split (5%) to hold a batch of the largest size.
      sentence = 'the quick brown fox jumps over the lazy dog. '
      f.write(sentence * (max(batches) * 257 * 25 // len(sentence) + 8000))
    for size in args.sizes.split(','):
      for batch in batches:
        rows = {}
        for label in labels:
          rows[label] = measure(config_for(size, label, args.mesh, batch, data))
          print(f'{size} batch {batch} {label}: {rows[label]}', file=sys.stderr, flush=True)
        key = size if batch == devices else f'{size}@batch{batch}'
        results[key] = {label: dataclasses.asdict(m) for label, m in rows.items()}
        sections.append(table(size, args.mesh, batch, rows))
        print(sections[-1] + '\n', flush=True)
  report.save(sections, args.out, results, args.json)


if __name__ == '__main__':
  main()
