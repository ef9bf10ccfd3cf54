"""Checkpoints behind one small interface, on orbax's ``CheckpointManager``.

A checkpoint holds the train state (step, params, optimizer state) as arrays
and a JSON record of the data position and the run's configuration. States are
always restored against an abstract target carrying shardings, so optax
NamedTuples come back as themselves and every array lands on its devices.
Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact; leftover
temporary directories are removed when the next run opens the directory.

Damage is detected, not trusted away. Every record is sealed: a SHA-256
digest covers the record, a digest of the state's layout (tree structure,
shapes, dtypes) and, per state leaf, a 32-bit hash of the array's bits
computed on device at save time. A step is only used when its commit marker is
present, orbax can read it, and the digest and every hash match; orbax alone
reads garbled array bytes without complaint. ``restore_latest`` walks back from
the newest step: a damaged step is reported in one line, moved aside to
``<step>.damaged`` (so the resumed run can save that step again) and the next
older step is tried. A sound step whose layout is not the target's (another
model or optimizer) is an error of the caller, and nothing is moved.

All processes of a multi-process run call every method; they read the same
files, agree on whether a step failed before any collective, and only process
0 moves directories.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

# Orbax writes it into a step as it commits. On a local path ``all_steps()`` lists
# a step without it (it only checks that the temporary directory was renamed),
# so ``restore`` checks it itself.
COMMIT_MARKER = ocp.path.atomicity.COMMIT_SUCCESS_FILE
SEAL = 'checksums'
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


class CheckpointError(RuntimeError):
  """A checkpoint step that is missing, unreadable or fails its checksums."""


class IncompatibleCheckpointError(ValueError):
  """A sound checkpoint of a differently shaped state (another model or optimizer)."""


def _mix(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection that spreads every input bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _leaf_hash(x: jax.Array) -> jax.Array:
  """A 32-bit hash of an array's bits and positions, independent of its sharding.

  Each element contributes ``mix(bits ^ mix(index))``, summed modulo 2**32.
  The sum is exact and order-free, so every sharding gives the same value,
  and since ``mix`` is a bijection any change to a single element changes it.
  """
  bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)
  index = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
  return jnp.sum(_mix(bits ^ _mix(index)), dtype=jnp.uint32)


@jax.jit
def _leaf_hashes(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([_leaf_hash(x) for x in leaves])


def state_checksums(state: Any) -> list[int]:
  """One 32-bit hash per leaf of ``state`` (global arrays; every process gets all)."""
  hashes = _leaf_hashes(jax.tree.leaves(state))
  return [int(h) for h in np.asarray(multihost_utils.process_allgather(hashes, tiled=True))]


def layout_digest(tree: Any) -> str:
  """A digest of a state's tree structure, shapes and dtypes (arrays or abstract)."""
  leaves, treedef = jax.tree.flatten(tree)
  layout = repr((str(treedef), [(tuple(x.shape), str(x.dtype)) for x in leaves]))
  return hashlib.sha256(layout.encode()).hexdigest()


def _digest(content: dict) -> str:
  return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def seal(record: dict, state: Any) -> dict:
  """``record`` with the state's layout and checksums, all under one digest."""
  content = {'record': record, 'layout': layout_digest(state), 'state': state_checksums(state)}
  return {**record, SEAL: {**content, 'digest': _digest(content)}}


def unseal(sealed: Any) -> tuple[dict, str, list[int]]:
  """The record, state layout and state checksums of a sealed record.

  Raises:
    CheckpointError: the seal is missing or does not match the record.
  """
  if not isinstance(sealed, dict) or not isinstance(sealed.get(SEAL), dict):
    raise CheckpointError('its record has no checksums')
  seal_ = sealed[SEAL]
  content = {
    'record': {k: v for k, v in sealed.items() if k != SEAL},
    'layout': seal_.get('layout'),
    'state': seal_.get('state'),
  }
  if seal_.get('digest') != _digest(content):
    raise CheckpointError('its record does not match its checksum')
  return content['record'], content['layout'], content['state']


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  summary = text[0] if text else ''
  return f'{type(error).__name__}: {summary[:200]}'


def _echoes_a_failed_read(unraisable: Any) -> bool:
  """Whether an unraisable error is an after-effect of a failed orbax read.

  When one read of a restore fails, orbax closes its event loop while other
  reads are in flight: their completion callbacks raise ``RuntimeError('Event
  loop is closed')`` in tensorstore's threads, and orbax's unfinished read
  coroutines raise their own errors as they are finalised, dozens of
  tracebacks after ``restore`` has returned.
  """
  error, source = unraisable.exc_value, unraisable.object
  closed_loop = isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'
  orbax_read = inspect.iscoroutine(source) and 'orbax' in source.cr_code.co_filename
  return closed_loop or orbax_read


@functools.cache
def quiet_failed_reads() -> None:
  """Keeps the echoes of damaged steps off stderr, for the whole process (opt-in, once).

  Installed by the trainer's ``main`` when it checkpoints; constructing a
  ``Checkpointer`` changes nothing in the interpreter.

  A damaged step is reported once, in one line, by ``restore``. Dropped are
  the after-effects of a failed read (``_echoes_a_failed_read``, asyncio's log
  of an orbax read task whose exception nobody retrieved, and the warning that
  such a read coroutine was never awaited) and orbax's
  warning, while listing steps, that a step's metadata file is missing; every
  other unraisable error and log record still goes through.
  """
  previous = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: (
    None if _echoes_a_failed_read(unraisable) else previous(unraisable)
  )
  logging.getLogger('absl').addFilter(
    lambda record: not record.getMessage().startswith('Metadata file does not exist')
  )
  logging.getLogger('asyncio').addFilter(lambda record: not _orphaned_orbax_read(record))
  # An orbax read coroutine that the failed restore never awaited warns when collected.
  warnings.filterwarnings(
    'ignore',
    message=f"coroutine '({'|'.join(ORBAX_READS)})' was never awaited",
    category=RuntimeWarning,
  )


# orbax's read coroutines (orbax/checkpoint/_src/serialization/serialization.py).
ORBAX_READS = (
  '_read_shard',
  '_read_array_index_and_device_put',
  '_read_and_create_array',
  'async_deserialize',
)


# What tensorstore's read errors say: their source location, or an absl status code.
TENSORSTORE_READ_ERRORS = ("source locations='tensorstore", 'OUT_OF_RANGE:', 'DATA_LOSS:')


def _orphaned_orbax_read(record: logging.LogRecord) -> bool:
  """Whether asyncio logs an orbax read whose exception nobody retrieved.

  The orphan is a ``Task`` (its repr names orbax's coroutine), a
  ``_GatheringFuture`` of such reads (its exception's traceback runs through
  orbax) or a bare ``Future`` of a tensorstore read (its error names
  tensorstore's source or a read status such as ``OUT_OF_RANGE``).
  """
  message = record.getMessage()
  if 'exception was never retrieved' not in message.split('\n', 1)[0]:
    return False
  error = record.exc_info[1] if record.exc_info else None
  if any(marker in f'{message} {error}' for marker in ('orbax', *TENSORSTORE_READ_ERRORS)):
    return True
  while error is not None:
    frames = traceback.extract_tb(error.__traceback__)
    if any('orbax' in frame.filename for frame in frames):
      return True
    error = error.__cause__ or error.__context__
  return False


def _agree(problem: str | None) -> str | None:
  """The local problem, or a stand-in when another process has one."""
  if jax.process_count() == 1:
    return problem
  failed = multihost_utils.process_allgather(np.int32(problem is not None))
  if problem is None and np.any(failed):
    return 'another process could not read it'
  return problem


class Checkpointer:
  """Saves and restores ``(state, record)`` pairs by step in ``directory``."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, record: dict) -> None:
    """Starts saving ``state`` and the sealed ``record`` (orbax finishes it in the background)."""
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(seal(record, state))
      ),
    )

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """The verified state at ``step`` (default: the latest) shaped like ``abstract_state``.

    Raises:
      CheckpointError: the step is uncommitted, unreadable or fails a checksum
        (one line, naming the step and the reason).
      IncompatibleCheckpointError: the step is sound but holds a state of
        another structure, shape or dtype; nothing is tried or moved.
    """
    step = self.latest_step() if step is None else step
    try:
      (state, record, expected), problem = self._read(abstract_state, step), None
    except CheckpointError as e:
      problem = str(e)
    problem = _agree(problem)
    if problem is None:  # every process read it: the checksums are one collective
      problem = _state_problem(state, expected)
    if problem is not None:
      raise CheckpointError(f'checkpoint step {step} in {self.directory} is damaged: {problem}')
    return state, record

  def _read(self, abstract_state: Any, step: int) -> tuple[Any, dict, Any]:
    """State, record and stored state checksums of ``step``, the record checked first."""
    if not os.path.exists(os.path.join(self.directory, str(step), COMMIT_MARKER)):
      raise CheckpointError(f'its commit marker {COMMIT_MARKER} is missing')
    record, layout, expected = unseal(self._orbax_restore(step, record=ocp.args.JsonRestore()))
    # The sealed layout, not orbax's ``item_metadata`` (which returns optax's
    # NamedTuples as dicts and lists, and reads the array metadata a damaged
    # step may lack): one comparison of the tree, shapes and dtypes.
    if layout != layout_digest(abstract_state):
      raise IncompatibleCheckpointError(
        f'checkpoint step {step} in {self.directory} holds a state of another structure or '
        'shape (another model, optimizer or optimizer setting); resume with the same settings '
        'or another --checkpoint-dir'
      )
    state = self._orbax_restore(step, state=ocp.args.StandardRestore(abstract_state))
    return state, record, expected

  def _orbax_restore(self, step: int, **items: Any) -> Any:
    """One item restored by orbax; any failure becomes a one-line ``CheckpointError``."""
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax and tensorstore raise many kinds; all mean unreadable
      raise CheckpointError(f'orbax cannot read it ({_first_line(e)})') from e
    (name,) = items
    return restored[name]

  def restore_latest(
    self, abstract_state: Any, report: Callable[[str], None]
  ) -> tuple[Any, dict] | None:
    """The newest step that passes ``restore``; ``None`` if there are no steps.

    Each damaged step is reported through ``report`` in one line and moved
    aside. Raises ``CheckpointError`` when every step is damaged.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        return self.restore(abstract_state, step)
      except CheckpointError as e:
        aside = self._move_aside(step)
        after = f'trying step {steps[i + 1]}' if i + 1 < len(steps) else 'no older step left'
        report(f'{e}; moved to {aside}; {after}')
    if steps:
      raise CheckpointError(f'no usable checkpoint in {self.directory}: all {len(steps)} damaged')
    return None

  def _move_aside(self, step: int) -> str:
    """Renames a damaged step out of orbax's sight (process 0), for all processes."""
    multihost_utils.sync_global_devices(f'checkpoint-name-aside-{step}')
    source = os.path.join(self.directory, str(step))
    target, n = f'{source}.damaged', 1
    while os.path.exists(target):
      n += 1
      target = f'{source}.damaged{n}'
    if jax.process_index() == 0:
      os.rename(source, target)
    multihost_utils.sync_global_devices(f'checkpoint-move-aside-{step}')
    self._manager.reload()
    return target

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _state_problem(state: Any, expected: Any) -> str | None:
  """What is wrong with a restored state given its stored checksums, or ``None``."""
  actual = state_checksums(state)
  if not isinstance(expected, list) or len(expected) != len(actual):
    return 'its state checksums do not fit the state'
  for (path, _), want, got in zip(jax.tree_util.tree_flatten_with_path(state)[0], expected, actual):
    if want != got:
      return f'the array at {jax.tree_util.keystr(path)} does not match its checksum'
  return None
