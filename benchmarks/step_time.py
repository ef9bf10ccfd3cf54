"""Optimizer speed: the update alone, the projector refresh, and a full train step.

    python -m benchmarks.step_time [--parts update,refresh,train] [--out FILE]

All ratios are measured side by side in one process, interleaving the
optimizers round by round so that drift on a noisy machine hits all of them
alike; each figure is the median over rounds, after warm-up.

- ``update``: one jitted ``tx.update`` + ``optax.apply_updates`` on the LLaMA
  ``--update-model`` shapes (default 60m), with parameters, gradients and state
  on the device and buffers donated, as a ratio to ``optax.adamw``. Projector
  refreshes are excluded (the gap is longer than the run).
- ``refresh``: the extra cost of a step that refreshes every projector,
  measured as (update with ``update_proj_gap=1``) minus (update that never
  refreshes), for the SVD, randomized-SVD and random projectors, and amortised
  over ``update_proj_gap`` steps.
- ``train``: a full train step (forward, backward, update) of the example
  trainer on ``--train-model`` (default 20m), as a ratio to AdamW.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import report
from benchmarks.memory import abstract_params
from examples.llama import optimizers
from examples.llama import run as run_lib
from examples.llama.train_config import TrainConfig

GAP = 200
NEVER = 10**9


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict:
  """Median seconds per call of each function, timed round-robin."""
  times = {name: [] for name in fns}
  for round_index in range(warmup + rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      if round_index >= warmup:
        times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def update_runner(tx: optax.GradientTransformation, params_shapes, dtype) -> Callable[[], None]:
  """A closure running one donated, jitted update on random device data."""
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.02, dtype), params_shapes
  )
  grads = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 1e-3, dtype), params_shapes)
  state = jax.jit(tx.init)(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  box = {'params': params, 'state': state}

  def run() -> None:
    box['params'], box['state'] = step(box['params'], box['state'], grads)
    jax.block_until_ready(box['params'])

  return run


def build(name: str, **hparams) -> optax.GradientTransformation:
  return optimizers.build(
    name, optax.constant_schedule(1e-3), optimizers.Hyperparameters(**hparams)
  )


def update_table(model: str, rank: int, rounds: int, dtype) -> str:
  shapes = abstract_params(model, dtype)
  candidates = {'adamw': build('adamw')}
  for name, spec in optimizers.REGISTRY.items():
    if name != 'adamw':
      kwargs = {'rank': rank, 'update_proj_gap': NEVER} if spec.low_rank else {}
      candidates[name] = build(name, **kwargs)
  candidates['adamsnsm (random projector)'] = build(
    'adamsnsm', rank=rank, update_proj_gap=NEVER, projector='random'
  )
  times = interleaved({n: update_runner(tx, shapes, dtype) for n, tx in candidates.items()}, rounds)
  lines = [
    f'| optimizer ({model}, rank {rank}, {jnp.dtype(dtype).name}) | update (ms) | vs optax.adamw |',
    '|---|---|---|',
  ]
  for name, seconds in times.items():
    lines.append(f'| {name} | {seconds * 1e3:.1f} | {seconds / times["adamw"]:.2f}x |')
  return '\n'.join(lines)


def refresh_table(model: str, rank: int, rounds: int, dtype) -> str:
  shapes = abstract_params(model, dtype)
  runners = {}
  for projector in ('svd', 'randomized_svd', 'random'):
    for label, gap in (('refresh', 1), ('steady', NEVER)):
      tx = build('adamsnsm', rank=rank, update_proj_gap=gap, projector=projector)
      runners[(projector, label)] = update_runner(tx, shapes, dtype)
  times = interleaved(runners, rounds)
  svd_cost = times[('svd', 'refresh')] - times[('svd', 'steady')]
  lines = [
    f'| projector ({model}, rank {rank}) | refresh (ms, all matrices) | amortised over '
    f'{GAP} steps (ms) | refresh vs svd | steady update (ms) |',
    '|---|---|---|---|---|',
  ]
  for projector in ('svd', 'randomized_svd', 'random'):
    cost = times[(projector, 'refresh')] - times[(projector, 'steady')]
    speedup = f'{svd_cost / cost:.1f}x cheaper' if projector != 'svd' and cost > 0 else '1x'
    lines.append(
      f'| {projector} | {cost * 1e3:.1f} | {cost / GAP * 1e3:.2f} | {speedup} | '
      f'{times[(projector, "steady")] * 1e3:.1f} |'
    )
  return '\n'.join(lines)


def train_table(model: str, rounds: int, names: list[str], bf16: bool) -> str:
  base = TrainConfig(
    model=model,
    steps=10**6,
    batch_size=8,
    mesh='data=1',
    param_dtype='bfloat16' if bf16 else 'float32',
    compute_dtype='bfloat16' if bf16 else 'float32',
    progress=False,
    update_proj_gap=NEVER,
  )
  runners = {}
  for name in names:
    run = run_lib.build(dataclasses.replace(base, optimizer=name))
    box = {'state': run.init_state(), 'position': 0}

    def step(run=run, box=box) -> None:
      box['state'], metrics = run.step_fn(box['state'], *run.batches.batch(box['position']))
      box['position'] += 1
      jax.block_until_ready(metrics)

    runners[name] = step
  times = interleaved(runners, rounds)
  tokens = base.batch_size * base.seq_len
  lines = [
    f'| optimizer ({model}, batch {base.batch_size}x{base.seq_len}, '
    f'{"bf16" if bf16 else "f32"}) | train step (s) | tokens/s | vs adamw |',
    '|---|---|---|---|',
  ]
  for name, seconds in times.items():
    lines.append(
      f'| {name} | {seconds:.3f} | {tokens / seconds:,.0f} | {seconds / times["adamw"]:.3f}x |'
    )
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--parts', default='update,refresh,train')
  parser.add_argument('--update-model', default='60m')
  parser.add_argument('--rank', type=int, default=128)
  parser.add_argument('--train-model', default='20m')
  parser.add_argument(
    '--train-optimizers', default='adamw,adamsn,adamsnsm,sumo,muon,adafactor,contrib_galore'
  )
  parser.add_argument('--rounds', type=int, default=10)
  parser.add_argument('--bf16', action='store_true', help='bf16 parameters and compute')
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  dtype = jnp.bfloat16 if args.bf16 else jnp.float32
  print(f'devices: {jax.devices()}')
  sections = []
  for part in args.parts.split(','):
    if part == 'update':
      sections.append(update_table(args.update_model, args.rank, args.rounds, dtype))
    elif part == 'refresh':
      sections.append(refresh_table(args.update_model, args.rank, args.rounds, dtype))
    elif part == 'train':
      sections.append(
        train_table(args.train_model, args.rounds, args.train_optimizers.split(','), args.bf16)
      )
    else:
      parser.error(f'unknown part {part!r}')
    print(sections[-1] + '\n', flush=True)
  report.write(sections, args.out)


if __name__ == '__main__':
  main()
