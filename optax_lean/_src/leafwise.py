"""The per-leaf skeleton every update of the library shares.

An update walks the gradient tree leaf by leaf, with the matching leaves of
its state fields and the leaf's static plan (its subspace, or its subset-norm
rule), and stores what it computes back in the dtypes and shardings of what it
replaces. ``map_leaves`` is that walk, written once.

Leaves that are separate arrays (a model without scanned layers) have no loop
to order their updates, and XLA's schedulers are free to run them side by
side, or to start the work that reads the state alone (a random basis drawn
from a stored key, a moment rotated into a new basis) while backpropagation
is still running. Each leaf's temporaries are then live at once. With
``in_sequence`` every leaf's inputs are made to depend on the previous leaf's
output (``after``), so one leaf's temporaries are live at a time. Only
separate matrices need it (``gated``): a stack walked by a loop
(``walk.map_matrices``) already takes its matrices in turn, and a leaf with an
elementwise update (a norm scale, an embedding under Adam) is best updated as
soon as its gradient is ready, which a gate would delay to the end of the
walk, holding its gradient meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_lean._src import sharding


def _summary(x: jax.Array) -> jax.Array | None:
  """A scalar that reads every entry of ``x`` (``None`` if it has none).

  A reduction, not one entry: slicing a sharded axis is refused on Explicit
  meshes, while a reduction's all-reduce is one scalar.
  """
  if x.size == 0:
    return None
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return jnp.max(jnp.real(x))


def token_of(tree: Any) -> jax.Array | None:
  """An ``int32`` zero that XLA cannot compute before ``tree``'s first non-empty leaf.

  It is one bit of the leaf's maximum (whether it is NaN, or its lowest bit)
  shifted out: zero whatever the leaf holds, but not known to be zero at
  compile time, so it carries a data dependency without changing any value.
  """
  for leaf in jax.tree.leaves(tree):
    summary = _summary(leaf)
    if summary is not None:
      if jnp.issubdtype(summary.dtype, jnp.inexact):
        bit = jnp.isnan(summary).astype(jnp.int32)
      else:
        bit = summary.astype(jnp.int32) & 1
      return jnp.right_shift(bit, 1)
  return None


def after(token: jax.Array | None, tree: Any) -> Any:
  """``tree`` unchanged, bit for bit, but computed after ``token`` (from ``token_of``).

  Each array has the zero ``token`` subtracted (``x - 0`` keeps every value,
  a negative zero and NaN included), or XOR-ed in (booleans), or subtracted
  from its key data (PRNG keys).
  """
  if token is None:
    return tree

  def depend(x):
    if x is None:
      return None
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.random.key_data(x)
      return jax.random.wrap_key_data(data - token.astype(data.dtype), impl=jax.random.key_impl(x))
    if x.dtype == jnp.bool_:
      return x ^ token.astype(jnp.bool_)
    return x - token.astype(x.dtype)

  return jax.tree.map(depend, tree)


def gated(plans: Sequence[Any]) -> list[bool]:
  """``in_sequence`` per leaf: whether it is a separate matrix.

  Args:
    plans: Per leaf, its plan (anything with a ``MatrixLayout`` as its
      ``layout``), or ``None`` where it is not read as a matrix.
  """
  return [plan is not None and not plan.layout.batch_shape for plan in plans]


def map_leaves(
  update_leaf: Callable[..., tuple[Any, ...]],
  updates: optax.Updates,
  fields: Sequence[Any],
  plans: Sequence[Any],
  *,
  outputs_like: optax.Updates | None = None,
  cast_outputs: bool = True,
  in_sequence: bool | Sequence[bool] = False,
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
    in_sequence: Whether each leaf's inputs wait for the previous leaf's
      output (the first leaf's state waits for its gradient), so that the
      leaves' temporaries are live one leaf at a time, or that choice per
      leaf (``gated``). Values do not change.

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
  gates = [in_sequence] * len(leaves) if isinstance(in_sequence, bool) else list(in_sequence)
  token = token_of(leaves) if any(gates) else None
  for index, (g, like, plan, gate, *olds) in enumerate(zip(leaves, likes, plans, gates, *columns)):
    if gate:
      g, olds = after(token, (g, olds))
    output, *news = update_leaf(index, g, *olds, plan)
    if token is not None:
      latest = token_of((output, news))
      token = token if latest is None else latest
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
