"""Matrix readings of a Flax NNX model's parameters, from its modules.

A kernel's shape alone does not say which of its axes are the input side and
which the output side: an attention query kernel ``(embed, heads, head_dim)``
and a stack of linear kernels ``(layers, in, out)`` are both 3-D. The modules
that own the kernels do say it, so ``nnx_dimension_numbers`` reads the model
once and returns the per-leaf ``DimensionNumbers`` for any tree of its
parameters (or their gradients).

Flax is imported lazily, inside ``nnx_dimension_numbers``: the library imports
without it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax

from optax_lean._src.axis_names import carried_axis_names, check_roles, read_names
from optax_lean._src.dimension_numbers import DimensionNumbers, path_names, placed

Path = tuple[str, ...]
_NAME = 'nnx_dimension_numbers'


def _reading(
  shape: tuple[int, ...], own_shape: tuple[int, ...], in_axes: Any, out_axes: Any
) -> DimensionNumbers | None:
  """Axes of a kernel of ``shape`` whose unstacked shape is ``own_shape``.

  ``in_axes`` and ``out_axes`` index ``own_shape``; any leading axes of
  ``shape`` beyond it (layers stacked by ``nnx.vmap`` / ``nnx.scan``) are
  batch axes. A kernel whose trailing axes are not ``own_shape`` (a stack axis
  that is not leading, or a subclass with another layout) gets ``None``.
  """
  stack = len(shape) - len(own_shape)
  if stack < 0 or tuple(shape[stack:]) != tuple(own_shape) or not in_axes or not out_axes:
    return None
  return placed(in_axes, out_axes, range(stack, len(shape)))


def _einsum_axes(einsum_str: Any, n_kernel: int) -> tuple[list[int], list[int]] | None:
  """Reduction and output axes of the kernel (second operand) of ``einsum_str``.

  ``None`` for an equation that does not read as a matrix: an ellipsis or a
  repeated letter in the kernel, a kernel letter found in neither the input
  nor the output, or a kernel with no reduction or no output axis.
  """
  if not isinstance(einsum_str, str):
    return None
  equation = einsum_str.replace(' ', '')
  if '->' not in equation or equation.count(',') != 1:
    return None
  operands, out = equation.split('->')
  lhs, kernel = operands.split(',')
  if '...' in kernel or len(set(kernel)) != len(kernel) or len(kernel) != n_kernel:
    return None
  lhs, out = lhs.replace('...', ''), out.replace('...', '')
  reduction, output = [], []
  for axis, letter in enumerate(kernel):
    if letter in lhs and letter not in out:
      reduction.append(axis)
    elif letter in out and letter not in lhs:
      output.append(axis)
    elif letter not in lhs:  # summed over the kernel alone
      return None
    # in the input, the kernel and the output: a batch axis
  if not reduction or not output:
    return None
  return reduction, output


def _kernel_reading(nnx: Any, module: Any, shape: tuple[int, ...]) -> DimensionNumbers | None:
  """The reading of ``module.kernel`` (of ``shape``), or ``None`` for an unknown module."""
  if isinstance(module, nnx.Linear):
    own = (module.in_features, module.out_features)
    return _reading(shape, own, (0,), (1,))
  if isinstance(module, nnx.LinearGeneral):
    # kernel (*batch_axis sizes, *in_features, *out_features)
    n_batch, n_in = len(module.batch_axis), len(module.in_features)
    own = (*module.batch_axis.values(), *module.in_features, *module.out_features)
    return _reading(
      shape,
      own,
      tuple(range(n_batch, n_batch + n_in)),
      tuple(range(n_batch + n_in, len(own))),
    )
  if isinstance(module, nnx.Einsum):
    own = tuple(module.kernel_shape)
    axes = _einsum_axes(module.einsum_str, len(own))
    return None if axes is None else _reading(shape, own, *axes)
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
    # kernel (*kernel_size, in, out); ConvTranspose(transpose_kernel=True) (*kernel_size, out, in)
    own = tuple(module.kernel_shape)
    n_space = len(own) - 2
    space = tuple(range(n_space))
    if isinstance(module, nnx.ConvTranspose) and module.transpose_kernel:
      return _reading(shape, own, (*space, n_space + 1), (n_space,))
    return _reading(shape, own, (*space, n_space), (n_space + 1,))
  return None


def nnx_dimension_numbers(
  model: Any, wrt: Any = None, *, roles: Mapping[str, str] | None = None
) -> Callable[[Any], Any]:
  """How each parameter of a Flax NNX model reads as a matrix, from its modules.

  The model is read once: the kernels of ``nnx.Linear``, ``nnx.LinearGeneral``
  (so ``nnx.MultiHeadAttention``'s projections), ``nnx.Einsum``, ``nnx.Conv``
  and ``nnx.ConvTranspose`` get the ``DimensionNumbers`` their module implies,
  with any leading axes of layers stacked by ``nnx.vmap`` / ``nnx.scan`` as
  batch axes; an ``nnx.Embed`` table reads as ``(vocabulary, features)``, which
  only the rules that take embeddings (``scale``) select by default.
  A parameter of another module reads from its axis names, when its
  ``nnx.Variable`` has them (``out_sharding`` metadata, as
  ``nnx.with_partitioning`` sets; see ``axis_names_dimension_numbers``).
  Everything else (biases, norm scales, unnamed parameters of other modules,
  1-D or empty leaves) gets ``None``: the optimizer's plain rule, or its own
  defaults, decide for those.

  The returned callable takes a tree of the model's parameters: an
  ``nnx.State`` (from ``nnx.state(model, nnx.Param)`` or ``nnx.split``), a
  pure dict (from ``nnx.to_pure_dict``), or the gradients of either; leaves
  are matched by path. Its result has the structure of that tree (for an
  ``nnx.State``, each ``nnx.Param`` then holds a ``DimensionNumbers`` or
  ``None``), so it also broadcasts onto the tree as a prefix with
  ``is_leaf=lambda x: x is None or isinstance(x, DimensionNumbers)``.

  Args:
    model: An ``nnx.Module``.
    wrt: An ``nnx`` filter of the variables that are parameters (default
      ``nnx.Param``).
    roles: Axis names to add to ``AXIS_ROLES`` or to override in it, for
      parameters read from their names.

  Returns:
    A callable from a parameter tree to a tree of ``DimensionNumbers`` or
    ``None``, for ``dimension_numbers=``. It raises ``ValueError`` for a leaf
    of 2 or more axes that is not a parameter of ``model``, or whose number of
    axes differs from that parameter's.

  Examples:
    >>> import jax, optax_lean
    >>> from flax import nnx
    >>> class Model(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.attn = nnx.MultiHeadAttention(
    ...         num_heads=2, in_features=8, decode=False, rngs=rngs)
    ...     self.conv = nnx.Conv(3, 5, (3, 3), rngs=rngs)
    >>> model = Model(nnx.Rngs(0))
    >>> fn = optax_lean.nnx_dimension_numbers(model)
    >>> state = nnx.state(model, nnx.Param)
    >>> readings = fn(state)
    >>> is_dims = lambda x: x is None or isinstance(x, optax_lean.DimensionNumbers)
    >>> for path, dims in jax.tree.leaves_with_path(readings, is_leaf=is_dims):
    ...   print(jax.tree_util.keystr(path), dims)
    ['attn']['key']['bias'].value None
    ['attn']['key']['kernel'].value DimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    ['attn']['out']['bias'].value None
    ['attn']['out']['kernel'].value DimensionNumbers(reduction_axis=(0, 1), output_axis=2)
    ['attn']['query']['bias'].value None
    ['attn']['query']['kernel'].value DimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    ['attn']['value']['bias'].value None
    ['attn']['value']['kernel'].value DimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    ['conv']['bias'].value None
    ['conv']['kernel'].value DimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
    >>> fn(nnx.to_pure_dict(state))['attn']['out']  # the same readings for a pure dict
    {'bias': None, 'kernel': DimensionNumbers(reduction_axis=(0, 1), output_axis=2)}
    >>> tx = optax_lean.adamsnsm(1e-2, rank=2, dimension_numbers=fn)
    >>> opt_state = tx.init(state)
  """
  from flax import nnx  # here, not at the top: flax is optional

  wrt = nnx.Param if wrt is None else wrt
  modules: dict[Path, Any] = {
    tuple(str(key) for key in path): node
    for path, node in nnx.iter_graph(model)
    if isinstance(node, nnx.Module)
  }
  # path -> (number of axes, reading) of every parameter
  table: dict[Path, tuple[int, DimensionNumbers | None]] = {}
  table_of_roles = check_roles(roles)
  is_variable = lambda x: isinstance(x, nnx.Variable)
  params = nnx.state(model, wrt)
  for path, variable in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)[0]:
    key = path_names(path)
    shape = tuple(getattr(variable.get_value(), 'shape', ()))
    reading = None
    if key and key[-1] == 'kernel' and len(shape) >= 2 and key[:-1] in modules:
      reading = _kernel_reading(nnx, modules[key[:-1]], shape)
    elif key and key[-1] == 'embedding' and isinstance(modules.get(key[:-1]), nnx.Embed):
      embed = modules[key[:-1]]  # a lookup: the token is the input side
      reading = _reading(shape, (embed.num_embeddings, embed.features), (0,), (1,))
    names = carried_axis_names(variable)
    if reading is None and names is not None:
      reading = read_names(names, table_of_roles)
    table[key] = (len(shape), reading)

  def dimension_numbers(tree: Any) -> Any:
    def one(path: tuple[Hashable, ...], leaf: Any) -> DimensionNumbers | None:
      key = path_names(path)
      shape = tuple(getattr(leaf, 'shape', ()))
      name = '.'.join(key)
      if key not in table:
        if len(shape) >= 2:
          raise ValueError(
            f'{_NAME}: leaf {name} is not a parameter of the model it was built from.'
          )
        return None
      ndim, reading = table[key]
      if len(shape) >= 2 and len(shape) != ndim:
        raise ValueError(
          f'{_NAME}: leaf {name} has shape {shape}, but the parameter of the model it was '
          f'built from has {ndim} axes.'
        )
      if len(shape) < 2 or 0 in shape:
        return None
      return reading

    return jax.tree_util.tree_map_with_path(one, tree)

  return dimension_numbers
