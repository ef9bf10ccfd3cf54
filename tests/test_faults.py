"""The trainer survives ``kill -9`` anywhere and damaged checkpoints.

A killed run, resumed, ends with bit-exactly the parameters and optimizer
state of a run that was never interrupted. A damaged newest checkpoint is
reported in one line, set aside, and the one before it is used; it is never
used itself, and a damage that orbax reads without complaint (sound files
with the wrong contents) is caught by the checksums.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from examples.llama.checkpoint import Checkpointer, state_checksums
from tests import cli

KILL_TIMEOUT = 240  # seconds for a run to reach its kill point, on a busy machine


@dataclasses.dataclass
class Run:
  """A trainer subprocess and where it writes."""

  process: subprocess.Popen
  checkpoints: Path
  metrics: Path
  started: float


KillPoint = Callable[[Run], bool]


def last_logged_step(run: Run) -> int:
  if not run.metrics.exists():
    return 0
  lines = run.metrics.read_text().splitlines()
  return json.loads(lines[-1])['step'] if lines else 0


def during_startup(run: Run) -> bool:
  """One second after launch: importing or compiling."""
  return time.monotonic() - run.started > 1.0


def after_step(n: int) -> KillPoint:
  """Once step ``n`` is logged (metrics are logged a step late: a later step is running)."""
  return lambda run: last_logged_step(run) >= n


def committed(step: int) -> KillPoint:
  """As soon as the checkpoint of ``step`` is committed."""
  return lambda run: (run.checkpoints / str(step)).exists()


def saving_after(step: int) -> KillPoint:
  """While orbax's temporary directory of the save after ``step`` exists."""
  return lambda run: (
    (run.checkpoints / str(step)).exists()
    and any('.orbax-checkpoint-tmp' in name for name in os.listdir(run.checkpoints))
  )


KILLS = {
  'during_startup': [during_startup],
  'once_checkpoint_4_is_committed': [committed(4)],
  'while_checkpoint_8_is_saved': [saving_after(4)],
  'after_step_6_is_logged': [after_step(6)],
  'three_times': [after_step(2), saving_after(4), after_step(10)],
}


@pytest.fixture(scope='module')
def options(corpus):
  return cli.toy_options(corpus)


@pytest.fixture(scope='module')
def straight(options, cli_env, tmp_path_factory):
  """Checkpoints of an uninterrupted run, and its final verified state and record."""
  directory = tmp_path_factory.mktemp('straight')
  paths = {'checkpoint_dir': str(directory / 'ckpt'), 'out_dir': str(directory / 'out')}
  out = cli.run(*cli.flags({**options, **paths}), env=cli_env)
  assert out.returncode == 0, out.stderr
  return directory / 'ckpt', cli.restore(str(directory / 'ckpt'), options)


def kill_when(run: Run, ready: KillPoint) -> None:
  """Polls until ``ready``, then sends SIGKILL; fails if the run ended first."""
  deadline = time.monotonic() + KILL_TIMEOUT
  while not ready(run):
    assert run.process.poll() is None, f'the run ended (status {run.process.returncode}) first'
    assert time.monotonic() < deadline, 'the kill point was not reached in time'
    time.sleep(0.002)
  run.process.send_signal(signal.SIGKILL)
  assert run.process.wait() == -signal.SIGKILL


@pytest.mark.parametrize('points', list(KILLS.values()), ids=list(KILLS))
def test_killed_runs_resume_bit_exactly(points, options, straight, cli_env, tmp_path):
  args = [*cli.flags(options), '--checkpoint-dir', str(tmp_path / 'ckpt'), '--resume']
  args += ['--out-dir', str(tmp_path / 'out')]
  for i, point in enumerate(points):
    run = Run(
      cli.start(*args, env=cli_env, log=str(tmp_path / f'killed{i}.log')),
      tmp_path / 'ckpt',
      tmp_path / 'out' / 'metrics.jsonl',
      time.monotonic(),
    )
    kill_when(run, point)
  finished = cli.run(*args, env=cli_env)
  assert finished.returncode == 0, finished.stderr
  assert 'warning' not in finished.stderr  # no checkpoint was damaged by a kill
  state, record = cli.restore(str(tmp_path / 'ckpt'), options)
  chex.assert_trees_all_equal(state, straight[1][0])
  assert record['data_position'] == 12


def test_checksums_ignore_sharding_and_see_every_bit_and_position():
  x = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8) / 7
  tree = {'f32': x, 'bf16': x.astype(jnp.bfloat16), 'int': jnp.arange(5, dtype=jnp.int32)}
  mesh = jax.make_mesh((8,), ('x',), axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, P('x'))
  sharded = {**tree, 'f32': jax.device_put(x, rows), 'bf16': jax.device_put(tree['bf16'], rows)}
  assert state_checksums(sharded) == state_checksums(tree)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  one_bit = jax.lax.bitcast_convert_type(bits.at[3, 5].set(bits[3, 5] ^ 1), jnp.float32)
  swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
  for changed in (one_bit, swapped):
    assert state_checksums([changed]) != state_checksums([x])


def largest_file(directory: Path) -> Path:
  return max((p for p in directory.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(path: Path) -> None:
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path) -> None:
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 3, len(data) // 3 + 8):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def edit_record(step_dir: Path, edit: Callable[[dict], None]) -> None:
  path = step_dir / 'record' / 'metadata'
  record = json.loads(path.read_text())
  edit(record)
  path.write_text(json.dumps(record))


def swap_state_with(older: str) -> Callable[[Path], None]:
  """Replaces the arrays with those of an older step: sound files, wrong contents."""

  def damage(step_dir: Path) -> None:
    shutil.rmtree(step_dir / 'state')
    shutil.copytree(step_dir.parent / older / 'state', step_dir / 'state')

  return damage


def empty(directory: Path) -> None:
  for path in directory.iterdir():
    if path.is_dir():
      shutil.rmtree(path)
    else:
      path.unlink()


DAMAGES = {
  'state_deleted': lambda d: shutil.rmtree(d / 'state'),
  'array_data_deleted': lambda d: shutil.rmtree(d / 'state' / 'd'),
  'largest_array_file_truncated': lambda d: truncate(largest_file(d / 'state')),
  'largest_array_file_garbled': lambda d: flip_bytes(largest_file(d / 'state')),
  'array_index_truncated': lambda d: truncate(d / 'state' / 'manifest.ocdbt'),
  'array_metadata_deleted': lambda d: (d / 'state' / '_METADATA').unlink(),
  'record_garbled': lambda d: (d / 'record' / 'metadata').write_text('{"data_position": 1'),
  'record_deleted': lambda d: (d / 'record' / 'metadata').unlink(),
  'record_tampered': lambda d: edit_record(d, lambda r: r.update(data_position=3)),
  'record_checksums_removed': lambda d: edit_record(d, lambda r: r.pop('checksums')),
  'commit_marker_removed': lambda d: (d / 'commit_success.txt').unlink(),
  'step_emptied': empty,
  'arrays_of_an_older_step': swap_state_with('8'),
}


@pytest.mark.parametrize('damage', list(DAMAGES.values()), ids=list(DAMAGES))
def test_damaged_latest_checkpoint_falls_back_to_the_previous(damage, straight, options, tmp_path):
  directory = tmp_path / 'ckpt'
  shutil.copytree(straight[0], directory)
  previous = cli.restore(str(directory), options, step=8)
  damage(directory / '12')
  reports = []
  checkpointer = Checkpointer(str(directory))
  state, record = checkpointer.restore_latest(cli.restore_target(options), report=reports.append)
  checkpointer.close()
  chex.assert_trees_all_equal(state, previous[0])
  assert record == previous[1]
  assert len(reports) == 1 and '\n' not in reports[0], reports
  assert reports[0].startswith(f'checkpoint step 12 in {directory} is damaged: ')
  assert reports[0].endswith(f'moved to {directory}/12.damaged; trying step 8')
  assert sorted(os.listdir(directory)) == ['12.damaged', '8']


@pytest.mark.parametrize(
  'damage', ['largest_array_file_truncated', 'largest_array_file_garbled', 'step_emptied']
)
def test_cli_resume_reports_a_damaged_checkpoint_in_one_line(
  damage, straight, options, cli_env, tmp_path
):
  directory = tmp_path / 'ckpt'
  shutil.copytree(straight[0], directory)
  DAMAGES[damage](directory / '12')
  args = [*cli.flags(options), '--checkpoint-dir', str(directory), '--resume']
  out = cli.run(*args, '--out-dir', str(tmp_path / 'out'), env=cli_env)
  assert out.returncode == 0, out.stderr
  assert out.stderr.count('\n') == 1, out.stderr
  assert out.stderr.startswith(f'warning: checkpoint step 12 in {directory} is damaged: ')
  assert 'resumed from step 8' in out.stdout
  state, record = cli.restore(str(directory), options)
  chex.assert_trees_all_equal(state, straight[1][0])
  assert record['data_position'] == 12


def test_cli_resume_with_every_checkpoint_damaged_exits_1(straight, options, cli_env, tmp_path):
  directory = tmp_path / 'ckpt'
  shutil.copytree(straight[0], directory)
  for step in ('8', '12'):
    (directory / step / 'commit_success.txt').unlink()
  args = [*cli.flags(options), '--checkpoint-dir', str(directory), '--resume']
  out = cli.run(*args, '--out-dir', str(tmp_path / 'out'), env=cli_env)
  assert out.returncode == 1
  assert out.stderr.splitlines() == [
    f'warning: checkpoint step 12 in {directory} is damaged: its commit marker '
    f'commit_success.txt is missing; moved to {directory}/12.damaged; trying step 8',
    f'warning: checkpoint step 8 in {directory} is damaged: its commit marker '
    f'commit_success.txt is missing; moved to {directory}/8.damaged; no older step left',
    f'error: no usable checkpoint in {directory}: all 2 damaged',
  ]


def test_cli_resume_into_another_models_checkpoint_moves_nothing(
  straight, options, cli_env, tmp_path
):
  directory = tmp_path / 'ckpt'
  shutil.copytree(straight[0], directory)
  args = [*cli.flags({**options, 'optimizer': 'adamw'}), '--checkpoint-dir', str(directory)]
  out = cli.run(*args, '--resume', '--out-dir', str(tmp_path / 'out'), env=cli_env)
  assert out.returncode == 1
  assert out.stderr.count('\n') == 1
  assert 'holds a state of another structure or shape' in out.stderr
  assert sorted(os.listdir(directory)) == ['12', '8']


@pytest.mark.parametrize(
  'message, dropped',
  [
    (  # tensorstore's read future of a truncated array file: no orbax frame, no Task
      'Future exception was never retrieved\nfuture: <Future finished exception=ValueError('
      '"OUT_OF_RANGE: Error reading local file \\"d/ocdbt.process_0/d/x\\" '
      "[source locations='tensorstore/kvstore/file/file_key_value_store.cc:270']\")>",
      True,
    ),
    (  # orbax's own read task
      "Task exception was never retrieved\nfuture: <Task finished name='Task-9' coro=<_read_shard"
      '() done, defined at /site-packages/orbax/checkpoint/_src/serialization/serialization.py:1>',
      True,
    ),
    ('Future exception was never retrieved\nfuture: <Future exception=KeyError(3)>', False),
  ],
)
def test_only_echoes_of_failed_reads_are_dropped_from_asyncio_logs(message, dropped):
  """After a damaged step, asyncio's logs of orphaned tensorstore reads are dropped, no others."""
  from examples.llama import checkpoint

  record = logging.LogRecord('asyncio', logging.ERROR, __file__, 1, message, None, None)
  assert checkpoint._orphaned_orbax_read(record) is dropped
