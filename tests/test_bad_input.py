"""Bad command lines and data: one clear line on stderr and a non-zero status.

Each case runs the trainer as users do. Problems visible in the arguments
alone exit with status 2 before any work; problems that need the data or the
model (a sequence longer than the text, a rank no matrix allows) exit with
status 1 once they are found. Neither prints a traceback.
"""

from __future__ import annotations

import warnings

import pytest

from examples.llama import optimizers
from examples.llama import train as train_lib
from tests import cli

BEFORE_WORK = [
  (['--optimizer', 'lion'], "unknown --optimizer 'lion'; choose one of adamw"),
  (['--model', '2b'], "unknown --model '2b'; choose one of toy"),
  (['--projector', 'qr'], "unknown --projector 'qr'; choose one of svd"),
  (['--mesh', 'data=3'], '--mesh data=3 needs 3 devices, which does not divide the 8'),
  (['--mesh', 'model=8'], "--mesh must look like 'data=N,fsdp=M', got 'model=8'"),
  (['--data', '/no/such/path'], "--data: no data files at '/no/such/path'"),
  (['--steps', '0'], '--steps must be >= 1, got 0'),
  (['--steps', 'many'], "argument --steps: invalid int value: 'many'"),
  (['--rank', '0'], '--rank must be >= 1, got 0'),
  (['--eval-batches', '0'], '--eval-batches must be >= 1, got 0'),
  (['--learning-rate', '-0.1'], '--learning-rate must be > 0, got -0.1'),
  (['--min-lr-ratio', '2'], '--min-lr-ratio must be in [0, 1], got 2.0'),
  (['--subset-size', 'rows'], "--subset-size must be 'heuristic' or an integer, got 'rows'"),
  (['--resume'], '--resume needs --checkpoint-dir'),
  (['--num-processes', '2', '--process-id', '2'], '--process-id must be in [0, 2), got 2'),
  (['--coordinator', 'localhost'], "--coordinator must look like 'HOST:PORT', got 'localhost'"),
]


@pytest.mark.parametrize('args, message', BEFORE_WORK)
def test_bad_arguments_exit_2_before_any_work(args, message, cli_env):
  out = cli.run(*args, env=cli_env, timeout=120)
  assert out.returncode == 2
  assert out.stderr.count('\n') == 1 and message in out.stderr, out.stderr


def test_bad_cluster_environment_exits_2(cli_env):
  out = cli.run(env={**cli_env, 'JAX_NUM_PROCESSES': 'two'}, timeout=120)
  assert out.returncode == 2
  assert out.stderr.count('\n') == 1
  assert "JAX_NUM_PROCESSES must be a non-negative integer, got 'two'" in out.stderr


def test_no_cluster_to_detect_exits_1(cli_env):
  detectable = ('SLURM_', 'OMPI_', 'KUBERNETES_', 'TPU_', 'JAX_COORDINATOR')
  env = {k: v for k, v in cli_env.items() if not k.startswith(detectable)}
  out = cli.run('--distributed', env=env, timeout=120)
  assert out.returncode == 1
  assert out.stderr.count('\n') == 1 and 'error: could not join a cluster' in out.stderr


def test_a_checkpoint_dir_that_is_a_file_exits_2(tmp_path, cli_env):
  (tmp_path / 'ckpt').write_text('not a directory')
  out = cli.run('--checkpoint-dir', str(tmp_path / 'ckpt'), env=cli_env, timeout=120)
  assert out.returncode == 2
  assert out.stderr.count('\n') == 1 and 'exists and is not a directory' in out.stderr


ONCE_FOUND = [
  (
    {'rank': 33},
    "--rank 33 is larger than any matrix of this model allows with the 'svd' projector "
    '(at most 32)',
  ),
  (
    {'rank': 257, 'projector': 'topk'},
    "--rank 257 is larger than any matrix of this model allows with the 'topk' projector "
    '(at most 256)',
  ),
  ({'seq_len': 100_000}, 'seq_len 100000 is longer than the training split'),
  ({'batch_size': 12, 'mesh': None}, '--batch-size 12 is not divisible by the 8 devices'),
  ({'n_kv_heads': 3}, 'n_heads 2 is not divisible by n_kv_heads 3'),
  ({'tokenizer': 'bpe:many'}, "tokenizer must be 'byte' or 'bpe:<vocab size>', got 'bpe:many'"),
  ({'momentum_on_refresh': 'sideways'}, 'momentum_on_refresh must be one of'),
  ({'update_proj_gap': 0}, 'update_proj_gap must be an int >= 1, got 0'),
  ({'weight_decay': -1.0}, 'weight_decay must be >= 0'),
]


@pytest.mark.parametrize('overrides, message', ONCE_FOUND)
def test_bad_values_found_on_the_way_exit_1(overrides, message, corpus, cli_env, tmp_path):
  options = cli.toy_options(corpus, out_dir=str(tmp_path), **overrides)
  out = cli.run(*cli.flags(options), env=cli_env, timeout=120)
  assert out.returncode == 1
  assert out.stderr.count('\n') == 1 and f'error: {message}' in out.stderr, out.stderr


@pytest.mark.parametrize(
  'text, message',
  [
    ('', 'seq_len 32 is longer than the training split (0 tokens)'),
    ('x' * 700, 'the validation split (35 tokens) holds 1 sequences of 32, fewer than one batch'),
  ],
  ids=['empty', 'validation_smaller_than_a_batch'],
)
def test_data_too_small_exits_1(text, message, tmp_path, cli_env):
  (tmp_path / 'tiny.txt').write_text(text)
  options = cli.toy_options(str(tmp_path / 'tiny.txt'), out_dir=str(tmp_path))
  out = cli.run(*cli.flags(options), env=cli_env, timeout=120)
  assert out.returncode == 1
  assert out.stderr.count('\n') == 1 and f'error: {message}' in out.stderr, out.stderr


@pytest.mark.parametrize(
  'projector, limit, clipped',
  [('svd', 32, False), ('randomized_svd', 32, False), ('topk', 256, True)],
)
def test_rank_check_allows_every_rank_some_matrix_takes(projector, limit, clipped, corpus):
  def build(rank):
    options = cli.toy_options(corpus, rank=rank, projector=projector)
    return train_lib.build(train_lib.TrainConfig(**options))

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    params = build(limit).abstract_state.params
  # The library clips, with a warning, where a matrix is smaller (topk: all but the head).
  assert any('exceeds what the' in str(w.message) for w in caught) == clipped
  with pytest.raises(ValueError, match=f'at most {limit}'):
    build(limit + 1)
  hparams = optimizers.Hyperparameters(rank=limit + 1, projector=projector)
  assert optimizers.rank_problem('adamsn', hparams, params) is None  # no subspace: no limit
