"""Subset-Norm (SN): one adaptive second-moment scalar per subset of coordinates.

Nguyen & Nguyen, `Lean and Mean Adaptive Optimization via Subset-Norm and
Subspace-Momentum with Convergence Guarantees <https://arxiv.org/abs/2411.07120>`_,
ICML 2025; official code https://github.com/timmytonga/sn-sm (``subset_norm.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree as otu

from optax_lean._src import checks, dtypes, leafwise, sharding
from optax_lean._src.dimension_numbers import (
  DimensionNumbersOrFn,
  MaskOrFn,
  MatrixLayout,
)
from optax_lean._src.selection import resolve_layouts

SubsetSize = str | int
HEURISTIC = 'heuristic'


class ScaleBySubsetNormState(NamedTuple):
  """State of ``scale_by_subset_norm``.

  Attributes:
    count: Number of updates so far (``shape=(), dtype=int32``).
    nu: Per leaf, the accumulated sum of squared gradients of each subset:
      ``(*batch, 1, out)`` or ``(*batch, in, 1)`` for the heuristic rule,
      ``(*batch, numel // s, 1)`` for subsets of ``s`` contiguous entries, and
      the leaf's own shape for leaves without the rule (one subset per entry).
  """

  count: jax.Array
  nu: optax.Updates


def closest_smaller_divisor(n: int, k: int) -> int:
  """The largest divisor of ``n`` that is at most ``k`` (official helper)."""
  for candidate in range(min(k, n), 0, -1):
    if n % candidate == 0:
      return candidate
  return 1


@dataclasses.dataclass(frozen=True)
class SubsetRule:
  """How one leaf's coordinates are grouped into subsets.

  ``kind`` is ``'per_output'`` (one subset per output unit, summing over the
  input axis: the rows of a PyTorch weight), ``'per_input'`` (one per input
  unit), ``'chunks'`` (``size`` contiguous entries of the PyTorch-order
  flattening) or ``'elementwise'`` (ordinary Adam).
  """

  kind: str
  size: int = 1

  @classmethod
  def resolve(cls, subset_size: SubsetSize, layout: MatrixLayout | None) -> SubsetRule:
    if layout is None:
      return cls('elementwise')
    if subset_size == HEURISTIC:
      # The official rule keeps the larger PyTorch axis (rows when square).
      if layout.out_size >= layout.in_size:
        return cls('per_output', layout.in_size)
      return cls('per_input', layout.out_size)
    numel = layout.in_size * layout.out_size
    if subset_size > 0:
      if subset_size > numel:
        raise ValueError(
          f'subset_size must be at most the size of each selected leaf, '
          f'got {subset_size} for a leaf of shape {layout.shape}.'
        )
      target = subset_size
    else:
      target = max(1, int(math.sqrt(numel) / -subset_size))
    return cls('chunks', closest_smaller_divisor(numel, target))

  def state_shape(self, layout: MatrixLayout) -> tuple[int, ...]:
    batch, n_in, n_out = layout.batch_shape, layout.in_size, layout.out_size
    if self.kind == 'per_output':
      return (*batch, 1, n_out)
    if self.kind == 'per_input':
      return (*batch, n_in, 1)
    return (*batch, n_in * n_out // self.size, 1)

  def compute_spec(self, layout: MatrixLayout, like: Any) -> tuple[Any, ...]:
    """Sharding of the state as the update computes it: the leaf's on the kept axis."""
    matrix_spec = tuple(layout.matrix_spec(sharding.spec_of(like)))
    batch, in_spec, out_spec = matrix_spec[:-2], matrix_spec[-2], matrix_spec[-1]
    if self.kind == 'per_output':
      return (*batch, None, out_spec)
    if self.kind == 'per_input':
      return (*batch, in_spec, None)
    return (*batch, self._chunk_spec(layout, like, out_spec), None)

  def state_spec(self, layout: MatrixLayout, like: Any) -> tuple[Any, ...]:
    """Sharding of the stored state: ``compute_spec``, plus the mesh axes of summed axes.

    Summing over a sharded axis would leave the state replicated; that mesh axis
    moves to the kept axis when it divides it (``sharding.with_spare_axes``).
    """
    shape = self.state_shape(layout)
    kept = len(shape) - (1 if self.kind == 'per_output' else 2)
    return sharding.with_spare_axes(self.compute_spec(layout, like), shape, like, (kept,))

  def _chunk_spec(self, layout: MatrixLayout, like: Any, out_spec: Any) -> Any:
    # Chunks follow the PyTorch (out, in) order, so they can keep the output
    # axis's sharding when every shard holds whole chunks.
    chunks = layout.in_size * layout.out_size // self.size
    return out_spec if chunks % sharding.num_shards(like, out_spec) == 0 else None

  def _chunk_view(self, matrix: jax.Array, layout: MatrixLayout, like: jax.Array) -> jax.Array:
    """``(*batch, numel // size, size)``: chunks of the PyTorch-order matrix."""
    torch_order = jnp.swapaxes(matrix, -1, -2)
    batch_spec = sharding.spec_of(matrix)[:-2]
    out_spec = sharding.spec_of(matrix)[-1]
    shape = (*self.state_shape(layout)[:-1], self.size)
    spec = (*batch_spec, self._chunk_spec(layout, like, out_spec), None)
    return sharding.reshape(torch_order, shape, spec)

  def statistic(self, g: jax.Array, layout: MatrixLayout | None) -> jax.Array:
    """The sum of squares of each subset, shaped like the state."""
    if self.kind == 'elementwise':
      return dtypes.abs_sq(g)
    matrix = layout.to_matrix(g)
    if self.kind == 'per_output':
      return jnp.sum(dtypes.abs_sq(matrix), axis=-2, keepdims=True)
    if self.kind == 'per_input':
      return jnp.sum(dtypes.abs_sq(matrix), axis=-1, keepdims=True)
    chunks = self._chunk_view(matrix, layout, g)
    return jnp.sum(dtypes.abs_sq(chunks), axis=-1, keepdims=True)

  def divide(
    self, numerator: jax.Array, denominator: jax.Array, layout: MatrixLayout | None
  ) -> jax.Array:
    """``numerator / denominator``, the denominator broadcast over subsets."""
    if self.kind == 'elementwise':
      return numerator / denominator
    matrix = layout.to_matrix(numerator)
    if self.kind in ('per_output', 'per_input'):
      return layout.from_matrix(matrix / denominator)
    torch_shape = (*layout.batch_shape, layout.out_size, layout.in_size)
    torch_spec = sharding.spec_of(jnp.swapaxes(matrix, -1, -2))
    divided = self._chunk_view(matrix, layout, numerator) / denominator
    torch_order = sharding.reshape(divided, torch_shape, torch_spec)
    return layout.from_matrix(jnp.swapaxes(torch_order, -1, -2))


@dataclasses.dataclass(frozen=True)
class Divisor:
  """One leaf's subset-norm denominators, and the division by them.

  What ``scale_by_subset_norm`` hands a numerator function (see its
  ``numerator``), so that the numerator can divide as it goes, one matrix at
  a time.

  Attributes:
    denominator: The leaf's denominators, shaped like its state (its batch
      axes first), in their compute dtype.
    rule: The leaf's subsets.
    layout: The leaf's matrix view (``None``: one subset per entry).
  """

  denominator: jax.Array
  rule: SubsetRule
  layout: MatrixLayout | None

  def divide(
    self,
    numerator: jax.Array,
    denominator: jax.Array | None = None,
    layout: MatrixLayout | None = None,
  ) -> jax.Array:
    """``numerator / denominator``, in their common compute dtype.

    The whole leaf by default; or, with one matrix's slice of the
    ``denominator``, that matrix in the canonical view ``(in, out)``
    (``matrix_layout``).
    """
    denominator = self.denominator if denominator is None else denominator
    dtype = dtypes.compute_dtype(numerator.dtype, denominator.dtype)
    layout = self.layout if layout is None else layout
    if layout is not None:  # the numerator's layout on the kept axis, for broadcasting
      denominator = sharding.reshard(denominator, self.rule.compute_spec(layout, numerator))
    return self.rule.divide(numerator.astype(dtype), denominator.astype(dtype), layout)

  @property
  def matrix_layout(self) -> MatrixLayout:
    """The layout of one matrix of the leaf's canonical view, ``(in, out)``."""
    return MatrixLayout((self.layout.in_size, self.layout.out_size), (), (0,), (1,))


def _validate_subset_size(subset_size: SubsetSize) -> None:
  if isinstance(subset_size, (jax.Array, np.ndarray, np.generic)):
    raise checks.static_error('subset_size', "'heuristic' or a non-zero int", ('subset_size',))
  if subset_size == HEURISTIC:
    return
  if isinstance(subset_size, bool) or not isinstance(subset_size, int):
    raise ValueError(f"subset_size must be 'heuristic' or a non-zero int, got {subset_size!r}.")
  if subset_size == 0:
    raise ValueError(
      "subset_size must be 'heuristic' or a non-zero int (k > 0: subsets of "
      'about k entries; -c < 0: subsets of about sqrt(numel) / c), got 0.'
    )


def scale_by_subset_norm(
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  subset_size: SubsetSize = HEURISTIC,
  *,
  bias_correction: bool = False,
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by a second moment shared within subsets of coordinates.

  For each subset :math:`S` of a leaf's coordinates, one scalar accumulates
  the *sum* of the squared gradient entries of the subset,

  .. math::
    v_t^S = \beta_2 v_{t-1}^S + (1 - \beta_2) \sum_{i \in S} g_{t,i}^2
    \quad (\beta_2 < 1), \qquad v_t^S = v_{t-1}^S + \sum_{i \in S} g_{t,i}^2
    \quad (\beta_2 = 1,\ \text{AdaGrad}),

  and every coordinate of the subset is divided by :math:`\sqrt{v_t^S} +
  \epsilon`. With bias correction the result is multiplied by
  :math:`\sqrt{1 - \beta_2^t}`, i.e. ``eps`` is added to the *uncorrected*
  root, as in Hugging Face's AdamW and the official code. With about
  :math:`\sqrt d` subsets of about :math:`\sqrt d` entries the state is
  :math:`O(\sqrt d)` instead of Adam's :math:`O(d)`. Because squares are
  summed, not averaged, steps are about :math:`1/\sqrt{|S|}` of Adam's; the
  authors use about 10x Adam's learning rate.

  Subsets of a selected leaf, read as a Flax kernel ``(…, in, out)`` (the
  transpose of a PyTorch weight ``(out, in)``):

  - ``'heuristic'``: one subset per output unit (a PyTorch row) when
    ``out >= in``, else one per input unit: the larger axis is kept.
  - ``k > 0``: contiguous chunks of the PyTorch-order (``(out, in)``
    row-major) flattening, of the largest size ``<= k`` dividing the size.
  - ``-c < 0``: chunks of about ``sqrt(numel) / c`` entries, likewise.

  Leaves without the rule (see ``mask``) get one subset per entry: Adam's (or
  RMSprop's) ordinary second moment.

  Used alone this is RMSprop-SN (``b2 < 1``) or AdaGrad-SN (``b2 = 1``). Its
  ``update`` also takes a keyword ``numerator``: a tree to divide instead of
  the gradient, or a function ``(gradient, divisors) -> quotient`` that
  divides its own numerator by each leaf's ``Divisor`` (the denominators,
  computed first). ``scale_by_ratio`` uses it to put a momentum over the
  same denominator (AdamSN, AdamSNSM), dividing matrix by matrix as the
  momentum is formed.

  Args:
    b2: Decay of the second moment, in ``[0, 1]``; ``1`` accumulates.
    eps: Added to the square root of the second moment, ``>= 0``.
    subset_size: ``'heuristic'``, or a non-zero int (see above). Pass it in
      ``static_args`` of ``optax.inject_hyperparams`` when it is an int.
    bias_correction: Multiply by :math:`\sqrt{1 - \beta_2^t}`; needs
      ``b2 < 1``.
    mask: Which leaves get subsets: a pytree (or prefix) of bools, or a
      callable returning one. Default: ``default_mask``, the linear
      kernels.
    dimension_numbers: How selected leaves read as ``(…, in, out)``; see
      ``DimensionNumbers``. Default: the last two axes.
    nu_dtype: Dtype of the second moment; default: the leaf's dtype (its
      real counterpart for complex leaves).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_lean
    >>> tx = optax.chain(optax_lean.scale_by_subset_norm(b2=0.999),
    ...                  optax.scale_by_learning_rate(1e-2))
    >>> params = {'w': jnp.ones((4, 3)), 'b': jnp.ones(3)}
    >>> state = tx.init(params)
    >>> state[0].nu['w'].shape, state[0].nu['b'].shape
    ((4, 1), (3,))

  References:
    Nguyen & Nguyen, `Lean and Mean Adaptive Optimization via Subset-Norm and
    Subspace-Momentum with Convergence Guarantees
    <https://arxiv.org/abs/2411.07120>`_, ICML 2025
  """
  checks.in_interval('b2', b2, 0.0, 1.0, include_high=True)
  checks.non_negative('eps', eps)
  _validate_subset_size(subset_size)
  if bias_correction and checks.is_zero(1 - b2):
    raise ValueError(
      'b2 must be < 1 with bias_correction (sqrt(1 - b2**t) would be 0); '
      'AdaGrad (b2 = 1) takes bias_correction=False.'
    )

  def leaf_rules(tree, warn=False) -> list[tuple[MatrixLayout | None, SubsetRule]]:
    layouts = resolve_layouts(
      tree, mask, dimension_numbers, allow_vectors=subset_size != HEURISTIC, warn=warn
    )
    return [(layout, SubsetRule.resolve(subset_size, layout)) for layout in layouts]

  def init_fn(params):
    params = dtypes.as_arrays(params)
    leaves, treedef = jax.tree.flatten(params)
    nus = []
    for p, (layout, rule) in zip(leaves, leaf_rules(params, warn=True)):
      dtype = dtypes.second_moment_dtype(p.dtype, nu_dtype)
      if layout is None:
        nus.append(otu.zeros_like(p, dtype=dtype))
        continue
      spec = rule.state_spec(layout, p)
      nus.append(sharding.zeros(rule.state_shape(layout), dtype, p, spec))
    return ScaleBySubsetNormState(
      count=jnp.zeros([], jnp.int32), nu=jax.tree.unflatten(treedef, nus)
    )

  def update_fn(updates, state, params=None, *, numerator=None, **extra_args):
    del params, extra_args
    updates = dtypes.as_arrays(updates)
    count_inc = optax.safe_increment(state.count)
    rules = leaf_rules(updates)

    def second_moment(index, g, nu, layout_rule):
      del index
      layout, rule = layout_rule
      dtype = dtypes.compute_dtype(g.dtype, nu.dtype)
      real = dtypes.real_dtype(dtype)
      decay = jnp.asarray(b2, real)
      stat = rule.statistic(g.astype(dtype), layout)
      old_nu = sharding.reshard_like(nu.astype(real), stat)  # the stored layout may differ
      accumulated = old_nu + stat
      new_nu = jnp.where(decay == 1, accumulated, decay * old_nu + (1 - decay) * stat)
      denominator = jnp.sqrt(new_nu) + jnp.asarray(eps, real)
      if bias_correction:
        denominator = denominator / jnp.sqrt(1 - decay ** count_inc.astype(real))
      return denominator, new_nu

    denominators, (nu,) = leafwise.map_leaves(
      second_moment, updates, (state.nu,), rules, cast_outputs=False
    )
    new_state = ScaleBySubsetNormState(count=count_inc, nu=nu)
    divisors = [
      Divisor(d, rule, layout) for d, (layout, rule) in zip(jax.tree.leaves(denominators), rules)
    ]
    if callable(numerator):
      return numerator(updates, divisors), new_state
    numerators = updates if numerator is None else numerator

    def divide(index, num, divisor):
      return divisors[index].divide(num), None  # the denominators are only read

    outputs, _ = leafwise.map_leaves(divide, numerators, (), divisors)
    return outputs, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
