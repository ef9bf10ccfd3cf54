"""Running the LLaMA trainer as a subprocess, the way users run it.

Every run gets 8 fake CPU devices and a persistent compilation cache shared by
the test session (``cli_env`` in ``conftest.py``), so the many short runs of
one program compile it once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from examples.llama import run as run_lib
from examples.llama.checkpoint import Checkpointer, quiet_failed_reads
from examples.llama.train_config import TrainConfig

# Damaged checkpoints are restored in this process too: opt in, as the trainer's main does.
quiet_failed_reads()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = 'examples.llama.train'


def toy_options(corpus: str, **overrides: Any) -> dict[str, Any]:
  """A toy run: 12 steps, checkpoints every 4, projector refreshes at 1, 3, 6, 9, 12."""
  return {
    'model': 'toy',
    'optimizer': 'adamsnsm',
    'steps': 12,
    'batch_size': 8,
    'seq_len': 32,
    'rank': 4,
    'update_proj_gap': 3,
    'eval_every': 12,
    'eval_batches': 1,
    'checkpoint_every': 4,
    'mesh': 'data=1',
    'data': corpus,
    'progress': False,
    **overrides,
  }


def flags(options: dict[str, Any]) -> list[str]:
  """Command-line flags for ``options`` (``TrainConfig`` field names)."""
  args = []
  for name, value in options.items():
    flag = '--' + name.replace('_', '-')
    if isinstance(value, bool):
      args.append(flag if value else '--no-' + flag[2:])
    elif value is not None:
      args += [flag, str(value)]
  return args


def command(*args: str) -> list[str]:
  return [sys.executable, '-m', MODULE, *args]


def run(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs the trainer to completion and captures its output."""
  return subprocess.run(
    command(*args), cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout
  )


def start(*args: str, env: dict[str, str], log: str) -> subprocess.Popen:
  """Starts the trainer in the background, its output going to the file ``log``."""
  with open(log, 'w') as out:
    return subprocess.Popen(command(*args), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)


def restore_target(options: dict[str, Any]):
  """The abstract state, with shardings, of a run with ``options`` (``TrainConfig`` fields)."""
  return run_lib.build(TrainConfig(**options)).restore_target()


def restore(checkpoint_dir: str, options: dict[str, Any], step: int | None = None):
  """The verified ``(state, record)`` of a checkpoint, restored in this process."""
  checkpointer = Checkpointer(checkpoint_dir)
  try:
    return checkpointer.restore(restore_target(options), step)
  finally:
    checkpointer.close()
