"""Bad command lines and data: one clear line on stderr and a non-zero status.

Each case runs the trainer as users do (all cases at once, a few processes at
a time). Problems visible in the arguments alone exit with status 2 before any
work; problems found while loading the data or building the model (a sequence
longer than the text, a rank no matrix allows) exit with status 1. Neither
prints a traceback.
"""

from __future__ import annotations

import dataclasses
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from examples.llama import optimizers
from examples.llama import run as run_lib
from examples.llama.train_config import TrainConfig
from tests import cli

DETECTABLE_CLUSTERS = ('SLURM_', 'OMPI_', 'KUBERNETES_', 'TPU_', 'JAX_COORDINATOR')


@dataclasses.dataclass(frozen=True)
class Case:
  """A bad input and the line it must give.

  Attributes:
    status: The exit status.
    message: Text the one line of stderr must contain.
    flags: The command line (``{corpus}`` stands for the test corpus), or
    toy: overrides of a toy run on the corpus (or on ``text``).
    text: The whole data, written to a file, for a toy run.
    env: Environment variables to set.
    unset: Prefixes of environment variables to remove.
  """

  status: int
  message: str
  flags: tuple[str, ...] = ()
  toy: dict | None = None
  text: str | None = None
  env: tuple[tuple[str, str], ...] = ()
  unset: tuple[str, ...] = ()


CASES = {
  # What the arguments alone show: status 2, before any work.
  'unknown_optimizer': Case(
    2, "unknown --optimizer 'lion'; choose one of adamw", ('--optimizer', 'lion')
  ),
  'unknown_model': Case(2, "unknown --model '2b'; choose one of toy", ('--model', '2b')),
  'unknown_param_dtype': Case(
    2,
    "unknown --param-dtype 'float16'; choose one of float32, bfloat16",
    ('--param-dtype', 'float16'),
  ),
  'unknown_rounding': Case(
    2,
    "unknown --rounding 'up'; choose one of stochastic, kahan, master, nearest",
    ('--rounding', 'up'),
  ),
  'unknown_projector': Case(
    2, "unknown --projector 'qr'; choose auto or one of svd", ('--projector', 'qr')
  ),
  'mesh_not_dividing_the_devices': Case(
    2, '--mesh data=3 needs 3 devices, which does not divide the 8', ('--mesh', 'data=3')
  ),
  'mesh_with_an_unknown_axis': Case(
    2, "--mesh must look like 'data=N,fsdp=M', got 'model=8'", ('--mesh', 'model=8')
  ),
  'missing_data_path': Case(
    2, "--data: no data files at '/no/such/path'", ('--data', '/no/such/path')
  ),
  'zero_steps': Case(2, '--steps must be >= 1, got 0', ('--steps', '0')),
  'steps_not_a_number': Case(2, "argument --steps: invalid int value: 'many'", ('--steps', 'many')),
  'zero_rank': Case(2, '--rank must be >= 1, got 0', ('--rank', '0')),
  'zero_eval_batches': Case(2, '--eval-batches must be >= 1, got 0', ('--eval-batches', '0')),
  'negative_learning_rate': Case(
    2, '--learning-rate must be > 0, got -0.1', ('--learning-rate', '-0.1')
  ),
  'min_lr_ratio_above_1': Case(
    2, '--min-lr-ratio must be in [0, 1], got 2.0', ('--min-lr-ratio', '2')
  ),
  'negative_warmup': Case(2, '--warmup-steps must be >= 0, got -1', ('--warmup-steps', '-1')),
  'negative_clip_norm': Case(
    2, '--clip-norm must be >= 0 (0: no clipping), got -1.0', ('--clip-norm', '-1')
  ),
  'subset_size_not_a_number': Case(
    2, "--subset-size must be 'heuristic' or an integer, got 'rows'", ('--subset-size', 'rows')
  ),
  'resume_without_a_checkpoint_dir': Case(2, '--resume needs --checkpoint-dir', ('--resume',)),
  'layerwise_without_scanned_layers': Case(2, '--layerwise needs --scan-layers', ('--layerwise',)),
  'layerwise_with_accumulation': Case(
    2,
    '--layerwise cannot accumulate gradients (--grad-accum 2)',
    ('--layerwise', '--scan-layers', '--grad-accum', '2'),
  ),
  'layerwise_skipping_non_finite_steps': Case(
    2,
    '--layerwise cannot skip non-finite steps',
    ('--layerwise', '--scan-layers', '--skip-nonfinite'),
  ),
  'checkpoint_dir_is_a_file': Case(
    2, 'exists and is not a directory', ('--checkpoint-dir', '{corpus}')
  ),
  'process_id_out_of_range': Case(
    2, '--process-id must be in [0, 2), got 2', ('--num-processes', '2', '--process-id', '2')
  ),
  'coordinator_without_a_port': Case(
    2, "--coordinator must look like 'HOST:PORT', got 'localhost'", ('--coordinator', 'localhost')
  ),
  'process_count_not_a_number': Case(
    2,
    "JAX_NUM_PROCESSES must be a non-negative integer, got 'two'",
    env=(('JAX_NUM_PROCESSES', 'two'),),
  ),
  # Found on the way: status 1.
  'no_cluster_to_detect': Case(
    1, 'could not join a cluster', ('--distributed',), unset=DETECTABLE_CLUSTERS
  ),
  'rank_above_every_matrix': Case(
    1,
    "--rank 33 is larger than any matrix of this model allows with the 'svd' projector "
    '(at most 32)',
    toy={'rank': 33},
  ),
  'rank_above_every_coordinate_subset': Case(
    1,
    "--rank 257 is larger than any matrix of this model allows with the 'topk' projector "
    '(at most 256)',
    toy={'rank': 257, 'projector': 'topk'},
  ),
  'sequence_longer_than_the_data': Case(
    1, 'seq_len 100000 is longer than the training split', toy={'seq_len': 100_000}
  ),
  'empty_data': Case(1, 'seq_len 32 is longer than the training split (0 tokens)', toy={}, text=''),
  'validation_smaller_than_a_batch': Case(
    1,
    'the validation split (35 tokens) holds 1 sequences of 32, fewer than one batch',
    toy={},
    text='x' * 700,
  ),
  'batch_not_dividing_the_devices': Case(
    1, '--batch-size 12 is not divisible by the 8 devices', toy={'batch_size': 12, 'mesh': None}
  ),
  'heads_not_dividing': Case(
    1, 'n_heads 2 is not divisible by n_kv_heads 3', toy={'n_kv_heads': 3}
  ),
  'unknown_tokenizer': Case(
    1,
    "tokenizer must be 'byte' or 'bpe:<vocab size>', got 'bpe:many'",
    toy={'tokenizer': 'bpe:many'},
  ),
  'unknown_momentum_policy': Case(
    1, 'momentum_on_refresh must be one of', toy={'momentum_on_refresh': 'sideways'}
  ),
  'zero_refresh_gap': Case(
    1, 'update_proj_gap must be an int >= 1, got 0', toy={'update_proj_gap': 0}
  ),
  'negative_weight_decay': Case(1, 'weight_decay must be >= 0', toy={'weight_decay': -1.0}),
}


def command_line(name: str, case: Case, corpus: str, tmp: Path) -> list[str]:
  if case.toy is None:
    return [flag.format(corpus=corpus) for flag in case.flags]
  data = corpus
  if case.text is not None:
    data = str(tmp / f'{name}.txt')
    Path(data).write_text(case.text)
  return cli.flags(cli.toy_options(data, out_dir=str(tmp / name), **case.toy))


def environment(case: Case, base: dict[str, str]) -> dict[str, str]:
  kept = {k: v for k, v in base.items() if not k.startswith(case.unset)}
  return {**kept, **dict(case.env)}


@pytest.fixture(scope='module')
def outcomes(corpus, cli_env, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
  """Every case's run, four at a time: they only start up, so they mostly wait."""
  tmp = tmp_path_factory.mktemp('bad-input')
  with ThreadPoolExecutor(max_workers=4) as pool:
    runs = {
      name: pool.submit(
        cli.run,
        *command_line(name, case, corpus, tmp),
        env=environment(case, cli_env),
        timeout=300,
      )
      for name, case in CASES.items()
    }
    return {name: run.result() for name, run in runs.items()}


@pytest.mark.parametrize('name', list(CASES))
def test_bad_input_gives_one_line_and_a_non_zero_status(name, outcomes):
  case, out = CASES[name], outcomes[name]
  assert out.returncode == case.status, out.stderr
  assert out.stderr.count('\n') == 1 and case.message in out.stderr, out.stderr
  if case.status == 1:
    assert out.stderr.startswith('error: ')


@pytest.mark.parametrize(
  'projector, limit, clipped',
  [('svd', 32, False), ('randomized_svd', 32, False), ('topk', 256, True)],
)
def test_rank_check_allows_every_rank_some_matrix_takes(projector, limit, clipped, corpus):
  def build(rank):
    options = cli.toy_options(corpus, rank=rank, projector=projector)
    return run_lib.build(TrainConfig(**options))

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    params = build(limit).abstract_state.params
  # The library clips, with a warning, where a matrix is smaller (topk: all but the head).
  assert any('exceeds what the' in str(w.message) for w in caught) == clipped
  with pytest.raises(ValueError, match=f'at most {limit}'):
    build(limit + 1)
  hparams = optimizers.Hyperparameters(rank=limit + 1, projector=projector)
  assert optimizers.rank_problem('adamsn', hparams, params) is None  # no subspace: no limit
