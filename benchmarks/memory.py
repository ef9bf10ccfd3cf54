"""Optimizer-state memory at the papers' LLaMA sizes, from jax.eval_shape.

    python -m benchmarks.memory [--sizes 60m,1b] [--bytes] [--out docs/memory.md]

Nothing is allocated: states are traced with ``jax.eval_shape`` on the LLaMA
parameter shapes of ``examples/llama`` (untied head, vocabulary 32000). Every
optimizer sees the trainer's leaf choice: SN/SM/GaLore-style rules on all
linear kernels (output head included), the plain rule on embeddings and norms.
Each row reports GiB and the ratio to AdamW in the same precision (float32
states for float32 parameters, bfloat16 for bfloat16, the papers' "pure
bf16"), next to the published figure where there is one (the memory tables of
SN-SM, arXiv 2411.07120, and GaLore, arXiv 2403.03507). AdamSNSM is reported
both as the paper counts it (momentum and second moment only) and with
everything counted (projector and step counts too).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_lean
from benchmarks import report
from examples.llama import optimizers
from examples.llama.configs import get_config
from examples.llama.model import Llama

GIB = 2**30
# The paper's rank per size (GaLore Table 2; SN-SM's 1B memory figure uses 512).
PAPER_RANK = {'60m': 128, '130m': 256, '350m': 256, '1b': 512, '7b': 1024}
# Published bf16 optimizer-state GiB (the SN-SM paper's memory table: m + v only; 1B: its
# README figure).
PUBLISHED = {
  ('adamw', '60m'): 0.216,
  ('adamw', '130m'): 0.500,
  ('adamw', '350m'): 1.371,
  ('adamw', '1b'): 4.988,
  ('adamsn', '60m'): 0.139,
  ('adamsn', '130m'): 0.296,
  ('adamsn', '350m'): 0.747,
  ('adamsn', '1b'): 2.618,
  ('rmsprop_sn', '60m'): 0.031,
  ('rmsprop_sn', '130m'): 0.046,
  ('rmsprop_sn', '350m'): 0.062,
  ('rmsprop_sn', '1b'): 0.123,
  ('adamsnsm r=128', '60m'): 0.081,
  ('adamsnsm r=128', '130m'): 0.126,
  ('adamsnsm r=128', '350m'): 0.201,
  ('adamsnsm r=128', '1b'): 0.394,
  ('adamsnsm r=256', '60m'): 0.100,
  ('adamsnsm r=256', '130m'): 0.160,
  ('adamsnsm r=256', '350m'): 0.279,
  ('adamsnsm r=256', '1b'): 0.542,
  ('adamsnsm r=512', '60m'): 0.139,
  ('adamsnsm r=512', '130m'): 0.228,
  ('adamsnsm r=512', '350m'): 0.435,
  ('adamsnsm r=512', '1b'): 0.839,
}
MOMENTS = ('mu', 'nu', 'ema')  # the state fields the paper counts


@dataclasses.dataclass(frozen=True)
class Row:
  label: str
  build: Callable[[str], optax.GradientTransformation]  # size -> optimizer
  paper_count: bool = False  # also report moments only


def registry(name: str, **hparams) -> Callable[[str], optax.GradientTransformation]:
  return lambda size: optimizers.build(
    name, optax.constant_schedule(1e-3), optimizers.Hyperparameters(**hparams)
  )


def rows() -> list[Row]:
  table = [
    Row('adamw', registry('adamw')),
    Row('adafactor', registry('adafactor')),
    Row('adamsn', registry('adamsn')),
    Row('rmsprop_sn', registry('rmsprop_sn')),
  ]
  for rank in (128, 256, 512):
    table.append(Row(f'adamsnsm r={rank}', registry('adamsnsm', rank=rank), paper_count=True))
  table += [
    Row(
      'adamsnsm r=512, random projector',
      registry('adamsnsm', rank=512, projector='random'),
      paper_count=True,
    ),
  ]
  for name, spec in optimizers.REGISTRY.items():
    if name in ('adamw', 'adafactor', 'adamsn', 'rmsprop_sn', 'adamsnsm'):
      continue
    if not spec.low_rank:
      table.append(Row(name, registry(name)))
      continue
    table.append(
      Row(
        f'{name} (paper rank)',
        lambda size, name=name: optimizers.build(
          name, optax.constant_schedule(1e-3), optimizers.Hyperparameters(rank=PAPER_RANK[size])
        ),
      )
    )
  return table


def abstract_params(size: str, dtype) -> dict:
  model = nnx.eval_shape(lambda: Llama(get_config(size), nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, dtype), params)


def measure(row: Row, size: str, params) -> tuple[int, int]:
  """(everything, moments only) in bytes."""
  state = jax.eval_shape(row.build(size).init, params)
  kinds = optax_lean.state_bytes_by_kind(state)
  return optax_lean.state_bytes(state), sum(v for k, v in kinds.items() if k in MOMENTS)


def amount(n: int, in_bytes: bool) -> str:
  return f'{n:,} B' if in_bytes else f'{n / GIB:.3f} GiB'


def table(sizes: list[str], in_bytes: bool = False) -> str:
  lines = []
  for dtype in (jnp.float32, jnp.bfloat16):
    name = jnp.dtype(dtype).name
    lines += [
      f'\n### {name} parameters and states\n',
      '| optimizer | ' + ' | '.join(sizes) + ' |',
      '|---|' + '---|' * len(sizes),
    ]
    params = {size: abstract_params(size, dtype) for size in sizes}
    adamw = {size: measure(rows()[0], size, params[size])[0] for size in sizes}
    for row in rows():
      cells, paper_cells = [], []
      for size in sizes:
        total, moments = measure(row, size, params[size])
        published = PUBLISHED.get((row.label, size))
        note = (
          f' (paper {published:.3f})'
          if published and dtype == jnp.bfloat16 and not row.paper_count
          else ''
        )
        cells.append(f'{amount(total, in_bytes)}, {total / adamw[size]:.1%}{note}')
        if row.paper_count:
          note = f' (paper {published:.3f})' if published and dtype == jnp.bfloat16 else ''
          paper_cells.append(f'{amount(moments, in_bytes)}, {moments / adamw[size]:.1%}{note}')
      lines.append(
        f'| {row.label}, everything counted | ' + ' | '.join(cells) + ' |'
        if row.paper_count
        else f'| {row.label} | ' + ' | '.join(cells) + ' |'
      )
      if row.paper_count:
        lines.append(
          f'| {row.label}, moments only (as the paper counts) | ' + ' | '.join(paper_cells) + ' |'
        )
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sizes', default='60m,130m,350m,1b,7b')
  parser.add_argument('--bytes', action='store_true', help='exact bytes instead of GiB')
  parser.add_argument('--out', default=None, help='also write the table to this file')
  args = parser.parse_args(argv)
  text = table(args.sizes.split(','), args.bytes)
  print(text)
  report.write([text], args.out)


if __name__ == '__main__':
  main()
