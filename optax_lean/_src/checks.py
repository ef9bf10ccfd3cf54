"""Construction-time checks of hyperparameters, with errors that say the range.

Only concrete Python numbers are checked: under ``optax.inject_hyperparams``
the floats arrive as traced arrays and must stay free of Python branching.
Shape-defining integers (``rank``, ``update_proj_gap``, ``subset_size``) are
always concrete and always checked.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any


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


def positive_int(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is an ``int`` >= 1."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f'{name} must be an int >= 1, got {value!r}.')
  if value < 1:
    raise ValueError(f'{name} must be an int >= 1, got {value}.')


def one_of(name: str, value: Any, choices: Iterable[str]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f'{name} must be one of {choices}, got {value!r}.')


def is_zero(value: Any) -> bool:
  """Whether ``value`` is a concrete zero (a structural choice, e.g. b1 = 0)."""
  return _is_concrete(value) and value == 0
