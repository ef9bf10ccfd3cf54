"""Per-layer updates of stacked parameters: an optimizer state split by layer.

A scanned model keeps each block parameter as one stacked leaf ``(layers,
...)``. An optimizer built for the stack (``tx.init(stacked)``) keeps its
per-layer state with the same leading axis, and a few leaves shared by all
layers (the step count, a PRNG key). Updating layer ``i`` alone, as soon as its
gradient exists (GaLore's per-layer weight updates, which never hold the whole
gradient), applies ``tx`` to layer ``i``'s slice of the parameters and of the
per-layer state, with the shared leaves as they were at the start of the step;
every layer advances them the same way, once per step.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

_IS_NONE = lambda x: x is None


def layer_axes(tx: optax.GradientTransformation, stacked_params: Any) -> Any:
  """Which leaves of ``tx``'s state carry the layer axis of ``stacked_params``.

  The state is traced twice with ``jax.eval_shape`` (nothing is allocated):
  for the stack's ``L`` layers and for ``L + 1``. A state leaf whose leading
  axis follows (``L`` then ``L + 1``) is per-layer; the others (step counts,
  keys, states of unstacked leaves) are shared.

  Args:
    tx: The optimizer, as applied to the whole stack.
    stacked_params: Parameters (arrays or ``jax.ShapeDtypeStruct``) whose every
      leaf has the same leading layer axis.

  Returns:
    A pytree of bools with the structure of ``tx.init(stacked_params)``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_lean
    >>> tx = optax.adam(1e-3)
    >>> axes = optax_lean.layer_axes(tx, {'w': jnp.zeros((3, 4, 5))})
    >>> axes[0].count, axes[0].mu['w']
    (False, True)
  """
  leaves = jax.tree.leaves(stacked_params)
  layers = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
  if len(layers) != 1 or None in layers:
    raise ValueError(
      'layer_axes: every leaf of stacked_params must have the same leading layer axis, '
      f'got leading sizes {sorted(map(str, layers))}.'
    )
  grow = lambda p: jax.ShapeDtypeStruct((p.shape[0] + 1, *p.shape[1:]), p.dtype)
  state = jax.eval_shape(tx.init, stacked_params)
  grown = jax.eval_shape(tx.init, jax.tree.map(grow, stacked_params))
  return jax.tree.map(
    lambda a, b: a.ndim > 0 and b.ndim == a.ndim and b.shape[0] == a.shape[0] + 1, state, grown
  )


def split_layers(state: optax.OptState, axes: Any) -> tuple[Any, Any]:
  """``state`` as ``(per_layer, shared)``: its per-layer leaves, and the others.

  Each part keeps the state's structure, with ``None`` where the other part
  has the leaf, so the per-layer part can be the ``xs`` of a ``jax.lax.scan``
  over layers.

  Args:
    state: A state of ``tx`` for a stack (or one layer's slice of it).
    axes: ``layer_axes(tx, stacked_params)``.

  Returns:
    ``(per_layer, shared)``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_lean
    >>> tx, params = optax.adam(1e-3), {'w': jnp.zeros((3, 4, 5))}
    >>> axes = optax_lean.layer_axes(tx, params)
    >>> per_layer, shared = optax_lean.split_layers(tx.init(params), axes)
    >>> per_layer[0].mu['w'].shape, shared[0].mu['w'], shared[0].count
    ((3, 4, 5), None, Array(0, dtype=int32))
  """
  per_layer = jax.tree.map(lambda x, a: x if a else None, state, axes)
  shared = jax.tree.map(lambda x, a: None if a else x, state, axes)
  return per_layer, shared


def merge_layers(per_layer: Any, shared: Any, axes: Any) -> optax.OptState:
  """The inverse of ``split_layers``.

  Args:
    per_layer: The per-layer part (of the stack, or of one layer).
    shared: The shared part.
    axes: ``layer_axes(tx, stacked_params)``.

  Returns:
    The state.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_lean
    >>> tx, params = optax.adam(1e-3), {'w': jnp.zeros((3, 4, 5))}
    >>> axes = optax_lean.layer_axes(tx, params)
    >>> state = tx.init(params)
    >>> again = optax_lean.merge_layers(*optax_lean.split_layers(state, axes), axes)
    >>> jax.tree.structure(again) == jax.tree.structure(state)
    True
  """
  return jax.tree.map(lambda a, x, y: x if a else y, axes, per_layer, shared, is_leaf=_IS_NONE)


def update_layer(
  tx: optax.GradientTransformation,
  updates: optax.Updates,
  layer_state: Any,
  shared_state: Any,
  axes: Any,
  params: optax.Params | None = None,
  *,
  index: jax.typing.ArrayLike | None = None,
  **extra_args: Any,
) -> tuple[optax.Updates, Any, Any]:
  r"""Applies ``tx`` to one layer of a stack: its gradient, state slice and parameters.

  For a stacked parameter :math:`W = (W_1, \dots, W_L)` and a transformation
  that treats layers independently (every optax_lean transformation does,
  through ``DimensionNumbers``' batch axes),

  .. math::
    \mathrm{tx}(G, s)_i = \mathrm{tx}(G_i, s_i),

  so updating each layer from its slice of the per-layer state, with the
  shared leaves as they were at the start of the step, gives the step of the
  whole stack, layer by layer (projectors that draw random numbers draw them
  per layer instead, see ``index``). Every layer advances the shared leaves
  (the step count) alike: keep the shared part one layer returns.

  Args:
    tx: The optimizer, as applied to the whole stack.
    updates: Layer ``i``'s gradient (unstacked).
    layer_state: Layer ``i``'s slice of ``split_layers(state, axes)[0]``.
    shared_state: ``split_layers(state, axes)[1]`` at the start of the step.
    axes: ``layer_axes(tx, stacked_params)``.
    params: Layer ``i``'s parameters (unstacked), when ``tx`` needs them.
    index: ``i``, passed to ``tx.update`` as the extra argument ``layer``:
      optax_lean's projectors fold it into the keys they draw random numbers
      from (``'random'``, ``'uniform'``, ``'randomized_svd'``), so that each
      layer gets its own subspace. Transformations that take no such argument
      ignore it.
    **extra_args: Passed on to ``tx.update``.

  Returns:
    ``(updates, layer_state, shared_state)``: layer ``i``'s updates and new
    state slice, and the shared part after one step.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_lean
    >>> params = {'kernel': jnp.ones((3, 8, 6))}  # three (8, 6) layers
    >>> tx = optax_lean.adamsnsm(1e-2, rank=2, update_proj_gap=5, mask={'kernel': True})
    >>> grads = {'kernel': jnp.cos(jnp.arange(144.0)).reshape(3, 8, 6)}
    >>> axes = optax_lean.layer_axes(tx, params)
    >>> per_layer, shared = optax_lean.split_layers(tx.init(params), axes)
    >>> layer = lambda x: jax.tree.map(lambda leaf: leaf[1], x)
    >>> updates, _, _ = optax_lean.update_layer(
    ...     tx, layer(grads), layer(per_layer), shared, axes, layer(params))
    >>> whole, _ = tx.update(grads, tx.init(params), params)
    >>> bool(jnp.allclose(updates['kernel'], whole['kernel'][1], atol=1e-6))
    True

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024 (per-layer
    weight updates)
  """
  state = merge_layers(layer_state, shared_state, axes)
  if index is not None:
    extra_args['layer'] = index
  updates, state = optax.with_extra_args_support(tx).update(updates, state, params, **extra_args)
  layer_state, shared_state = split_layers(state, axes)
  return updates, layer_state, shared_state
