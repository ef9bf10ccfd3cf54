"""Train the LLaMA example with any registered optimizer.

    python -m examples.llama.train --model tiny --optimizer adamsnsm --steps 600

The train step is functional: the model is split into a graph and a plain
pytree of parameters, the train state ``(step, params, opt_state)`` is a
pytree, and one ``jax.jit`` with explicit input and output shardings (from
``optax_lean.state_sharding``) and a donated state runs each step. Metrics are
read one step late so the host never waits on the device, except at
evaluations and checkpoints.

Several processes train one model when given ``--coordinator HOST:PORT
--num-processes N --process-id I`` (see ``distributed.py``); process 0 prints
and writes metrics. ``--resume`` continues from the newest checkpoint that
passes its checksums, reporting and setting aside damaged ones (see
``checkpoint.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_lean
from examples.llama import checkpoint, distributed, layerwise, optimizers, rso_layers, validation
from examples.llama import data as data_lib
from examples.llama.checkpoint import Checkpointer, CheckpointError
from examples.llama.configs import CONFIGS, get_config
from examples.llama.model import Block, Llama


@dataclasses.dataclass
class TrainConfig:
  """Everything a run depends on; the command line sets each field."""

  model: str = 'tiny'
  optimizer: str = 'adamsnsm'
  learning_rate: float | None = None  # None: the optimizer's registered default
  steps: int = 600
  batch_size: int = 16
  seq_len: int = 256
  warmup_steps: int | None = None  # None: 10% of the steps
  min_lr_ratio: float = 0.1
  clip_norm: float = 1.0
  weight_decay: float = 0.0
  rank: int | None = None  # None: a quarter of the model width, as the papers' ranks
  update_proj_gap: int = 100
  projector: str = 'auto'  # the exact SVD on CPU, randomized on GPU and TPU
  subset_size: str = 'heuristic'
  momentum_on_refresh: str = 'official'
  state_dtype: str | None = None  # 'bfloat16' or 'float32' for every optimizer state; None: params'
  grad_accum: int = 1
  bf16: bool = False
  scan_layers: bool = False
  remat: bool = False  # with --scan-layers: recompute each block in the backward pass
  layerwise: bool = False  # with --scan-layers: update each layer as its gradient exists
  tie_embeddings: bool = False
  n_kv_heads: int | None = None
  mesh: str | None = None  # e.g. 'data=2,fsdp=4'; None: all devices on 'data'
  distributed: bool = False  # join a JAX cluster, detecting whatever is not set below
  coordinator: str | None = None  # HOST:PORT of process 0; else $JAX_COORDINATOR_ADDRESS
  num_processes: int | None = None  # else $JAX_NUM_PROCESSES
  process_id: int | None = None  # else $JAX_PROCESS_ID
  eval_every: int = 100
  eval_batches: int = 20
  checkpoint_dir: str | None = None
  checkpoint_every: int = 100
  resume: bool = False
  seed: int = 0
  out_dir: str | None = None
  data: str | None = None  # None: the bundled Shakespeare corpus
  data_files: str | None = None
  tokenizer: str = 'byte'
  skip_nonfinite: bool = False  # wrap the optimizer in optax.apply_if_finite
  nonfinite_grad_step: int | None = None  # fault injection: NaN gradients at this micro step
  progress: bool = True


class TrainState(NamedTuple):
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass
class RunResult:
  """What a finished run reports (the comparison tool reads it)."""

  config: TrainConfig
  history: list[dict]
  param_count: int
  state_bytes: int
  adamw_state_bytes: int
  tokens_per_second: float
  final_state: TrainState


class TrainingError(RuntimeError):
  """A run that must stop: a non-finite loss or gradient."""


MAX_CONSECUTIVE_NONFINITE = 10


def parse_mesh(spec: str | None) -> tuple[tuple[str, ...], tuple[int, ...]]:
  devices = len(jax.devices())
  if spec is None:
    return ('data',), (devices,)
  names, sizes = [], []
  for part in spec.split(','):
    name, _, size = part.partition('=')
    if name not in ('data', 'fsdp') or name in names or not size.isdigit() or int(size) < 1:
      raise ValueError(f"--mesh must look like 'data=N,fsdp=M', got {spec!r}")
    names.append(name)
    sizes.append(int(size))
  if devices % math.prod(sizes):
    raise ValueError(
      f'--mesh {spec} needs {math.prod(sizes)} devices, which does not divide '
      f'the {devices} available'
    )
  if jax.process_count() > 1 and math.prod(sizes) != devices:
    raise ValueError(
      f'--mesh {spec} uses {math.prod(sizes)} of the {devices} devices; a multi-process '
      'run must use all of them'
    )
  return tuple(names), tuple(sizes)


def fsdp_spec(shape: tuple[int, ...], fsdp: int, stacked: bool) -> P:
  """Shards the largest axis divisible by the FSDP size (not a layer axis)."""
  if fsdp == 1:
    return P()
  candidates = [a for a in range(1 if stacked else 0, len(shape)) if shape[a] % fsdp == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda a: shape[a])
  return P(*[('fsdp' if a == axis else None) for a in range(len(shape))])


def on_mesh(mesh: jax.sharding.Mesh, fn: Callable) -> Callable:
  """``fn`` traced with ``mesh`` as the context mesh.

  The optimizer then shares each projector refresh out over the mesh (each
  device decomposes its own layers of a stack, ``optax_lean.state_sharding``'s
  docs), which it can only do when it knows the mesh.
  """

  @functools.wraps(fn)
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return traced


def learning_rate_schedule(cfg: TrainConfig, peak: float) -> optax.Schedule:
  warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.steps // 10
  return optax.warmup_cosine_decay_schedule(
    0.0, peak, warmup, max(cfg.steps, warmup + 1), end_value=peak * cfg.min_lr_ratio
  )


def peak_learning_rate(cfg: TrainConfig) -> float:
  """The schedule's peak: ``--learning-rate``, or the optimizer's registered default."""
  return cfg.learning_rate or optimizers.REGISTRY[cfg.optimizer].learning_rate


def hyperparameters(cfg: TrainConfig, model_width: int) -> optimizers.Hyperparameters:
  """The optimizer settings of the command line; the rank defaults to a quarter width."""
  subset = cfg.subset_size if cfg.subset_size == 'heuristic' else int(cfg.subset_size)
  return optimizers.Hyperparameters(
    peak_learning_rate=peak_learning_rate(cfg),
    weight_decay=cfg.weight_decay,
    rank=cfg.rank if cfg.rank is not None else max(1, model_width // 4),
    update_proj_gap=cfg.update_proj_gap,
    projector=cfg.projector,
    subset_size=subset,
    momentum_on_refresh=cfg.momentum_on_refresh,
    state_dtype=cfg.state_dtype,
  )


def make_optimizer(
  cfg: TrainConfig, hparams: optimizers.Hyperparameters
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The configured optimizer (with clipping, protection, accumulation) and its schedule."""
  schedule = learning_rate_schedule(cfg, hparams.peak_learning_rate)
  tx = optimizers.build(cfg.optimizer, schedule, hparams)
  if cfg.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  if cfg.skip_nonfinite:
    tx = optax.apply_if_finite(tx, MAX_CONSECUTIVE_NONFINITE)
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
  return tx, schedule


def loss_fn(graphdef, params, inputs, targets):
  logits = nnx.merge(graphdef, params)(inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def format_bytes(n: int) -> str:
  return f'{n / 2**20:.2f} MiB'


class MetricsWriter:
  """JSON lines in ``out_dir/metrics.jsonl``, and TensorBoard if installed."""

  def __init__(self, out_dir: str, append: bool):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'metrics.jsonl')
    self._file = open(path, 'a' if append else 'w')  # noqa: SIM115 (closed by close())
    try:
      from tensorboardX import SummaryWriter

      self._tensorboard = SummaryWriter(os.path.join(out_dir, 'tensorboard'))
    except ImportError:
      self._tensorboard = None

  def write(self, record: dict) -> None:
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tensorboard is not None:
      for key, value in record.items():
        if key != 'step':
          self._tensorboard.add_scalar(key, value, record['step'])

  def close(self) -> None:
    self._file.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


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
  split: Any  # params -> (trainable, frozen)
  join: Any  # (trainable, frozen) -> params
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


def build(cfg: TrainConfig) -> Run:
  """Loads the data and builds the model, optimizer, mesh and jitted steps."""
  text = data_lib.load_text(cfg.data, data_files=cfg.data_files)
  tokenizer = data_lib.make_tokenizer(cfg.tokenizer, text)
  batches = data_lib.TokenBatches.from_tokens(
    tokenizer.encode(text), cfg.batch_size, cfg.seq_len, cfg.seed
  )
  spec = optimizers.REGISTRY[cfg.optimizer]
  hparams = hyperparameters(cfg, get_config(cfg.model).dim)
  model_cfg = get_config(
    cfg.model,
    vocab_size=tokenizer.vocab_size
    if cfg.model in ('toy', 'tiny', '5m', '20m')
    else CONFIGS[cfg.model].vocab_size,
    scan_layers=cfg.scan_layers,
    remat=cfg.remat,
    tie_embeddings=cfg.tie_embeddings,
    n_kv_heads=cfg.n_kv_heads,
    compute_dtype='bfloat16' if cfg.bf16 else 'float32',
    rso_rank=hparams.rank if spec.trains_factors else None,
  )
  names, sizes = parse_mesh(cfg.mesh)
  devices = math.prod(sizes)
  if cfg.batch_size % devices:
    raise ValueError(
      f'--batch-size {cfg.batch_size} is not divisible by the {devices} devices of the mesh'
    )
  mesh = jax.make_mesh(
    sizes,
    names,
    axis_types=(jax.sharding.AxisType.Auto,) * len(names),
    devices=jax.devices()[:devices],
  )
  fsdp = dict(zip(names, sizes)).get('fsdp', 1)
  # With RSO the linear kernels and their random projections are frozen between merges.
  split, join = (
    (rso_layers.split, rso_layers.join)
    if spec.trains_factors
    else (rso_layers.no_split, rso_layers.no_join)
  )

  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: Llama(model_cfg, nnx.Rngs(0))))
  abstract_params = nnx.to_pure_dict(abstract_params)
  param_shd = jax.tree.map(
    lambda p: NamedSharding(mesh, fsdp_spec(p.shape, fsdp, cfg.scan_layers)), abstract_params
  )
  problem = optimizers.rank_problem(cfg.optimizer, hparams, abstract_params)
  if problem:
    raise ValueError(problem)
  # The layerwise step clips by the previous step's norm itself (layerwise.py).
  tx, schedule = make_optimizer(
    dataclasses.replace(cfg, clip_norm=0.0) if cfg.layerwise else cfg, hparams
  )
  replicated = NamedSharding(mesh, P())
  if cfg.layerwise:
    opt_shd = layerwise.state_sharding(tx, abstract_params, param_shd, replicated)
  else:
    opt_shd = optax_lean.state_sharding(tx, split(abstract_params)[0], split(param_shd)[0])
  state_shd = TrainState(replicated, param_shd, opt_shd)
  batch_shd = NamedSharding(mesh, P(names))

  def init_state() -> TrainState:
    params = nnx.to_pure_dict(nnx.state(Llama(model_cfg, nnx.Rngs(cfg.seed))))
    opt_state = layerwise.init(tx, params) if cfg.layerwise else tx.init(split(params)[0])
    return TrainState(jnp.zeros([], jnp.int32), params, opt_state)

  def train_step(state: TrainState, inputs, targets):
    trainable, frozen = split(state.params)
    loss, grads = jax.value_and_grad(lambda t: loss_fn(graphdef, join(t, frozen), inputs, targets))(
      trainable
    )
    if cfg.nonfinite_grad_step is not None:
      poison = state.step + 1 == cfg.nonfinite_grad_step
      grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g).astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    params, step = join(trainable, frozen), state.step + 1
    if spec.trains_factors:
      key = jax.random.fold_in(jax.random.key(cfg.seed), step)
      params, opt_state = jax.lax.cond(
        step % (hparams.update_proj_gap * cfg.grad_accum) == 0,
        lambda: (
          rso_layers.merge_and_redraw(params, key),
          rso_layers.reset_factor_state(tx, opt_state, trainable),
        ),
        lambda: (params, opt_state),
      )
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
    return TrainState(step, params, opt_state), metrics

  step_fn = train_step
  if cfg.layerwise:
    block_graphdef = nnx.split(nnx.eval_shape(lambda: Block(model_cfg, nnx.Rngs(0))))[0]
    layer_step = layerwise.make_step(graphdef, block_graphdef, tx, cfg.clip_norm)

    def step_fn(state: TrainState, inputs, targets):
      params, opt_state, loss, norm = layer_step(state.params, state.opt_state, inputs, targets)
      return TrainState(state.step + 1, params, opt_state), {'loss': loss, 'grad_norm': norm}

  return Run(
    cfg=cfg,
    batches=batches,
    mesh=mesh,
    batch_sharding=batch_shd,
    rows=distributed.local_rows(batch_shd, (cfg.batch_size, cfg.seq_len)),
    tx=tx,
    schedule=schedule,
    state_sharding=state_shd,
    abstract_state=jax.eval_shape(init_state),
    graphdef=graphdef,
    split=split,
    join=join,
    init_state=jax.jit(init_state, out_shardings=state_shd),
    step_fn=jax.jit(
      on_mesh(mesh, step_fn),
      in_shardings=(state_shd, batch_shd, batch_shd),
      out_shardings=(state_shd, replicated),
      donate_argnums=0,
    ),
    eval_fn=jax.jit(
      lambda params, x, y: loss_fn(graphdef, params, x, y),
      in_shardings=(param_shd, batch_shd, batch_shd),
      out_shardings=replicated,
    ),
  )


def report_memory(run: Run) -> tuple[int, int, int]:
  """Prints parameter count and optimizer-state memory next to AdamW's."""
  params = rso_layers.without_factors(run.abstract_state.params)
  opt_state = run.abstract_state.opt_state
  n_params = sum(p.size for p in jax.tree.leaves(params))
  opt_bytes = optax_lean.state_bytes(opt_state)
  adamw_bytes = optax_lean.state_bytes(jax.eval_shape(optax.adamw(1e-3).init, params))
  by_kind = ', '.join(
    f'{k} {format_bytes(v)}' for k, v in optax_lean.state_bytes_by_kind(opt_state).items()
  )
  cfg = run.cfg
  say(
    f'model {cfg.model}: {n_params:,} parameters ({format_bytes(4 * n_params)} f32); mesh '
    f'{dict(run.mesh.shape)}'
  )
  say(
    f'optimizer {cfg.optimizer}: state {format_bytes(opt_bytes)} '
    f'({100 * opt_bytes / adamw_bytes:.1f}% of adamw {format_bytes(adamw_bytes)}): {by_kind}'
  )
  return n_params, opt_bytes, adamw_bytes


def say(line: str, file: TextIO | None = None) -> None:
  """Prints a line from process 0 only (every process computes the same)."""
  if distributed.is_primary():
    print(line, file=file or sys.stdout, flush=True)


def starting_point(run: Run, checkpointer: Checkpointer | None) -> tuple[TrainState, int, bool]:
  """The state and data position to start from, and whether they were resumed.

  With ``--resume``, the newest checkpoint that passes its checksums (damaged
  newer ones are reported and set aside); otherwise a fresh state.
  """
  cfg = run.cfg
  warn = lambda line: say(f'warning: {line}', file=sys.stderr)
  restored = None
  if cfg.resume and checkpointer is not None:
    restored = checkpointer.restore_latest(run.restore_target(), report=warn)
  if restored is None:
    return run.init_state(), 0, False
  state, record = restored
  if record['config']['model'] != cfg.model or record['config']['optimizer'] != cfg.optimizer:
    raise ValueError(
      f'--resume: {cfg.checkpoint_dir} holds a {record["config"]["model"]} / '
      f'{record["config"]["optimizer"]} run'
    )
  position = record['data_position']
  say(f'resumed from step {int(state.step)} (data position {position})')
  return state, position, True


def train(cfg: TrainConfig) -> RunResult:
  """Runs (or resumes) one training run and returns its history."""
  run = build(cfg)
  n_params, opt_bytes, adamw_bytes = report_memory(run)
  schedule = run.schedule
  checkpointer = Checkpointer(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
  state, position, resumed = starting_point(run, checkpointer)

  out_dir = cfg.out_dir or os.path.join('runs', f'{cfg.model}-{cfg.optimizer}')
  writer = MetricsWriter(out_dir, append=resumed) if distributed.is_primary() else None
  val_batches = run.validation_batches()
  tokens_per_micro_step = cfg.batch_size * cfg.seq_len
  micro_steps = cfg.steps * cfg.grad_accum
  history: list[dict] = []
  timer = {'start': None, 'first': position + 1}
  nonfinite = {'consecutive': 0}

  def evaluate(params) -> float:
    return float(np.mean(jax.device_get([run.eval_fn(params, x, y) for x, y in val_batches])))

  def finish(micro_step: int, metrics: dict, val_loss: float | None = None) -> None:
    """Checks, records and writes the metrics of one (micro) step."""
    step = micro_step // cfg.grad_accum
    record = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if math.isfinite(record['loss']) and math.isfinite(record['grad_norm']):
      nonfinite['consecutive'] = 0
    else:
      nonfinite['consecutive'] += 1
      last = checkpointer.latest_step() if checkpointer else None
      where = 'none' if last is None else f'step {last} in {cfg.checkpoint_dir}'
      problem = (
        f'non-finite loss or gradient at step {step} (loss {record["loss"]}, grad norm '
        f'{record["grad_norm"]})'
      )
      if not cfg.skip_nonfinite:
        raise TrainingError(f'{problem}; stopping. Last good checkpoint: {where}')
      if nonfinite['consecutive'] >= MAX_CONSECUTIVE_NONFINITE:
        raise TrainingError(
          f'{problem}, {MAX_CONSECUTIVE_NONFINITE} in a row; stopping. '
          f'Last good checkpoint: {where}'
        )
      record['skipped'] = True
      note(f'{problem}: step skipped')
    # Steps after the first (which compiles) are timed; this one is done now.
    elapsed = time.perf_counter() - timer['start']
    timed = (micro_step - timer['first']) * tokens_per_micro_step
    record.update(
      step=step,
      tokens=micro_step * tokens_per_micro_step,
      lr=float(schedule(step)),
      tokens_per_sec=timed / elapsed if timed > 0 else 0.0,
    )
    if cfg.grad_accum > 1:
      record['micro_step'] = micro_step
    if val_loss is not None:
      record.update(val_loss=val_loss, val_ppl=math.exp(val_loss))
    history.append(record)
    if writer is not None:
      writer.write(record)
    summary = f'loss {record["loss"]:.3f} {record["tokens_per_sec"]:,.0f} tok/s'
    if progress is not None:
      progress.set_postfix_str(summary)
    if val_loss is not None:
      note(f'step {step}: {summary}, val loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f})')

  def note(line: str) -> None:
    """A line above the progress bar, or printed (process 0)."""
    if progress is not None:
      progress.write(line)
    else:
      say(line)

  progress = None
  if cfg.progress and distributed.is_primary():
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in a log file.
    progress = tqdm(
      total=micro_steps,
      initial=position,
      unit='step',
      dynamic_ncols=True,
      file=sys.stdout,
      disable=None,
    )
  lagged = None  # the previous step's (micro step, metrics), read one step late
  try:
    while position < micro_steps:
      state, metrics = run.step_fn(state, *run.train_batch(position))
      position += 1
      if timer['start'] is None:  # the first step compiles: time from its end
        jax.block_until_ready(state)
        timer['start'] = time.perf_counter()
      if lagged is not None:
        finish(*lagged)
        lagged = None
      if progress is not None:
        progress.update(1)
      step, boundary = divmod(position, cfg.grad_accum)
      last = position == micro_steps
      due_eval = boundary == 0 and (step % cfg.eval_every == 0 or last)
      due_save = (
        checkpointer is not None and boundary == 0 and (step % cfg.checkpoint_every == 0 or last)
      )
      if due_eval or due_save:
        finish(position, metrics, evaluate(state.params) if due_eval else None)
        if due_save:
          checkpointer.save(
            step, state, {'data_position': position, 'config': dataclasses.asdict(cfg)}
          )
      else:
        lagged = (position, metrics)
    if lagged is not None:
      finish(*lagged)
    jax.block_until_ready(state)
  finally:
    if progress is not None:
      progress.close()
    if writer is not None:
      writer.close()
    if checkpointer is not None:
      checkpointer.close()

  elapsed = time.perf_counter() - timer['start'] if timer['start'] else 0.0
  timed = (position - timer['first']) * tokens_per_micro_step
  return RunResult(
    config=cfg,
    history=history,
    param_count=n_params,
    state_bytes=opt_bytes,
    adamw_state_bytes=adamw_bytes,
    tokens_per_second=timed / elapsed if timed > 0 else 0.0,
    final_state=state,
  )


class OneLineErrorParser(argparse.ArgumentParser):
  """Reports a bad argument in one line (no usage block) and exits with 2."""

  def error(self, message: str):
    self.exit(2, f'{self.prog}: error: {message}\n')


def build_parser() -> argparse.ArgumentParser:
  parser = OneLineErrorParser(description=__doc__.split('\n\n')[0])
  for field in dataclasses.fields(TrainConfig):
    flag = '--' + field.name.replace('_', '-')
    default = field.default
    if field.type == 'bool':
      parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
      continue
    kind = {'int': int, 'float': float}.get(field.type.split(' |')[0], str)
    parser.add_argument(flag, type=kind, default=default)
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


def validate(cfg: TrainConfig) -> list[str]:
  """Problems with a config that can be found before any work."""
  return validation.config_problems(cfg) + mesh_problems(cfg)


def mesh_problems(cfg: TrainConfig) -> list[str]:
  """Problems with ``--mesh`` on the devices at hand (starts the JAX backend)."""
  try:
    parse_mesh(cfg.mesh)
  except ValueError as e:
    return [str(e)]
  return []


def main(argv: list[str] | None = None) -> int:
  cfg, cluster = config_from_args(argv)
  try:
    distributed.join(cluster)
  except (RuntimeError, ValueError) as e:
    print(
      f'error: could not join a cluster ({e}); where JAX cannot detect it, pass '
      '--coordinator, --num-processes and --process-id',
      file=sys.stderr,
    )
    return 1
  problems = mesh_problems(cfg)
  if problems:
    build_parser().error(problems[0])
  if cfg.checkpoint_dir:
    checkpoint.quiet_failed_reads()  # a damaged step is reported in one line, by restore
  try:
    result = train(cfg)
  except (ValueError, OSError, TrainingError, CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  final = [r for r in result.history if 'val_loss' in r]
  if final:
    say(
      f'final val loss {final[-1]["val_loss"]:.4f} (ppl {final[-1]["val_ppl"]:.2f}), '
      f'{result.tokens_per_second:,.0f} tokens/s'
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
