"""The one registry of optimizers the trainer and the comparison know by name.

To add an optimizer, add an ``OptimizerSpec`` to ``REGISTRY``. Every spec
builds the bare optimizer from a learning-rate schedule and the shared
hyperparameters; the trainer adds clipping, accumulation and protection.
Default learning rates are the best of the sweeps on the ``tiny`` config
(``python -m benchmarks.convergence --sweep``, in docs/benchmarks.md);
subset-norm optimizers take about 10x AdamW's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

import optax_lean
from examples.llama import rso_layers


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
  """What the command line can set, shared by all optimizers.

  These defaults are the trainer's too (``train_config.TrainConfig`` takes
  them); the trainer always sets ``rank`` (default: a quarter of the model
  width), which ``None`` here leaves to the optimizer.
  """

  peak_learning_rate: float = 1e-3  # the schedule's peak (OSD scales its projector step by it)
  weight_decay: float = 0.0
  rank: int | None = None  # None: the optimizer's own default
  update_proj_gap: int = 100
  projector: str = 'auto'  # the exact SVD on CPU, randomized on GPU and TPU
  subset_size: str | int = 'heuristic'
  momentum_on_refresh: str = 'official'
  state_dtype: str | None = None  # e.g. 'bfloat16' for every state; None: the parameters'


# 'int8': the moments in 8 bits (optax_lean.quantize_state), the rest of the state float32.
STATE_DTYPES = ('bfloat16', 'float32', 'int8')


# The parameters' and the computation's dtypes (--param-dtype, --compute-dtype).
DTYPES = ('float32', 'bfloat16')

# How updates land on bfloat16 parameters: name -> (transformation from a seed, help).
ROUNDINGS: dict[str, tuple[Callable[[int], optax.GradientTransformation], str]] = {
  'stochastic': (optax_lean.stochastic_rounding, 'unbiased stochastic rounding, no memory'),
  'kahan': (lambda seed: optax_lean.kahan_summation(), 'a bfloat16 compensation buffer'),
  'master': (lambda seed: optax_lean.master_weights(), 'a float32 copy in the state'),
  'nearest': (lambda seed: optax.identity(), "round to nearest, optax's own"),
}
DEFAULT_ROUNDING = 'stochastic'


def rounding(name: str, seed: int) -> optax.GradientTransformation:
  """The transformation that makes updates land on low-precision parameters, put last."""
  return ROUNDINGS[name][0](seed)


def state_dtypes(h: Hyperparameters, *fields: str) -> dict[str, str]:
  """``{field: h.state_dtype}`` for the optimizer's dtype arguments, if a dtype is set."""
  return {} if h.state_dtype is None else dict.fromkeys(fields, h.state_dtype)


def linear_kernels(params: Any) -> Any:
  """The SN/SM leaves: every linear kernel (as the official code's nn.Linear group).

  Embeddings and norm scales get the plain rule. Scanned kernels
  ``(layers, in, out)`` are read with the default dimension numbers (last two
  axes, leading axes batch).
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params
  )


def attn_mlp_kernels(params: Any) -> Any:
  """The GaLore-family leaves: kernels under ``attn`` or ``mlp`` (not the output head).

  The official GaLore, LDAdam and Online Subspace Descent scripts project only
  the attention and MLP linear layers.
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, _: (
      getattr(path[-1], 'key', None) == 'kernel'
      and any(getattr(k, 'key', None) in ('attn', 'mlp') for k in path)
    ),
    params,
  )


def kernels_and_embedding(params: Any) -> Any:
  """SCALE's leaves: every linear kernel and the embedding table (the official ``main_params``)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: getattr(path[-1], 'key', None) in ('kernel', 'embedding'), params
  )


def muon_dimension_numbers(params: Any) -> Any:
  """Muon's reading of the linear kernels ``(…, in, out)``; ``None`` (its Adam) elsewhere."""

  def reading(path, p):
    if getattr(path[-1], 'key', None) != 'kernel':
      return None
    return optax.contrib.MuonDimensionNumbers(p.ndim - 2, p.ndim - 1)

  return jax.tree_util.tree_map_with_path(reading, params)


def adafactor(
  lr: optax.Schedule, h: Hyperparameters, momentum: float | None
) -> optax.GradientTransformation:
  """``optax.adafactor`` with absolute steps (the schedule sets them, as for AdamW).

  ``multiply_by_parameter_scale=False``: the default (True) multiplies each
  step by the parameter's root mean square, so that its rate would not be
  comparable with the other optimizers' peaks.
  """
  return optax.adafactor(
    lr,
    multiply_by_parameter_scale=False,
    momentum=momentum,
    weight_decay_rate=h.weight_decay or None,
  )


def sumo(lr: optax.Schedule, h: Hyperparameters, **options: Any) -> optax.GradientTransformation:
  """``optax_lean.sumo`` with the shared hyperparameters and ``options``.

  ``--momentum-on-refresh official`` is each method's own: SUMO's code keeps
  the momentum (``'keep'``).
  """
  return optax_lean.sumo(
    lr,
    weight_decay=h.weight_decay,
    rank=h.rank,
    update_proj_gap=h.update_proj_gap,
    projector=h.projector,
    momentum_on_refresh='keep' if h.momentum_on_refresh == 'official' else h.momentum_on_refresh,
    **state_dtypes(h, 'mu_dtype', 'nu_dtype', 'projector_dtype'),
    **options,
  )


def contrib_galore_dimension_numbers(params: Any) -> Any:
  """``optax.contrib.galore``'s reading of the attention and MLP kernels; ``None`` elsewhere.

  It has no batch axes, so the stacked kernels of ``--scan-layers`` are refused.
  """

  def reading(path, p, chosen):
    if not chosen:
      return None
    if p.ndim != 2:
      raise ValueError(
        f'contrib_galore: {jax.tree_util.keystr(path)} has shape {p.shape}; '
        'optax.contrib.galore projects 2-D kernels only: run it without --scan-layers'
      )
    return optax.contrib.GaLoreDimensionNumbers(0, 1)

  return jax.tree_util.tree_map_with_path(reading, params, attn_mlp_kernels(params))


# SCALE's official scripts give the AdamW leaves (norm scales) their own peak,
# 2e-2 for the small models; the schedule keeps the shape of the main one.
SCALE_ADAM_PEAK = 2e-2


def scaled_schedule(schedule: optax.Schedule, peak: float, new_peak: float) -> optax.Schedule:
  """``schedule`` rescaled so that its peak ``peak`` becomes ``new_peak``."""
  return lambda count: schedule(count) * (new_peak / peak)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  build: Callable[[optax.Schedule, Hyperparameters], optax.GradientTransformation]
  learning_rate: float
  low_rank: bool = False
  trains_factors: bool = False  # the model trains RSO factors (rso_layers.py), see 'rso_layers'
  description: str = ''


REGISTRY: dict[str, OptimizerSpec] = {
  'adamw': OptimizerSpec(
    lambda lr, h: optax.adamw(
      lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=h.weight_decay, **state_dtypes(h, 'mu_dtype')
    ),
    3e-3,
    description='optax.adamw (PyTorch flavour), the baseline',
  ),
  'adafactor': OptimizerSpec(
    lambda lr, h: adafactor(lr, h, momentum=None),
    3e-3,
    description='optax.adafactor: factored second moment, no momentum (peer)',
  ),
  'adafactor_momentum': OptimizerSpec(
    lambda lr, h: adafactor(lr, h, momentum=0.9),
    3e-3,
    description='optax.adafactor with momentum 0.9 (peer)',
  ),
  'adamsn': OptimizerSpec(
    lambda lr, h: optax_lean.adamsn(
      lr,
      weight_decay=h.weight_decay,
      subset_size=h.subset_size,
      mask=linear_kernels,
      **state_dtypes(h, 'mu_dtype', 'nu_dtype'),
    ),
    3e-2,
    description='Adam momentum over subset-norm',
  ),
  'adamsnsm': OptimizerSpec(
    lambda lr, h: optax_lean.adamsnsm(
      lr,
      weight_decay=h.weight_decay,
      rank=h.rank,
      update_proj_gap=h.update_proj_gap,
      projector=h.projector,
      subset_size=h.subset_size,
      mask=linear_kernels,
      momentum_on_refresh=h.momentum_on_refresh,
      **state_dtypes(h, 'mu_dtype', 'nu_dtype', 'projector_dtype'),
    ),
    1e-2,
    low_rank=True,
    description='subspace momentum over subset-norm',
  ),
  'rso_layers': OptimizerSpec(
    lambda lr, h: rso_layers.partitioned(
      optax.adam(lr), optax.adamw(lr, eps=1e-8, weight_decay=h.weight_decay)
    ),
    3e-3,
    low_rank=True,
    trains_factors=True,
    description='RSO on the model side: Adam on a random rank-r factor of each linear layer, '
    'merged every update_proj_gap steps (activation memory drops too)',
  ),
  'galore': OptimizerSpec(
    lambda lr, h: optax_lean.galore(
      lr,
      weight_decay=h.weight_decay,
      rank=h.rank,
      update_proj_gap=h.update_proj_gap,
      projector=h.projector,
      mask=attn_mlp_kernels,
      **state_dtypes(h, 'mu_dtype', 'nu_dtype', 'projector_dtype'),
    ),
    1e-2,
    low_rank=True,
    description='GaLore: Adam inside an SVD subspace, scale 0.25 (official GaLoreAdamW)',
  ),
  'ldadam': OptimizerSpec(
    lambda lr, h: optax_lean.ldadam(
      lr,
      weight_decay=h.weight_decay,
      rank=h.rank,
      mask=attn_mlp_kernels,
      **state_dtypes(h, 'mu_dtype', 'nu_dtype', 'projector_dtype', 'error_dtype'),
    ),
    3e-3,
    low_rank=True,
    description='LDAdam: projection-aware moments, power iteration every step, error feedback',
  ),
  'online_subspace_descent': OptimizerSpec(
    lambda lr, h: optax_lean.online_subspace_descent(
      lr,
      weight_decay=h.weight_decay,
      rank=h.rank,
      update_proj_gap=h.update_proj_gap,
      mask=attn_mlp_kernels,
      base_learning_rate=h.peak_learning_rate,
      **state_dtypes(h, 'mu_dtype', 'nu_dtype', 'projector_dtype'),
    ),
    1e-2,
    low_rank=True,
    description='Online Subspace Descent: GaLore with a projector learned by online PCA',
  ),
  'rso': OptimizerSpec(
    lambda lr, h: optax_lean.rso(
      lr,
      weight_decay=h.weight_decay,
      rank=h.rank,
      update_proj_gap=h.update_proj_gap,
      mask=linear_kernels,
      **state_dtypes(h, 'mu_dtype', 'nu_dtype'),
    ),
    3e-3,
    low_rank=True,
    description='RSO as a transformation: Adam in a random subspace, reset every gap steps',
  ),
  'apollo': OptimizerSpec(
    lambda lr, h: optax_lean.apollo(
      lr,
      weight_decay=h.weight_decay,
      rank=h.rank,
      update_proj_gap=h.update_proj_gap,
      mask=attn_mlp_kernels,
      **state_dtypes(h, 'mu_dtype', 'nu_dtype'),
    ),
    1e-2,
    low_rank=True,
    description="APOLLO: AdamW's channel-wise scaling, estimated in a random rank-r sketch",
  ),
  'apollo_mini': OptimizerSpec(
    lambda lr, h: optax_lean.apollo_mini(
      lr,
      weight_decay=h.weight_decay,
      update_proj_gap=h.update_proj_gap,
      mask=attn_mlp_kernels,
      **state_dtypes(h, 'mu_dtype', 'nu_dtype'),
    ),
    1e-2,
    description='APOLLO-Mini: one scaling factor per matrix from a rank-1 sketch (scale 128)',
  ),
  'scale': OptimizerSpec(
    lambda lr, h: optax_lean.scale(
      lr,
      weight_decay=h.weight_decay,
      adam_learning_rate=scaled_schedule(lr, h.peak_learning_rate, SCALE_ADAM_PEAK),
      mask=kernels_and_embedding,
      **state_dtypes(h, 'mu_dtype', 'nu_dtype'),
    ),
    1e-3,
    description='SCALE: column-normalised SGD, momentum on the output layer only',
  ),
  'contrib_galore': OptimizerSpec(
    lambda lr, h: optax.contrib.galore(
      lr,
      rank=h.rank or 128,
      update_proj_gap=h.update_proj_gap,
      scale=0.25,
      weight_decay=h.weight_decay,
      weight_dimension_numbers=contrib_galore_dimension_numbers,
    ),
    1e-1,
    low_rank=True,
    description='optax.contrib.galore: GaLore with Adam, scale 0.25, unscanned models (peer)',
  ),
  'sumo': OptimizerSpec(
    lambda lr, h: sumo(lr, h, mask=attn_mlp_kernels),
    1e-2,
    low_rank=True,
    description='SUMO: subspace momentum orthogonalised by an exact SVD, AdamW elsewhere',
  ),
  'sumo_sn': OptimizerSpec(
    lambda lr, h: sumo(
      lr, h, mask=linear_kernels, residual='subset_norm', subset_size=h.subset_size
    ),
    1e-2,
    low_rank=True,
    description="SUMO's subspace step with AdamSNSM's subset-norm step outside it",
  ),
  'muon': OptimizerSpec(
    lambda lr, h: optax.contrib.muon(
      lr,
      weight_decay=h.weight_decay,
      muon_weight_dimension_numbers=muon_dimension_numbers,
      **state_dtypes(h, 'mu_dtype'),
    ),
    3e-2,
    description='optax.contrib.muon: the kernels orthogonalised, Adam on the rest (peer)',
  ),
  'muon_bf16': OptimizerSpec(
    lambda lr, h: optax.contrib.muon(
      lr,
      weight_decay=h.weight_decay,
      muon_weight_dimension_numbers=muon_dimension_numbers,
      mu_dtype='bfloat16',
    ),
    3e-2,
    description='optax.contrib.muon with bfloat16 momentum (peer)',
  ),
  'rmsprop_sn': OptimizerSpec(
    lambda lr, h: optax_lean.rmsprop_sn(
      lr,
      weight_decay=h.weight_decay,
      subset_size=h.subset_size,
      mask=linear_kernels,
      **state_dtypes(h, 'nu_dtype'),
    ),
    1e-2,
    description='RMSprop over subset-norm, no momentum',
  ),
  'adagrad_snsm': OptimizerSpec(
    lambda lr, h: optax_lean.adagrad_snsm(
      lr,
      weight_decay=h.weight_decay,
      rank=h.rank,
      update_proj_gap=h.update_proj_gap,
      subset_size=h.subset_size,
      projector=h.projector,
      mask=linear_kernels,
      momentum_on_refresh=h.momentum_on_refresh,
      **state_dtypes(h, 'mu_dtype', 'nu_dtype', 'projector_dtype'),
    ),
    1.0,
    low_rank=True,
    description='subspace momentum over accumulated subset-norm',
  ),
  'sgd_sm': OptimizerSpec(
    lambda lr, h: optax_lean.sgd_sm(
      lr,
      weight_decay=h.weight_decay,
      rank=h.rank,
      update_proj_gap=h.update_proj_gap,
      projector=h.projector,
      mask=linear_kernels,
      momentum_on_refresh=h.momentum_on_refresh,
      **state_dtypes(h, 'mu_dtype', 'projector_dtype'),
    ),
    0.3,
    low_rank=True,
    description='SGD with subspace momentum',
  ),
}


def rank_problem(name: str, hparams: Hyperparameters, params: Any) -> str | None:
  """Why ``hparams.rank`` cannot work for ``params``, or ``None`` if it can.

  The library clips a rank per leaf (with a warning) to what each matrix
  allows, which is right when some kernels are smaller than others; a rank
  larger than every kernel allows is a mistake on the command line.
  """
  if not REGISTRY[name].low_rank or hparams.rank is None:
    return None
  projector = optax_lean.get_projector(hparams.projector)
  selected = jax.tree.leaves(linear_kernels(params))
  limit = max(
    projector.max_rank(*p.shape[-2:])
    for p, chosen in zip(jax.tree.leaves(params), selected)
    if chosen
  )
  if hparams.rank <= limit:
    return None
  return (
    f'--rank {hparams.rank} is larger than any matrix of this model allows with the '
    f'{projector.name!r} projector (at most {limit})'
  )


def build(name: str, schedule: optax.Schedule, hparams: Hyperparameters):
  """The named optimizer; ``ValueError`` listing the choices if unknown."""
  if name not in REGISTRY:
    raise ValueError(f'unknown optimizer {name!r}; choose one of {", ".join(REGISTRY)}')
  if hparams.state_dtype == 'int8':
    float_state = dataclasses.replace(hparams, state_dtype=None)
    return optax_lean.quantize_state(REGISTRY[name].build(schedule, float_state))
  return REGISTRY[name].build(schedule, hparams)
