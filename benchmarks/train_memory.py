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
Two suffixes are GaLore's single-GPU setup (``scripts/single_gpu/llama_7b.sh``
of the official code): one device, bfloat16 parameters and compute, per-layer
updates, 8-bit moments and stochastic rounding, with ``+galore_1x256`` one
sequence of 256 tokens and ``+galore_16x256`` sixteen, with remat; they set
the mesh and batch themselves.
Low-rank optimizers use the paper's rank for the size; ``adamsnsm`` the SVD
projector, ``adamsnsm_random`` the seeded random one.

Every row is set beside AdamW's row with the same suffixes (measured too when
not asked for). "temporaries over adamw" is what the optimizer's temporaries
add to AdamW's; "budget" is the peak a memory-lean optimizer may reach:
AdamW's peak minus the state it saves, plus 5% of AdamW's peak. ``--buffers
K`` lists, under each table, what is live at each row's peak: the ``K``
largest groups of buffers made by one HLO op at one source line, with their
count, total, shape and JAX operation (from XLA's dump of the compiled
step).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import re
import shutil
import sys
import tempfile
import time

from benchmarks import cpu_devices, hlo

GIB = 2**30
BUDGET_SLACK = 0.05  # of AdamW's peak
PAPER_RANK = {'60m': 128, '130m': 256, '350m': 256, '1b': 512, '7b': 1024}
PAPER_BATCH = 512  # sequences of 256 tokens (GaLore, SN-SM)
# GaLore's single-GPU 7B setup: suffix -> sequences of 256 tokens per step, and the options.
SINGLE_DEVICE = {
  'galore_1x256': 1,
  'galore_16x256': 16,
}
SINGLE_DEVICE_OPTIONS = {
  'mesh': 'fsdp=1',
  'param_dtype': 'bfloat16',
  'compute_dtype': 'bfloat16',
  'state_dtype': 'int8',
  'rounding': 'stochastic',
  'scan_layers': True,
  'layerwise': True,
}
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
  'apollo': ('apollo', {}),
  'apollo_mini': ('apollo_mini', {}),
  'scale': ('scale', {}),
  'sumo': ('sumo', {'projector': 'svd'}),
  'muon': ('muon', {}),
  'muon_bf16': ('muon_bf16', {}),
  'adafactor': ('adafactor', {}),
  'adafactor_momentum': ('adafactor_momentum', {}),
  'contrib_galore': ('contrib_galore', {}),
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
  cpu_stack_copy_bytes: int = 0
  peak_buffers: list[hlo.Buffer] = dataclasses.field(default_factory=list)


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


def cpu_stack_copy_bytes(run, state) -> int:
  """Bytes of the 16-bit stacks the per-layer step copies on XLA:CPU (layerwise.py's ``_as_bits``).

  XLA's CPU backend cannot write a bfloat16 stack in place layer by layer; the
  per-layer step carries the bits of each 16-bit stack instead (the stacked
  blocks and their per-layer state), which costs one copy of each. Backends
  that write bfloat16 in place make no such copy. Zero for other steps.
  """
  import jax

  import optax_lean
  from examples.llama.layerwise import is_16_bit_float

  if not run.cfg.layerwise or jax.default_backend() != 'cpu':
    return 0
  blocks = state.params['blocks']
  per_layer, _ = optax_lean.split_layers(
    state.opt_state.blocks, optax_lean.layer_axes(run.tx, blocks)
  )
  leaves = jax.tree.leaves((blocks, per_layer))
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves if is_16_bit_float(x))


def config_for(size: str, label: str, mesh: str, batch: int, data: str):
  """The trainer's config of one label at one size."""
  from examples.llama.train_config import TrainConfig

  base, _, suffixes = label.partition('+')
  optimizer, overrides = LABELS[base]
  flags = set(suffixes.split('+')) if suffixes else set()
  unknown = flags - {'bf16_states', 'scan', 'remat', 'layerwise', *SINGLE_DEVICE}
  if unknown:
    raise ValueError(f'unknown label suffix {sorted(unknown)} in {label!r}')
  options = dict(
    batch_size=batch,
    mesh=mesh,
    scan_layers=bool(flags & {'scan', 'remat', 'layerwise'}),
    remat='remat' in flags,
    layerwise='layerwise' in flags,
    state_dtype='bfloat16' if 'bf16_states' in flags else None,
  )
  for suffix in flags & set(SINGLE_DEVICE):
    sequences = SINGLE_DEVICE[suffix]
    options.update(SINGLE_DEVICE_OPTIONS, batch_size=sequences, remat=sequences > 1)
  return TrainConfig(
    model=size,
    optimizer=optimizer,
    seq_len=256,
    rank=PAPER_RANK.get(size),
    data=data,
    progress=False,
    **options,
    **overrides,
  )


def adamw_counterpart(label: str) -> str:
  """The AdamW label with the same suffixes: ``galore+remat`` -> ``adamw+remat``."""
  _, plus, suffixes = label.partition('+')
  return f'adamw{plus}{suffixes}'


def budget_bytes(m: Measurement, adamw: Measurement) -> int:
  """The most a memory-lean optimizer may peak at: AdamW's, less the state saved, plus slack."""
  saved = adamw.state_bytes_per_device - m.state_bytes_per_device
  return round(adamw.peak_bytes - saved + BUDGET_SLACK * adamw.peak_bytes)


def newest_dump(dump_dir: str, seen: set[str]) -> tuple[str, str] | None:
  """The live ranges and HLO of the step compiled last into ``dump_dir``."""
  found = sorted(
    set(glob.glob(os.path.join(dump_dir, 'module_*live-range.txt'))) - seen,
    key=lambda path: int(re.search(r'module_(\d+)', path).group(1)),
  )
  if not found:
    return None
  seen.update(found)
  live = found[-1]
  with open(live) as f, open(live.replace('-live-range.txt', '.txt')) as g:
    return f.read(), g.read()


def measure(cfg, dump_dir: str | None = None, seen: set[str] | None = None) -> Measurement:
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
  dump = newest_dump(dump_dir, seen) if dump_dir else None
  return Measurement(
    peak_buffers=hlo.peak_buffers(*dump) if dump else [],
    argument_bytes=stats.argument_size_in_bytes,
    output_bytes=stats.output_size_in_bytes,
    temp_bytes=stats.temp_size_in_bytes,
    alias_bytes=stats.alias_size_in_bytes,
    peak_bytes=peak,
    compile_s=compile_s,
    state_bytes_per_device=shard_bytes(state.opt_state, run.state_sharding.opt_state),
    state_bytes_total=total_bytes(state.opt_state),
    arguments_match_shards=held == stats.argument_size_in_bytes,
    cpu_stack_copy_bytes=cpu_stack_copy_bytes(run, state),
  )


def table(size: str, mesh: str, batch: int, rows: dict[str, Measurement]) -> str:
  gib = lambda n: f'{n / GIB:.3f}'
  lines = [
    f'**{size}**, mesh {mesh}, batch {batch} x 256 tokens ({batch // cpu_devices.count(mesh)} per '
    'device), float32 parameters, per device (GiB)',
    '',
    '| label | state / device | state total | share | arguments | outputs | temporaries | '
    'aliases | peak | peak vs adamw | temporaries over adamw | budget | within | compile (s) | '
    'args = shards | XLA:CPU stack copies | peak less them |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for label, m in rows.items():
    adamw = rows.get(adamw_counterpart(label))
    versus = over = budget = within = '—'
    if adamw is not None:
      versus = f'{m.peak_bytes / adamw.peak_bytes:.0%}'
      over = gib(m.temp_bytes - adamw.temp_bytes)
      if adamw is not m:
        budget = gib(budget_bytes(m, adamw))
        within = 'yes' if m.peak_bytes <= budget_bytes(m, adamw) else '**no**'
    lines.append(
      f'| {label} | {gib(m.state_bytes_per_device)} | {gib(m.state_bytes_total)} | '
      f'{m.state_bytes_per_device / m.state_bytes_total:.3f} | {gib(m.argument_bytes)} | '
      f'{gib(m.output_bytes)} | {gib(m.temp_bytes)} | {gib(m.alias_bytes)} | '
      f'{gib(m.peak_bytes)} | {versus} | {over} | {budget} | {within} | {m.compile_s:.0f} | '
      f'{"yes" if m.arguments_match_shards else "NO"} | '
      + (
        f'{gib(m.cpu_stack_copy_bytes)} | {gib(m.peak_bytes - m.cpu_stack_copy_bytes)} |'
        if m.cpu_stack_copy_bytes
        else '— | — |'
      )
    )
  return '\n'.join(lines)


def buffer_table(label: str, m: Measurement, count: int) -> str:
  """The ``count`` largest groups of buffers live at the peak of ``label``'s step."""
  mib = lambda n: f'{n / 2**20:.1f}'
  live = sum(b.size for b in m.peak_buffers)
  lines = [
    f'Buffers live at the peak of **{label}** ({live / GIB:.3f} GiB live in all, arguments '
    f'included), the {count} largest groups by HLO op and source line, MiB:',
    '',
    '| MiB in all | buffers | largest | HLO op | its shape | JAX op | source |',
    '|---|---|---|---|---|---|---|',
  ]
  for g in hlo.group_buffers(m.peak_buffers)[:count]:
    b = g.largest
    lines.append(
      f'| {mib(g.size)} | {g.count} | {mib(b.size)} | {b.op} | `{b.shape}` | `{b.jax_op}` | '
      f'{b.source} |'
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
  parser.add_argument(
    '--buffers', type=int, default=0, help='list the K largest groups of buffers live at each peak'
  )
  args = parser.parse_args(argv)
  dump_dir = tempfile.mkdtemp(prefix='train-memory-hlo-') if args.buffers else None
  if dump_dir:  # XLA reads its flags when the backend starts
    os.environ['XLA_FLAGS'] = (
      f'{os.environ.get("XLA_FLAGS", "")} --xla_dump_to={dump_dir} '
      '--xla_dump_hlo_module_re=jit_(train_step|step_fn)'
    ).strip()
  cpu_devices.use(cpu_devices.count(args.mesh))  # before JAX starts
  from benchmarks import report

  devices = cpu_devices.count(args.mesh)
  labels = args.labels.split(',')
  if args.scan_layers:
    labels += [f'{label}+scan' for label in labels if '+scan' not in label]
  # Each row is compared with AdamW's of the same suffixes, measured first.
  counterparts = [adamw_counterpart(label) for label in labels]
  labels = list(dict.fromkeys([c for c in counterparts if c not in labels] + labels))
  seen: set[str] = set()
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
          rows[label] = measure(config_for(size, label, args.mesh, batch, data), dump_dir, seen)
          brief = dataclasses.replace(rows[label], peak_buffers=[])
          print(f'{size} batch {batch} {label}: {brief}', file=sys.stderr, flush=True)
        key = size if batch == devices else f'{size}@batch{batch}'
        results[key] = {
          label: row_json(m, rows.get(adamw_counterpart(label))) for label, m in rows.items()
        }
        sections.append(table(size, args.mesh, batch, rows))
        sections += [
          buffer_table(label, m, args.buffers) for label, m in rows.items() if args.buffers
        ]
        print('\n\n'.join(sections[-1 - len(rows) * bool(args.buffers) :]) + '\n', flush=True)
  if dump_dir:
    shutil.rmtree(dump_dir, ignore_errors=True)
  report.save(sections, args.out, results, args.json)


def row_json(m: Measurement, adamw: Measurement | None) -> dict:
  """One row of ``--json``: the measurement, and its budget against AdamW's row."""
  row = dataclasses.asdict(m)
  row['peak_buffers'] = [dataclasses.asdict(b) for b in m.peak_buffers]
  if adamw is not None and adamw is not m:
    row['budget_bytes'] = budget_bytes(m, adamw)
    row['temp_bytes_over_adamw'] = m.temp_bytes - adamw.temp_bytes
  return row


if __name__ == '__main__':
  main()
