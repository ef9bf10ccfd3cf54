"""How many bytes an optimizer state holds, in total and by part.

Works on real states and on ``jax.eval_shape(tx.init, params)`` alike, so the
memory of any optimizer at any model size can be read without allocating it.
"""

from __future__ import annotations

import math
from typing import Any

import jax


def _nbytes(leaf: Any) -> int:
  return math.prod(leaf.shape) * leaf.dtype.itemsize


def state_bytes(state: Any) -> int:
  """Total bytes of the arrays (or shape-dtype structs) in ``state``.

  Args:
    state: An optimizer state, or its ``jax.eval_shape``.

  Returns:
    The sum over leaves of ``size * itemsize``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_lean
    >>> params = {'w': jnp.zeros((512, 512))}
    >>> optax_lean.state_bytes(jax.eval_shape(optax.adam(1e-3).init, params))
    2097156
  """
  return sum(_nbytes(leaf) for leaf in jax.tree.leaves(state))


def state_bytes_by_leaf(state: Any) -> dict[str, int]:
  """Bytes of each leaf of ``state``, keyed by its path.

  Args:
    state: An optimizer state, or its ``jax.eval_shape``.

  Returns:
    A dict from each leaf's path (``jax.tree_util.keystr``) to its bytes, in
    leaf order.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_lean
    >>> params = {'w': jnp.zeros((512, 256))}
    >>> state = jax.eval_shape(optax_lean.rmsprop_sn(1e-2).init, params)
    >>> optax_lean.state_bytes_by_leaf(state)
    {'[0].count': 4, "[0].nu['w']": 2048, '[2].count': 4}
  """
  return {
    jax.tree_util.keystr(path): _nbytes(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
  }


def state_bytes_by_kind(state: Any) -> dict[str, int]:
  """Bytes of ``state`` grouped by the state field that holds each leaf.

  The kind of a leaf is the name of the innermost named field on its path:
  ``mu`` (first moment / momentum), ``nu`` (second moment), ``projector``,
  ``count``, and so on for any optax state.

  Args:
    state: An optimizer state, or its ``jax.eval_shape``.

  Returns:
    A dict from field name to bytes, largest first.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_lean
    >>> params = {'w': jnp.zeros((512, 256))}
    >>> tx = optax_lean.adamsnsm(1e-2, rank=32)
    >>> optax_lean.state_bytes_by_kind(jax.eval_shape(tx.init, params))
    {'mu': 65536, 'projector': 32768, 'nu': 2048, 'count': 12}
  """
  totals: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
    kind = names[-1] if names else 'other'
    totals[kind] = totals.get(kind, 0) + _nbytes(leaf)
  return dict(sorted(totals.items(), key=lambda item: -item[1]))
