"""Train the LLaMA example with any registered optimizer.

    python -m examples.llama.train --model tiny --optimizer adamsnsm --steps 600

``train_config.py`` holds the command line, ``run.py`` builds the run (data,
model, mesh, optimizer, shardings and the steps ``steps.py`` defines, each
under one ``jax.jit``) and ``metrics.py`` records it; this module resumes it
and runs its loop. Metrics are read one step late so the host never waits on
the device, except at evaluations and checkpoints.

Several processes train one model when given ``--coordinator HOST:PORT
--num-processes N --process-id I`` (see ``distributed.py``); process 0 prints
and writes metrics. ``--resume`` continues from the newest checkpoint that
passes its checksums, reporting and setting aside damaged ones (see
``checkpoint.py``).
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np

from examples.llama import checkpoint, distributed, mesh
from examples.llama import run as run_lib
from examples.llama.checkpoint import Checkpointer, CheckpointError
from examples.llama.metrics import StepLog, TrainingError, report_memory, say
from examples.llama.steps import TrainState
from examples.llama.train_config import TrainConfig, build_parser, config_from_args


@dataclasses.dataclass
class RunResult:
  """What a finished run reports (the comparison tool reads it)."""

  config: TrainConfig
  history: list[dict]
  param_count: int
  state_bytes: int
  adamw_state_bytes: int
  tokens_per_second: float
  final_state: TrainState


def starting_point(
  run: run_lib.Run, checkpointer: Checkpointer | None
) -> tuple[TrainState, int, bool]:
  """The state and data position to start from, and whether they were resumed.

  With ``--resume``, the newest checkpoint that passes its checksums (damaged
  newer ones are reported and set aside); otherwise a fresh state.
  """
  cfg = run.cfg
  warn = lambda line: say(f'warning: {line}', file=sys.stderr)
  restored = None
  if cfg.resume and checkpointer is not None:
    restored = checkpointer.restore_latest(run.restore_target(), report=warn)
  if restored is None:
    return run.init_state(), 0, False
  state, record = restored
  if record['config']['model'] != cfg.model or record['config']['optimizer'] != cfg.optimizer:
    raise ValueError(
      f'--resume: {cfg.checkpoint_dir} holds a {record["config"]["model"]} / '
      f'{record["config"]["optimizer"]} run'
    )
  position = record['data_position']
  say(f'resumed from step {int(state.step)} (data position {position})')
  return state, position, True


def evaluate(run: run_lib.Run, params, batches: list[tuple[jax.Array, jax.Array]]) -> float:
  """The mean validation loss over ``batches``."""
  return float(np.mean(jax.device_get([run.eval_fn(params, x, y) for x, y in batches])))


def train(cfg: TrainConfig) -> RunResult:
  """Runs (or resumes) one training run and returns its history."""
  run = run_lib.build(cfg)
  n_params, opt_bytes, adamw_bytes = report_memory(run)
  checkpointer = Checkpointer(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
  state, position, resumed = starting_point(run, checkpointer)
  val_batches = run.validation_batches()
  log = StepLog(cfg, run.schedule, position, resumed, checkpointer)
  micro_steps = cfg.steps * cfg.grad_accum
  try:
    while position < micro_steps:
      state, step_metrics = run.step_fn(state, *run.train_batch(position))
      position += 1
      log.stepped(state)
      step, boundary = divmod(position, cfg.grad_accum)
      last = position == micro_steps
      due_eval = boundary == 0 and (step % cfg.eval_every == 0 or last)
      due_save = (
        checkpointer is not None and boundary == 0 and (step % cfg.checkpoint_every == 0 or last)
      )
      if not (due_eval or due_save):
        log.defer(position, step_metrics)  # recorded once the next step is dispatched
        continue
      val_loss = evaluate(run, state.params, val_batches) if due_eval else None
      log.record(position, step_metrics, val_loss)
      if due_save:
        record = {'data_position': position, 'config': dataclasses.asdict(cfg)}
        checkpointer.save(step, state, record)
    log.flush()
    jax.block_until_ready(state)
  finally:
    log.close()
    if checkpointer is not None:
      checkpointer.close()
  return RunResult(
    config=cfg,
    history=log.history,
    param_count=n_params,
    state_bytes=opt_bytes,
    adamw_state_bytes=adamw_bytes,
    tokens_per_second=log.tokens_per_second(position),
    final_state=state,
  )


def main(argv: list[str] | None = None) -> int:
  """The command line: parse, join a cluster, check the mesh, train, report."""
  cfg, cluster = config_from_args(argv)
  try:
    distributed.join(cluster)
  except (RuntimeError, ValueError) as e:
    print(
      f'error: could not join a cluster ({e}); where JAX cannot detect it, pass '
      '--coordinator, --num-processes and --process-id',
      file=sys.stderr,
    )
    return 1
  problems = mesh.mesh_problems(cfg.mesh)
  if problems:
    build_parser().error(problems[0])
  if cfg.checkpoint_dir:
    checkpoint.quiet_failed_reads()  # a damaged step is reported in one line, by restore
  try:
    result = train(cfg)
  except (ValueError, OSError, TrainingError, CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  final = [r for r in result.history if 'val_loss' in r]
  if final:
    say(
      f'final val loss {final[-1]["val_loss"]:.4f} (ppl {final[-1]["val_ppl"]:.2f}), '
      f'{result.tokens_per_second:,.0f} tokens/s'
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
