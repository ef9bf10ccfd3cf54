"""One Adam step in either of the two flavours the official codes use.

Hugging Face's AdamW (GaLore, SN-SM, OSD) adds ``eps`` to the root of the
*uncorrected* second moment and folds both bias corrections into the step
size; PyTorch's and optax's Adam (LDAdam, RSO's inner solver) add ``eps`` to the
root of the corrected one:

.. math::
  d_\\text{hf} = \\frac{\\sqrt{1-\\beta_2^t}}{1-\\beta_1^t}
    \\frac{m_t}{\\sqrt{v_t} + \\epsilon}, \\qquad
  d_\\text{torch} = \\frac{m_t / (1-\\beta_1^t)}{\\sqrt{v_t / (1-\\beta_2^t)} + \\epsilon}.

The helper works on moments of any shape (full, low-rank, a projector's), so
every optimizer of the family shares one implementation of Adam. As in optax,
complex gradients are supported: the second moment averages :math:`|g|^2`.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp

from optax_lean._src import checks, dtypes

Flavour = typing.Literal['hf', 'torch']
FLAVOURS: tuple[str, ...] = typing.get_args(Flavour)


def validate_adam(
  b1: jax.typing.ArrayLike, b2: jax.typing.ArrayLike, eps: jax.typing.ArrayLike, prefix: str = ''
) -> None:
  """The official ``AdamW`` checks: ``0 <= b1, b2 < 1`` and ``eps >= 0``."""
  checks.in_interval(f'{prefix}b1', b1, 0.0, 1.0)
  checks.in_interval(f'{prefix}b2', b2, 0.0, 1.0)
  checks.non_negative(f'{prefix}eps', eps)


def adam_step(
  g: jax.Array,
  mu: jax.Array,
  nu: jax.Array,
  count_inc: jax.Array,
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  flavour: Flavour,
  *,
  correct_bias: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Updates the moments with ``g`` and returns ``(direction, mu, nu)``.

  Args:
    g: The gradient (or its projection), in any float or complex dtype.
    mu: First moment, of ``g``'s shape, in any float or complex dtype.
    nu: Second moment, of ``g``'s shape, real.
    count_inc: The 1-based step ``t`` of the bias corrections.
    b1: First-moment decay.
    b2: Second-moment decay.
    eps: The denominator's offset.
    flavour: ``'hf'`` or ``'torch'`` (see the module docstring).
    correct_bias: ``False`` drops the bias corrections, :math:`m_t /
      (\sqrt{v_t} + \epsilon)` (Hugging Face's ``correct_bias=False``).

  Returns:
    The (bias-corrected) direction and the new moments in their compute dtype
    (``dtypes.compute_dtype``; the second moment in its real counterpart):
    the caller casts them back to their storage dtypes.
  """
  checks.one_of('flavour', flavour, FLAVOURS)
  dtype = dtypes.compute_dtype(g.dtype, mu.dtype, nu.dtype)
  real = dtypes.real_dtype(dtype)
  g = g.astype(dtype)
  b1, b2, eps = (jnp.asarray(x, real) for x in (b1, b2, eps))
  mu = b1.astype(dtype) * mu.astype(dtype) + (1 - b1).astype(dtype) * g
  nu = b2 * dtypes.store(nu, real) + (1 - b2) * dtypes.abs_sq(g)
  t = count_inc.astype(real)
  correction1, correction2 = 1 - b1**t, 1 - b2**t
  if not correct_bias:
    direction = mu / (jnp.sqrt(nu) + eps).astype(dtype)
  elif flavour == 'hf':
    scale = jnp.sqrt(correction2) / correction1
    direction = scale.astype(dtype) * (mu / (jnp.sqrt(nu) + eps).astype(dtype))
  else:
    direction = (mu / correction1.astype(dtype)) / (jnp.sqrt(nu / correction2) + eps).astype(dtype)
  return direction, mu, nu
