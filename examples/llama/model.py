"""A LLaMA decoder in flax.nnx, with 2-D ``(in, out)`` kernels throughout.

RMSNorm, rotary position embeddings, SwiGLU MLP, causal attention with optional
grouped-query heads, no biases, and an untied (or tied) output head. With
``scan_layers`` the blocks are created by ``nnx.vmap`` and run by ``nnx.scan``,
so every block parameter gains a leading layer axis: kernels become
``(layers, in, out)``, which optimizers read with
``optax_lean.DimensionNumbers(1, 2)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from examples.llama.configs import LlamaConfig
from examples.llama.rso_layers import RSOLinear


def dense(n_in: int, n_out: int, rngs: nnx.Rngs, config: LlamaConfig) -> nnx.Module:
  """A bias-free linear layer; with ``config.rso_rank``, an RSO layer (see rso_layers.py)."""
  dtype, param_dtype = jnp.dtype(config.compute_dtype), jnp.dtype(config.param_dtype)
  if config.rso_rank:
    return RSOLinear(n_in, n_out, config.rso_rank, rngs, dtype, param_dtype)
  return nnx.Linear(
    n_in,
    n_out,
    use_bias=False,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=nnx.initializers.normal(0.02),
    rngs=rngs,
  )


def rope(x_BTHD: jax.Array, theta: float) -> jax.Array:
  """Rotates the two halves of each head by position-dependent angles."""
  seq_len, head_dim = x_BTHD.shape[1], x_BTHD.shape[-1]
  freqs = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles_TD = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(angles_TD)[None, :, None, :], jnp.cos(angles_TD)[None, :, None, :]
  first, second = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x_BTHD.dtype)


class Attention(nnx.Module):
  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    head_dim = config.head_dim
    self.config = config
    self.q = dense(config.dim, config.n_heads * head_dim, rngs, config)
    self.k = dense(config.dim, config.kv_heads * head_dim, rngs, config)
    self.v = dense(config.dim, config.kv_heads * head_dim, rngs, config)
    self.o = dense(config.n_heads * head_dim, config.dim, rngs, config)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    batch, seq_len, _ = x_BTD.shape
    c = self.config
    q_BTHD = self.q(x_BTD).reshape(batch, seq_len, c.n_heads, c.head_dim)
    k_BTKD = self.k(x_BTD).reshape(batch, seq_len, c.kv_heads, c.head_dim)
    v_BTKD = self.v(x_BTD).reshape(batch, seq_len, c.kv_heads, c.head_dim)
    out_BTHD = jax.nn.dot_product_attention(
      rope(q_BTHD, c.rope_theta), rope(k_BTKD, c.rope_theta), v_BTKD, is_causal=True
    )
    return self.o(out_BTHD.reshape(batch, seq_len, c.n_heads * c.head_dim))


class MLP(nnx.Module):
  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.gate = dense(config.dim, config.ffn_dim, rngs, config)
    self.up = dense(config.dim, config.ffn_dim, rngs, config)
    self.down = dense(config.ffn_dim, config.dim, rngs, config)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD))


def rms_norm(config: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(
    config.dim,
    epsilon=config.norm_eps,
    dtype=jnp.dtype(config.compute_dtype),
    param_dtype=jnp.dtype(config.param_dtype),
    rngs=rngs,
  )


class Block(nnx.Module):
  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.attn_norm = rms_norm(config, rngs)
    self.attn = Attention(config, rngs)
    self.mlp_norm = rms_norm(config, rngs)
    self.mlp = MLP(config, rngs)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD))
    return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class Llama(nnx.Module):
  """Token ids ``(batch, time)`` to next-token logits ``(batch, time, vocab)``."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(
      config.vocab_size,
      config.dim,
      dtype=jnp.dtype(config.compute_dtype),
      param_dtype=jnp.dtype(config.param_dtype),
      embedding_init=nnx.initializers.normal(0.02),
      rngs=rngs,
    )
    if config.scan_layers:

      @nnx.split_rngs(splits=config.n_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def stacked_blocks(rngs: nnx.Rngs) -> Block:
        return Block(config, rngs)

      self.blocks = stacked_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(config, rngs) for _ in range(config.n_layers)])
    self.final_norm = rms_norm(config, rngs)
    if not config.tie_embeddings:
      self.lm_head = dense(config.dim, config.vocab_size, rngs, config)

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    x_BTD = self.embed(tokens_BT)
    if self.config.scan_layers:

      def run_block(x_BTD: jax.Array, block: Block) -> jax.Array:
        return block(x_BTD)

      if self.config.remat:
        # The backward pass recomputes each block from its input: one layer's
        # weights and activations live at a time, as FSDP needs.
        run_block = nnx.remat(run_block, policy=jax.checkpoint_policies.nothing_saveable)
      x_BTD = nnx.scan(run_block, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x_BTD, self.blocks)
    else:
      for block in self.blocks:
        x_BTD = block(x_BTD)
    x_BTD = self.final_norm(x_BTD)
    head = self.embed.attend if self.config.tie_embeddings else self.lm_head
    logits_BTV = head(x_BTD)
    return logits_BTV.astype(jnp.float32)
