"""Construction-time checks of hyperparameters, with errors that say the range.

Only concrete Python numbers are checked: under ``optax.inject_hyperparams``
the floats arrive as traced arrays and must stay free of Python branching.
Shape-defining integers (``rank``, an integer ``subset_size``) must be concrete
Python ints; an array there gets an error that says how to keep it static.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_concrete(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def in_interval(
  name: str,
  value: Any,
  low: float,
  high: float,
  *,
  include_high: bool = False,
) -> None:
  """Raises ``ValueError`` unless ``low <= value < high`` (or ``<= high``)."""
  if not _is_concrete(value):
    return
  ok = low <= value <= high if include_high else low <= value < high
  if not ok:
    bracket = ']' if include_high else ')'
    raise ValueError(f'{name} must be in [{low}, {high}{bracket}, got {value}.')


def non_negative(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value >= 0``."""
  if _is_concrete(value) and value < 0:
    raise ValueError(f'{name} must be >= 0, got {value}.')


def positive(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value > 0``."""
  if _is_concrete(value) and not value > 0:
    raise ValueError(f'{name} must be > 0, got {value}.')


def positive_int(name: str, value: Any, *, static_args: tuple[str, ...] | None = None) -> None:
  """Raises ``ValueError`` unless ``value`` is a Python ``int`` >= 1.

  For shape-defining integers (``rank``): an array here is what
  ``optax.inject_hyperparams`` makes of a number it was not told is static;
  the error then names the ``static_args`` to pass (default: ``name`` and
  ``update_proj_gap``, for the methods that refresh).
  """
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    raise static_error(name, 'a Python int >= 1', static_args or (name, 'update_proj_gap'))
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f'{name} must be an int >= 1, got {value!r}.')
  if value < 1:
    raise ValueError(f'{name} must be an int >= 1, got {value}.')


def static_error(name: str, expected: str, static_args: tuple[str, ...]) -> ValueError:
  """The error for an array where a static Python value is needed."""
  return ValueError(
    f'{name} must be {expected}, got an array: optax.inject_hyperparams turns numbers '
    'and schedules into arrays unless told otherwise; pass '
    f'static_args={static_args!r}.'
  )


def positive_count(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is an int >= 1 or an integer array.

  For integers used only in traced arithmetic (``update_proj_gap``), which
  ``optax.inject_hyperparams`` may turn into arrays; a concrete value is still
  checked.
  """
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    if not jnp.issubdtype(jnp.result_type(value), jnp.integer) or jnp.ndim(value) != 0:
      raise ValueError(f'{name} must be an int >= 1 or an integer scalar, got {value!r}.')
    if not isinstance(value, jax.core.Tracer) and int(value) < 1:
      raise ValueError(f'{name} must be an int >= 1, got {int(value)}.')
    return
  positive_int(name, value)


def refresh_gap(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is a refresh schedule or a valid ``positive_count``.

  A schedule is any callable (``count -> bool``). ``optax.inject_hyperparams``
  calls the callables it is given and passes on their values: a boolean array
  here is such a value, and the error names the ``static_args`` to pass.
  """
  if callable(value):
    return
  if isinstance(value, (jax.Array, np.ndarray, np.generic)) and jnp.issubdtype(
    jnp.result_type(value), jnp.bool_
  ):
    raise static_error(name, 'an int >= 1 or a refresh schedule', (name,))
  positive_count(name, value)


def one_of(name: str, value: Any, choices: Iterable[str]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f'{name} must be one of {choices}, got {value!r}.')


def is_zero(value: Any) -> bool:
  """Whether ``value`` is a concrete zero (a structural choice, e.g. b1 = 0)."""
  return _is_concrete(value) and value == 0
