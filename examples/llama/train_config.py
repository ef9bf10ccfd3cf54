"""What a training run depends on (``TrainConfig``) and the command line that sets it.

Every field of ``TrainConfig`` is one flag, ``--field-name``, whose help says
the valid values and the default. The optimizer settings take their defaults
from ``optimizers.Hyperparameters``, so each default is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

import optax_lean
from examples.llama import distributed, optimizers, validation
from examples.llama.configs import CONFIGS

DESCRIPTION = 'Train the LLaMA example with any registered optimizer.'
_OPTIMIZER_DEFAULTS = optimizers.Hyperparameters()


def option(default: Any, text: str) -> Any:
  """A ``TrainConfig`` field: its default and its line of ``--help`` (the default appended)."""
  return dataclasses.field(default=default, metadata={'help': text})


@dataclasses.dataclass
class TrainConfig:
  """Everything a run depends on; the command line sets each field."""

  model: str = option('tiny', f'model size: one of {", ".join(CONFIGS)}')
  optimizer: str = option('adamsnsm', f'optimizer: one of {", ".join(optimizers.REGISTRY)}')
  learning_rate: float | None = option(
    None, "peak learning rate, > 0; unset: the optimizer's registered default"
  )
  steps: int = option(600, 'optimizer steps, >= 1')
  batch_size: int = option(16, "sequences per global batch, >= 1, divisible by the mesh's devices")
  seq_len: int = option(256, 'tokens per sequence, >= 1')
  warmup_steps: int | None = option(None, 'linear warmup steps, >= 0; unset: a tenth of --steps')
  min_lr_ratio: float = option(0.1, 'final learning rate as a fraction of the peak, in [0, 1]')
  clip_norm: float = option(1.0, 'global gradient-norm clipping threshold, >= 0 (0: none)')
  weight_decay: float = option(_OPTIMIZER_DEFAULTS.weight_decay, 'decoupled weight decay, >= 0')
  rank: int | None = option(
    None, 'rank of the low-rank optimizers, >= 1; unset: a quarter of the model width'
  )
  update_proj_gap: int = option(
    _OPTIMIZER_DEFAULTS.update_proj_gap,
    'steps between projector refreshes (rso_layers: between merges), >= 1',
  )
  projector: str = option(
    _OPTIMIZER_DEFAULTS.projector,
    'auto (the exact SVD on CPU, randomized on GPU and TPU) or one of '
    f'{", ".join(optax_lean.PROJECTORS)}',
  )
  subset_size: str = option(
    _OPTIMIZER_DEFAULTS.subset_size, "subset-norm subset size: 'heuristic' or a non-zero integer"
  )
  momentum_on_refresh: str = option(
    _OPTIMIZER_DEFAULTS.momentum_on_refresh,
    'subspace momentum at a refresh: official, reset, keep or rotate',
  )
  state_dtype: str | None = option(
    _OPTIMIZER_DEFAULTS.state_dtype,
    f"every optimizer state's dtype: {' or '.join(optimizers.STATE_DTYPES)}; unset: the params'",
  )
  grad_accum: int = option(1, 'micro batches per optimizer step (optax.MultiSteps), >= 1')
  param_dtype: str = option(
    'float32', f"the parameters' dtype (MaxText's weight_dtype): {' or '.join(optimizers.DTYPES)}"
  )
  compute_dtype: str = option(
    'float32',
    f"the matmuls' and activations' dtype (MaxText's dtype): {' or '.join(optimizers.DTYPES)}",
  )
  rounding: str = option(
    optimizers.DEFAULT_ROUNDING,
    'how updates land on bfloat16 parameters: '
    + ', '.join(f'{name} ({text})' for name, (_, text) in optimizers.ROUNDINGS.items()),
  )
  scan_layers: bool = option(False, 'stack the blocks and run them under jax.lax.scan')
  remat: bool = option(False, 'with --scan-layers: recompute each block in the backward pass')
  layerwise: bool = option(
    False, 'with --scan-layers: update each layer as soon as its gradient exists'
  )
  tie_embeddings: bool = option(False, 'share the embedding with the output projection')
  n_kv_heads: int | None = option(
    None, 'key/value heads, >= 1, dividing the heads; unset: as many as the heads'
  )
  mesh: str | None = option(None, "device mesh 'data=N,fsdp=M'; unset: every device on data")
  distributed: bool = option(
    False, 'join a JAX cluster even when --coordinator and the next two are unset (JAX detects)'
  )
  coordinator: str | None = option(None, 'HOST:PORT of process 0; unset: $JAX_COORDINATOR_ADDRESS')
  num_processes: int | None = option(None, 'processes, >= 1; unset: $JAX_NUM_PROCESSES')
  process_id: int | None = option(
    None, "this process's index, in [0, processes); unset: $JAX_PROCESS_ID"
  )
  eval_every: int = option(100, 'steps between evaluations (and at the last step), >= 1')
  eval_batches: int = option(20, 'validation batches per evaluation, >= 1')
  checkpoint_dir: str | None = option(None, 'directory of the checkpoints; unset: none')
  checkpoint_every: int = option(100, 'steps between checkpoints (and at the last step), >= 1')
  resume: bool = option(False, 'continue from the newest sound checkpoint in --checkpoint-dir')
  seed: int = option(0, 'seed of the initialization and the batch order, an integer')
  out_dir: str | None = option(
    None, 'directory of metrics.jsonl and TensorBoard logs; unset: runs/MODEL-OPTIMIZER'
  )
  data: str | None = option(
    None, 'text: a file, directory, glob or hf:PATH[:NAME]; unset: the bundled Shakespeare'
  )
  data_files: str | None = option(None, "data files of an hf: dataset; unset: the dataset's")
  tokenizer: str = option('byte', "'byte' or 'bpe:VOCAB_SIZE' (trained on the data)")
  skip_nonfinite: bool = option(
    False, 'skip non-finite steps (optax.apply_if_finite) instead of stopping'
  )
  nonfinite_grad_step: int | None = option(
    None, 'fault injection: NaN gradients at this micro step, >= 1; unset: none'
  )
  progress: bool = option(True, 'a progress bar, on a terminal')

  def peak_learning_rate(self) -> float:
    """The schedule's peak: ``--learning-rate``, or the optimizer's registered default."""
    return self.learning_rate or optimizers.REGISTRY[self.optimizer].learning_rate

  def hyperparameters(self, model_width: int) -> optimizers.Hyperparameters:
    """The optimizer settings; the rank defaults to a quarter of ``model_width``."""
    subset = self.subset_size if self.subset_size == 'heuristic' else int(self.subset_size)
    return optimizers.Hyperparameters(
      peak_learning_rate=self.peak_learning_rate(),
      weight_decay=self.weight_decay,
      rank=self.rank if self.rank is not None else max(1, model_width // 4),
      update_proj_gap=self.update_proj_gap,
      projector=self.projector,
      subset_size=subset,
      momentum_on_refresh=self.momentum_on_refresh,
      state_dtype=self.state_dtype,
    )


class OneLineErrorParser(argparse.ArgumentParser):
  """Reports a bad argument in one line (no usage block) and exits with 2."""

  def error(self, message: str) -> typing.NoReturn:
    self.exit(2, f'{self.prog}: error: {message}\n')


def flag_type(hint: Any) -> type:
  """The type a flag parses: ``int`` for ``int`` or ``int | None``, and so on."""
  (kind,) = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
  return kind


def build_parser() -> argparse.ArgumentParser:
  """One flag per ``TrainConfig`` field; its help ends with the default."""
  parser = OneLineErrorParser(description=DESCRIPTION)
  hints = typing.get_type_hints(TrainConfig)
  for field in dataclasses.fields(TrainConfig):
    flag = '--' + field.name.replace('_', '-')
    text = f'{field.metadata["help"]} (default: {field.default})'.replace('%', '%%')
    kind = flag_type(hints[field.name])
    if kind is bool:
      parser.add_argument(
        flag, action=argparse.BooleanOptionalAction, default=field.default, help=text
      )
    else:
      parser.add_argument(flag, type=kind, default=field.default, help=text)
  return parser


def config_from_args(argv: list[str] | None = None) -> tuple[TrainConfig, distributed.Cluster]:
  """Parses and checks the command line without touching a device.

  Bad values exit with one line and status 2.
  """
  parser = build_parser()
  cfg = TrainConfig(**vars(parser.parse_args(argv)))
  cluster, cluster_problems = distributed.cluster_from(
    cfg.coordinator, cfg.num_processes, cfg.process_id, cfg.distributed
  )
  problems = validation.config_problems(cfg) + cluster_problems
  if problems:
    parser.error(problems[0])
  return cfg, cluster
