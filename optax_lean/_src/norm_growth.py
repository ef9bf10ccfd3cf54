"""The norm-growth limiter of Fira and APOLLO, as its own transformation.

Fira (Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_) and APOLLO (Zhu et
al., `APOLLO: SGD-like Memory, AdamW-level Performance
<https://arxiv.org/abs/2412.05270>`_, MLSys 2025; official code
https://github.com/zhuhanqing/APOLLO, ``apollo_torch/apollo.py``) keep the
norm of each matrix's update from growing by more than a factor ``gamma`` per
step, which tames the loss spikes of a scaled full-rank gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lean._src import checks, dtypes, leafwise
from optax_lean._src.dimension_numbers import (
  DimensionNumbersOrFn,
  MaskOrFn,
  MatrixLayout,
)
from optax_lean._src.selection import resolve_layouts


class ScaleByNormGrowthLimitState(NamedTuple):
  """State of ``scale_by_norm_growth_limit``.

  Attributes:
    previous_norm: Per selected leaf, the norm of each of its matrices' last
      (limited) update, shaped like the leaf's batch axes (``inf`` before the
      first update); ``None`` for the other leaves.
  """

  previous_norm: optax.Updates


def matrix_norms(u: jax.Array, layout: MatrixLayout) -> jax.Array:
  """The Frobenius norm of each matrix of ``u`` (over its matrix axes), in float32 or wider."""
  dtype = dtypes.real_dtype(dtypes.compute_dtype(u.dtype))
  squares = jnp.real(u * jnp.conj(u)).astype(dtype)
  return jnp.sqrt(jnp.sum(squares, axis=layout.in_axes + layout.out_axes))


def limit_growth(
  u: jax.Array,
  previous_norm: jax.Array,
  layout: MatrixLayout,
  gamma: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
) -> tuple[jax.Array, jax.Array]:
  r"""One leaf's limited update and its matrices' new norms.

  .. math::
    \ell = \max\Big(\frac{\|U_t\|}{\|U_{t-1}\| + \epsilon}, \gamma\Big) / \gamma,
    \qquad U_t \leftarrow U_t / \ell,

  and the stored norm is :math:`\|U_t\| / \ell`: a matrix whose norm grew by
  more than :math:`\gamma` is scaled to :math:`\gamma (\|U_{t-1}\| + \epsilon)`.
  """
  norms = matrix_norms(u, layout)
  limiter = jnp.maximum(norms / (previous_norm + eps), gamma) / gamma
  expand = lambda x: jnp.expand_dims(x, layout.in_axes + layout.out_axes)
  return (u / expand(limiter).astype(u.dtype)).astype(u.dtype), norms / limiter


def scale_by_norm_growth_limit(
  gamma: jax.typing.ArrayLike = 1.01,
  *,
  eps: jax.typing.ArrayLike = 1e-8,
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
) -> optax.GradientTransformation:
  r"""Limits the growth of each matrix's update norm to a factor ``gamma`` per step.

  For each matrix of a selected leaf (each layer of a stack separately), with
  :math:`\|\cdot\|` the Frobenius norm:

  .. math::
    U_t \leftarrow U_t \Big/ \frac{\max\big(\|U_t\| / (\|U_{t-1}\| + \epsilon),
      \gamma\big)}{\gamma},

  where :math:`U_{t-1}` is the previous limited update; the first update
  passes unchanged. This is the limiter of Fira and of APOLLO's official code
  (``gamma = 1.01``, ``eps = 1e-8``). Leaves that are not selected pass
  unchanged.

  Args:
    gamma: The largest growth factor of a matrix's norm per step, ``>= 1``.
    eps: Added to the previous norm.
    mask: Which leaves are limited (as ``scale_by_subset_norm``'s ``mask``);
      ``None``: the leaves ``dimension_numbers`` reads as matrices, else
      ``default_mask``.
    dimension_numbers: How selected leaves read as matrices: their batch axes
      (the layers of a stack) get one norm each.

  Returns:
    An ``optax.GradientTransformation`` whose state is
    ``ScaleByNormGrowthLimitState``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> tx = optax_lean.scale_by_norm_growth_limit(gamma=1.01)
    >>> state = tx.init({'w': jnp.zeros((2, 2))})
    >>> _, state = tx.update({'w': jnp.ones((2, 2))}, state)  # norm 2: kept
    >>> updates, state = tx.update({'w': 10 * jnp.ones((2, 2))}, state)
    >>> round(float(jnp.linalg.norm(updates['w'])), 4)  # held to 1.01 x 2
    2.02

  References:
    Chen et al., `Fira <https://arxiv.org/abs/2410.01623>`_, NeurIPS 2025; Zhu et al.,
    `APOLLO <https://arxiv.org/abs/2412.05270>`_, MLSys 2025.
  """
  checks.in_interval('gamma', gamma, 1.0, float('inf'))
  checks.non_negative('eps', eps)

  def layouts(tree):
    return resolve_layouts(tree, mask, dimension_numbers)

  def init_fn(params):
    params = dtypes.as_arrays(params)
    norms = [
      None
      if layout is None
      else jnp.full(layout.batch_shape, jnp.inf, dtypes.real_dtype(dtypes.compute_dtype(p.dtype)))
      for p, layout in zip(jax.tree.leaves(params), layouts(params))
    ]
    return ScaleByNormGrowthLimitState(jax.tree.unflatten(jax.tree.structure(params), norms))

  def update_fn(updates, state, params=None):
    del params
    updates = dtypes.as_arrays(updates)

    def update_leaf(index, u, previous, layout):
      del index
      if layout is None:
        return u, None
      return limit_growth(u, previous, layout, gamma, eps)

    outputs, (norms,) = leafwise.map_leaves(
      update_leaf, updates, (state.previous_norm,), layouts(updates)
    )
    return outputs, ScaleByNormGrowthLimitState(norms)

  return optax.GradientTransformation(init_fn, update_fn)
