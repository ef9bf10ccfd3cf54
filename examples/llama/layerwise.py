"""Per-layer updates for the scanned LLaMA: a train step that never holds the whole gradient.

``--layerwise`` (with ``--scan-layers``) replaces the trainer's step by one in
which each parameter is updated as soon as its gradient exists, as GaLore's
per-layer weight updates do:

1. The forward pass runs the blocks under ``jax.lax.scan`` and keeps only each
   block's input.
2. The head (final norm and output projection) takes its gradient from the
   loss and is updated at once.
3. A reverse ``jax.lax.scan`` over the blocks recomputes block ``i`` from its
   input, takes its vjp, updates block ``i``'s parameters from its slice of the
   optimizer state (``optax_lean.update_layer``; refreshes happen there, one
   layer's matrices at a time) and carries the activation cotangent down.
4. The embedding is updated last, from the cotangent that reaches it.

Only one block's gradient, recomputed activations and refresh work live at a
time. Global-norm clipping needs every gradient before any update, so here the
step is clipped by the *previous* step's global norm: ``scale = min(1, c /
norm_{t-1})`` (no clipping at the first step). The norm of the current step is
summed layer by layer on the way and stored for the next one. Without clipping
the step equals the trainer's ordinary one, up to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_lean

EMBED = 'embed'
BLOCKS = 'blocks'


class LayerwiseState(NamedTuple):
  """The optimizer state of a layerwise run.

  Attributes:
    blocks: The optimizer's state for the stacked blocks.
    head: Its state for every other parameter but the embedding.
    embed: Its state for the embedding.
    grad_norm: The previous step's global gradient norm (0 before the first).
  """

  blocks: Any
  head: Any
  embed: Any
  grad_norm: jax.Array


def parts(params: dict) -> tuple[Any, dict, dict]:
  """``params`` as ``(blocks, head, embed)``."""
  head = {k: v for k, v in params.items() if k not in (EMBED, BLOCKS)}
  return params[BLOCKS], head, {EMBED: params[EMBED]}


def init(tx: optax.GradientTransformation, params: dict) -> LayerwiseState:
  blocks, head, embed = parts(params)
  return LayerwiseState(tx.init(blocks), tx.init(head), tx.init(embed), jnp.zeros([], jnp.float32))


def state_sharding(tx: optax.GradientTransformation, params: dict, shardings: dict, replicated):
  """The shardings of ``init(tx, params)``, from those of the parameters."""
  return LayerwiseState(
    *(
      optax_lean.state_sharding(tx, part, shd) for part, shd in zip(parts(params), parts(shardings))
    ),
    replicated,
  )


def is_16_bit_float(x: Any) -> bool:
  """Whether ``x`` (an array or ``ShapeDtypeStruct``) holds 16-bit floats: bits on CPU."""
  return jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2


def _as_bits(tree: Any) -> Any:
  """On CPU, each 16-bit float leaf as its bits (``uint16``); other leaves as they are.

  The loops slice and write the stacks layer by layer. XLA's CPU backend has no
  bfloat16 dynamic-update-slice: it writes each layer through float32 copies of
  the whole stack. Their bits are written in place; what remains is one copy
  of each 16-bit stack, made where the loop starts. Other backends write
  bfloat16 in place, and keep the stacks as they are.
  """

  if jax.default_backend() != 'cpu':
    return tree

  bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16) if is_16_bit_float(x) else x
  return jax.tree.map(bits, tree)


def _from_bits(bits: Any, like: Any) -> Any:
  """The inverse of ``_as_bits``, with ``like``'s dtypes (arrays or ``ShapeDtypeStruct``)."""
  convert = lambda x, dtype: x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)
  return jax.tree.map(lambda x, y: convert(x, y.dtype), bits, like)


def _sum_of_squares(tree: Any) -> jax.Array:
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def _clip_by_previous_norm(clip_norm: float, grad_norm: jax.Array) -> Callable[[Any], Any]:
  """Scales gradients by ``min(1, clip_norm / grad_norm)``; no clipping when ``clip_norm`` is 0."""
  scale = jnp.float32(1.0)
  if clip_norm:
    scale = jnp.where(grad_norm > clip_norm, clip_norm / grad_norm, 1.0)
  return lambda grads: jax.tree.map(lambda g: (scale * g).astype(g.dtype), grads)


def _apply(tx: optax.GradientTransformation, grads: Any, state: Any, params: Any):
  """``(params, state)`` after one update from ``grads``."""
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def _update_blocks(
  tx: optax.GradientTransformation,
  block: Callable[[Any, jax.Array], jax.Array],
  clip: Callable[[Any], Any],
  blocks: Any,
  state: Any,
  block_inputs: jax.Array,
  cotangent: jax.Array,
  norm_sq: jax.Array,
) -> tuple[Any, Any, jax.Array, jax.Array]:
  """The stacked blocks updated from the top down, one layer's gradient at a time.

  Returns the blocks, their optimizer state, the cotangent of the first
  block's input and ``norm_sq`` plus the squared norm of every block gradient.
  """
  axes = optax_lean.layer_axes(tx, blocks)
  per_layer, shared = optax_lean.split_layers(state, axes)

  # The blocks and their state are updated in place, in the loop's carry: one
  # copy of each, whatever the number of layers (16-bit floats as their bits).
  like = (blocks, per_layer)

  def backward(carry, layer):
    cotangent, norm_sq, blocks, per_layer, _ = carry
    index, input_i = layer
    params_i, state_i = _from_bits(jax.tree.map(lambda x: x[index], (blocks, per_layer)), like)
    _, block_vjp = jax.vjp(block, params_i, input_i)
    grads_i, cotangent = block_vjp(cotangent)
    updates_i, state_i, stepped = optax_lean.update_layer(
      tx, clip(grads_i), state_i, shared, axes, params_i, index=index
    )
    write = lambda stack, value: jax.tree.map(
      lambda x, y: x.at[index].set(y), stack, _as_bits(value)
    )
    blocks = write(blocks, optax.apply_updates(params_i, updates_i))
    per_layer = write(per_layer, state_i)
    return (cotangent, norm_sq + _sum_of_squares(grads_i), blocks, per_layer, stepped), None

  layers = jnp.arange(jax.tree.leaves(blocks)[0].shape[0])
  carry = (cotangent, norm_sq, *_as_bits((blocks, per_layer)), shared)
  carry, _ = jax.lax.scan(backward, carry, (layers, block_inputs), reverse=True)
  cotangent, norm_sq, *bits, shared = carry  # every layer steps `shared` alike
  blocks, per_layer = _from_bits(tuple(bits), like)
  return blocks, optax_lean.merge_layers(per_layer, shared, axes), cotangent, norm_sq


def make_step(
  graphdef: nnx.GraphDef,
  block_graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  clip_norm: float,
) -> Callable[..., tuple[dict, LayerwiseState, jax.Array, jax.Array]]:
  """The layerwise step: ``(params, state, inputs, targets) -> (params, state, loss, norm)``."""

  def model(head: dict, embed: dict, blocks: Any):
    return nnx.merge(graphdef, {**head, **embed, BLOCKS: blocks})

  def block(layer_params: Any, x_BTD: jax.Array) -> jax.Array:
    return nnx.merge(block_graphdef, layer_params)(x_BTD)

  def head_loss(head: dict, embed: dict, blocks: Any, x_BTD: jax.Array, targets) -> jax.Array:
    net = model(head, embed, blocks)
    projection = net.embed.attend if net.config.tie_embeddings else net.lm_head
    logits = projection(net.final_norm(x_BTD)).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def step(params: dict, state: LayerwiseState, inputs, targets):
    blocks, head, embed = parts(params)
    clip = _clip_by_previous_norm(clip_norm, state.grad_norm)

    x0, embed_vjp = jax.vjp(lambda e: model(head, e, blocks).embed(inputs), embed)
    keep_input = lambda x, layer: (block(_from_bits(layer, blocks), x), x)
    x_last, block_inputs = jax.lax.scan(keep_input, x0, _as_bits(blocks))

    loss, head_vjp = jax.vjp(
      lambda h, e, x: head_loss(h, e, blocks, x, targets), head, embed, x_last
    )
    head_grads, tied_grads, cotangent = head_vjp(jnp.ones_like(loss))
    norm_sq = _sum_of_squares(head_grads)
    head, head_state = _apply(tx, clip(head_grads), state.head, head)

    blocks, blocks_state, cotangent, norm_sq = _update_blocks(
      tx, block, clip, blocks, state.blocks, block_inputs, cotangent, norm_sq
    )

    (embed_grads,) = embed_vjp(cotangent)
    embed_grads = jax.tree.map(jnp.add, embed_grads, tied_grads)
    norm_sq = norm_sq + _sum_of_squares(embed_grads)
    embed, embed_state = _apply(tx, clip(embed_grads), state.embed, embed)

    grad_norm = jnp.sqrt(norm_sq)
    new_state = LayerwiseState(blocks_state, head_state, embed_state, grad_norm)
    return {**head, **embed, BLOCKS: blocks}, new_state, loss, grad_norm

  return step
