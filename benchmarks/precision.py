"""Low-precision training: bfloat16 parameters and 8-bit states against float32.

    python -m benchmarks.precision [--optimizer adamsnsm] [--model tiny] [--steps 600]
                                   [--out FILE] [--plot FILE]

Trains the demo's setting (``benchmarks.convergence.BASE``: the bundled corpus,
600 steps of 8 x 128 bytes) with ``--scan-layers --layerwise``, as the 7B
single-device recipe does, once per precision setting: float32 throughout
(four seeds: their spread is the noise), then bfloat16 parameters and
compute with each way of landing updates (``--rounding``: stochastic, kahan,
master, nearest) and float32 states, and the whole recipe: bfloat16,
stochastic rounding and 8-bit states. The table gives each run's final
validation loss, the steps it needs to reach the float32 run's final loss and
its optimizer state (the rounding's buffers included); the plot, the curves.
"""

from __future__ import annotations

import argparse
import dataclasses

from benchmarks import convergence, report
from examples.llama import compare
from examples.llama import train as train_lib

BFLOAT16 = dict(param_dtype='bfloat16', compute_dtype='bfloat16', state_dtype='float32')
# label -> TrainConfig overrides, the float32 run first (the reference).
SETTINGS = {
  'float32': {},
  'float32, seed 1': dict(seed=1),
  'float32, seed 2': dict(seed=2),
  'float32, seed 3': dict(seed=3),
  'bf16, stochastic rounding': dict(BFLOAT16, rounding='stochastic'),
  'bf16, kahan summation': dict(BFLOAT16, rounding='kahan'),
  'bf16, float32 master copy': dict(BFLOAT16, rounding='master'),
  'bf16, round to nearest': dict(BFLOAT16, rounding='nearest'),
  'bf16, stochastic rounding, 8-bit states': dict(
    BFLOAT16, rounding='stochastic', state_dtype='int8'
  ),
}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--optimizer', default='adamsnsm', help='registry name (default adamsnsm)')
  parser.add_argument('--model', default=convergence.BASE.model)
  parser.add_argument('--steps', type=int, default=convergence.BASE.steps)
  parser.add_argument('--out-dir', default='runs/precision')
  parser.add_argument('--out', default=None, help='also write the table to this file')
  parser.add_argument('--plot', default=None, help='write the curves to this file')
  args = parser.parse_args(argv)
  base = dataclasses.replace(
    convergence.BASE, model=args.model, steps=args.steps, scan_layers=True, layerwise=True
  )
  results: list[train_lib.RunResult] = []
  for label, overrides in SETTINGS.items():
    out_dir = f'{args.out_dir}/{args.optimizer}/{label.replace(", ", "_").replace(" ", "-")}'
    cfg = dataclasses.replace(base, optimizer=args.optimizer, out_dir=out_dir, **overrides)
    print(f'-- {args.optimizer}, {label}', flush=True)
    results.append(train_lib.train(cfg))
  labels = [f'{args.optimizer}, {label}' for label in SETTINGS]
  table = compare.table(results, labels)
  print(table, flush=True)
  if args.plot:
    compare.plot(results, args.plot, labels)
  report.write([table], args.out)


if __name__ == '__main__':
  main()
