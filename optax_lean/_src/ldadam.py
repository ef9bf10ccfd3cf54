"""LDAdam: Adam in a subspace that moves every step, with states carried along.

Robert, Safaryan, Modoranu & Alistarh, `LDAdam: Adaptive Optimization from
Low-Dimensional Gradient Statistics <https://arxiv.org/abs/2410.16103>`_,
ICLR 2025; official code https://github.com/IST-DASLab/LDAdam
(``ldadamw_torch/ldadamw.py``, ``projector.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree as otu

from optax_lean._src import checks, dtypes, leafwise, walk
from optax_lean._src import projectors as proj_lib
from optax_lean._src.adam import adam_step, validate_adam
from optax_lean._src.combine import chain_with_decay_before_update
from optax_lean._src.dimension_numbers import DimensionNumbersOrFn, MaskOrFn
from optax_lean._src.subspace import SubspacePlan, plan_subspaces
from optax_lean._src.subspace_adam import adam_states


class ScaleByLDAdamState(NamedTuple):
  """State of ``scale_by_ldadam``.

  Attributes:
    count: Number of updates so far (``shape=(), dtype=int32``).
    mu: Per leaf, Adam's first moment: low-rank (the ``(…, in, out)`` view
      with the projected axis shrunk to the rank) for a leaf with a subspace,
      full otherwise.
    nu: Per leaf, Adam's second moment, shaped like ``mu``.
    projector: Per leaf with a subspace, the current basis; ``None`` otherwise.
    error: Per leaf with a subspace, the error-feedback buffer (the leaf's
      shape); ``None`` for other leaves, and ``None`` altogether without
      error feedback.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  projector: optax.Updates
  error: optax.Updates


def _ldadam_projector(projector: str | proj_lib.Projector) -> proj_lib.Projector:
  """A named projector with LDAdam's side rule: a square matrix projects ``out``."""
  if isinstance(projector, proj_lib.Projector):
    return projector
  checks.one_of('projector', projector, ('power_iteration', 'svd'))
  return dataclasses.replace(proj_lib.get_projector(projector), square_side='out')


def ldadam_matrix_step(
  g_a: jax.Array,
  m_a: jax.Array,
  v_a: jax.Array,
  old: jax.Array,
  error_a: jax.Array | None,
  plan: SubspacePlan,
  keys: jax.Array,
  count: jax.Array,
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  rho: jax.typing.ArrayLike,
  error_feedback: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """One matrix's LDAdam step (``scale_by_ldadam``'s recurrences), at 0-based ``count``.

  Args:
    g_a: The gradient in the rows view ``(…, size, c)``.
    m_a: First moment ``(…, r, c)``.
    v_a: Second moment ``(…, r, c)``.
    old: The previous projector state (all zeros before the first step).
    error_a: The error-feedback buffer in the rows view, or ``None``.
    plan: The leaf's subspace plan (its projector and rank).
    keys: The PRNG keys of the refresh (``SubspacePlan.keys``).
    count: The 0-based step.
    b1: First-moment decay.
    b2: Second-moment decay.
    eps: Adam's offset (torch flavour).
    rho: Weight of the momentum in the tracked matrix.
    error_feedback: Whether to return the new error buffer.

  Returns:
    ``(update, m, v, projector_state, error)`` in the compute dtype (the
    projector state as stored; ``error`` ``None`` without feedback).
  """
  dtype = dtypes.compute_dtype(g_a.dtype, m_a.dtype, v_a.dtype)
  a_a = g_a.astype(dtype)
  if error_a is not None:
    a_a = a_a + error_a.astype(dtype)
  m_a, v_a = m_a.astype(dtype), v_a.astype(dtype)
  k = count.astype(dtype)
  b1_, b2_, rho_ = (jnp.asarray(x, dtype) for x in (b1, b2, rho))
  # At k = 0 the moments are zero; unit corrections keep the maths finite.
  correction1 = jnp.where(count > 0, 1 - b1_**k, 1)
  correction2 = jnp.where(count > 0, 1 - b2_**k, 1)
  old_basis = plan.basis(old, a_a, dtype)

  def first(_):
    return plan.refresh(a_a, old, keys)

  def later(_):
    momentum = proj_lib.back_project(m_a / correction1, old_basis, a_a, dtype)
    return plan.refresh(rho_ * momentum + (1 - rho_) * a_a, old, keys)

  new = jax.lax.cond(count == 0, first, later, None)
  basis = plan.basis(new, a_a, dtype)
  projected = proj_lib.project(a_a, basis, dtype)
  change = proj_lib.change_of_basis(basis, old_basis, dtype)
  m_rotated = proj_lib.rotate(change, m_a, like=projected)
  variance = v_a / correction2 - jnp.square(m_a / correction1)
  v_rotated = correction2 * jnp.abs(
    proj_lib.rotate(jnp.square(change), variance, like=projected)
    + jnp.square(m_rotated / correction1)
  )
  direction, new_m, new_v = adam_step(
    projected, m_rotated, v_rotated, optax.safe_increment(count), b1, b2, eps, 'torch'
  )
  update = proj_lib.back_project(direction, basis, a_a, dtype)
  if not error_feedback:
    return update, new_m, new_v, new, None
  # What projecting lost of the gradient, and of the momentum when it moved
  # to the new basis; fed back into the next step's gradient.
  lost = a_a - proj_lib.back_project(projected, basis, a_a, dtype)
  moved = proj_lib.back_project(m_a, old_basis, a_a, dtype) - proj_lib.back_project(
    m_rotated, basis, a_a, dtype
  )
  return update, new_m, new_v, new, lost + b1_ / (1 - b1_) * moved


def scale_by_ldadam(
  b1: jax.typing.ArrayLike = 0.908,
  b2: jax.typing.ArrayLike = 0.99,
  eps: jax.typing.ArrayLike = 1e-8,
  rank: int | None = None,
  rho: jax.typing.ArrayLike = 0.908,
  *,
  error_feedback: bool = True,
  projector: str | proj_lib.Projector = 'power_iteration',
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  projector_dtype: jax.typing.DTypeLike | None = None,
  error_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""LDAdam's scaling: Adam on a rank-``r`` projection, re-estimated every step.

  At step :math:`k` (0-based) a selected matrix sees :math:`A_k = G_k + E_{k-1}`
  (the gradient plus the error-feedback buffer). With :math:`P` a basis of the
  projected axis (``size x r``), :math:`\hat m = m / (1-\beta_1^k)`:

  .. math::
    P_k &= \mathrm{QR}\big(Y Y^\top P_{k-1}\big), \quad
      Y = \rho P_{k-1} \hat m_{k-1} + (1-\rho) A_k
      \qquad (P_0: \text{top-}r \text{ SVD of } A_0), \\
    C &= P_k^\top P_{k-1}, \qquad \tilde m = C m_{k-1}, \qquad
    \tilde v = (1-\beta_2^k) \big| (C \circ C)\big(\tfrac{v_{k-1}}{1-\beta_2^k}
      - \hat m_{k-1}^2\big) + \big(\tfrac{\tilde m}{1-\beta_1^k}\big)^2 \big|, \\
    R_k &= P_k^\top A_k, \quad m_k = \beta_1 \tilde m + (1-\beta_1) R_k, \quad
    v_k = \beta_2 \tilde v + (1-\beta_2) R_k^2, \\
    u_k &= P_k \frac{m_k / (1-\beta_1^{k+1})}
      {\sqrt{v_k / (1-\beta_2^{k+1})} + \epsilon}, \qquad
    E_k = A_k - P_k R_k + \tfrac{\beta_1}{1-\beta_1}
      \big(P_{k-1} m_{k-1} - P_k \tilde m\big).

  The subspace follows a mix of the gradient and the momentum by one
  warm-started power iteration per step; the moments are rotated into each
  new basis (the second moment by its variance, projection-aware); the error
  buffer feeds back what the projections of the gradient and of the momentum
  lost. This is the official ``LDAdamW`` (torch-flavour Adam with the
  optimizer-global step for every bias correction), with the official side
  rule for the PyTorch weight ``K.T``: a "right" projector on the ``in`` axis
  when ``out > in``, a "left" one on ``out`` otherwise (square matrices
  project ``out``, unlike GaLore). The basis is sign-canonicalised, which
  does not change the updates (the change of basis :math:`C` absorbs signs).
  Leaves without a subspace get torch-flavour Adam.

  **Memory.** The moments cost :math:`r\max(m,n)` numbers each and the basis
  :math:`r\min(m,n)`, as in the official code. The error buffer is a full
  :math:`mn` state: PyTorch keeps it for free in ``p.grad``, which LDAdam's
  ``zero_grad`` leaves uncleared so that the next backward pass adds the new
  gradient to it; a functional optimizer must store it. ``error_feedback=False``
  removes it (the official no-EF runs use a larger rank instead).

  Args:
    b1: First-moment decay, in ``[0, 1)``.
    b2: Second-moment decay, in ``[0, 1)``.
    eps: Added to the root of the corrected second moment, ``>= 0``.
    rank: ``None`` (default: 16) or the subspace rank ``r >= 1``, clipped (with a warning) to
      ``min(in, out)``; the official code raises instead.
    rho: Weight of the momentum in the matrix the subspace tracks, in
      ``[0, 1)``.
    error_feedback: Keep and feed back the compression error (a full-size
      state per selected leaf).
    projector: ``'power_iteration'`` (official default), ``'svd'`` (an exact
      SVD of :math:`Y` every step, the official ``proj_method='svd'``) or a
      ``Projector``.
    mask: Leaves that get a subspace (default: ``default_mask``, the linear kernels;
      the official scripts select the attention and MLP kernels).
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: First-moment dtype (default: the leaf's).
    nu_dtype: Second-moment dtype (default: the leaf's, real for
      complex leaves).
    projector_dtype: Basis dtype (default: the leaf's).
    error_dtype: Error-buffer dtype (default: the leaf's).
    seed: Seed of a randomized projector (the default power iteration draws
      nothing).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    ``ScaleByLDAdamState``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> tx = optax_lean.scale_by_ldadam(rank=2)
    >>> state = tx.init({'kernel': jnp.ones((6, 6)), 'bias': jnp.ones(6)})
    >>> state.mu['kernel'].shape, state.error['kernel'].shape
    ((6, 2), (6, 6))

  References:
    Robert et al., `LDAdam: Adaptive Optimization from Low-Dimensional
    Gradient Statistics <https://arxiv.org/abs/2410.16103>`_, ICLR 2025
  """
  rank = 16 if rank is None else rank
  validate_adam(b1, b2, eps)
  checks.positive_int('rank', rank, static_args=('rank',))
  checks.in_interval('rho', rho, 0.0, 1.0)
  projector = _ldadam_projector(projector)

  def plans(tree, warn=False):
    return plan_subspaces(
      tree, projector, rank, mask, dimension_numbers, warn=warn, real_only='ldadam'
    )

  def init_fn(params):
    params = dtypes.as_arrays(params)
    leaves, treedef = jax.tree.flatten(params)
    leaf_plans = plans(params, warn=True)
    mus, nus, projs = adam_states(params, leaf_plans, mu_dtype, nu_dtype, projector_dtype)
    errors = [
      None
      if plan is None
      else otu.zeros_like(p, dtype=p.dtype if error_dtype is None else error_dtype)
      for p, plan in zip(leaves, leaf_plans)
    ]
    unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
    return ScaleByLDAdamState(
      count=jnp.zeros([], jnp.int32),
      mu=unflatten(mus),
      nu=unflatten(nus),
      projector=unflatten(projs),
      error=unflatten(errors) if error_feedback else None,
    )

  def update_leaf(g, mu, nu, old, error, plan, leaf_index, count):
    """A selected leaf's update and states, one matrix at a time (``ldadam_matrix_step``)."""
    config = (b1, b2, eps, rho, error is not None)

    def matrix(g_m, mu_m, nu_m, old_m, error_m, keys_m):
      results = ldadam_matrix_step(
        plan.matrix_rows(g_m),
        plan.matrix_rows(mu_m),
        plan.matrix_rows(nu_m),
        old_m,
        None if error_m is None else plan.matrix_rows(error_m),
        plan,
        keys_m,
        count,
        *config,
      )
      update, new_m, new_v, new, new_error = results
      rows = lambda x, like: None if x is None else plan.matrix_rows(x.astype(like.dtype))
      return (
        plan.matrix_rows(update),
        rows(new_m, mu_m),
        rows(new_v, nu_m),
        new,
        None if error_m is None else rows(new_error, error_m),
      )

    in_place = dtypes.compute_dtype(g.dtype, mu.dtype, nu.dtype) == g.dtype
    into = {1: 1, 2: 2, 3: 3} | ({0: 0} if in_place else {}) | ({4: 4} if error is not None else {})
    operands = (plan.layout.to_matrix(g), mu, nu, old, error, plan.keys(seed, leaf_index, count))
    if error is not None:
      operands = (*operands[:4], plan.layout.to_matrix(error), operands[5])
    update, mu, nu, new, error = walk.map_matrices(
      matrix, plan.layout.batch_shape, operands, into=into
    )
    error = None if error is None else plan.layout.from_matrix(error)
    return plan.layout.from_matrix(update), mu, nu, new, error

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    updates = dtypes.as_arrays(updates)
    count_inc = optax.safe_increment(state.count)

    def update_leaf_or_plain(index, g, mu, nu, proj_state, error, plan):
      if plan is None:
        return (*adam_step(g, mu, nu, count_inc, b1, b2, eps, 'torch'), None, None)
      return update_leaf(g, mu, nu, proj_state, error, plan, index, state.count)

    fields = (state.mu, state.nu, state.projector, state.error)
    leaf_plans = plans(updates)
    outputs, (mu, nu, projector_state, error) = leafwise.map_leaves(
      update_leaf_or_plain,
      updates,
      fields,
      leaf_plans,
      in_sequence=leafwise.gated(leaf_plans),
    )
    return outputs, ScaleByLDAdamState(
      count=count_inc, mu=mu, nu=nu, projector=projector_state, error=error
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ldadam(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.908,
  b2: jax.typing.ArrayLike = 0.99,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  rank: int | None = None,
  rho: jax.typing.ArrayLike = 0.908,
  error_feedback: bool = True,
  mask: MaskOrFn | None = None,
  projector: str | proj_lib.Projector = 'power_iteration',
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  projector_dtype: jax.typing.DTypeLike | None = None,
  error_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
  weight_decay_mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LDAdamW, as the official ``LDAdamW``.

  ``scale_by_ldadam``, then decoupled weight decay on the *pre-update*
  parameters and the learning rate (``optax.add_decayed_weights`` then
  ``optax.scale_by_learning_rate``), i.e. :math:`p \leftarrow p(1 - \eta_t
  \lambda) - \eta_t u_t`, the official (and ``torch.optim.AdamW``) order.
  The paper's LLaMA-350M script uses ``learning_rate=1e-3``, the default
  betas, ``rho`` and ``eps``, ``rank=8`` with error feedback (256 without),
  no weight decay and no gradient clipping. With error feedback, clip or
  accumulate gradients *before* this optimizer: in PyTorch the buffer lives in
  ``p.grad``, so there clipping acts on gradient plus error.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    b1: First-moment decay, in ``[0, 1)``.
    b2: Second-moment decay, in ``[0, 1)``.
    eps: Added to the root of the corrected second moment.
    weight_decay: Decoupled weight decay, ``>= 0``, applied before the update.
    rank: ``None`` (default: 16) or the subspace rank.
    rho: Momentum weight in the tracked matrix, in ``[0, 1)``.
    error_feedback: Keep the full-size error buffer (see
      ``scale_by_ldadam``).
    mask: Leaves that get a subspace (default: ``default_mask``, the linear kernels).
    projector: ``'power_iteration'``, ``'svd'`` or a ``Projector``.
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: First-moment dtype (default: the parameter's).
    nu_dtype: Second-moment dtype (default: the parameter's, real for
      complex parameters).
    projector_dtype: Basis dtype (default: the parameter's).
    error_dtype: Error-buffer dtype (default: the parameter's).
    seed: Seed of a randomized projector (see ``scale_by_ldadam``).
    weight_decay_mask: Leaves to decay (default: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_lean
    >>> params = {'w': jnp.ones((8, 4)), 'b': jnp.zeros(4)}
    >>> loss = lambda p: jnp.sum((jnp.ones(8) @ p['w'] + p['b'] - 1.0) ** 2)
    >>> tx = optax_lean.ldadam(1e-2, rank=2)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f'{loss(params):.2f}')
    187.69

  References:
    Robert et al., `LDAdam: Adaptive Optimization from Low-Dimensional
    Gradient Statistics <https://arxiv.org/abs/2410.16103>`_, ICLR 2025
  """
  core = scale_by_ldadam(
    b1,
    b2,
    eps,
    rank,
    rho,
    error_feedback=error_feedback,
    projector=projector,
    mask=mask,
    dimension_numbers=dimension_numbers,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
    projector_dtype=projector_dtype,
    error_dtype=error_dtype,
    seed=seed,
  )
  return chain_with_decay_before_update(core, learning_rate, weight_decay, weight_decay_mask)
