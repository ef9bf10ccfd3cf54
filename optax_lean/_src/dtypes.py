"""The dtypes optimizer maths runs in, and the complex-aware operations it needs.

States may be stored in bfloat16 or float16, but their maths runs in float32
(float64 when any operand is), as the moments of a half-precision model lose
too much in half-precision arithmetic; results are cast back to their storage
dtypes. Complex leaves keep complex maths (complex64, or complex128 when any
operand is 64-bit): first moments and bases are complex, second moments are
the real moving averages of :math:`|g|^2` (so they are stored in the real
counterpart of the leaf's dtype), and projections use the conjugate transpose.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike


def is_complex(dtype: DTypeLike) -> bool:
  """Whether ``dtype`` is a complex dtype."""
  return jnp.issubdtype(dtype, jnp.complexfloating)


def compute_dtype(*dtypes: DTypeLike) -> jnp.dtype:
  """The dtype of state maths for operands of ``dtypes``.

  float32, float64 if any operand is 64-bit; the complex counterpart of that
  when any operand is complex.
  """
  dtypes = [jnp.dtype(d) for d in dtypes]
  wide = any(d in (jnp.float64, jnp.complex128) for d in dtypes)
  if any(is_complex(d) for d in dtypes):
    return jnp.dtype(jnp.complex128 if wide else jnp.complex64)
  return jnp.dtype(jnp.float64 if wide else jnp.float32)


def real_dtype(dtype: DTypeLike) -> jnp.dtype:
  """The real counterpart of ``dtype`` (itself for real dtypes)."""
  return jnp.finfo(dtype).dtype if is_complex(dtype) else jnp.dtype(dtype)


def second_moment_dtype(leaf_dtype: DTypeLike, requested: DTypeLike | None) -> jnp.dtype:
  """A second moment's storage dtype: ``requested``, else the leaf's real counterpart."""
  return real_dtype(leaf_dtype if requested is None else requested)


def abs_sq(x: jax.Array) -> jax.Array:
  """:math:`|x|^2`, real for complex ``x``."""
  if is_complex(x.dtype):
    return jnp.square(jnp.real(x)) + jnp.square(jnp.imag(x))
  return jnp.square(x)


def adjoint(x: jax.Array) -> jax.Array:
  """The conjugate transpose of the last two axes (the transpose for real ``x``)."""
  x = jnp.swapaxes(x, -1, -2)
  return jnp.conj(x) if is_complex(x.dtype) else x


def conj(x: jax.Array) -> jax.Array:
  """The complex conjugate (``x`` itself for real ``x``)."""
  return jnp.conj(x) if is_complex(x.dtype) else x


def store(x: jax.Array, dtype: DTypeLike) -> jax.Array:
  """``x`` cast to a storage ``dtype``, dropping an (exactly zero) imaginary part."""
  if is_complex(x.dtype) and not is_complex(dtype):
    x = jnp.real(x)
  return x.astype(dtype)


def as_arrays(tree: Any) -> Any:
  """``tree`` with Python-number leaves as arrays (optax accepts ``{'w': 1.0}``)."""
  return jax.tree.map(lambda x: x if hasattr(x, 'dtype') else jnp.asarray(x), tree)
