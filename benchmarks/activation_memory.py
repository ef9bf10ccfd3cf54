"""Compiled memory of a full train step, AdamW against RSO-style factor training.

    python -m benchmarks.activation_memory [--model 20m] [--ranks 128,32]

For each optimizer the example trainer's jitted train step (forward, backward,
update) is lowered and compiled for one CPU device, and XLA's
``compiled.memory_analysis()`` is printed: arguments (parameters, optimizer
state, batch), and temporaries (activations kept for the backward pass and
other scratch). The "saved for backward" column sums what JAX keeps between
the forward and backward passes of the loss alone
(``jax.ad_checkpoint.print_saved_residuals``), excluding the arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import re

import jax
import numpy as np
from jax import ad_checkpoint

from benchmarks import report
from examples.llama import run as run_lib
from examples.llama.steps import loss_fn
from examples.llama.train_config import TrainConfig

MB = 1e6
_RESIDUAL = re.compile(r'^([a-z]+)(\d*)\[([\d,]*)\]\s+(.*)$')  # e.g. "f32[8,256,512] output of ..."


def saved_for_backward(run: run_lib.Run, inputs, targets) -> int:
  """Bytes JAX keeps from the forward pass for the backward pass, arguments excluded."""
  state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), run.abstract_state.params)
  trainable, frozen = run.trained.split(state)
  loss = lambda t: loss_fn(run.graphdef, run.trained.join(t, frozen), inputs, targets)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    ad_checkpoint.print_saved_residuals(loss, trainable)
  total = 0
  for line in printed.getvalue().splitlines():
    match = _RESIDUAL.match(line.strip())
    if match is None or 'from the argument' in line or 'from a constant' in line:
      continue
    kind, bits, dims, _ = match.groups()
    itemsize = 1 if kind == 'bool' else int(bits) // 8
    total += math.prod(int(d) for d in dims.split(',') if d) * itemsize
  return total


def row(cfg: TrainConfig, label: str) -> str:
  run = run_lib.build(cfg)
  inputs, targets = run.batches.batch(0)
  compiled = run.step_fn.lower(run.restore_target(), inputs, targets).compile()
  stats = compiled.memory_analysis()
  saved = saved_for_backward(run, inputs, targets)
  return (
    f'| {label} | {stats.argument_size_in_bytes / MB:.1f} | '
    f'{stats.temp_size_in_bytes / MB:.1f} | {saved / MB:.1f} |'
  )


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='20m')
  parser.add_argument('--ranks', default='128,32')
  parser.add_argument('--batch-size', type=int, default=8)
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  base = TrainConfig(model=args.model, batch_size=args.batch_size, mesh='data=1', progress=False)
  lines = [
    f'| {args.model}, batch {args.batch_size}x{base.seq_len}, f32 | arguments (MB) | '
    'temporaries (MB) | saved for backward (MB) |',
    '|---|---|---|---|',
    row(dataclasses.replace(base, optimizer='adamw'), 'adamw'),
    row(dataclasses.replace(base, optimizer='adamsnsm'), 'adamsnsm (rank 128)'),
  ]
  for rank in args.ranks.split(','):
    lines.append(
      row(
        dataclasses.replace(base, optimizer='rso_layers', rank=int(rank)),
        f'rso_layers (rank {rank})',
      )
    )
  text = '\n'.join(lines)
  print(text)
  report.write([text], args.out)


if __name__ == '__main__':
  main()
