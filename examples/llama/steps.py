"""The functions a run compiles: the initial state, the train step and the loss.

The train state ``(step, params, opt_state)`` is a pytree and the model a
graph merged with plain parameters, so each step is a pure function of the
state and a batch. The ordinary step takes the whole gradient; with
``--layerwise`` each layer is updated as soon as its gradient exists
(``layerwise.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from examples.llama import layerwise
from examples.llama.configs import LlamaConfig
from examples.llama.model import Block, Llama
from examples.llama.rso_layers import TrainAll

Step = Callable[[Any, jax.Array, jax.Array], tuple[Any, dict]]


class TrainState(NamedTuple):
  step: jax.Array
  params: Any
  opt_state: Any


def loss_fn(graphdef: nnx.GraphDef, params: Any, inputs: jax.Array, targets: jax.Array):
  """Mean next-token cross-entropy of the model ``graphdef`` with ``params``."""
  logits = nnx.merge(graphdef, params)(inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_init(
  config: LlamaConfig,
  tx: optax.GradientTransformation,
  trained: TrainAll,
  seed: int,
  per_layer: bool,
) -> Callable[[], TrainState]:
  """``() -> TrainState``: fresh parameters from ``seed`` and their optimizer state."""

  def init_state() -> TrainState:
    params = nnx.to_pure_dict(nnx.state(Llama(config, nnx.Rngs(seed))))
    opt_state = layerwise.init(tx, params) if per_layer else tx.init(trained.split(params)[0])
    return TrainState(jnp.zeros([], jnp.int32), params, opt_state)

  return init_state


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  trained: TrainAll,
  nonfinite_grad_step: int | None,
) -> Step:
  """``(state, inputs, targets) -> (state, metrics)`` on the whole gradient.

  ``nonfinite_grad_step`` (fault injection) makes that micro step's gradients NaN.
  """

  def train_step(state: TrainState, inputs, targets):
    trainable, frozen = trained.split(state.params)
    loss, grads = jax.value_and_grad(
      lambda t: loss_fn(graphdef, trained.join(t, frozen), inputs, targets)
    )(trainable)
    if nonfinite_grad_step is not None:
      poison = state.step + 1 == nonfinite_grad_step
      grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g).astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    params, step = trained.join(trainable, frozen), state.step + 1
    params, opt_state = trained.after_step(tx, step, params, opt_state, trainable)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
    return TrainState(step, params, opt_state), metrics

  return train_step


def make_layerwise_step(
  graphdef: nnx.GraphDef, config: LlamaConfig, tx: optax.GradientTransformation, clip_norm: float
) -> Step:
  """The train step of ``--layerwise``, clipping by the previous step's norm (layerwise.py)."""
  block_graphdef = nnx.split(nnx.eval_shape(lambda: Block(config, nnx.Rngs(0))))[0]
  layer_step = layerwise.make_step(graphdef, block_graphdef, tx, clip_norm)

  def step_fn(state: TrainState, inputs, targets):
    params, opt_state, loss, norm = layer_step(state.params, state.opt_state, inputs, targets)
    return TrainState(state.step + 1, params, opt_state), {'loss': loss, 'grad_norm': norm}

  return step_fn
