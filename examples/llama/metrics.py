"""What a run reports: lines from process 0, metrics files, a progress bar and throughput.

``StepLog`` records every (micro) step's metrics: it stops a run at a
non-finite loss or gradient (or counts it as skipped, with
``--skip-nonfinite``), writes ``metrics.jsonl`` (and TensorBoard logs) on
process 0, shows a progress bar there, and times the steps after the first,
which compiles. Metrics can be recorded one step late (``defer``), so the host
never waits on the device for them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

import jax
import optax

import optax_lean
from examples.llama import distributed, rso_layers

if TYPE_CHECKING:
  from examples.llama.checkpoint import Checkpointer
  from examples.llama.run import Run
  from examples.llama.train_config import TrainConfig

MAX_CONSECUTIVE_NONFINITE = 10


class TrainingError(RuntimeError):
  """A run that must stop: a non-finite loss or gradient."""


def say(line: str, file: TextIO | None = None) -> None:
  """Prints a line from process 0 only (every process computes the same)."""
  if distributed.is_primary():
    print(line, file=file or sys.stdout, flush=True)


def format_bytes(n: int) -> str:
  return f'{n / 2**20:.2f} MiB'


def report_memory(run: Run) -> tuple[int, int, int]:
  """Prints parameter count and optimizer-state memory next to AdamW's."""
  params = rso_layers.without_factors(run.abstract_state.params)
  opt_state = run.abstract_state.opt_state
  n_params = sum(p.size for p in jax.tree.leaves(params))
  param_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
  param_dtypes = '/'.join(sorted({p.dtype.name for p in jax.tree.leaves(params)}))
  opt_bytes = optax_lean.state_bytes(opt_state)
  adamw_bytes = optax_lean.state_bytes(jax.eval_shape(optax.adamw(1e-3).init, params))
  by_kind = ', '.join(
    f'{k} {format_bytes(v)}' for k, v in optax_lean.state_bytes_by_kind(opt_state).items()
  )
  cfg = run.cfg
  say(
    f'model {cfg.model}: {n_params:,} parameters ({format_bytes(param_bytes)} {param_dtypes}); '
    f'mesh {dict(run.mesh.shape)}'
  )
  say(
    f'optimizer {cfg.optimizer}: state {format_bytes(opt_bytes)} '
    f'({100 * opt_bytes / adamw_bytes:.1f}% of adamw {format_bytes(adamw_bytes)}): {by_kind}'
  )
  return n_params, opt_bytes, adamw_bytes


class MetricsWriter:
  """JSON lines in ``out_dir/metrics.jsonl``, and TensorBoard if installed."""

  def __init__(self, out_dir: str, append: bool):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'metrics.jsonl')
    self._file = open(path, 'a' if append else 'w')  # noqa: SIM115 (closed by close())
    try:
      from tensorboardX import SummaryWriter

      self._tensorboard = SummaryWriter(os.path.join(out_dir, 'tensorboard'))
    except ImportError:
      self._tensorboard = None

  def write(self, record: dict) -> None:
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tensorboard is not None:
      for key, value in record.items():
        if key != 'step':
          self._tensorboard.add_scalar(key, value, record['step'])

  def close(self) -> None:
    self._file.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


def progress_bar(total: int, initial: int) -> Any:
  """A tqdm bar of micro steps on stdout: a bar on a terminal, nothing in a log file."""
  from tqdm import tqdm

  return tqdm(
    total=total, initial=initial, unit='step', dynamic_ncols=True, file=sys.stdout, disable=None
  )


class StepLog:
  """The metrics of a run's (micro) steps from ``position`` on: checked, kept and shown."""

  def __init__(
    self,
    cfg: TrainConfig,
    schedule: optax.Schedule,
    position: int,
    resumed: bool,
    checkpointer: Checkpointer | None,
  ):
    self.history: list[dict] = []
    self._cfg, self._schedule, self._checkpointer = cfg, schedule, checkpointer
    self._tokens_per_micro_step = cfg.batch_size * cfg.seq_len
    self._first = position + 1  # this run's first micro step, which compiles
    self._start: float | None = None  # when it ended
    self._nonfinite = 0  # consecutive non-finite steps
    self._deferred: tuple[int, dict] | None = None
    primary = distributed.is_primary()
    out_dir = cfg.out_dir or os.path.join('runs', f'{cfg.model}-{cfg.optimizer}')
    self._writer = MetricsWriter(out_dir, append=resumed) if primary else None
    self._bar = None
    if cfg.progress and primary:
      self._bar = progress_bar(cfg.steps * cfg.grad_accum, position)

  def stepped(self, state: Any) -> None:
    """After each micro step: starts the clock after the first, records a deferred step."""
    if self._start is None:  # the first step compiles: time from its end
      jax.block_until_ready(state)
      self._start = time.perf_counter()
    self.flush()
    if self._bar is not None:
      self._bar.update(1)

  def defer(self, micro_step: int, metrics: dict) -> None:
    """Records ``metrics`` after the next micro step is under way (or at ``flush``)."""
    self._deferred = (micro_step, metrics)

  def flush(self) -> None:
    """Records the deferred step, if any."""
    if self._deferred is not None:
      self.record(*self._deferred)
      self._deferred = None

  def record(self, micro_step: int, metrics: dict, val_loss: float | None = None) -> None:
    """Checks, records, writes and shows the metrics of one (micro) step."""
    step = micro_step // self._cfg.grad_accum
    record = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self._check_finite(step, record)
    record.update(
      step=step,
      tokens=micro_step * self._tokens_per_micro_step,
      lr=float(self._schedule(step)),
      tokens_per_sec=self.tokens_per_second(micro_step),
    )
    if self._cfg.grad_accum > 1:
      record['micro_step'] = micro_step
    if val_loss is not None:
      record.update(val_loss=val_loss, val_ppl=math.exp(val_loss))
    self.history.append(record)
    if self._writer is not None:
      self._writer.write(record)
    summary = f'loss {record["loss"]:.3f} {record["tokens_per_sec"]:,.0f} tok/s'
    if self._bar is not None:
      self._bar.set_postfix_str(summary)
    if val_loss is not None:
      self.note(f'step {step}: {summary}, val loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f})')

  def _check_finite(self, step: int, record: dict) -> None:
    """Raises ``TrainingError`` at a non-finite step, unless it is to be skipped (and marked)."""
    if math.isfinite(record['loss']) and math.isfinite(record['grad_norm']):
      self._nonfinite = 0
      return
    self._nonfinite += 1
    last = self._checkpointer.latest_step() if self._checkpointer else None
    where = 'none' if last is None else f'step {last} in {self._cfg.checkpoint_dir}'
    problem = (
      f'non-finite loss or gradient at step {step} (loss {record["loss"]}, grad norm '
      f'{record["grad_norm"]})'
    )
    if not self._cfg.skip_nonfinite:
      raise TrainingError(f'{problem}; stopping. Last good checkpoint: {where}')
    if self._nonfinite >= MAX_CONSECUTIVE_NONFINITE:
      raise TrainingError(
        f'{problem}, {MAX_CONSECUTIVE_NONFINITE} in a row; stopping. Last good checkpoint: {where}'
      )
    record['skipped'] = True
    self.note(f'{problem}: step skipped')

  def tokens_per_second(self, micro_step: int) -> float:
    """Throughput of the micro steps after the first, up to ``micro_step`` (done by now)."""
    elapsed = time.perf_counter() - self._start if self._start else 0.0
    timed = (micro_step - self._first) * self._tokens_per_micro_step
    return timed / elapsed if timed > 0 else 0.0

  def note(self, line: str) -> None:
    """A line above the progress bar, or printed (process 0)."""
    if self._bar is not None:
      self._bar.write(line)
    else:
      say(line)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._writer is not None:
      self._writer.close()
