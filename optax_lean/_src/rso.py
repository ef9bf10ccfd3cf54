"""Random-subspace Adam, the optimizer side of RSO.

Chen, Zhang, Liu, Yuan, Wen, `A Memory Efficient Randomized Subspace
Optimization Method for Training Large Language Models
<https://arxiv.org/abs/2502.07222>`_, ICML 2025. No official code was found;
this follows the paper's algorithm (outer iterations, each a random-subspace
subproblem solved by Adam from zero).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from optax_lean._src import checks
from optax_lean._src import projectors as proj_lib
from optax_lean._src.combine import chain_with_decay_before_update
from optax_lean._src.dimension_numbers import DimensionNumbersOrFn, MaskOrFn
from optax_lean._src.subspace_adam import ScaleBySubspaceAdamState, scale_by_subspace_adam

ScaleByRandomSubspaceState = ScaleBySubspaceAdamState


def scale_by_random_subspace(
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  rank: int | None = None,
  update_proj_gap: int = 200,
  *,
  side: str = 'in',
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam inside a random subspace, resampled with a fresh Adam every ``K`` steps.

  RSO splits training into outer iterations of :math:`K` steps
  (``update_proj_gap``). Each draws, per selected matrix, a random basis
  :math:`P_k` (``size x r``, orthonormal columns) and solves the subproblem
  :math:`\min_B f(W_k + P_k B)` from :math:`B = 0` with a fresh Adam, then
  merges :math:`W_{k+1} = W_k + P_k B`. Since :math:`\nabla_B f = P_k^\top
  \nabla_W f`, this is, step by step,

  .. math::
    R_t = P_k^\top G_t, \qquad
    m_t, v_t = \mathrm{Adam}(R_t), \qquad
    u_t = P_k \frac{m_t / (1-\beta_1^{s})}{\sqrt{v_t / (1-\beta_2^{s})} + \epsilon},

  with :math:`m, v` zeroed at each resample and :math:`s` the step within the
  outer iteration (torch/optax Adam). Leaves without a subspace get Adam with
  the global step. The basis is ``RandomProjector(side=side)``'s: the thin QR
  of a Gaussian drawn from a stored key (8 bytes per leaf), regenerated each
  step; a model can rebuild the same :math:`P_k` with
  ``RandomProjector().basis(key, (…, size, r), dtype)``. The Adam state costs
  :math:`2r` numbers per column of the other axis.

  **What this captures of RSO, and what it does not.** It reproduces the
  optimizer: random subspaces, a fresh Adam per subspace, the merge (which
  this form performs continuously: :math:`W_k + P_k B` is the current weight).
  It does not give RSO's *activation and gradient* savings: those need the
  model to compute a selected layer as :math:`y = x K + (x P_k) B` with
  :math:`K` frozen, so that only the ``r``-dimensional :math:`x P_k` is saved
  for the backward pass and only :math:`\nabla_B` is formed. That is a
  model-side option; here the full gradient is formed, then projected. Also
  not reproduced: the proximal term :math:`\|B\|^2 / (2\eta_k)` of the
  subproblem, and the paper's Gaussian :math:`P_k` with
  :math:`\mathcal N(0, 1/r)` entries (an orthonormal basis is used, a
  Haar-distributed subspace as in the analysis; a Gaussian one scales the
  update by about :math:`\sqrt{\text{size}/r}`). The paper's inner-loop
  length and ranks are not verified; the defaults follow GaLore's.

  Args:
    b1: First-moment decay, in ``[0, 1)``.
    b2: Second-moment decay, in ``[0, 1)``.
    eps: Added to the root of the corrected second moment, ``>= 0``.
    rank: ``None`` (default: 128) or the subspace rank ``r >= 1`` (clipped, with a warning, to
      ``min(in, out)``).
    update_proj_gap: Steps ``K >= 1`` per outer iteration (per subspace).
    side: The axis the basis spans: ``'in'`` (default: the input side, where
      the model-side option saves activations), ``'out'``, ``'smaller'`` or
      ``'larger'``.
    mask: Leaves that get a subspace (default: ``default_mask``, the linear kernels).
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: First-moment dtype (default: the leaf's).
    nu_dtype: Second-moment dtype (default: the leaf's, real for
      complex leaves).
    seed: Seed of the random bases.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    ``ScaleByRandomSubspaceState``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> tx = optax_lean.scale_by_random_subspace(rank=2, update_proj_gap=50)
    >>> state = tx.init({'kernel': jnp.ones((4, 6))})
    >>> state.mu['kernel'].shape, state.projector['kernel'].shape
    ((2, 6), (2,))

  References:
    Chen et al., `A Memory Efficient Randomized Subspace Optimization Method
    for Training Large Language Models <https://arxiv.org/abs/2502.07222>`_,
    ICML 2025
  """
  rank = 128 if rank is None else rank
  checks.positive_count('update_proj_gap', update_proj_gap)
  return scale_by_subspace_adam(
    b1,
    b2,
    eps,
    rank,
    update_proj_gap,
    1.0,
    proj_lib.RandomProjector(side=side),
    flavour='torch',
    moments_on_refresh='reset',
    mask=mask,
    dimension_numbers=dimension_numbers,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
    seed=seed,
  )


def rso(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  rank: int | None = None,
  update_proj_gap: int = 200,
  mask: MaskOrFn | None = None,
  side: str = 'in',
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
  weight_decay_mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""RSO-style random-subspace AdamW.

  ``scale_by_random_subspace``, then ``optax.add_decayed_weights`` and the
  learning rate (:math:`p \leftarrow p - \eta_t(u_t + \lambda p)`, optax's
  AdamW order). Weight decay acts on the full parameters, not on the
  subproblem's :math:`B` alone. See ``scale_by_random_subspace`` for what
  this reproduces of RSO and what needs the model-side option.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    b1: First-moment decay, in ``[0, 1)``.
    b2: Second-moment decay, in ``[0, 1)``.
    eps: Added to the root of the corrected second moment.
    weight_decay: Decoupled weight decay, ``>= 0``.
    rank: ``None`` (default: 128) or the subspace rank.
    update_proj_gap: Steps per outer iteration.
    mask: Leaves that get a subspace (default: ``default_mask``, the linear kernels).
    side: The axis the basis spans (default ``'in'``).
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: First-moment dtype (default: the parameter's).
    nu_dtype: Second-moment dtype (default: the parameter's, real for
      complex parameters).
    seed: Seed of the random bases.
    weight_decay_mask: Leaves to decay (default: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_lean
    >>> params = {'w': jnp.ones((8, 4)), 'b': jnp.zeros(4)}
    >>> loss = lambda p: jnp.sum((jnp.ones(8) @ p['w'] + p['b'] - 1.0) ** 2)
    >>> tx = optax_lean.rso(1e-2, rank=2, update_proj_gap=10)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f'{loss(params):.2f}')
    193.54

  References:
    Chen et al., `A Memory Efficient Randomized Subspace Optimization Method
    for Training Large Language Models <https://arxiv.org/abs/2502.07222>`_,
    ICML 2025
  """
  core = scale_by_random_subspace(
    b1,
    b2,
    eps,
    rank,
    update_proj_gap,
    side=side,
    mask=mask,
    dimension_numbers=dimension_numbers,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
    seed=seed,
  )
  return chain_with_decay_before_update(core, learning_rate, weight_decay, weight_decay_mask)
