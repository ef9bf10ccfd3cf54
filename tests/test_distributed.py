"""Two processes train one model as one process does.

The trainer runs as two processes of 4 fake CPU devices each (gloo
collectives, a coordinator on a free localhost port) on the same
``data=2,fsdp=4`` mesh and global batch as one process of 8 devices. Losses
and final parameters agree to float32 rounding, as amplified by the SVD bases
(losses within 2.5e-7 relative, parameters within 2.5e-6 absolute when
measured): only the order of the cross-process sums differs. A two-process
resume from a checkpoint whose newest step one process cannot read falls
back, in agreement, to the step before and reproduces its own uninterrupted
run bit-exactly.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import chex
import numpy as np
import pytest

from examples.llama import distributed
from tests import cli

TIMEOUT = 400  # seconds for a two-process run on a busy 2-core machine
MESH = 'data=2,fsdp=4'


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def start_two_processes(
  args: list[str], env: dict[str, str], logs: Path, name: str
) -> list[subprocess.Popen]:
  """Starts the trainer as processes 0 and 1 of one cluster, logging to ``logs/name{i}.log``."""
  cluster = ['--coordinator', f'localhost:{free_port()}', '--num-processes', '2']
  env = {**env, 'JAX_NUM_CPU_DEVICES': '4'}
  return [
    cli.start(*args, *cluster, '--process-id', str(i), env=env, log=str(logs / f'{name}{i}.log'))
    for i in range(2)
  ]


def finish(processes: list[subprocess.Popen], logs: list[Path]) -> list[str]:
  """Waits for every process (killing all if one fails or hangs); returns their logs."""
  deadline = time.monotonic() + TIMEOUT
  try:
    while any(p.poll() is None for p in processes):
      failed = [p for p in processes if p.poll() not in (None, 0)]
      assert not failed and time.monotonic() < deadline, 'a process failed or hung'
      time.sleep(0.1)
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = [log.read_text() for log in logs]
  assert [p.returncode for p in processes] == [0] * len(processes), outputs
  return outputs


def metrics(out_dir: Path) -> dict[str, np.ndarray]:
  records = [json.loads(line) for line in (out_dir / 'metrics.jsonl').read_text().splitlines()]
  return {
    key: np.array([r[key] for r in records if key in r])
    for key in ('step', 'loss', 'grad_norm', 'val_loss')
  }


@pytest.fixture(scope='module')
def options(corpus):
  return cli.toy_options(
    corpus, steps=6, mesh=MESH, eval_every=3, eval_batches=2, checkpoint_every=3
  )


def test_two_processes_match_one(options, cli_env, tmp_path):
  # The one-process reference runs alongside the pair: they only share the CPU.
  paths = {'checkpoint_dir': str(tmp_path / 'one'), 'out_dir': str(tmp_path / 'one-out')}
  one = cli.start(*cli.flags({**options, **paths}), env=cli_env, log=str(tmp_path / 'one.log'))
  two_args = [*cli.flags(options), '--checkpoint-dir', str(tmp_path / 'two')]
  pair = start_two_processes(
    [*two_args, '--out-dir', str(tmp_path / 'two-out')], cli_env, tmp_path, 'two'
  )
  logs = [tmp_path / name for name in ('one.log', 'two0.log', 'two1.log')]
  _, first, second = finish([one, *pair], logs)
  assert 'final val loss' in first and 'model toy' not in second  # process 0 reports alone

  single, double = metrics(tmp_path / 'one-out'), metrics(tmp_path / 'two-out')
  np.testing.assert_array_equal(double['step'], np.arange(1, 7))
  for key in ('loss', 'grad_norm', 'val_loss'):  # measured: at most 2.5e-7 apart
    np.testing.assert_allclose(double[key], single[key], rtol=1e-6, atol=0, err_msg=key)
  state_one, record_one = cli.restore(str(tmp_path / 'one'), options)
  state_two, record_two = cli.restore(str(tmp_path / 'two'), options)
  assert record_one['data_position'] == record_two['data_position'] == 6
  # SVD bases amplify the rounding of the cross-process sums (measured: 3.2e-5
  # apart, bound 1e-4). A basis that far apart moves each normalised update
  # by about as much, so the parameters, after 6 steps of a learning rate of
  # at most 1e-2, by at most 6 * 1e-2 * 1e-4 (measured: 2.5e-6).
  chex.assert_trees_all_close(state_two.opt_state, state_one.opt_state, rtol=0, atol=1e-4)
  chex.assert_trees_all_close(state_two.params, state_one.params, rtol=0, atol=6e-6)

  # Process 1's shard of the newest step is cut short: both fall back to step 3.
  shard = max(
    (tmp_path / 'two' / '6' / 'state').glob('ocdbt.process_1/d/*'), key=lambda p: p.stat().st_size
  )
  shard.write_bytes(shard.read_bytes()[:100])
  pair = start_two_processes(
    [*two_args, '--resume', '--out-dir', str(tmp_path / 'resumed-out')],
    cli_env,
    tmp_path,
    'resumed',
  )
  first, _ = finish(pair, [tmp_path / 'resumed0.log', tmp_path / 'resumed1.log'])
  assert 'checkpoint step 6' in first and 'is damaged' in first and 'trying step 3' in first
  assert 'resumed from step 3' in first
  chex.assert_trees_all_equal(cli.restore(str(tmp_path / 'two'), options)[0], state_two)


def test_cluster_comes_from_flags_then_environment():
  environ = {
    'JAX_COORDINATOR_ADDRESS': 'head:1234',
    'JAX_NUM_PROCESSES': '4',
    'JAX_PROCESS_ID': '3',
  }
  cluster, problems = distributed.cluster_from(None, None, 1, environ=environ)
  assert cluster == distributed.Cluster('head:1234', 4, 1) and cluster.wanted and not problems
  alone, problems = distributed.cluster_from(None, None, None, environ={})
  assert not alone.wanted and not problems
  assert distributed.cluster_from(None, None, None, auto=True, environ={})[0].wanted


@pytest.mark.parametrize(
  'coordinator, count, index, environ, problem',
  [
    ('head', 2, 0, {}, "--coordinator must look like 'HOST:PORT', got 'head'"),
    ('head:99999', 2, 0, {}, "--coordinator must look like 'HOST:PORT'"),
    ('head:1234', 0, None, {}, '--num-processes must be >= 1, got 0'),
    ('head:1234', 2, 2, {}, '--process-id must be in [0, 2), got 2'),
    ('head:1234', 2, -1, {}, '--process-id must be in [0, 2), got -1'),
    (None, None, None, {'JAX_PROCESS_ID': 'one'}, 'JAX_PROCESS_ID must be a non-negative'),
    ('head:1234', None, -1, {}, '--process-id must be >= 0, got -1'),
  ],
)
def test_bad_clusters_are_named(coordinator, count, index, environ, problem):
  _, problems = distributed.cluster_from(coordinator, count, index, environ=environ)
  assert len(problems) == 1 and problem in problems[0], problems
