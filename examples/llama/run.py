"""A configured run: its data, model, mesh, shardings, optimizer and compiled steps.

``build`` turns a ``TrainConfig`` into a ``Run`` in five parts: the data and
its tokenizer, the model, the optimizer, the shardings, and the steps, each
compiled by one ``jax.jit`` with explicit input and output shardings (from
``optax_lean.state_sharding``); the train step donates its state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_lean
from examples.llama import configs, distributed, layerwise, mesh, optimizers, rso_layers, steps
from examples.llama import data as data_lib
from examples.llama.metrics import MAX_CONSECUTIVE_NONFINITE
from examples.llama.model import Llama
from examples.llama.steps import TrainState
from examples.llama.train_config import TrainConfig


@dataclasses.dataclass
class Run:
  """A configured run: data, model graph, optimizer, shardings and jitted steps."""

  cfg: TrainConfig
  batches: data_lib.TokenBatches
  mesh: jax.sharding.Mesh
  batch_sharding: NamedSharding
  rows: slice  # the rows of each batch this process feeds
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_sharding: TrainState
  abstract_state: TrainState
  graphdef: Any  # the model's structure, to nnx.merge with parameters
  trained: rso_layers.TrainAll  # which parameters train: split, join, after_step
  init_state: Any  # () -> TrainState, jitted
  step_fn: Any  # (state, inputs, targets) -> (state, metrics), jitted, donates state
  eval_fn: Any  # (params, inputs, targets) -> loss, jitted

  def global_batch(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """One global batch from this process's rows of it."""
    shape = (self.cfg.batch_size, self.cfg.seq_len)
    return (
      distributed.global_array(self.batch_sharding, inputs, shape),
      distributed.global_array(self.batch_sharding, targets, shape),
    )

  def train_batch(self, position: int) -> tuple[jax.Array, jax.Array]:
    return self.global_batch(*self.batches.batch(position, self.rows))

  def validation_batches(self) -> list[tuple[jax.Array, jax.Array]]:
    return [
      self.global_batch(x[self.rows], y[self.rows])
      for x, y in self.batches.validation(self.cfg.eval_batches)
    ]

  def restore_target(self) -> TrainState:
    """The abstract state, with shardings, to restore a checkpoint into."""
    return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      self.abstract_state,
      self.state_sharding,
    )


def load_data(cfg: TrainConfig) -> tuple[data_lib.TokenBatches, int]:
  """The batch stream of ``--data`` under ``--tokenizer``, and the tokenizer's vocabulary."""
  text = data_lib.load_text(cfg.data, data_files=cfg.data_files)
  tokenizer = data_lib.make_tokenizer(cfg.tokenizer, text)
  batches = data_lib.TokenBatches.from_tokens(
    tokenizer.encode(text), cfg.batch_size, cfg.seq_len, cfg.seed
  )
  return batches, tokenizer.vocab_size


class Model(NamedTuple):
  """The model of a run: its config, its graph and its parameters' shapes."""

  config: configs.LlamaConfig
  graphdef: nnx.GraphDef
  abstract_params: dict


def make_model(cfg: TrainConfig, vocab_size: int, rso_rank: int | None) -> Model:
  """The model of ``--model`` with the command line's options, nothing allocated."""
  config = configs.get_config(
    cfg.model,
    vocab_size=configs.vocab_size(cfg.model, vocab_size),
    scan_layers=cfg.scan_layers,
    remat=cfg.remat,
    tie_embeddings=cfg.tie_embeddings,
    n_kv_heads=cfg.n_kv_heads,
    compute_dtype=cfg.compute_dtype,
    param_dtype=cfg.param_dtype,
    rso_rank=rso_rank,
  )
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0))))
  return Model(config, graphdef, nnx.to_pure_dict(abstract_params))


def learning_rate_schedule(cfg: TrainConfig, peak: float) -> optax.Schedule:
  """Linear warmup to ``peak``, then cosine decay to ``peak * --min-lr-ratio``."""
  warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.steps // 10
  return optax.warmup_cosine_decay_schedule(
    0.0, peak, warmup, max(cfg.steps, warmup + 1), end_value=peak * cfg.min_lr_ratio
  )


def make_optimizer(
  cfg: TrainConfig, hparams: optimizers.Hyperparameters, abstract_params: dict
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The configured optimizer (with clipping, protection, accumulation) and its schedule.

  ``ValueError`` for a rank no matrix of the model allows. The layerwise step
  clips by the previous step's norm itself (layerwise.py), so it gets no clipping here.
  """
  problem = optimizers.rank_problem(cfg.optimizer, hparams, abstract_params)
  if problem:
    raise ValueError(problem)
  schedule = learning_rate_schedule(cfg, hparams.peak_learning_rate)
  tx = optimizers.build(cfg.optimizer, schedule, hparams)
  if cfg.param_dtype != 'float32':  # the last transformation: updates land unbiased
    tx = optax.chain(tx, optimizers.rounding(cfg.rounding, cfg.seed))
  if cfg.clip_norm and not cfg.layerwise:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  if cfg.skip_nonfinite:
    tx = optax.apply_if_finite(tx, MAX_CONSECUTIVE_NONFINITE)
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
  return tx, schedule


class Shardings(NamedTuple):
  """Where a run's arrays live."""

  params: Any
  state: TrainState
  batch: NamedSharding
  replicated: NamedSharding


def make_shardings(
  cfg: TrainConfig,
  device_mesh: jax.sharding.Mesh,
  tx: optax.GradientTransformation,
  trained: rso_layers.TrainAll,
  abstract_params: dict,
) -> Shardings:
  """FSDP parameters (``--mesh``'s ``fsdp`` axis), their optimizer state, batches on every axis."""
  fsdp = device_mesh.shape.get('fsdp', 1)
  param_shd = jax.tree.map(
    lambda p: NamedSharding(device_mesh, mesh.fsdp_spec(p.shape, fsdp, cfg.scan_layers)),
    abstract_params,
  )
  replicated = NamedSharding(device_mesh, P())
  if cfg.layerwise:
    opt_shd = layerwise.state_sharding(tx, abstract_params, param_shd, replicated)
  else:
    opt_shd = optax_lean.state_sharding(
      tx, trained.split(abstract_params)[0], trained.split(param_shd)[0]
    )
  batch = NamedSharding(device_mesh, P(device_mesh.axis_names))
  return Shardings(param_shd, TrainState(replicated, param_shd, opt_shd), batch, replicated)


class Compiled(NamedTuple):
  """A run's jitted functions, and the shapes of its state."""

  init_state: Any  # () -> TrainState
  abstract_state: TrainState
  step_fn: Any  # (state, inputs, targets) -> (state, metrics), donates state
  eval_fn: Any  # (params, inputs, targets) -> loss


def compile_steps(
  cfg: TrainConfig,
  model: Model,
  tx: optax.GradientTransformation,
  trained: rso_layers.TrainAll,
  shd: Shardings,
) -> Compiled:
  """The initial state, train step and evaluation, each under one ``jax.jit``."""
  init_state = steps.make_init(model.config, tx, trained, cfg.seed, per_layer=cfg.layerwise)
  if cfg.layerwise:
    step_fn = steps.make_layerwise_step(model.graphdef, model.config, tx, cfg.clip_norm)
  else:
    step_fn = steps.make_train_step(model.graphdef, tx, trained, cfg.nonfinite_grad_step)
  return Compiled(
    init_state=jax.jit(init_state, out_shardings=shd.state),
    abstract_state=jax.eval_shape(init_state),
    step_fn=jax.jit(
      step_fn,
      in_shardings=(shd.state, shd.batch, shd.batch),
      out_shardings=(shd.state, shd.replicated),
      donate_argnums=0,
    ),
    eval_fn=jax.jit(
      lambda params, x, y: steps.loss_fn(model.graphdef, params, x, y),
      in_shardings=(shd.params, shd.batch, shd.batch),
      out_shardings=shd.replicated,
    ),
  )


def build(cfg: TrainConfig) -> Run:
  """Loads the data and builds the model, mesh, optimizer, shardings and jitted steps."""
  batches, vocab_size = load_data(cfg)
  hparams = cfg.hyperparameters(configs.get_config(cfg.model).dim)
  trained = rso_layers.trained_parameters(
    optimizers.REGISTRY[cfg.optimizer].trains_factors,
    hparams.rank,
    period=hparams.update_proj_gap * cfg.grad_accum,
    seed=cfg.seed,
  )
  model = make_model(cfg, vocab_size, trained.rso_rank)
  device_mesh = mesh.make_mesh(cfg.mesh, cfg.batch_size)
  tx, schedule = make_optimizer(cfg, hparams, model.abstract_params)
  shd = make_shardings(cfg, device_mesh, tx, trained, model.abstract_params)
  compiled = compile_steps(cfg, model, tx, trained, shd)
  return Run(
    cfg=cfg,
    batches=batches,
    mesh=device_mesh,
    batch_sharding=shd.batch,
    rows=distributed.local_rows(shd.batch, (cfg.batch_size, cfg.seq_len)),
    tx=tx,
    schedule=schedule,
    state_sharding=shd.state,
    abstract_state=compiled.abstract_state,
    graphdef=model.graphdef,
    trained=trained,
    init_state=compiled.init_state,
    step_fn=compiled.step_fn,
    eval_fn=compiled.eval_fn,
  )
