"""Walks over the matrices of the selected leaves, one at a time or one per device.

An update written with batched operations over a stack of matrices (a scanned
model's ``(layers, in, out)`` kernels) holds the temporaries of every matrix
of the stack at once: the partial sums of a projection, a back-projected
direction, the gathered matrices and workspaces of a decomposition. In the
train step that large models jit, those temporaries, not the optimizer state,
set the peak memory. The walks here bound them to what one matrix needs:

- ``map_matrices`` runs a per-matrix function over a stack in sequence
  (``jax.lax.scan``), in the stack's own layout (its FSDP shards, say), and
  stacks the results;
- ``refresh_in_rounds`` runs a projector refresh over every selected matrix
  of the tree in rounds of one matrix per device: the round's matrices are
  gathered whole, each device decomposes its own (``sharding.spread_over_batch``),
  and the small results go back to their leaves. Matrices of the same shape
  share rounds whether they sit in one stack or in separate leaves, so a
  model without stacked layers shares its refresh out too.

Neither changes the maths: each matrix sees the operations it would see in a
batch of one.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_lean._src import sharding


def _flatten_batch(x: jax.Array, batch_ndim: int) -> jax.Array:
  """``x`` with its ``batch_ndim`` leading axes merged into one, unsharded."""
  x = sharding.off_batch(x, batch_ndim)
  if batch_ndim == 1:
    return x
  spec = sharding.spec_of(x)
  shape = (math.prod(x.shape[:batch_ndim]), *x.shape[batch_ndim:])
  return sharding.reshape(x, shape, (None, *spec[batch_ndim:]))


def _unflatten_batch(x: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
  if len(batch_shape) == 1:
    return x
  spec = sharding.spec_of(x)
  return sharding.reshape(x, (*batch_shape, *x.shape[1:]), (None,) * len(batch_shape) + spec[1:])


def round_size(count: int, devices: int) -> int:
  """How many matrices of a stack of ``count`` to take together: one per device.

  ``devices`` when they divide the stack into whole rounds, else 1 (each
  device then does every matrix's share itself): a round over part of the
  mesh would lay matrices out over a sub-group of devices, whose collectives
  XLA's CPU runtime can deadlock on (docs/guide.md, "Sharding").
  """
  return devices if count % devices == 0 else 1


def map_matrices(
  fn: Callable[..., tuple[Any, ...]],
  batch_shape: tuple[int, ...],
  operands: Sequence[Any],
  *,
  into: dict[int, int] | None = None,
  per_round: Callable[..., tuple[Any, ...]] | None = None,
  devices: int = 1,
) -> tuple[Any, ...]:
  """``fn`` of each matrix of a stack in turn, its outputs stacked back.

  Args:
    fn: ``(*matrix_operands) -> outputs``, for one matrix: each operand is the
      matrix's slice of an entry of ``operands`` (``None`` stays ``None``);
      ``outputs`` is a tuple of arrays.
    batch_shape: The stack's batch axes, leading every operand. ``()`` calls
      ``fn`` once on the operands as they are.
    operands: Arrays with ``batch_shape`` leading, or ``None``.
    into: ``{output: operand}``: outputs written over the operand they replace,
      matrix by matrix, in its dtype and layout, so that they take no buffer
      of their own (XLA updates a loop's carried array in place). Each such
      operand's matrix is read before its new value is written.
    per_round: Optional ``(*round_operands) -> extras``, run on the matrices
      of a round (one per device, stacked) before ``fn`` sees them one by one
      with their slices of ``extras`` appended to their operands: for work
      that is shared out over the devices, such as drawing random bases.
    devices: Devices to share a round's ``per_round`` work over.

  Returns:
    ``fn``'s outputs, each with ``batch_shape`` leading.
  """
  into = into or {}
  if not batch_shape:
    extras = () if per_round is None else per_round(*operands)
    outputs = fn(*operands, *extras)
    return tuple(
      sharding.cast_like(y, operands[into[k]]) if k in into else y for k, y in enumerate(outputs)
    )
  flat = [None if x is None else _flatten_batch(x, len(batch_shape)) for x in operands]
  count = math.prod(batch_shape)
  size = 1 if per_round is None else round_size(count, devices)
  carried = sorted(set(into.values()))

  def round_of(x, start):
    return jax.lax.dynamic_slice_in_dim(x, start, size)

  def body(carry, index):
    current = list(flat)
    for operand, value in zip(carried, carry):
      current[operand] = value
    start = index * size
    chosen = [None if x is None else round_of(x, start) for x in current]
    extras = () if per_round is None else per_round(*chosen)
    if size == 1:
      squeeze = lambda xs: [None if x is None else x[0] for x in xs]
      outputs = tuple(None if y is None else y[None] for y in fn(*squeeze([*chosen, *extras])))
    else:
      outputs = jax.lax.map(lambda xs: fn(*xs), (*chosen, *extras))
    new_carry = list(carry)
    for output, operand in into.items():
      position = carried.index(operand)
      value = sharding.cast_like(outputs[output], chosen[operand])
      new_carry[position] = jax.lax.dynamic_update_slice_in_dim(
        new_carry[position], value, start, axis=0
      )
    stacked = tuple(None if k in into else y for k, y in enumerate(outputs))
    return tuple(new_carry), stacked

  carry, stacked = jax.lax.scan(
    body, tuple(flat[operand] for operand in carried), jnp.arange(count // size)
  )

  def restack(k, y):
    if y is None and k not in into:
      return None
    if k in into:  # back in the layout of the operand it replaces
      operand = operands[into[k]]
      return sharding.reshard_like(
        _unflatten_batch(carry[carried.index(into[k])], batch_shape), operand
      )
    y = sharding.reshape(y, (count, *y.shape[2:]), (None, *sharding.spec_of(y)[2:]))
    return _unflatten_batch(y, batch_shape)

  return tuple(restack(k, y) for k, y in enumerate(stacked))


@dataclasses.dataclass(frozen=True)
class RefreshItem:
  """One leaf's part in a refresh: its matrices, their states and keys.

  Attributes:
    g_a: The leaf's gradient in the projected-rows view ``(…, size, c)``.
    state: The projector states ``(…, *state_shape)``.
    keys: One PRNG key per matrix (the batch shape).
    refresh: ``(g_a, state, keys) -> state`` for a stack of matrices.
    group: Items of equal ``group`` share rounds: their matrices have the
      same shapes, dtypes and refresh.
  """

  g_a: jax.Array
  state: jax.Array
  keys: jax.Array
  refresh: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
  group: Any

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return self.keys.shape

  def flat(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The operands as one matrix each along a single leading axis."""
    ndim = len(self.batch_shape)
    if ndim == 0:
      return self.g_a[None], self.state[None], self.keys[None]
    return (
      _flatten_batch(self.g_a, ndim),
      _flatten_batch(self.state, ndim),
      self.keys.reshape(-1),
    )


def refresh_in_rounds(items: Sequence[RefreshItem], devices: int) -> list[jax.Array]:
  """The new projector states of ``items``, refreshed one matrix per device at a time.

  The matrices of each group (all the items with its ``group``, in order)
  are taken ``devices`` at a time: a round stacks them, spreads them over the
  devices whole (padding the last round with repeats of its first matrix),
  refreshes them, and keeps the results, which go back to their items at the
  end. The rounds run in sequence (``jax.lax.scan``), so one round's gathered
  matrices and workspace are live at a time.

  Args:
    items: The leaves to refresh.
    devices: The devices of the mesh (1 without one).

  Returns:
    Each item's new state, in the layout of its old one.
  """
  groups: dict[Any, list[int]] = collections.defaultdict(list)
  for index, item in enumerate(items):
    groups[item.group].append(index)
  new_states: list[jax.Array | None] = [None] * len(items)
  for members in groups.values():
    flats = [items[i].flat() for i in members]
    matrices = [(m, j) for m, flat in enumerate(flats) for j in range(flat[0].shape[0])]
    # A round spans every device (padded): a layout over part of the mesh
    # would need collectives over sub-groups of devices as well.
    size = devices if len(matrices) > 1 else 1
    rounds = [matrices[start : start + size] for start in range(0, len(matrices), size)]
    rounds[-1] += [rounds[-1][0]] * (size - len(rounds[-1]))
    refresh = items[members[0]].refresh

    def gather(chosen, flats=flats):
      def stack(part):  # the round's matrices, in the layout of its first
        first = flats[chosen[0][0]][part]
        like = sharding.spec_of(first)[1:]
        return jnp.stack([sharding.reshard(flats[m][part][j], like) for m, j in chosen])

      g_a, state, keys = (stack(part) for part in range(3))
      if len(chosen) > 1:
        g_a = sharding.spread_over_batch(g_a, matrix_axes=2)
        state = sharding.spread_over_batch(state, matrix_axes=state.ndim - 1)
      return g_a, state, keys

    def one_round(index, rounds=rounds, refresh=refresh, gather=gather):
      branches = [lambda chosen=chosen: gather(chosen) for chosen in rounds]
      operands = branches[0]() if len(rounds) == 1 else jax.lax.switch(index, branches)
      return refresh(*operands)

    results = jax.lax.map(one_round, jnp.arange(len(rounds)))
    # The new states (small) leave the round layout before going back to their leaves.
    spec = sharding.spec_of(results)
    results = sharding.reshard(results, (None, None, *spec[2:]))
    results = sharding.reshape(results, (-1, *results.shape[2:]), (None, *spec[2:]))
    position = {}
    for k, matrix in enumerate(m for chosen in rounds for m in chosen):
      position.setdefault(matrix, k)
    for m, i in enumerate(members):
      item = items[i]
      count = flats[m][0].shape[0]
      picks = jnp.asarray([position[(m, j)] for j in range(count)])
      picked = jnp.take(results, picks, axis=0)
      picked = picked.reshape(*item.batch_shape, *picked.shape[1:])
      new_states[i] = sharding.cast_like(picked, item.state)
  return new_states
