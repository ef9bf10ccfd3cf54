"""Checkpoints behind one small interface, on orbax's ``CheckpointManager``.

A checkpoint holds the train state (step, params, optimizer state) as arrays
and a JSON record of the data position and the run's configuration. States are
always restored against an abstract target carrying shardings, so optax
NamedTuples come back as themselves and every array lands on its devices.
Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores ``(state, record)`` pairs by step in ``directory``."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self._manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, record: dict) -> None:
    self._manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
    )

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """The state at ``step`` (default: the latest) shaped like ``abstract_state``."""
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()
      ),
    )
    return restored.state, restored.record

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
