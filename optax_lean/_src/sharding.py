"""Optimizer-state sharding, and the sharding-in-types plumbing behind it.

JAX meshes come in two flavours. Under *Auto* axes, shardings live outside the
types and XLA propagates them; optimizer states should then be created with
``jax.jit(tx.init, out_shardings=state_sharding(...))``. Under *Explicit* axes
(the default of ``jax.make_mesh`` since JAX 0.7) every array type carries its
sharding, and operations that cannot infer an output sharding (contractions
over sharded axes, reshapes across shards, SVD/QR of sharded matrices) need an
explicit one. The helpers here pass those shardings when, and only when, the
operands carry explicit shardings, so the same transformation code runs
unsharded, under Auto and under Explicit meshes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from optax_lean._src import dtypes


def explicit_sharding(x: Any) -> NamedSharding | None:
  """``x``'s sharding if it is carried in its type (an Explicit mesh)."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    sharding = x.sharding
  else:
    sharding = jax.typeof(x).sharding
  if isinstance(sharding, NamedSharding) and AxisType.Explicit in getattr(
    sharding.mesh, 'axis_types', ()
  ):
    return sharding
  return None


def padded_spec(spec: PartitionSpec, ndim: int) -> tuple[Any, ...]:
  """``spec`` as a tuple with one entry per axis."""
  return tuple(spec) + (None,) * (ndim - len(spec))


def spec_of(x: Any) -> tuple[Any, ...]:
  """The per-axis explicit sharding of ``x`` (all ``None`` if it has none)."""
  sharding = explicit_sharding(x)
  spec = sharding.spec if sharding is not None else PartitionSpec()
  return padded_spec(spec, jnp.ndim(x))


def mesh_axes(entry: Any) -> tuple[str, ...]:
  """The mesh axis names of one ``PartitionSpec`` entry (``None``, a name or a tuple)."""
  if entry is None:
    return ()
  return entry if isinstance(entry, tuple) else (entry,)


def num_shards(x: Any, entry: Any) -> int:
  """How many shards the spec ``entry`` makes on ``x``'s explicit mesh."""
  sharding = explicit_sharding(x)
  if sharding is None:
    return 1
  count = 1
  for name in mesh_axes(entry):
    count *= sharding.mesh.shape[name]
  return count


def with_spare_axes(
  spec: tuple[Any, ...], shape: tuple[int, ...], like: Any, order: tuple[int, ...]
) -> tuple[Any, ...]:
  """``spec`` with the mesh axes of ``like`` that it lacks placed on free axes of ``shape``.

  A state that reduces a sharded axis of its parameter (a low-rank moment, a
  subset norm, a basis of the other axis) loses that axis's sharding and
  would be replicated. Each mesh axis of ``like``'s explicit sharding that
  ``spec`` does not use goes to the first axis in ``order`` that is unsharded
  and divisible by it, so the state is split over as many devices as its
  parameter; where none divides, it stays replicated.
  """
  target = explicit_sharding(like)
  if target is None:
    return spec
  used = {name for entry in spec for name in mesh_axes(entry)}
  spec = list(spec)
  for entry in padded_spec(target.spec, jnp.ndim(like)):
    if not mesh_axes(entry) or used & set(mesh_axes(entry)):
      continue
    size = num_shards(like, entry)
    for axis in order:
      if spec[axis] is None and shape[axis] % size == 0:
        spec[axis] = entry
        used.update(mesh_axes(entry))
        break
  return tuple(spec)


def mesh_of(x: Any) -> jax.sharding.AbstractMesh | Mesh | None:
  """The mesh ``x`` is laid out on, if any is known where it is traced.

  ``x``'s own mesh under an Explicit mesh; else the context mesh
  (``jax.set_mesh``, ``jax.sharding.use_abstract_mesh``); else, inside
  ``jax.jit``, the mesh of the arguments ``x`` derives from (a traced value's
  type names the mesh of its inputs' shardings under Auto axes too, though
  not how they split it); else ``None``.
  """
  explicit = explicit_sharding(x)
  if explicit is not None:
    return explicit.mesh
  context = jax.sharding.get_abstract_mesh()
  if not context.empty:
    return context
  if isinstance(x, jax.core.Tracer):
    traced = getattr(jax.typeof(x), 'sharding', None)
    mesh = getattr(traced, 'mesh', None)
    if mesh is not None and not mesh.empty:
      return mesh
  return None


def device_count(x: Any) -> int:
  """How many devices the mesh of ``x`` (``mesh_of``) has; 1 without a mesh."""
  mesh = mesh_of(x)
  return 1 if mesh is None else math.prod(mesh.shape.values())


def spread_over_batch(x: jax.Array, matrix_axes: int) -> jax.Array:
  """``x`` with its trailing ``matrix_axes`` whole and the mesh's axes on its batch axes.

  The layout in which a batched decomposition (SVD, QR) of a stack of
  matrices is shared out: the matrix axes are gathered, and each axis of the
  mesh that the batch axes do not use yet goes to the first batch axis whose
  length it divides (with the ones already there), so that each device
  decomposes whole matrices of its own part of the stack and XLA partitions
  the decomposition along the batch. The mesh is ``mesh_of(x)``: a reshard
  under an Explicit mesh, a sharding constraint otherwise. Without a batch
  axis, or where no mesh axis divides it, each device decomposes every
  matrix.
  """
  explicit = explicit_sharding(x)
  mesh = mesh_of(x)
  batch = jnp.ndim(x) - matrix_axes
  if explicit is None and (mesh is None or batch <= 0 or not isinstance(x, jax.core.Tracer)):
    return x
  entries = [list(mesh_axes(entry)) for entry in spec_of(x)[:batch]]
  used = {name for entry in entries for name in entry}
  kinds = (AxisType.Explicit,) if explicit is not None else (AxisType.Auto,)
  free = [
    name
    for name, kind in zip(mesh.axis_names, mesh.axis_types)
    if name not in used and kind in kinds
  ]
  for name in free:
    for axis, entry in enumerate(entries):
      shards = math.prod(mesh.shape[n] for n in (*entry, name))
      if jnp.shape(x)[axis] % shards == 0:
        entry.append(name)
        break
  spec = (*(None if not e else e[0] if len(e) == 1 else tuple(e) for e in entries),)
  spec += (None,) * matrix_axes
  if explicit is not None:
    return reshard(x, spec)
  if all(entry is None for entry in spec):
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def off_batch(x: jax.Array, batch_axes: int) -> jax.Array:
  """``x`` with its leading ``batch_axes`` unsharded, their mesh axes moved to the others.

  A walk over the matrices of a stack slices it along its batch axes, which
  an Explicit mesh allows only when they are whole. Each mesh axis on a batch
  axis moves to the first other axis it divides (an all-to-all, so each
  device still holds ``1 / N`` of ``x``), or is dropped where none does.
  Under Auto meshes (no sharding in the types) ``x`` is returned as is.
  """
  if explicit_sharding(x) is None:
    return x
  spec = list(spec_of(x))
  moving = [name for entry in spec[:batch_axes] for name in mesh_axes(entry)]
  if not moving:
    return x
  spec[:batch_axes] = [None] * batch_axes
  like_mesh = explicit_sharding(x).mesh
  for name in moving:
    for axis in range(batch_axes, len(spec)):
      entry = mesh_axes(spec[axis])
      shards = math.prod(like_mesh.shape[n] for n in (*entry, name))
      if jnp.shape(x)[axis] % shards == 0:
        joined = (*entry, name)
        spec[axis] = joined[0] if len(joined) == 1 else joined
        break
  return reshard(x, tuple(spec))


def per_matrix(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """``fn`` of a stack of matrices ``x``, run on each device's own matrices.

  ``fn`` maps ``(…, m, n)`` to ``(…, p, q)`` matrix by matrix (a QR, an SVD
  factor). Under an Explicit mesh whose axes split ``x``'s batch axes (and not
  its matrix axes), it runs inside ``jax.shard_map`` on each device's part, so
  that no device decomposes another's matrices, whatever sharding rules
  ``fn``'s primitives have; elsewhere it is ``fn(x)``.
  """
  explicit = explicit_sharding(x)
  spec = spec_of(x)
  if explicit is None or all(entry is None for entry in spec) or any(spec[-2:]):
    return fn(x)
  mapped = jax.shard_map(
    fn, mesh=explicit.mesh, in_specs=PartitionSpec(*spec), out_specs=PartitionSpec(*spec)
  )
  return mapped(x)


def named_like(x: Any, spec: tuple[Any, ...]) -> NamedSharding | None:
  """A sharding with ``spec`` on ``x``'s explicit mesh, or ``None``."""
  sharding = explicit_sharding(x)
  if sharding is None:
    return None
  return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def reshard(x: jax.Array, spec: tuple[Any, ...]) -> jax.Array:
  """Moves ``x`` to ``spec`` on its explicit mesh; a no-op otherwise."""
  target = named_like(x, spec)
  if target is None or padded_spec(target.spec, x.ndim) == spec_of(x):
    return x
  return jax.sharding.reshard(x, target)


def reshard_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """Gives ``x`` the explicit sharding of ``like`` (same rank)."""
  if explicit_sharding(like) is None:
    return x
  return reshard(x, spec_of(like))


def cast_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` in ``like``'s dtype and explicit sharding: how states are stored back."""
  return reshard_like(dtypes.store(x, like.dtype), like)


def einsum(
  subscripts: str,
  *operands: jax.Array,
  out_spec: tuple[Any, ...],
  out_dtype: jax.typing.DTypeLike | None = None,
) -> jax.Array:
  """``jnp.einsum`` with an output sharding under Explicit meshes.

  Operands are multiplied in their own (common) dtype and accumulated in
  ``out_dtype``, so bf16 operands keep bf16 matmul speed on accelerators. XLA's
  CPU backend has no such mixed-precision dot for every shape, so there the
  operands are cast to ``out_dtype`` first: the same products (a product of
  two bf16 or f16 numbers is exact in float32), accumulated in the same dtype.
  """
  if out_dtype is not None and jax.default_backend() == 'cpu':
    operands = tuple(operand.astype(out_dtype) for operand in operands)
  out_sharding = None
  for operand in operands:
    out_sharding = named_like(operand, out_spec)
    if out_sharding is not None:
      break
  return jnp.einsum(
    subscripts,
    *operands,
    out_sharding=out_sharding,
    preferred_element_type=out_dtype,
  )


def reshape(x: jax.Array, shape: tuple[int, ...], out_spec: tuple[Any, ...]) -> jax.Array:
  """``jnp.reshape`` with an output sharding under Explicit meshes."""
  return jnp.reshape(x, shape, out_sharding=named_like(x, out_spec))


def zeros(
  shape: tuple[int, ...],
  dtype: jax.typing.DTypeLike,
  like: Any,
  spec: tuple[Any, ...],
) -> jax.Array:
  """Zeros sharded as ``spec`` on the explicit mesh of ``like``, if any."""
  target = named_like(like, spec)
  if target is not None and not isinstance(like, jax.core.Tracer):
    # Outside a trace, an explicit out_sharding needs a mesh context; a jitted
    # constructor with out_shardings allocates each shard in place instead.
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=target)()
  return jnp.zeros(shape, dtype, out_sharding=target)


def state_sharding(tx: Any, params: Any, param_sharding: Any | None = None) -> Any:
  """Maps parameter shardings to the shardings of ``tx``'s state.

  Every state leaf is split over the same mesh axes as its parameter, so that
  each device holds about ``1 / N`` of the state: moments shaped like a
  parameter copy its sharding; subset-norm accumulators keep the sharding of
  the axis they keep; low-rank moments keep that of their full-size axis;
  bases take that of the axis they span. A mesh axis of an axis a state
  reduces (the projected axis of a low-rank moment, the summed axis of a subset
  norm) moves to a kept axis it divides, else to the rank axis; the
  projections then produce that layout directly (a reduce-scatter through the
  contraction's output sharding). Step counts and PRNG keys are replicated, and
  so is an axis no mesh axis divides. The rule is read off ``tx.init`` itself,
  traced under an Explicit copy of the mesh, so it is right for any chain of
  optax and optax_lean transformations.

  Projector refreshes are shared out too. An SVD or QR needs whole matrices,
  so a refresh takes the selected matrices of the tree in rounds of one per
  device: a round gathers its matrices (an all-to-all), each device
  decomposes its own, and the new bases go to the state's layout
  (``O(r (m + n))`` numbers per matrix). The work per device is then about
  ``1 / N`` of all of it, for stacked layers and separate leaves of one shape
  alike, and one round's matrices are live at a time. The mesh is the
  types' under an Explicit mesh, and under an Auto one the mesh that the
  update's inputs are laid out on (``mesh_of``): no context mesh is needed.

  Args:
    tx: An ``optax.GradientTransformation``.
    params: The parameters, as arrays or ``jax.ShapeDtypeStruct``.
    param_sharding: A tree of ``NamedSharding`` matching ``params``. Defaults
      to ``params``' own ``.sharding``.

  Returns:
    A tree of ``NamedSharding`` with the structure of ``tx.init(params)``, on
    the parameters' mesh (with its own axis types), ready for ``jax.jit``'s
    ``out_shardings``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_lean
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ('fsdp',))
    >>> params = {'w': jnp.ones((8, 4))}
    >>> shd = {'w': NamedSharding(mesh, P('fsdp', None))}
    >>> tx = optax_lean.adamsnsm(1e-2, rank=2)
    >>> state_shd = optax_lean.state_sharding(tx, params, shd)
    >>> state = jax.jit(tx.init, out_shardings=state_shd)(params)
  """
  if param_sharding is None:
    param_sharding = jax.tree.map(lambda p: p.sharding, params)
  shardings = jax.tree.leaves(param_sharding)
  if not shardings or not all(isinstance(s, NamedSharding) for s in shardings):
    raise ValueError(
      'state_sharding: param_sharding must be a tree of NamedSharding '
      '(one per parameter, on one mesh).'
    )
  mesh = shardings[0].mesh
  explicit = Mesh(
    mesh.devices, mesh.axis_names, axis_types=(AxisType.Explicit,) * len(mesh.axis_names)
  )
  abstract = jax.tree.map(
    lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=NamedSharding(explicit, s.spec)),
    params,
    param_sharding,
  )
  with jax.set_mesh(explicit):
    shapes = jax.eval_shape(tx.init, abstract)

  def to_mesh(leaf):
    spec = leaf.sharding.spec if leaf.sharding is not None else PartitionSpec()
    return NamedSharding(mesh, spec)

  return jax.tree.map(to_mesh, shapes)
