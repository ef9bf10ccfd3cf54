"""SUMO: subspace momentum, orthogonalised exactly by the SVD of its small matrix.

Refael, Smorodinsky, Tirer and Lindenbaum, `SUMO: Subspace-Aware
Moment-Orthogonalization for Accelerating Memory-Efficient LLM Training
<https://arxiv.org/abs/2505.24749>`_, NeurIPS 2025; official code
https://github.com/RandalW7/SUMO_optimizer (``optimizers_torch/sumo_optimizer.py``).
A configuration of the subspace-momentum engine (``orthogonalize=True``, the
other leaves passed on) followed by Hugging Face's AdamW on those leaves.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, get_args

import jax
import optax

from optax_lean._src import checks
from optax_lean._src.adam import validate_adam
from optax_lean._src.combine import chain_with_decay_after_update, scale_by_ratio
from optax_lean._src.dimension_numbers import DimensionNumbersOrFn, MaskOrFn
from optax_lean._src.projectors import Projector
from optax_lean._src.selection import selection_mask
from optax_lean._src.subset_norm import SubsetSize, scale_by_subset_norm
from optax_lean._src.subspace import OnRefresh, RefreshSchedule
from optax_lean._src.subspace_momentum import scale_by_subspace_momentum

# What the gradient's part outside the subspace gets.
Residual = Literal['gradient', 'subset_norm']


def sumo(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  rank: int | None = None,
  update_proj_gap: int | RefreshSchedule = 200,
  projector: str | Projector = 'auto',
  momentum_on_refresh: OnRefresh = 'keep',
  consistent_rms: jax.typing.ArrayLike | None = 0.2,
  residual: Residual = 'gradient',
  subset_size: SubsetSize = 'heuristic',
  adam_b1: jax.typing.ArrayLike = 0.9,
  adam_b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  projector_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
  weight_decay_mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SUMO: Muon's orthogonalised momentum, kept and orthogonalised in a rank-r subspace.

  For a selected matrix with gradient :math:`G_t` and a basis :math:`Q`
  (``size x r``, the top singular vectors of the smaller axis) refreshed
  every ``update_proj_gap`` steps:

  .. math::
    R_t &= Q^\top G_t, \qquad m_t = \beta_1 m_{t-1} + (1 - \beta_1) R_t,
    \qquad m_t = U \Sigma V^\top \\
    u_t &= \rho \sqrt{\max(m, n)}\; Q U V^\top + (G_t - Q R_t), \\
    W_t &= (W_{t-1} - \eta_t u_t)(1 - \eta_t \lambda).

  The polar factor :math:`U V^\top` is exact (an SVD of the ``r x n``
  momentum, cheap at small ``r``), where Muon approximates it by
  Newton-Schulz iterations; the gradient's part outside the subspace is
  added unscaled (the official code's "original space update"). Other leaves
  (vectors, the embedding) get Hugging Face's AdamW. State: :math:`r n` per
  matrix plus the basis, against Muon's :math:`m n` and AdamW's
  :math:`2 m n`.

  Where the official code and the paper's Algorithm 1 differ:

  - At a refresh the official code keeps the momentum as it is
    (``momentum_on_refresh='keep'``, the default); Algorithm 1 carries it
    into the new basis, :math:`m \leftarrow Q_{new}^\top Q_{old} m`
    (``'rotate'``).
  - The official code scales the polar factor by
    :math:`0.2\sqrt{\max(m, n)}` (Moonlight's update RMS of 0.2,
    ``consistent_rms=0.2``); Algorithm 1 by 1 (``consistent_rms=None``).
  - The official code's momentum is a sum :math:`m \leftarrow \mu m + R`
    whose Nesterov variant (its default) stores :math:`R + \mu m`. A polar
    factor does not see a positive scale, so the sum is this EMA, and the
    stored Nesterov value makes it an EMA of decay :math:`\mu^2`: its
    defaults (``momentum=0.95``, ``nesterov=True``) are ``b1=0.95**2``.
  - Its norm-growth limiter acts on :math:`U V^\top`, whose norm is
    :math:`\sqrt{r}` at every step: it never limits, and is left out.
  - Its ``alpha`` multiplies the whole step and is a part of
    ``learning_rate`` here; its separate ``lr_adam`` is not offered (with
    ``consistent_rms`` both parts share one rate, as in Moonlight).

  ``residual='subset_norm'`` is a variant outside the paper, AdamSNSM's
  full-space step with SUMO's subspace step: the part outside the subspace
  is divided by the subset-norm denominator (``scale_by_subset_norm``, with
  ``adam_b2``, ``eps`` and ``subset_size``) and by :math:`1 - \beta_1^t`, as
  AdamSNSM's is, while the polar part is not; other leaves then get the same
  AdamW with ``b1`` as its first-moment decay (``adam_b1`` is not used).
  It costs AdamSNSM's second moment, one number per subset.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    b1: Momentum decay in the subspace, in ``[0, 1)``.
    weight_decay: Decoupled weight decay, applied after the update.
    rank: ``None`` (default: 128) or the subspace rank (clipped, with a
      warning, to each matrix's limit).
    update_proj_gap: Steps between refreshes, or a schedule: a function of
      the 0-based step count that says whether to refresh.
    projector: ``'auto'`` (default: the exact SVD on CPU, the randomized one
      on GPU and TPU), ``'svd'``, ``'randomized_svd'``, ``'random'`` or a
      ``Projector`` (see ``scale_by_subspace_momentum``).
    momentum_on_refresh: ``'keep'`` (official code), ``'rotate'`` (Algorithm
      1), ``'reset'`` or ``'official'`` (SM's quirk).
    consistent_rms: :math:`\rho > 0`, or ``None`` for a factor of 1.
    residual: ``'gradient'`` (the paper's and the official code's: the
      gradient outside the subspace as it is) or ``'subset_norm'`` (divided
      by the subset norms, see above).
    subset_size: The subsets of ``residual='subset_norm'`` (see
      ``scale_by_subset_norm``).
    adam_b1: AdamW's first-moment decay on the other leaves.
    adam_b2: AdamW's second-moment decay on the other leaves.
    eps: AdamW's offset, added to the root of the uncorrected second moment.
    mask: Leaves that get the subspace (default: ``default_mask``, the
      linear kernels).
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: Dtype of the momenta (default: the parameter's).
    nu_dtype: Dtype of AdamW's second moment (default: the parameter's).
    projector_dtype: Stored-basis dtype (default: the parameter's).
    seed: Seed of the randomized projectors.
    weight_decay_mask: Leaves to decay (default: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_lean
    >>> params = {'w': jnp.ones((8, 4)), 'b': jnp.zeros(4)}
    >>> loss = lambda p: jnp.sum((jnp.ones(8) @ p['w'] + p['b'] - 1.0) ** 2)
    >>> tx = optax_lean.sumo(1e-2, rank=2, update_proj_gap=10)
    >>> state = tx.init(params)
    >>> state[0][0].mu['w'].shape, state[0][0].mu['b']  # 8 x rank; AdamW has 'b'
    ((8, 2), None)
    >>> before = loss(params)
    >>> for _ in range(5):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < before)
    True

  References:
    Refael et al., `SUMO: Subspace-Aware Moment-Orthogonalization for
    Accelerating Memory-Efficient LLM Training
    <https://arxiv.org/abs/2505.24749>`_, NeurIPS 2025
  """
  validate_adam(adam_b1, adam_b2, eps, prefix='adam_')
  checks.one_of('residual', residual, get_args(Residual))
  subspace = functools.partial(
    scale_by_subspace_momentum,
    b1,
    rank,
    update_proj_gap,
    projector,
    momentum_on_refresh=momentum_on_refresh,
    orthogonalize=True,
    consistent_rms=consistent_rms,
    mask=mask,
    dimension_numbers=dimension_numbers,
    mu_dtype=mu_dtype,
    projector_dtype=projector_dtype,
    seed=seed,
  )
  if residual == 'subset_norm':
    core = scale_by_ratio(
      subspace(bias_correction=True),
      scale_by_subset_norm(
        adam_b2,
        eps,
        subset_size,
        bias_correction=True,
        mask=mask,
        dimension_numbers=dimension_numbers,
        nu_dtype=nu_dtype,
      ),
    )
    return chain_with_decay_after_update(core, learning_rate, weight_decay, weight_decay_mask)
  others = functools.partial(
    selection_mask, mask=mask, dimension_numbers=dimension_numbers, complement=True
  )
  adamw = scale_by_ratio(
    optax.ema(adam_b1, debias=True, accumulator_dtype=mu_dtype),
    scale_by_subset_norm(adam_b2, eps, bias_correction=True, mask=False, nu_dtype=nu_dtype),
  )
  core = optax.chain(subspace(other_leaves='pass'), optax.masked(adamw, others))
  return chain_with_decay_after_update(core, learning_rate, weight_decay, weight_decay_mask)
