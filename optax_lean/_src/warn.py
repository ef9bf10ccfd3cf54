"""Warnings that point at the user's line, reported once each.

A warning about a leaf is raised deep inside ``tx.init``, under optax's
``chain``, JAX's ``jit`` or ``eval_shape`` and perhaps ``nnx.Optimizer``. A fixed
``stacklevel`` would name one of those library lines; ``warn`` instead names the
first frame outside optax_lean, optax, JAX, chex and Flax: the user's call.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

_LIBRARIES = ('optax_lean', 'optax', 'jax', 'jaxlib', 'chex', 'flax')


def _library_dirs() -> tuple[str, ...]:
  dirs = []
  for name in _LIBRARIES:
    module = sys.modules.get(name)
    if module is not None and getattr(module, '__file__', None):
      dirs.append(os.path.dirname(module.__file__) + os.sep)
  return tuple(dirs)


def _is_internal(filename: str, library_dirs: tuple[str, ...]) -> bool:
  return filename.startswith(library_dirs) or os.path.basename(filename) == 'contextlib.py'


def warn(message: str, category: type[Warning] = UserWarning) -> None:
  """``warnings.warn`` attributed to the first frame outside the libraries."""
  library_dirs = _library_dirs()
  frame = sys._getframe(1)
  level = 2
  while frame is not None and _is_internal(frame.f_code.co_filename, library_dirs):
    frame = frame.f_back
    level += 1
  warnings.warn(message, category, stacklevel=level)


@contextlib.contextmanager
def once() -> Iterator[None]:
  """Reports each distinct warning raised inside the block once, where it pointed.

  Transformations built from parts that share a ``mask`` (``scale_by_ratio``)
  would otherwise warn about the same leaf once per part.
  """
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    yield
  seen = set()
  for record in caught:
    key = (str(record.message), record.category)
    if key in seen:
      continue
    seen.add(key)
    warnings.warn_explicit(
      record.message, record.category, record.filename, record.lineno, source=record.source
    )
