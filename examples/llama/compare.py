"""Train several optimizers on the same data and seed, and compare them.

    python -m examples.llama.compare --optimizers adamw,adamsn,adamsnsm --model tiny

Takes every option of ``examples.llama.train`` (applied to each run) plus
``--optimizers``, and writes to ``--out-dir`` (default ``runs/compare``):
``results.md``, a table of final validation loss and perplexity, the steps each
optimizer needs to reach the first optimizer's final validation loss,
optimizer-state memory and throughput; ``val_loss.png``, validation loss
against tokens; and each run's ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

from examples.llama import mesh, validation
from examples.llama import train as train_lib
from examples.llama.metrics import TrainingError
from examples.llama.train_config import TrainConfig, build_parser


def steps_to_reach(history: list[dict], target: float) -> float | None:
  """The (interpolated) step at which validation loss first reaches ``target``."""
  evals = [(r['step'], r['val_loss']) for r in history if 'val_loss' in r]
  previous = (0, float('inf'))
  for step, loss in evals:
    if loss <= target:
      if not np.isfinite(previous[1]):
        return float(step)
      fraction = (previous[1] - target) / (previous[1] - loss)
      return previous[0] + fraction * (step - previous[0])
    previous = (step, loss)
  return None


def final_val_loss(result: train_lib.RunResult) -> float:
  """The validation loss of a run's last evaluation."""
  return [r for r in result.history if 'val_loss' in r][-1]['val_loss']


def table(results: list[train_lib.RunResult], labels: list[str] | None = None) -> str:
  """A markdown table; the first run is the reference for "steps to reach"."""
  labels = labels or [r.config.optimizer for r in results]
  reference = results[0]
  target = final_val_loss(reference)
  name = reference.config.optimizer
  lines = [
    f'| optimizer | peak lr | final val loss | val ppl | steps to {name} final '
    f'({target:.3f}) | state memory | tokens/s |',
    '|---|---|---|---|---|---|---|',
  ]
  for label, result in zip(labels, results):
    cfg = result.config
    final = [r for r in result.history if 'val_loss' in r][-1]
    reached = steps_to_reach(result.history, target)
    reach = 'not reached' if reached is None else f'{reached:.0f} ({reached / cfg.steps:.0%})'
    lr = cfg.peak_learning_rate()
    memory = (
      f'{result.state_bytes / 2**20:.2f} MiB '
      f'({result.state_bytes / result.adamw_state_bytes:.0%} of adamw)'
    )
    lines.append(
      f'| {label} | {lr:g} | {final["val_loss"]:.4f} | {final["val_ppl"]:.2f} | '
      f'{reach} | {memory} | {result.tokens_per_second:,.0f} |'
    )
  return '\n'.join(lines)


def plot(results: list[train_lib.RunResult], path: str, labels: list[str] | None = None) -> None:
  """Validation loss against training tokens, one curve per run (labelled by optimizer)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8.5, 4.5))
  labels = labels or [r.config.optimizer for r in results]
  colors = plt.get_cmap('tab20').colors
  tails = []  # each curve from its second evaluation on, which sets the vertical range
  for index, (label, result) in enumerate(zip(labels, results)):
    evals = [r for r in result.history if 'val_loss' in r]
    ax.plot(
      [r['tokens'] / 1e6 for r in evals],
      [r['val_loss'] for r in evals],
      marker='o',
      markersize=3,
      color=colors[index % len(colors)],
      linestyle='-' if index < len(colors) else '--',
      label=label,
    )
    tails += [r['val_loss'] for r in evals[1:]]
  cfg = results[0].config
  ax.set_xlabel('training tokens (millions)')
  ax.set_ylabel('validation loss (nats/token)')
  ax.set_title(f'LLaMA {cfg.model}, batch {cfg.batch_size}x{cfg.seq_len}, {cfg.steps} steps')
  ax.grid(alpha=0.3)
  if tails:
    low, high = min(tails), max(tails)
    ax.set_ylim(low - 0.03 * (high - low), high + 0.03 * (high - low))
  ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def label_positions(
  points: list[tuple[float, float]], names: list[str], span: float
) -> list[tuple[float, float, str]]:
  """Where each point's label goes: ``(x, y, alignment)`` in data coordinates, overlapping no other.

  A label is taken as 0.8 state-percent per character wide and 4% of the loss
  ``span`` high, and keeps off the points and the labels placed before it. Each
  tries the right of its point, then its left, level with it or a row lower,
  and otherwise moves up a row at a time.
  """
  height, gap = 0.04 * span, 1.0
  # left, right, bottom of each label placed, and of each point (labels keep off them too)
  placed = [(x - gap, x + gap, y) for x, y in points]

  def free(left, right, bottom, own):
    return not any(
      left < box_right and box_left < right and abs(bottom - box_bottom) < height
      for box_left, box_right, box_bottom in placed
      if (box_left, box_right, box_bottom) != own
    )

  positions: list[tuple[float, float, str]] = [(0.0, 0.0, 'left')] * len(points)
  for index in sorted(range(len(points)), key=lambda i: points[i][1]):
    x, y = points[index]
    width = 0.8 * len(names[index])
    own = (x - gap, x + gap, y)
    candidates = [
      (x + gap, y, 'left'),
      (x - gap, y, 'right'),
      (x + gap, y - height, 'left'),
      (x - gap, y - height, 'right'),
    ]
    candidates += [(x + gap, y + k * height, 'left') for k in range(1, 50)]
    for label_x, label_y, align in candidates:
      left = label_x if align == 'left' else label_x - width
      if free(left, left + width, label_y, own):
        placed.append((left, left + width, label_y))
        positions[index] = (label_x, label_y, align)
        break
  return positions


def state_plot(results: list[train_lib.RunResult], path: str) -> None:
  """Final validation loss against optimizer state (percent of AdamW's), one point per run."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 5.5))
  points = [(100 * r.state_bytes / r.adamw_state_bytes, final_val_loss(r)) for r in results]
  names = [f'{r.config.optimizer} {r.config.peak_learning_rate():g}' for r in results]
  xs, ys = zip(*points)
  span = max(ys) - min(ys) or 1.0
  colors = plt.get_cmap('tab20').colors
  labels = label_positions(points, names, span)
  for index, ((x, y), (label_x, label_y, align), name) in enumerate(zip(points, labels, names)):
    color = colors[index % len(colors)]
    ax.scatter(x, y, color=color, zorder=3)
    far = abs(label_y - y) > 0.05 * span
    ax.annotate(
      name,
      (x, y),
      xytext=(label_x, label_y),
      ha=align,
      va='center',
      fontsize=8,
      color='black',
      arrowprops=dict(arrowstyle='-', lw=0.5, color=color) if far else None,
    )
  ax.set_ylim(min(ys) - 0.06 * span, max(ys) + 0.1 * span)
  ax.set_xlim(-12, max(xs) + 20)
  cfg = results[0].config
  ax.set_xlabel("optimizer state (% of AdamW's)")
  ax.set_ylabel('final validation loss (nats/token)')
  ax.set_title(f'LLaMA {cfg.model}, {cfg.steps} steps: each optimizer at its tuned rate')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  parser.description = __doc__.split('\n\n')[0]
  parser.add_argument(
    '--optimizers',
    default='adamw,adamsn,adamsnsm',
    help='comma-separated registry names; the first is the reference (default: %(default)s)',
  )
  args = parser.parse_args(argv)
  names = args.optimizers.split(',')
  del args.optimizers
  base = TrainConfig(**vars(args))
  out_dir = base.out_dir or os.path.join('runs', 'compare')
  run_configs = [dataclasses.replace(base, optimizer=name) for name in names]
  problems = [
    p for cfg in run_configs for p in validation.config_problems(cfg) + mesh.mesh_problems(cfg.mesh)
  ]
  if problems:
    parser.error(problems[0])
  if base.learning_rate is not None and len(names) > 1:
    parser.error(
      '--learning-rate would apply to every optimizer; leave it out to use each '
      "optimizer's registered default"
    )

  results = []
  for name in names:
    print(f'== {name} ==', flush=True)
    cfg = dataclasses.replace(base, optimizer=name, out_dir=os.path.join(out_dir, name))
    try:
      results.append(train_lib.train(cfg))
    except (ValueError, TrainingError) as e:
      print(f'error: {name}: {e}', file=sys.stderr)
      return 1

  os.makedirs(out_dir, exist_ok=True)
  markdown = table(results)
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(markdown + '\n')
  plot(results, os.path.join(out_dir, 'val_loss.png'))
  print(markdown)
  print(f'table: {os.path.join(out_dir, "results.md")}')
  print(f'plot: {os.path.join(out_dir, "val_loss.png")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
