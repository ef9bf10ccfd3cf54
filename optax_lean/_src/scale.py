"""SCALE: column-normalised SGD, with momentum on the output layer only.

Glentis, Li, Han and Hong, `SCALE: Stochastic Column-normAlized Last-layer
momEntum <https://arxiv.org/abs/2506.16659>`_, ICML 2026; official code
https://github.com/OptimAI-Lab/Minimalist_LLM_Pretraining
(``mem_eff_pt/pt_scale/scale_optimizer.py``). Every matrix, the embedding
table included, takes its gradient divided by each output unit's root mean
square over the input side; only the output layer keeps a momentum; vectors
(norm scales, biases) get AdamW.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from optax_lean._src import checks, dtypes, leafwise
from optax_lean._src import warn as warn_lib
from optax_lean._src.adam import adam_step, validate_adam
from optax_lean._src.combine import add_decay_before_update, chain_with_decay_before_update
from optax_lean._src.dimension_numbers import (
  OUTPUT_LAYER_NAMES,
  DimensionNumbersOrFn,
  MaskOrFn,
  MatrixLayout,
  broadcast_to_leaves,
  find_output_layer,
  is_tree_function,
  path_names,
  path_str,
)
from optax_lean._src.selection import resolve_layouts, selection_mask

# The official ``clamp_min_(1e-8)`` of each output unit's root mean square.
RMS_FLOOR = 1e-8


class ScaleByColumnNormState(NamedTuple):
  """State of ``scale_by_column_norm``.

  Attributes:
    count: Number of updates so far (Adam's bias corrections).
    mu: The output layer's momentum and the other leaves' Adam first moment;
      ``None`` for the normalised matrices, which keep no state.
    nu: The other leaves' Adam second moment; ``None`` for every matrix.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def column_normalize(g: jax.Array, layout: MatrixLayout) -> jax.Array:
  r"""``g`` divided by each output unit's root mean square over the input side.

  .. math::
    u_{ij} = g_{ij} \Big/ \max\Big(\sqrt{\tfrac{1}{d_\text{in}}
      \textstyle\sum_{i'} |g_{i'j}|^2},\ 10^{-8}\Big)

  for ``g`` read as ``(…, in, out)`` by ``layout`` (each matrix of a stack on
  its own). A PyTorch ``(out, in)`` weight's rows, a Flax ``(in, out)``
  kernel's columns, an embedding's features over the vocabulary.

  Args:
    g: A leaf, in its own layout.
    layout: How it reads as ``(…, in, out)``.

  Returns:
    The normalised leaf, in the compute dtype.
  """
  dtype = dtypes.compute_dtype(g.dtype)
  g = g.astype(dtype)
  mean_square = jnp.mean(dtypes.abs_sq(g), axis=layout.in_axes, keepdims=True)
  rms = jnp.maximum(jnp.sqrt(mean_square), jnp.asarray(RMS_FLOOR, mean_square.dtype))
  return g / rms.astype(dtype)


OutputLayer = str | bool | MaskOrFn | None


def _output_leaves(
  tree: Any, layouts: Sequence[MatrixLayout | None], output_layer: OutputLayer, warn: bool
) -> set[int]:
  """The flat indices of the leaves that keep a momentum."""
  if output_layer is False:
    return set()
  with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  if output_layer is None:
    found, candidates = find_output_layer(tree, layouts)
    if not found and candidates and warn:  # a whole model, not a part of one (layerwise)
      warn_lib.warn(
        'optax_lean.scale: no output layer found (no matrix named one of '
        f"{', '.join(OUTPUT_LAYER_NAMES)}, none mapping to an embedding's vocabulary), so "
        'no leaf keeps a momentum; name it with output_layer= (or pass output_layer=False).'
      )
    return set(found)
  if isinstance(output_layer, str):
    chosen = [output_layer in path_names(path) for path, _ in with_paths]
    if not any(chosen) and any(path for path, _ in with_paths):  # a lone array has no names
      raise ValueError(f'output_layer: {output_layer!r} names no leaf of the params.')
  else:
    mask = output_layer(tree) if is_tree_function(output_layer) else output_layer
    chosen = broadcast_to_leaves('output_layer', mask, tree)
  found = {i for i, c in enumerate(chosen) if c}
  unread = [path_str(with_paths[i][0]) for i in sorted(found) if layouts[i] is None]
  if unread:
    raise ValueError(
      f'output_layer: {", ".join(unread)} is not one of the matrices the rule reads '
      '(see mask= and dimension_numbers=).'
    )
  return found


def scale_by_column_norm(
  momentum: jax.typing.ArrayLike = 0.9,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  *,
  output_layer: OutputLayer = None,
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SCALE's direction: column-normalised gradients, momentum on the output layer.

  For each selected matrix read as ``(…, in, out)``, with
  :math:`C(X)_{ij} = X_{ij} / \max(\mathrm{rms}_i X_{:j}, 10^{-8})`
  (``column_normalize``),

  .. math::
    u = C(G) \text{ (hidden matrices, embedding)}, \qquad
    m_t = \beta m_{t-1} + (1-\beta) G_t,\ u = C(m_t) \text{ (output layer)},

  and Hugging Face's Adam direction
  :math:`\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \frac{m_t}{\sqrt{v_t} +
  \epsilon}` for every other leaf.

  The output layer is, by default, the single matrix named one of
  ``'lm_head'``, ``'head'``, ``'unembed'``, ``'unembedding'``, ``'logits'``,
  ``'logits_dense'`` or ``'output'``, else the single one whose output side is
  an embedding table's vocabulary; several candidates raise a ``ValueError``
  naming them; none, among unstacked matrices, warns. A model that ties its output layer to the
  embedding passes ``output_layer='embedding'`` (or its name).

  Args:
    momentum: The output layer's momentum :math:`\beta`, in ``[0, 1)``.
    b1: Adam's first-moment decay for the other leaves.
    b2: Adam's second-moment decay for the other leaves.
    eps: Adam's offset, on the root of the uncorrected second moment.
    output_layer: ``None`` (find it, see above), ``False`` (no momentum
      anywhere), a name on the leaf's path (``'lm_head'``), or a pytree (or
      prefix, or callable) of bools.
    mask: Leaves normalised as matrices (default: every matrix the layout
      reader can read, embedding tables included, read as ``(vocabulary,
      features)``).
    dimension_numbers: How selected leaves read as ``(…, in, out)``; a
      PyTorch-layout ``(out, in)`` weight is ``DimensionNumbers(1, 0)``.
    mu_dtype: Dtype of the momentum and Adam's first moment (default: the
      leaf's).
    nu_dtype: Dtype of Adam's second moment (default: the leaf's).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    ``ScaleByColumnNormState``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> params = {'embed': {'embedding': jnp.ones((10, 4))},
    ...           'dense': {'kernel': jnp.ones((4, 4))},
    ...           'lm_head': {'kernel': jnp.ones((4, 10))}, 'norm': jnp.ones(4)}
    >>> tx = optax_lean.scale_by_column_norm()
    >>> state = tx.init(params)
    >>> state.mu['dense'], state.mu['lm_head']['kernel'].shape
    ({'kernel': None}, (4, 10))

  References:
    Glentis et al., `SCALE: Stochastic Column-normAlized Last-layer momEntum
    <https://arxiv.org/abs/2506.16659>`_, ICML 2026
  """
  checks.in_interval('momentum', momentum, 0.0, 1.0)
  validate_adam(b1, b2, eps)
  if isinstance(output_layer, jax.Array):
    raise ValueError(
      'output_layer must be a name, a mask or a function of the params, got an array: '
      'optax.inject_hyperparams calls functions as schedules; pass '
      "static_args=('output_layer',)."
    )

  def plans(tree, warn=False) -> list[tuple[MatrixLayout | None, bool]]:
    layouts = resolve_layouts(tree, mask, dimension_numbers, embeddings=True, warn=warn)
    outputs = _output_leaves(tree, layouts, output_layer, warn)
    return [(layout, i in outputs) for i, layout in enumerate(layouts)]

  def init_fn(params):
    params = dtypes.as_arrays(params)
    leaves, treedef = jax.tree.flatten(params)
    mus, nus = [], []
    for p, (layout, is_output) in zip(leaves, plans(params, warn=True)):
      keeps_momentum = layout is None or is_output
      mus.append(otu.tree_zeros_like(p, dtype=mu_dtype) if keeps_momentum else None)
      second = dtypes.second_moment_dtype(p.dtype, nu_dtype)
      nus.append(otu.tree_zeros_like(p, dtype=second) if layout is None else None)
    unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
    return ScaleByColumnNormState(jnp.zeros([], jnp.int32), unflatten(mus), unflatten(nus))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    updates = dtypes.as_arrays(updates)
    count_inc = optax.safe_increment(state.count)

    def update_leaf(index, g, mu, nu, plan):
      del index
      layout, is_output = plan
      if layout is None:
        return adam_step(g, mu, nu, count_inc, b1, b2, eps, 'hf')
      if not is_output:
        return column_normalize(g, layout), None, None
      dtype = dtypes.compute_dtype(g.dtype, mu.dtype)
      beta = jnp.asarray(momentum, dtypes.real_dtype(dtype)).astype(dtype)
      mu = beta * mu.astype(dtype) + (1 - beta) * g.astype(dtype)
      return column_normalize(mu, layout), mu, None

    directions, (mu, nu) = leafwise.map_leaves(
      update_leaf, updates, (state.mu, state.nu), plans(updates)
    )
    return directions, ScaleByColumnNormState(count_inc, mu, nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale(
  learning_rate: optax.ScalarOrSchedule,
  momentum: jax.typing.ArrayLike = 0.9,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  adam_learning_rate: optax.ScalarOrSchedule | None = None,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  output_layer: OutputLayer = None,
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  weight_decay_mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SCALE: column-normalised SGD with momentum on the output layer only.

  ``scale_by_column_norm``, decoupled weight decay of the parameters before
  the update, and the learning rate, as the official ``SCALE`` optimizer:

  .. math::
    W_t = W_{t-1}(1 - \eta_t\lambda) - \eta_t\, u_t,

  with ``adam_learning_rate`` in place of :math:`\eta_t` for the leaves that
  get AdamW. State: the output layer's momentum and AdamW's moments of the
  vectors, nothing for the hidden matrices and the embedding.

  The official code divides by the root mean square of each output unit's
  row (PyTorch's ``(out, in)`` weights, ``dim=1``) and of each feature of
  the embedding over the vocabulary (``dim=0``): both are the input side, axis
  0 of a Flax kernel ``(in, out)`` and of an ``nnx.Embed`` table ``(vocabulary,
  features)``. The paper's "column-wise normalisation" by the :math:`\ell_2`
  norm differs by :math:`\sqrt{d_\text{in}}`, absorbed in the learning rate.
  Its official scripts use ``learning_rate`` 1e-3 (60M-350M) and 2e-4 (1B),
  ``adam_learning_rate`` 2e-2 and 1e-3, no weight decay.

  Args:
    learning_rate: A float or an ``optax`` schedule, for the matrices.
    momentum: The output layer's momentum, in ``[0, 1)``.
    weight_decay: Decoupled weight decay, ``>= 0``.
    adam_learning_rate: A float or schedule for the AdamW leaves (default:
      ``learning_rate``).
    b1: AdamW's first-moment decay.
    b2: AdamW's second-moment decay.
    eps: AdamW's offset.
    output_layer: Which matrix keeps a momentum (see
      ``scale_by_column_norm``).
    mask: Leaves normalised as matrices (see ``scale_by_column_norm``).
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: Dtype of the momenta (default: the parameter's).
    nu_dtype: Dtype of AdamW's second moment (default: the parameter's).
    weight_decay_mask: Leaves to decay (default: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_lean
    >>> params = {'embed': {'embedding': jnp.ones((10, 4))},
    ...           'lm_head': {'kernel': jnp.ones((4, 10))}}
    >>> def loss(p):
    ...   logits = p['embed']['embedding'][jnp.arange(3)] @ p['lm_head']['kernel']
    ...   return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), jnp.arange(3) + 1])
    >>> tx = optax_lean.scale(1e-2)
    >>> state = tx.init(params)
    >>> before = loss(params)
    >>> for _ in range(5):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < before)
    True

  References:
    Glentis et al., `SCALE: Stochastic Column-normAlized Last-layer momEntum
    <https://arxiv.org/abs/2506.16659>`_, ICML 2026
  """
  core = scale_by_column_norm(
    momentum,
    b1,
    b2,
    eps,
    output_layer=output_layer,
    mask=mask,
    dimension_numbers=dimension_numbers,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
  )
  if adam_learning_rate is None:
    return chain_with_decay_before_update(core, learning_rate, weight_decay, weight_decay_mask)

  matrices = functools.partial(
    selection_mask, mask=mask, dimension_numbers=dimension_numbers, embeddings=True
  )
  others = functools.partial(matrices, complement=True)
  return optax.chain(
    core,
    add_decay_before_update(weight_decay, weight_decay_mask),
    optax.masked(optax.scale_by_learning_rate(learning_rate), matrices),
    optax.masked(optax.scale_by_learning_rate(adam_learning_rate), others),
  )
