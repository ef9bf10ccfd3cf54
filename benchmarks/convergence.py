"""Convergence: each optimizer at its tuned learning rate, against AdamW's final loss.

    python -m benchmarks.convergence [--sweep] [--study [adamsnsm,sumo]] [--model 20m]
                                     [--optimizers a,b]
                                     [--out FILE] [--plots DIR]

Every run uses the example trainer with the same data (the bundled corpus),
seed, model and step budget. ``SWEEP`` records the learning rates tried per
optimizer and ``TUNED`` the best of them (``--sweep`` reruns the sweep and
prints the best). The report gives each optimizer's final validation loss and
the steps and tokens it needs to reach AdamW's final validation loss (the
paper's headline: AdamSNSM in at most half of AdamW's steps). ``--study``
varies AdamSNSM's (``--study sumo``: SUMO's) rank, refresh gap and momentum
policy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from benchmarks import report
from examples.llama import compare
from examples.llama import train as train_lib
from examples.llama.train_config import TrainConfig

# The demo's setting (make demo): 600 steps of 8 x 128 bytes, about 2 minutes a run on 2 cores.
BASE = TrainConfig(
  model='tiny',
  steps=600,
  batch_size=8,
  seq_len=128,
  eval_every=50,
  eval_batches=20,
  mesh='data=1',
  progress=False,
)
# Peak learning rates tried per optimizer (warmup 10%, cosine to 10%).
SWEEP = {
  'adamw': (3e-4, 1e-3, 3e-3, 1e-2),
  'adamsn': (1e-2, 3e-2, 1e-1),
  'adamsnsm': (3e-3, 1e-2, 3e-2, 1e-1),
  'galore': (3e-3, 1e-2, 3e-2),
  'apollo': (3e-3, 1e-2, 3e-2),
  'apollo_mini': (3e-3, 1e-2, 3e-2),
  'scale': (3e-4, 1e-3, 3e-3, 1e-2),
  'muon': (3e-3, 1e-2, 3e-2, 1e-1),
  'muon_bf16': (1e-2, 3e-2, 1e-1),
  'adafactor': (3e-4, 1e-3, 3e-3, 1e-2),
  'adafactor_momentum': (1e-3, 3e-3, 1e-2),
  'contrib_galore': (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
  'sumo': (1e-3, 3e-3, 1e-2, 3e-2),
  'sumo_sn': (3e-3, 1e-2, 3e-2),
}
# The best of SWEEP on BASE (python -m benchmarks.convergence --sweep); each inside its range.
TUNED = {
  'adamw': 1e-3,
  'adamsn': 3e-2,
  'adamsnsm': 3e-2,
  'galore': 1e-2,
  'apollo': 1e-2,
  'apollo_mini': 1e-2,
  'scale': 3e-3,
  'muon': 3e-2,
  'muon_bf16': 3e-2,
  'adafactor': 3e-3,
  'adafactor_momentum': 3e-3,
  'contrib_galore': 1e-1,
  'sumo': 1e-2,
  'sumo_sn': 1e-2,
}
# Per optimizer: the rate of its variants (the trainer's default for it) and the variants.
STUDIES = {
  'adamsnsm': (
    1e-2,
    {
      'defaults (rank 32, gap 100, svd, official)': {},
      'rank 16': dict(rank=16),
      'rank 64': dict(rank=64),
      'rank 128 (full)': dict(rank=128),
      'gap 25': dict(update_proj_gap=25),
      'gap 300': dict(update_proj_gap=300),
      "momentum 'keep'": dict(momentum_on_refresh='keep'),
      "momentum 'rotate'": dict(momentum_on_refresh='rotate'),
      "momentum 'reset'": dict(momentum_on_refresh='reset'),
      'randomized_svd': dict(projector='randomized_svd'),
    },
  ),
  'sumo': (
    1e-2,
    {
      'defaults (rank 32, gap 100, keep)': {},
      'rank 16': dict(rank=16),
      'rank 64': dict(rank=64),
      'gap 25': dict(update_proj_gap=25),
      'gap 300': dict(update_proj_gap=300),
      "momentum 'rotate'": dict(momentum_on_refresh='rotate'),
    },
  ),
}


def run(base: TrainConfig, name: str, lr: float, out_dir: str, **overrides) -> train_lib.RunResult:
  cfg = dataclasses.replace(base, optimizer=name, learning_rate=lr, out_dir=out_dir, **overrides)
  print(f'-- {name} lr={lr:g} {overrides or ""}', flush=True)
  return train_lib.train(cfg)


def sweep(base: TrainConfig, out_dir: str, names: list[str]) -> tuple[str, dict]:
  """The sweep's table over ``names``, and each optimizer's best run."""
  columns = max(len(SWEEP[name]) for name in names)
  lines = [
    '| optimizer | ' + ' | '.join(f'lr #{i + 1}' for i in range(columns)) + ' | best |',
    '|---|' + '---|' * (columns + 1),
  ]
  best_runs = {}
  for name in names:
    rates = SWEEP[name]
    runs = {lr: run(base, name, lr, f'{out_dir}/sweep/{name}-{lr:g}') for lr in rates}
    best = min(runs, key=lambda lr: compare.final_val_loss(runs[lr]))
    best_runs[name] = runs[best]
    cells = [f'{lr:g}: {compare.final_val_loss(result):.4f}' for lr, result in runs.items()]
    cells += [''] * (columns - len(cells))
    lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {best:g} |')
  return '\n'.join(lines), best_runs


def headline(base: TrainConfig, out_dir: str, done: dict) -> list[train_lib.RunResult]:
  """Every optimizer at its tuned rate, AdamW first, then the best runs of ``done`` not in TUNED."""
  tuned = [done.get(name) or run(base, name, lr, f'{out_dir}/{name}') for name, lr in TUNED.items()]
  return tuned + [result for name, result in done.items() if name not in TUNED]


def study(base: TrainConfig, out_dir: str, done: dict, name: str) -> str:
  """``name``'s variants in ``STUDIES``, against tuned AdamW's final loss."""
  results = [done.get('adamw') or run(base, 'adamw', TUNED['adamw'], f'{out_dir}/adamw')]
  labels = ['adamw']
  learning_rate, variants = STUDIES[name]
  for label, overrides in variants.items():
    results.append(run(base, name, learning_rate, f'{out_dir}/study/{name}/{label}', **overrides))
    labels.append(f'{name}, {label}')
  return compare.table(results, labels)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sweep', action='store_true', help='rerun the learning-rate sweep')
  parser.add_argument(
    '--study',
    nargs='?',
    const='adamsnsm',
    default=None,
    help=f'vary the rank, gap and refresh policy of these optimizers (of {", ".join(STUDIES)}; '
    'default: adamsnsm)',
  )
  parser.add_argument('--steps', type=int, default=BASE.steps)
  parser.add_argument('--model', default=BASE.model, help='config name (default: %(default)s)')
  parser.add_argument(
    '--optimizers', default=','.join(SWEEP), help='which optimizers --sweep tries (default: all)'
  )
  parser.add_argument('--plots', default=None, help='write the curves and the state plot here')
  parser.add_argument('--out-dir', default='runs/convergence')
  parser.add_argument('--out', default=None, help='also write the tables to this file')
  args = parser.parse_args(argv)
  base = dataclasses.replace(BASE, steps=args.steps, model=args.model)
  names = args.optimizers.split(',')
  unknown = [name for name in names if name not in SWEEP]
  if unknown:
    parser.error(f'--optimizers: no sweep for {", ".join(unknown)}; choose from {", ".join(SWEEP)}')
  sections, done = [], {}
  if args.sweep:
    table, done = sweep(base, args.out_dir, names)
    sections.append(table)
    print(sections[-1], flush=True)
  results = headline(base, args.out_dir, done)
  sections.append(compare.table(results))
  print(sections[-1], flush=True)
  if args.plots:
    os.makedirs(args.plots, exist_ok=True)
    compare.plot(results, os.path.join(args.plots, f'convergence_{base.model}.png'))
    compare.state_plot(results, os.path.join(args.plots, f'loss_vs_state_{base.model}.png'))
  for name in args.study.split(',') if args.study else []:
    if name not in STUDIES:
      parser.error(f'--study: no study of {name}; choose from {", ".join(STUDIES)}')
    sections.append(study(base, args.out_dir, done, name))
    print(sections[-1], flush=True)
  report.write(sections, args.out)


if __name__ == '__main__':
  main()
