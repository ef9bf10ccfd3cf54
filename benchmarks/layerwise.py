"""The tiny demo with per-layer updates next to the ordinary step, clipped as each clips.

    python -m benchmarks.layerwise [--steps 600] [--out layerwise.md]

Both runs are the demo's (``make demo``: the ``tiny`` LLaMA on the bundled
corpus, batch 8 x 128 bytes, AdamSNSM at its registered rate, global-norm
clipping at 1.0) with scanned layers. The ordinary step clips each step by its
own global gradient norm; ``--layerwise`` clips by the previous step's, since
its early layers are updated before the later gradients exist. The table
prints both validation losses at every evaluation, and the loss curves' gap.
"""

from __future__ import annotations

import argparse
import dataclasses

from benchmarks import report
from examples.llama import train as train_lib
from examples.llama.train_config import TrainConfig


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', type=int, default=600, help='training steps (default 600)')
  parser.add_argument('--optimizer', default='adamsnsm', help='registry optimizer')
  parser.add_argument('--out', default=None, help='write the table here')
  args = parser.parse_args(argv)
  base = TrainConfig(
    model='tiny',
    optimizer=args.optimizer,
    steps=args.steps,
    batch_size=8,
    seq_len=128,
    eval_every=50,
    scan_layers=True,
    progress=False,
  )
  runs = {
    'ordinary (clip by this step)': train_lib.train(base),
    'layerwise (clip by last step)': train_lib.train(dataclasses.replace(base, layerwise=True)),
  }
  evals = {
    label: {r['step']: r['val_loss'] for r in run.history if 'val_loss' in r}
    for label, run in runs.items()
  }
  (a, first), (b, second) = evals.items()
  lines = [
    f'| step | {a} | {b} | difference |',
    '|---|---|---|---|',
    *(
      f'| {step} | {first[step]:.4f} | {second[step]:.4f} | {second[step] - first[step]:+.4f} |'
      for step in sorted(first)
    ),
  ]
  speed = ', '.join(
    f'{label}: {run.tokens_per_second:,.0f} tokens/s' for label, run in runs.items()
  )
  text = '\n'.join(lines) + f'\n\n{speed}'
  print(text)
  report.write([text], args.out)


if __name__ == '__main__':
  main()
