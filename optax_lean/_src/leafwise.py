"""The per-leaf skeleton every update of the library shares.

An update walks the gradient tree leaf by leaf, with the matching leaves of
its state fields and the leaf's static plan (its subspace, or its subset-norm
rule), and stores what it computes back in the dtypes and shardings of what it
replaces. ``map_leaves`` is that walk, written once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from optax_lean._src import sharding


def map_leaves(
  update_leaf: Callable[..., tuple[Any, ...]],
  updates: optax.Updates,
  fields: Sequence[Any],
  plans: Sequence[Any],
  *,
  outputs_like: optax.Updates | None = None,
  cast_outputs: bool = True,
) -> tuple[optax.Updates, tuple[Any, ...]]:
  """Runs ``update_leaf`` on every leaf of ``updates`` and rebuilds the trees.

  Args:
    update_leaf: ``(index, g, *field_leaves, plan) -> (output, *new_field_leaves)``
      for the leaf at flat position ``index``. A field given as ``None`` hands
      ``None`` for every leaf; a new leaf returned as ``None`` (a field that is
      only read) stays ``None``.
    updates: The gradient tree.
    fields: State trees with ``updates``' structure (``None`` marks a leaf
      without that state), or ``None``.
    plans: One static plan per leaf (``None`` where there is none).
    outputs_like: The tree whose leaves the outputs are stored like; default
      ``updates``.
    cast_outputs: Whether outputs are stored like ``outputs_like``; without,
      they are returned as computed.

  Returns:
    ``(outputs, new_fields)``: the outputs in the dtype and sharding of
    ``outputs_like``'s leaves (an output returned as ``None`` stays ``None``),
    and each new field with every leaf stored like the one it replaces
    (``None`` stays ``None``; a field given as ``None`` comes back ``None``).
  """
  leaves, treedef = jax.tree.flatten(updates)
  likes = leaves if outputs_like is None else treedef.flatten_up_to(outputs_like)
  columns = [
    [None] * len(leaves) if field is None else treedef.flatten_up_to(field) for field in fields
  ]
  outputs, new_columns = [], [[] for _ in fields]
  for index, (g, like, plan, *olds) in enumerate(zip(leaves, likes, plans, *columns)):
    output, *news = update_leaf(index, g, *olds, plan)
    if output is not None and cast_outputs:
      output = sharding.cast_like(output, like)
    outputs.append(output)
    for column, old, new in zip(new_columns, olds, news):
      column.append(None if old is None or new is None else sharding.cast_like(new, old))
  unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
  new_fields = tuple(
    None if field is None else unflatten(column) for field, column in zip(fields, new_columns)
  )
  return unflatten(outputs), new_fields
