"""8-bit optimizer states: block-wise dynamic quantisation of moments.

Dettmers et al.'s 8-bit optimizers keep each moment as one byte per number and
one float32 scale per block: a block is divided by its largest magnitude, and
each normalised value is stored as the index of the nearest value of a fixed
256-entry map. The map is *dynamic*: its values spread over several decades,
so that small moments keep a relative precision that a linear map would lose.

``dynamic_map`` builds that map from the paper's dynamic tree quantisation:
after an optional sign bit, the number of leading zero bits ``k`` is a decimal
exponent, the first one bit ends it, and the remaining bits divide ``[0.1, 1]``
into equal bins, whose midpoints times ``10^-k`` are the map's values; ``0`` and
``1`` complete it (a block's largest magnitude is stored exactly). Second
moments, never negative, use the unsigned map and so one more bit of fraction.

Blocks run along a leaf's last axis, so the codes keep the leaf's shape (and
its sharding) and the scales its leading axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_lean._src import checks, sharding

# The exponent bits of the 8-bit map: decades 10^0 .. 10^-6.
_DECADES = 7


@functools.cache
def dynamic_map(signed: bool) -> np.ndarray:
  """The 256 sorted values of the 8-bit dynamic tree map (float32), ``0`` and ``1`` included.

  Args:
    signed: A sign bit and 6 further bits (first moments), or 7 further bits
      (non-negative second moments).

  Returns:
    A sorted ``float32`` array of 256 distinct values in ``[-1, 1]``.
  """
  fraction_bits = 6 if signed else 7
  values = [0.0, 1.0]
  for exponent in range(_DECADES):
    bins = 2 ** (fraction_bits - exponent)
    edges = np.linspace(0.1, 1.0, bins + 1)
    magnitudes = 10.0**-exponent * (edges[:-1] + edges[1:]) / 2
    values += list(magnitudes) + (list(-magnitudes) if signed else [])
  table = np.array(sorted(values), np.float32)
  assert table.size == 256 and np.unique(table).size == 256
  return table


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=('codes', 'scales'), meta_fields=('signed', 'dtype')
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A float array as 8-bit codes and one scale per block of its last axis.

  Attributes:
    codes: ``uint8``, the array's shape: indices into ``dynamic_map(signed)``.
    scales: ``float32``, ``(*shape[:-1], blocks)``: each block's largest magnitude.
    signed: Which map the codes index.
    dtype: The dtype the array dequantises to.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from optax_lean import quantize_state
    >>> state = quantize_state(optax.adam(1e-3), min_size=16).init({'w': jnp.ones((4, 300))})
    >>> moment = state.inner[0].nu['w']
    >>> moment.codes.shape, moment.scales.shape, moment.signed
    ((4, 300), (4, 2), False)
  """

  codes: jax.Array
  scales: jax.Array
  signed: bool
  dtype: str


def _blocks(n: int, block_size: int) -> int:
  return max(1, math.ceil(n / block_size))


def _blocked(x: jax.Array, block_size: int) -> jax.Array:
  """``x``'s last axis as ``(blocks, block_size)``, zero-padded at the end."""
  n = x.shape[-1]
  blocks = _blocks(n, block_size)
  size = min(block_size, n)
  padding = blocks * size - n
  if padding:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padding)])
  return x.reshape(*x.shape[:-1], blocks, size)


def _unblocked(x: jax.Array, n: int) -> jax.Array:
  return x.reshape(*x.shape[:-2], -1)[..., :n]


def _lookup(table: jax.Array, indices: jax.Array) -> jax.Array:
  """``table[indices]``, laid out like ``indices`` under an Explicit mesh."""
  layout = sharding.explicit_sharding(indices)
  return table[indices] if layout is None else table.at[indices].get(out_sharding=layout)


def _nearest(table: np.ndarray, values: jax.Array) -> jax.Array:
  """The index of the entry of the sorted ``table`` nearest each of ``values``.

  A binary search over the midpoints between neighbouring entries: the answer
  is how many midpoints lie below the value, found one bit at a time (256
  entries, 8 steps), with gathers that keep the values' sharding.
  """
  midpoints = np.append((table[:-1] + table[1:]) / 2, np.inf).astype(table.dtype)  # 256
  # The first bit compares with one midpoint: no gather of constant indices.
  index = jnp.where(midpoints[127] < values, 128, 0).astype(jnp.int32)
  midpoints = jnp.asarray(midpoints)
  for bit in reversed(range(7)):
    candidate = index + (1 << bit)
    index = jnp.where(_lookup(midpoints, candidate - 1) < values, candidate, index)
  return index


def quantize(x: jax.Array, *, signed: bool, block_size: int) -> QuantizedArray:
  """``x`` (at least 1-D, real) as 8-bit codes of the nearest map values, block by block."""
  # The barrier keeps XLA from folding a constant input (a fresh state's zeros)
  # into constants the size of the leaf at compile time.
  blocks = _blocked(jax.lax.optimization_barrier(x.astype(jnp.float32)), block_size)
  scales = jnp.max(jnp.abs(blocks), axis=-1)
  normalised = blocks / jnp.where(scales == 0, 1.0, scales)[..., None]
  codes = _nearest(dynamic_map(signed), normalised).astype(jnp.uint8)
  return QuantizedArray(_unblocked(codes, x.shape[-1]), scales, signed, jnp.dtype(x.dtype).name)


def dequantize(q: QuantizedArray, block_size: int) -> jax.Array:
  """The array ``q`` stands for: each code's map value times its block's scale."""
  values = _lookup(jnp.asarray(dynamic_map(q.signed)), q.codes.astype(jnp.int32))
  values = _blocked(values, block_size) * q.scales[..., None]
  return _unblocked(values, q.codes.shape[-1]).astype(q.dtype)


class QuantizedState(NamedTuple):
  """``quantize_state``'s state: the inner state with its moments as ``QuantizedArray``\\ s.

  Attributes:
    inner: The wrapped transformation's state; each quantised leaf is a
      ``QuantizedArray``.
  """

  inner: optax.OptState


_is_quantized = lambda x: isinstance(x, QuantizedArray)


def _field_names(path: tuple[Any, ...]) -> set[str]:
  return {key.name for key in path if isinstance(key, jax.tree_util.GetAttrKey)}


def quantize_state(
  inner: optax.GradientTransformation,
  *,
  block_size: int = 256,
  min_size: int = 4096,
  signed_fields: Sequence[str] = ('mu', 'ema'),
  unsigned_fields: Sequence[str] = ('nu',),
) -> optax.GradientTransformationExtraArgs:
  """Keeps ``inner``'s moments in 8 bits between steps (Dettmers et al.'s 8-bit states).

  Each real floating leaf of ``inner``'s state under a field named in
  ``signed_fields`` (first moments) or ``unsigned_fields`` (second moments,
  never negative), with at least ``min_size`` numbers, is stored as one
  ``uint8`` code per number and one float32 scale per block of ``block_size``
  numbers along its last axis: :math:`x \\approx s_b\\, q[c]`, with :math:`s_b`
  the block's largest magnitude and :math:`q` the 256-value dynamic tree map
  (``dynamic_map``). The update dequantises them, runs ``inner``, and stores the
  new moments quantised to the nearest map value. Other leaves (step counts,
  keys, projector bases, small or complex leaves) are kept as they are.

  A moment of ``n`` numbers then costs ``n + 4 n / block_size`` bytes instead of
  ``4 n``. The codes keep the moment's shape, and so its sharding.

  Args:
    inner: Any optax transformation whose moments are named like optax's
      (``optax.adamw``'s ``mu`` and ``nu``, ``optax.ema``'s ``ema``, as in
      ``optax.adafactor``'s momentum, and every optax_lean optimizer's).
    block_size: Numbers per scale along the last axis (a leaf with fewer has
      one block per row).
    min_size: Leaves with fewer numbers at ``init`` stay in their own dtype
      (a layer's slice of a quantised stack stays quantised).
    signed_fields: State fields quantised with the signed map.
    unsigned_fields: State fields quantised with the unsigned map: their
      values must not be negative.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    ``QuantizedState``.

  References:
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, 2022.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_lean
    >>> tx = optax_lean.quantize_state(optax.adamw(1e-3), min_size=16)
    >>> state = tx.init({'w': jnp.ones((8, 512))})
    >>> state.inner[0].mu['w'].codes.dtype, state.inner[0].mu['w'].scales.shape
    (dtype('uint8'), (8, 2))
  """
  checks.positive_int('block_size', block_size)
  checks.positive_int('min_size', min_size)
  overlap = set(signed_fields) & set(unsigned_fields)
  if overlap:
    raise ValueError(f'quantize_state: fields {sorted(overlap)} are both signed and unsigned.')
  inner = optax.with_extra_args_support(inner)

  def signedness(path: tuple[Any, ...], leaf: Any) -> bool | None:
    """Whether the leaf is quantised with the signed map, or ``None`` if it is kept."""
    fields = _field_names(path)
    dtype = getattr(leaf, 'dtype', None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or jnp.ndim(leaf) == 0:
      return None
    if math.prod(jnp.shape(leaf)) < min_size:
      return None
    if fields & set(unsigned_fields):
      return False
    if fields & set(signed_fields):
      return True
    return None

  def pack(state: optax.OptState) -> optax.OptState:
    def one(path, leaf):
      signed = signedness(path, leaf)
      return leaf if signed is None else quantize(leaf, signed=signed, block_size=block_size)

    return jax.tree_util.tree_map_with_path(one, state)

  def unpack(state: optax.OptState) -> optax.OptState:
    return jax.tree.map(
      lambda x: dequantize(x, block_size) if _is_quantized(x) else x, state, is_leaf=_is_quantized
    )

  def repack(old: optax.OptState, new: optax.OptState) -> optax.OptState:
    """``new`` with each leaf quantised as ``old``'s was: the state keeps its structure."""

    def one(was, leaf):
      if not _is_quantized(was):
        return leaf
      return dataclasses.replace(
        quantize(leaf, signed=was.signed, block_size=block_size), dtype=was.dtype
      )

    return jax.tree.map(one, old, new, is_leaf=_is_quantized)

  def init_fn(params):
    return QuantizedState(pack(inner.init(params)))

  def update_fn(updates, state, params=None, **extra_args):
    updates, new_inner = inner.update(updates, unpack(state.inner), params, **extra_args)
    return updates, QuantizedState(repack(state.inner, new_inner))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
