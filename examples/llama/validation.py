"""The trainer's checks of a configuration that need neither a device nor tokens.

Each problem is one line naming the flag, its value and what it must be; the
command line prints the first and exits with status 2 before any work.
``cfg`` is a ``train_config.TrainConfig``.
"""

from __future__ import annotations

import os
from typing import Any

import optax_lean
from examples.llama import data as data_lib
from examples.llama import optimizers
from examples.llama.configs import CONFIGS


def config_problems(cfg: Any) -> list[str]:
  """Problems with a config that need neither a device nor the data's tokens."""
  problems = []
  if cfg.optimizer not in optimizers.REGISTRY:
    problems.append(
      f'unknown --optimizer {cfg.optimizer!r}; choose one of {", ".join(optimizers.REGISTRY)}'
    )
  if cfg.model not in CONFIGS:
    problems.append(f'unknown --model {cfg.model!r}; choose one of {", ".join(CONFIGS)}')
  if cfg.projector != 'auto' and cfg.projector not in optax_lean.PROJECTORS:
    problems.append(
      f'unknown --projector {cfg.projector!r}; choose auto or one of '
      f'{", ".join(optax_lean.PROJECTORS)}'
    )
  if cfg.state_dtype is not None and cfg.state_dtype not in optimizers.STATE_DTYPES:
    problems.append(
      f'unknown --state-dtype {cfg.state_dtype!r}; choose one of '
      f'{", ".join(optimizers.STATE_DTYPES)}'
    )
  for flag, value, choices in (
    ('--param-dtype', cfg.param_dtype, optimizers.DTYPES),
    ('--compute-dtype', cfg.compute_dtype, optimizers.DTYPES),
    ('--rounding', cfg.rounding, optimizers.ROUNDINGS),
  ):
    if value not in choices:
      problems.append(f'unknown {flag} {value!r}; choose one of {", ".join(choices)}')
  if cfg.subset_size != 'heuristic' and not cfg.subset_size.lstrip('-').isdigit():
    problems.append(f"--subset-size must be 'heuristic' or an integer, got {cfg.subset_size!r}")
  if cfg.data is not None and not cfg.data.startswith('hf:'):
    try:
      data_lib.data_paths(cfg.data)
    except data_lib.DataError as e:
      problems.append(f'--data: {e}')
  checkpoint_dir = cfg.checkpoint_dir
  if (
    checkpoint_dir is not None
    and os.path.exists(checkpoint_dir)
    and not os.path.isdir(checkpoint_dir)
  ):
    problems.append(f'--checkpoint-dir {checkpoint_dir} exists and is not a directory')
  if cfg.resume and cfg.checkpoint_dir is None:
    problems.append('--resume needs --checkpoint-dir')
  return problems + layerwise_problems(cfg) + range_problems(cfg)


def layerwise_problems(cfg: Any) -> list[str]:
  """What ``--layerwise`` cannot be combined with."""
  if not cfg.layerwise:
    return []
  problems = []
  if not cfg.scan_layers:
    problems.append(
      '--layerwise needs --scan-layers (it updates the stacked blocks layer by layer)'
    )
  if cfg.grad_accum > 1:
    problems.append(
      f'--layerwise cannot accumulate gradients (--grad-accum {cfg.grad_accum}): each layer '
      'is updated as soon as its gradient exists'
    )
  if cfg.skip_nonfinite or cfg.nonfinite_grad_step is not None:
    problems.append(
      '--layerwise cannot skip non-finite steps: earlier layers are updated before later '
      'gradients exist'
    )
  spec = optimizers.REGISTRY.get(cfg.optimizer)
  if spec is not None and spec.trains_factors:
    problems.append(f'--layerwise does not support --optimizer {cfg.optimizer}')
  return problems


def range_problems(cfg: Any) -> list[str]:
  """Numbers outside their ranges, one line each."""
  problems = []
  at_least_one = (
    'steps',
    'batch_size',
    'seq_len',
    'grad_accum',
    'eval_every',
    'eval_batches',
    'checkpoint_every',
    'rank',
  )
  for name in at_least_one:
    value = getattr(cfg, name)
    if value is not None and value < 1:
      problems.append(f'--{name.replace("_", "-")} must be >= 1, got {value}')
  if cfg.learning_rate is not None and not cfg.learning_rate > 0:
    problems.append(f'--learning-rate must be > 0, got {cfg.learning_rate}')
  if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
    problems.append(f'--warmup-steps must be >= 0, got {cfg.warmup_steps}')
  if not 0 <= cfg.min_lr_ratio <= 1:
    problems.append(f'--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}')
  if not cfg.clip_norm >= 0:
    problems.append(f'--clip-norm must be >= 0 (0: no clipping), got {cfg.clip_norm}')
  return problems
