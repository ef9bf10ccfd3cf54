"""Matrix readings from the names of a parameter's axes.

Large JAX trainers name every axis of every parameter for sharding: MaxText's
Linen models box each kernel in ``nn.LogicallyPartitioned`` with logical names
such as ``('embed', 'layers', 'q_heads', 'kv')``, Flax NNX keeps them in each
``nnx.Variable``'s ``out_sharding`` metadata, and haliax's ``NamedArray`` carries
its ``axes``. Those names say what the shape cannot: which axis stacks layers
and which axes form the input and output sides of the matrix.

Each name has a role (``AXIS_ROLES``):

- ``'stack'``: a batch axis (layers, pipeline stages, experts);
- ``'heads'``: an axis of an attention head's side; adjacent head axes
  (``heads``, ``head_dim``) join into one side;
- ``'hidden'``: a side of its own (``embed``, ``mlp``, ``vocab``); so is a name
  the table does not know, or an unnamed axis;
- ``'exclude'``: the leaf is not a matrix (a norm's scale).

Once the stack axes are set aside, a leaf whose other axes form exactly two
sides is a matrix, read input side first (Flax, Haiku and MaxText kernels are
``(in, out)``), or output side first for layouts stored as PyTorch does.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
from jax.sharding import PartitionSpec

from optax_lean._src.dimension_numbers import DimensionNumbers, axes_field

Role = Literal['stack', 'heads', 'hidden', 'exclude']
ROLES: tuple[Role, ...] = ('stack', 'heads', 'hidden', 'exclude')

AXIS_ROLES: dict[str, Role] = {
  # stacked layers, pipeline stages, mixture-of-experts (MaxText: 'exp')
  'layers': 'stack',
  'stage': 'stack',
  'experts': 'stack',
  'exp': 'stack',
  'num_activations': 'stack',  # MaxText's fused MLP input kernel, one matrix per activation
  # attention heads (MaxText's and haliax's names)
  'heads': 'heads',
  'q_heads': 'heads',
  'kv_heads': 'heads',
  'kv_head': 'heads',
  'kv': 'heads',
  'head_dim': 'heads',
  'kv_head_dim': 'heads',
  'head_size': 'heads',
  'q_heads_per_group': 'heads',
  # hidden sides
  'embed': 'hidden',
  'mlp': 'hidden',
  'vocab': 'hidden',
  'embed_vocab': 'hidden',  # MaxText's embedding side of the embedding and logits tables
  # norms' scales
  'norm': 'exclude',
}


def check_roles(roles: Mapping[str, str] | None) -> Mapping[str, str]:
  """``AXIS_ROLES`` updated with ``roles``; a ``ValueError`` for an unknown role."""
  if roles is None:
    return AXIS_ROLES
  if not isinstance(roles, Mapping):
    raise ValueError(f'roles must be a mapping of axis names to roles, got {type(roles)}.')
  for name, role in roles.items():
    if role not in ROLES:
      raise ValueError(f'roles: axis {name!r} has role {role!r}; roles are {ROLES}.')
  return {**AXIS_ROLES, **roles}


def carried_axis_names(node: Any) -> tuple[str | None, ...] | None:
  """The axis names a node of another library carries, one per axis, or ``None``.

  A Linen ``nn.Partitioned`` box (``nn.LogicallyPartitioned`` too) has
  ``names``; an ``nnx.Variable`` may have ``out_sharding`` metadata (called
  ``sharding_names`` or ``sharding`` by older Flax); a haliax ``NamedArray`` has
  ``axes``. A library is looked up in ``sys.modules``, never imported.
  """
  meta, nnx, haliax = (sys.modules.get(name) for name in ('flax.core.meta', 'flax.nnx', 'haliax'))
  if meta is not None and isinstance(node, meta.Partitioned):
    return tuple(node.names)
  if haliax is not None and isinstance(node, haliax.NamedArray):
    return tuple(axis.name for axis in node.axes)
  if nnx is not None and isinstance(node, nnx.Variable):
    metadata = node.get_metadata()
    for key in ('out_sharding', 'sharding_names', 'sharding'):
      names = metadata.get(key)
      if names is not None:
        ndim = len(getattr(node.get_value(), 'shape', ()))
        return tuple(names) if len(tuple(names)) == ndim else None
  return None


def is_axis_names(x: Any) -> bool:
  """Whether ``x`` is one leaf's axis names: a tuple or ``PartitionSpec`` of names or ``None``."""
  return isinstance(x, (tuple, PartitionSpec)) and all(
    name is None or isinstance(name, str) for name in x
  )


def excludes(names: Sequence[str | None], roles: Mapping[str, str]) -> bool:
  """Whether a name in ``names`` marks its leaf as not a matrix."""
  return any(name is not None and roles.get(name) == 'exclude' for name in names)


def read_names(
  names: Sequence[str | None],
  roles: Mapping[str, str],
  output_first: bool = False,
) -> DimensionNumbers | None:
  """The reading of a leaf whose axes are named ``names``, or ``None`` if it has none.

  ``None`` for an excluded name, and for names that do not leave exactly two
  sides once the stack axes are set aside.
  """
  if excludes(names, roles):
    return None
  role_of = [None if name is None else roles.get(name) for name in names]
  sides: list[list[int]] = []
  previous = None
  for axis, role in enumerate(role_of):
    if role == 'stack':
      continue
    if role == 'heads' and previous == 'heads':
      sides[-1].append(axis)
    else:
      sides.append([axis])
    previous = role
  if len(sides) != 2:
    return None
  in_axes, out_axes = reversed(sides) if output_first else sides
  return DimensionNumbers(axes_field(tuple(in_axes)), axes_field(tuple(out_axes)))


def axis_names_dimension_numbers(
  axis_names: Any,
  *,
  roles: Mapping[str, str] | None = None,
  output_first: bool = False,
) -> Any:
  """How each parameter reads as a matrix, from the names of its axes.

  A parameter's axis names, one per axis, say which axes stack layers (batch
  axes) and which form the matrix's input and output sides; ``AXIS_ROLES``
  gives each name its role:

  - stack axes (``layers``, ``stage``, ``experts``, ``exp``) are batch axes;
  - adjacent head axes (``heads``, ``q_heads``, ``kv_heads``, ``kv``,
    ``head_dim``, …) join into one side;
  - each other axis (``embed``, ``mlp``, ``vocab``, or a name not in the table)
    is a side of its own;
  - a leaf with a ``norm`` axis is not a matrix.

  A leaf with exactly two sides reads as ``(in, out)`` in the order of its axes
  (``output_first`` reverses it); any other leaf gets ``None`` (the plain rule).
  So MaxText's scanned query kernel ``('embed', 'layers', 'q_heads', 'kv')``
  reads as ``DimensionNumbers(0, (2, 3))`` and its output projection
  ``('heads', 'layers', 'kv', 'embed')`` as ``DimensionNumbers((0, 2), 3)``.
  Embedding tables read as ``(vocab, embed)`` matrices too; the optimizers
  leave them out by their path (any name containing ``embed``), as by default.

  Args:
    axis_names: A pytree whose leaves are each parameter's axis names: tuples
      or ``PartitionSpec``\\ s of strings (``None`` for an unnamed axis), as
      ``flax.linen.get_partition_spec`` gives for a Linen variables tree with
      logical partitioning; or the parameters themselves where they carry
      their names: a Linen variables tree of ``nn.LogicallyPartitioned`` boxes
      (as MaxText builds it), an ``nnx.State`` whose variables have
      ``out_sharding`` metadata, or a tree of haliax ``NamedArray``\\ s (with
      ``output_first=True``, haliax's ``Linear`` layout). A ``None`` leaf or an
      empty tuple reads as ``None``.
    roles: Names to add to ``AXIS_ROLES`` or to override in it, mapped to
      ``'stack'``, ``'heads'``, ``'hidden'`` or ``'exclude'``.
    output_first: Whether matrices are stored output side first (PyTorch's and
      haliax's ``Linear.weight``).

  Returns:
    A pytree of ``DimensionNumbers`` or ``None`` with the structure of
    ``axis_names`` (its name tuples as leaves), for ``dimension_numbers=``:
    the leaves read as ``None`` get the plain rule, so it also sets the mask.

  Examples:
    >>> import optax_lean
    >>> names = {
    ...     'query': ('embed', 'layers', 'q_heads', 'kv'),
    ...     'out': ('heads', 'layers', 'kv', 'embed'),
    ...     'wi': ('embed', 'layers', 'mlp'),
    ...     'norm': ('norm', 'layers'),
    ... }
    >>> dims = optax_lean.axis_names_dimension_numbers(names)
    >>> dims['query'], dims['out'], dims['norm']
    (DimensionNumbers(reduction_axis=0, output_axis=(2, 3)), \
DimensionNumbers(reduction_axis=(0, 2), output_axis=3), None)
    >>> tx = optax_lean.adamsnsm(1e-2, rank=2, dimension_numbers=dims)
  """
  table = check_roles(roles)

  is_leaf = lambda x: x is None or is_axis_names(x) or carried_axis_names(x) is not None

  def one(leaf: Any) -> DimensionNumbers | None:
    if leaf is None:
      return None
    names = leaf if is_axis_names(leaf) else carried_axis_names(leaf)
    if names is None:
      raise ValueError(
        'axis_names: each leaf must be a tuple or PartitionSpec of axis names (str or None), '
        'or a parameter that carries them (nn.Partitioned, nnx.Variable, NamedArray); '
        f'got {leaf!r}.'
      )
    return read_names(tuple(names), table, output_first)

  return jax.tree.map(one, axis_names, is_leaf=is_leaf)
