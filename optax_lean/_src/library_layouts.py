"""Matrix readings of the parameter trees other JAX libraries hand an optimizer.

The default reading (``selection``) looks at paths and shapes. Many trees say
more than that, and this module reads it:

- Equinox: the tree is the model itself, so each ``eqx.nn.Linear`` node says
  its weight is ``(…, out, in)``, with any leading axes stacked by
  ``eqx.filter_vmap``; convolutions, embeddings and norms are known too;
- Flax Linen with partitioning metadata (MaxText): each ``nn.Partitioned`` box
  carries its axis names;
- Flax NNX: each ``nnx.Variable`` may carry its axis names as ``out_sharding``
  metadata;
- haliax: each ``NamedArray`` carries its axes, and each ``haliax.nn.Linear``
  its ``In`` and ``Out``;
- Haiku: ``hk.layer_stack`` puts ``__layer_stack…`` in the module path of the
  leaves it stacks, one leading axis per stack.

A library is looked up in ``sys.modules``, never imported: a tree can hold its
types only if the user imported it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax

from optax_lean._src.axis_names import carried_axis_names, excludes, read_names
from optax_lean._src.dimension_numbers import DimensionNumbers, axes_field, path_names, placed


class NodeReading(NamedTuple):
  """How a leaf of a known node reads: a matrix, an embedding table, neither, or unknown.

  ``undecided``: the node names the leaf's axes, but the names do not read as a
  matrix (not two sides, or a name of the wrong role).
  """

  dimension_numbers: DimensionNumbers | None
  embedding: bool = False
  undecided: bool = False


NOT_A_MATRIX = NodeReading(None)


def _from_names(
  names: Any, roles: Mapping[str, str], embedding: bool = False, output_first: bool = False
) -> NodeReading:
  names = tuple(names)
  reading = read_names(names, roles, output_first)
  return NodeReading(reading, embedding, undecided=reading is None and not excludes(names, roles))


def _module(name: str) -> Any:
  return sys.modules.get(name)


def _equinox_types() -> dict[str, tuple[type, ...]]:
  eqx = _module('equinox')
  if eqx is None:
    return {}
  nn = eqx.nn
  return {
    'linear': (nn.Linear,),
    'conv': (nn.Conv,),
    'embedding': (nn.Embedding,),
    'norm': (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm),
  }


def _haliax_types() -> dict[str, tuple[type, ...]]:
  haliax, hnn = _module('haliax'), _module('haliax.nn')
  if haliax is None or hnn is None:
    return {}
  return {
    'named_array': (haliax.NamedArray,),
    'linear': (hnn.Linear,),
    'embedding': (hnn.Embedding,),
    'norm': tuple(getattr(hnn, name) for name in ('LayerNorm', 'RmsNorm') if hasattr(hnn, name)),
  }


def _kind(node: Any) -> str | None:
  """Which known node ``node`` is, or ``None``."""
  meta, nnx = _module('flax.core.meta'), _module('flax.nnx')
  if (meta is not None and isinstance(node, meta.Partitioned)) or (
    nnx is not None and isinstance(node, nnx.Variable) and carried_axis_names(node) is not None
  ):
    return 'named'
  for library, types in (('equinox', _equinox_types()), ('haliax', _haliax_types())):
    for kind, classes in types.items():
      if classes and isinstance(node, classes):
        return f'{library}_{kind}'
  return None


def is_known_node(node: Any) -> bool:
  """Whether ``node`` is a subtree this module reads (for ``is_leaf=``)."""
  return _kind(node) is not None


def _stacked(own_ndim: int, ndim: int, in_axes: tuple[int, ...], out_axes: tuple[int, ...]):
  """A reading of a leaf of ``ndim`` axes whose last ``own_ndim`` are its own."""
  stack = ndim - own_ndim
  if stack < 0:
    return NOT_A_MATRIX
  return NodeReading(placed(in_axes, out_axes, range(stack, ndim)))


def _equinox_reading(kind: str, module: Any, name: str, ndim: int) -> NodeReading:
  if name != 'weight' or kind == 'equinox_norm':
    return NOT_A_MATRIX
  if kind == 'equinox_linear':  # (…, out, in)
    return _stacked(2, ndim, (1,), (0,))
  if kind == 'equinox_conv':  # (…, out, in / groups, *kernel)
    own = module.num_spatial_dims + 2
    return _stacked(own, ndim, tuple(range(1, own)), (0,))
  reading = _stacked(2, ndim, (0,), (1,))  # an embedding (…, vocabulary, features)
  return reading._replace(embedding=True)


def _axis_names(spec: Any) -> tuple[str, ...]:
  axes = spec if isinstance(spec, tuple) else (spec,)
  return tuple(axis.name for axis in axes)


def _haliax_reading(kind: str, module: Any, name: str, roles: Mapping[str, str]) -> NodeReading:
  if kind == 'haliax_named_array':  # outside a Linear: stored output side first, as Linear's
    return _from_names(carried_axis_names(module), roles, output_first=True)
  if name != 'weight' or kind == 'haliax_norm':
    return NOT_A_MATRIX
  names = carried_axis_names(module.weight)
  if kind == 'haliax_embedding':
    return _from_names(names, roles, embedding=True)
  in_names, out_names = _axis_names(module.In), _axis_names(module.Out)
  in_axes = tuple(i for i, axis in enumerate(names) if axis in in_names)
  out_axes = tuple(i for i, axis in enumerate(names) if axis in out_names)
  return NodeReading(DimensionNumbers(axes_field(in_axes), axes_field(out_axes)))


def node_readings(node: Any, roles: Mapping[str, str]) -> list[NodeReading]:
  """The reading of each leaf of a known ``node``, in ``jax.tree.leaves(node)`` order."""
  kind = _kind(node)
  with_paths = jax.tree_util.tree_flatten_with_path(node)[0]
  if kind == 'named':
    return [_from_names(carried_axis_names(node), roles)] * len(with_paths)
  readings = []
  for path, leaf in with_paths:
    names = path_names(path)
    name = names[0] if names else ''
    if kind.startswith('equinox'):
      readings.append(_equinox_reading(kind, node, name, leaf.ndim))
    else:
      readings.append(_haliax_reading(kind, node, name, roles))
  return readings


def layer_stack_axes(names: tuple[str, ...]) -> int:
  """How many leading axes ``hk.layer_stack`` added to a Haiku leaf at path ``names``.

  Haiku names each module by its scope, ``'outer/__layer_stack_no_per_layer/linear'``;
  every layer stack on the way adds one leading axis.
  """
  scopes = [scope for name in names[:-1] for scope in name.split('/')]
  return sum(scope.startswith('__layer_stack') for scope in scopes)
