"""Randomized subspace optimization (RSO) of the linear layers, on the model side.

Chen et al., `A Memory Efficient Randomized Subspace Optimization Method for
Training Large Language Models <https://arxiv.org/abs/2502.07222>`_, ICML 2025.

For ``period`` steps every linear layer ``y = x W`` is trained only through a
low-dimensional factor ``B`` on a fixed random projection ``P`` of its input,

.. math::
  y = x W + (x P) B, \\qquad P \\in \\mathbb{R}^{n \\times r},\\ P_{ij} \\sim
  \\mathcal{N}(0, 1/r),\\ B_0 = 0,

with ``W`` frozen. Then ``W <- W + P B``, a new ``P`` is drawn, and ``B`` and
its optimizer state start again from zero. The gradient of ``B`` needs only
the ``r``-dimensional ``x P``, and the frozen ``W`` needs no saved input at
all, so the linear layers keep ``r`` instead of ``n`` activations per token
for the backward pass; the optimizer state covers ``B`` (``r x out``) instead
of ``W``. Embeddings and norms train as usual.

The paper has no official code; this follows its algorithm (Adam as the inner
solver, no proximal term, projection on the input side).

The trainer sees the option through one interface, ``trained_parameters``:
which parameters the optimizer trains, how they rejoin the frozen rest, and
what follows each step (``TrainAll`` for every other optimizer, which does
nothing; ``TrainFactors`` here).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

FACTOR, KERNEL, PROJECTION = 'factor', 'kernel', 'projection'


class Projection(nnx.Variable):
  """The fixed random input projection ``P`` of an RSO layer (never trained)."""


class RSOLinear(nnx.Module):
  """``x W + (x P) B`` with an ``(in, out)`` kernel ``W`` and a rank-``r`` factor ``B``."""

  def __init__(self, n_in: int, n_out: int, rank: int, rngs: nnx.Rngs, dtype, param_dtype):
    kernel = nnx.initializers.normal(0.02)(rngs.params(), (n_in, n_out), param_dtype)
    self.kernel = nnx.Param(kernel)
    self.factor = nnx.Param(jnp.zeros((rank, n_out), param_dtype))
    self.projection = Projection(random_projection(rngs.params(), (n_in, rank)).astype(param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    low_rank = x @ self.projection[...].astype(self.dtype)
    return x @ self.kernel[...].astype(self.dtype) + low_rank @ self.factor[...].astype(self.dtype)


def random_projection(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.normal(key, shape, jnp.float32) / math.sqrt(shape[-1])


def split(state: dict) -> tuple[dict, dict]:
  """``(trainable, frozen)``: the frozen part is every RSO kernel and projection."""
  flat = traverse_util.flatten_dict(state)
  layers = {path[:-1] for path in flat if path[-1] == FACTOR}
  frozen = {p: v for p, v in flat.items() if p[:-1] in layers and p[-1] in (KERNEL, PROJECTION)}
  trainable = {p: v for p, v in flat.items() if p not in frozen}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def join(trainable: dict, frozen: dict) -> dict:
  return traverse_util.unflatten_dict(
    {**traverse_util.flatten_dict(trainable), **traverse_util.flatten_dict(frozen)}
  )


def factor_mask(trainable: dict) -> dict:
  return jax.tree_util.tree_map_with_path(
    lambda path, _: getattr(path[-1], 'key', None) == FACTOR, trainable
  )


def without_factors(state: dict) -> dict:
  """The model's own parameters: ``state`` without RSO factors and projections."""
  flat = traverse_util.flatten_dict(state)
  return traverse_util.unflatten_dict(
    {p: v for p, v in flat.items() if p[-1] not in (FACTOR, PROJECTION)}
  )


def merge_and_redraw(state: dict, key: jax.Array) -> dict:
  """``W <- W + P B``, ``B <- 0`` and a fresh ``P`` for every RSO layer."""
  flat = traverse_util.flatten_dict(state)
  layers = sorted(path[:-1] for path in flat if path[-1] == FACTOR)
  for index, layer in enumerate(layers):
    kernel, factor = flat[(*layer, KERNEL)], flat[(*layer, FACTOR)]
    projection = flat[(*layer, PROJECTION)]
    flat[(*layer, KERNEL)] = kernel + (projection @ factor).astype(kernel.dtype)
    flat[(*layer, FACTOR)] = jnp.zeros_like(factor)
    flat[(*layer, PROJECTION)] = random_projection(
      jax.random.fold_in(key, index), projection.shape
    ).astype(projection.dtype)
  return traverse_util.unflatten_dict(flat)


def reset_factor_state(tx: optax.GradientTransformation, opt_state: Any, trainable: dict) -> Any:
  """The optimizer state with its factor partition re-initialised (count included)."""
  fresh = tx.init(trainable)
  inner = optax.tree.get(opt_state, 'inner_states')
  fresh_inner = optax.tree.get(fresh, 'inner_states')
  return optax.tree.set(opt_state, inner_states={**inner, FACTOR: fresh_inner[FACTOR]})


def partitioned(
  factor_tx: optax.GradientTransformation, other_tx: optax.GradientTransformation
) -> optax.GradientTransformation:
  """``factor_tx`` on the factors, ``other_tx`` on everything else trainable."""
  labels = lambda params: jax.tree.map(
    lambda is_factor: FACTOR if is_factor else 'other', factor_mask(params)
  )
  return optax.partition({FACTOR: factor_tx, 'other': other_tx}, labels)


class TrainAll:
  """Every parameter trains and nothing follows a step: every optimizer but RSO's own."""

  @property
  def rso_rank(self) -> int | None:
    """The factor rank to build the model's linear layers with (``None``: plain layers)."""
    return None

  def split(self, params: dict) -> tuple[dict, dict]:
    """``(trainable, frozen)``."""
    return params, {}

  def join(self, trainable: dict, frozen: dict) -> dict:
    """The parameters of ``split``'s two parts."""
    del frozen
    return trainable

  def after_step(
    self,
    tx: optax.GradientTransformation,
    step: jax.Array,
    params: dict,
    opt_state: Any,
    trainable: dict,
  ) -> tuple[dict, Any]:
    """The parameters and optimizer state once micro step ``step`` (from 1) is applied."""
    del tx, step, trainable
    return params, opt_state


@dataclasses.dataclass(frozen=True)
class TrainFactors(TrainAll):
  """RSO on the model side: the factors train, merged and redrawn every ``period`` micro steps.

  Between merges every RSO kernel and random projection is frozen.
  """

  rank: int
  period: int
  seed: int

  @property
  def rso_rank(self) -> int:
    return self.rank

  def split(self, params: dict) -> tuple[dict, dict]:
    return split(params)

  def join(self, trainable: dict, frozen: dict) -> dict:
    return join(trainable, frozen)

  def after_step(
    self,
    tx: optax.GradientTransformation,
    step: jax.Array,
    params: dict,
    opt_state: Any,
    trainable: dict,
  ) -> tuple[dict, Any]:
    """At every ``period``-th micro step: ``merge_and_redraw`` and fresh factor states."""
    key = jax.random.fold_in(jax.random.key(self.seed), step)
    return jax.lax.cond(
      step % self.period == 0,
      lambda: (merge_and_redraw(params, key), reset_factor_state(tx, opt_state, trainable)),
      lambda: (params, opt_state),
    )


def trained_parameters(trains_factors: bool, rank: int, period: int, seed: int) -> TrainAll:
  """``TrainFactors`` of ``rank`` for an optimizer that trains RSO factors, else ``TrainAll``."""
  return TrainFactors(rank, period, seed) if trains_factors else TrainAll()
