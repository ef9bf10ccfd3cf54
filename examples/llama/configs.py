"""Named model sizes: a CPU demo, CI toys, and the papers' LLaMA-on-C4 sizes.

The paper sizes (60m ... 7b) are those of the GaLore / SN-SM benchmark harness
(vocabulary 32000, sequence length 256); the small ones train with the
vocabulary of the run's tokenizer (``vocab_size``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A LLaMA decoder: RMSNorm, RoPE, SwiGLU, causal (grouped-query) attention."""

  vocab_size: int = 256
  dim: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int | None = None  # None: as many as n_heads (no grouping)
  ffn_dim: int = 384
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  scan_layers: bool = False
  remat: bool = False  # with scan_layers: keep only each block's input, recompute the rest
  compute_dtype: str = 'float32'  # the matmuls and activations
  param_dtype: str = 'float32'  # the parameters as stored and trained
  rso_rank: int | None = None  # train linear layers through rank-r factors (rso_layers.py)

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  def validate(self) -> None:
    if self.dim % self.n_heads:
      raise ValueError(f'dim {self.dim} is not divisible by n_heads {self.n_heads}')
    if self.n_heads % self.kv_heads:
      raise ValueError(f'n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}')


CONFIGS = {
  'toy': LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_dim=64),
  'tiny': LlamaConfig(vocab_size=256, dim=128, n_layers=4, n_heads=4, ffn_dim=384),
  '5m': LlamaConfig(vocab_size=256, dim=256, n_layers=6, n_heads=8, ffn_dim=688),
  '20m': LlamaConfig(vocab_size=256, dim=512, n_layers=6, n_heads=8, ffn_dim=1376),
  '60m': LlamaConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, ffn_dim=1376),
  '130m': LlamaConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_dim=2048),
  '350m': LlamaConfig(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, ffn_dim=2736),
  '1b': LlamaConfig(vocab_size=32000, dim=2048, n_layers=24, n_heads=32, ffn_dim=5461),
  '7b': LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008),
}

# The sizes that train with their run's tokenizer's vocabulary (bytes, or a BPE of the corpus).
TOKENIZER_VOCABULARY = ('toy', 'tiny', '5m', '20m')


def vocab_size(name: str, tokenizer_vocab_size: int) -> int:
  """The vocabulary config ``name`` trains with, given its run's tokenizer."""
  return tokenizer_vocab_size if name in TOKENIZER_VOCABULARY else CONFIGS[name].vocab_size


def get_config(name: str, **overrides) -> LlamaConfig:
  """A named config with field overrides; ``ValueError`` for an unknown name."""
  if name not in CONFIGS:
    raise ValueError(f'unknown config {name!r}; choose one of {", ".join(CONFIGS)}')
  config = dataclasses.replace(CONFIGS[name], **overrides)
  config.validate()
  return config
