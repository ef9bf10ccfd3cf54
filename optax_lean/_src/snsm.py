"""The SN/SM optimizers (arXiv 2411.07120): AdamSNSM, AdamSN and their siblings.

The GaLore family's optimizers live beside their own cores (``galore``,
``ldadam``, ``online_subspace``, ``rso``); this module holds the optimizers
built from the two SN/SM engines, ``subset_norm`` and ``subspace_momentum``.
Each is an ``optax.chain`` of a ``scale_by_*`` core,
``optax.scale_by_learning_rate`` and ``add_decayed_weights_after_update``,
reproducing the official ``GenericOptim`` (Hugging Face flavour: ``eps`` on the
uncorrected second moment, weight decay after the update). Leaves chosen by
``mask`` (default: ``default_mask``, the linear kernels) get the
Subset-Norm / Subspace-Momentum rule; the others get the same base rule
without it, as the official code's plain parameter group does.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from optax_lean._src import checks
from optax_lean._src.combine import chain_with_decay_after_update, scale_by_ratio
from optax_lean._src.dimension_numbers import DimensionNumbersOrFn, MaskOrFn
from optax_lean._src.projectors import Projector
from optax_lean._src.subset_norm import SubsetSize, scale_by_subset_norm
from optax_lean._src.subspace import OnRefresh, RefreshSchedule
from optax_lean._src.subspace_momentum import scale_by_subspace_momentum


def _momentum(
  b1: jax.typing.ArrayLike, *, debias: bool, mu_dtype: jax.typing.DTypeLike | None
) -> optax.GradientTransformation:
  """A full EMA momentum, or none when ``b1 == 0``."""
  checks.in_interval('b1', b1, 0.0, 1.0)
  if checks.is_zero(b1):
    return optax.identity()
  return optax.ema(b1, debias=debias, accumulator_dtype=mu_dtype)


def adamsnsm(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  rank: int | None = None,
  update_proj_gap: int | RefreshSchedule = 200,
  projector: str | Projector = 'auto',
  subset_size: SubsetSize = 'heuristic',
  mask: MaskOrFn | None = None,
  momentum_on_refresh: OnRefresh = 'official',
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  projector_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
  weight_decay_mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamSNSM: subspace momentum over a subset-norm denominator.

  The paper's headline optimizer. For a selected matrix with gradient
  :math:`G_t`, a rank-``r`` basis :math:`B` refreshed every
  ``update_proj_gap`` steps and subsets :math:`S`:

  .. math::
    R_t &= B^\top G_t, \qquad m_t = \beta_1 m_{t-1} + (1-\beta_1) R_t \\
    N_t &= B m_t + (G_t - B R_t) \\
    v_t^S &= \beta_2 v_{t-1}^S + (1-\beta_2) \textstyle\sum_{i\in S} G_{t,i}^2 \\
    p_t &= p_{t-1} - \eta_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
      \frac{N_t}{\sqrt{v_t^S} + \epsilon},
    \qquad p_t \leftarrow p_t (1 - \eta_t \lambda).

  Numerator and denominator both see the raw gradient (``scale_by_ratio`` of
  ``scale_by_subspace_momentum`` and ``scale_by_subset_norm``). Other leaves
  get AdamW with the same Hugging Face flavour. The state is
  :math:`r\max(m,n) + \max(m,n)` numbers per matrix plus the projector,
  against Adam's :math:`2mn`. Subset-norm steps are smaller than Adam's: use
  about 10x Adam's learning rate.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    b1: Momentum decay, in ``[0, 1)``.
    b2: Second-moment decay, in ``[0, 1)``.
    eps: Added to the root of the uncorrected second moment, ``>= 0``.
    weight_decay: Decoupled weight decay, applied after the update.
    rank: ``None`` (default: 128) or the subspace rank (clipped, with a warning,
      to each matrix's limit).
    update_proj_gap: Steps between projector refreshes, or a schedule:
      a function of the 0-based step count that says whether to refresh.
    projector: ``'auto'`` (default: the exact SVD on CPU, the randomized one
      on GPU and TPU, see ``get_projector``), ``'svd'``, ``'randomized_svd'``,
      ``'random'``, ``'uniform'``, ``'topk'`` or a ``Projector`` (see
      ``scale_by_subspace_momentum``).
    subset_size: ``'heuristic'`` or a non-zero int (see
      ``scale_by_subset_norm``).
    mask: Leaves that get SN/SM: a pytree (or prefix) of bools, or a callable
      returning one. Default: ``default_mask``, the linear kernels.
    momentum_on_refresh: ``'official'`` (default), ``'reset'``, ``'keep'`` or
      ``'rotate'``.
    dimension_numbers: How selected leaves read as ``(…, in, out)``; see
      ``DimensionNumbers``.
    mu_dtype: Momentum dtype (default: the parameter's).
    nu_dtype: Second-moment dtype (default: the parameter's, real for
      complex parameters).
    projector_dtype: Stored-basis dtype (default: the parameter's).
    seed: Seed of the randomized projectors.
    weight_decay_mask: Leaves to decay (default: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_lean
    >>> params = {'w': jnp.ones((8, 4)), 'b': jnp.zeros(4)}
    >>> loss = lambda p: jnp.sum((jnp.ones(8) @ p['w'] + p['b'] - 1.0) ** 2)
    >>> tx = optax_lean.adamsnsm(1e-2, rank=2, update_proj_gap=10)
    >>> state = tx.init(params)
    >>> print(f'{loss(params):.2f}')
    196.00
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f'{loss(params):.2f}')
    187.69

  References:
    Nguyen & Nguyen, `Lean and Mean Adaptive Optimization via Subset-Norm and
    Subspace-Momentum with Convergence Guarantees
    <https://arxiv.org/abs/2411.07120>`_, ICML 2025
  """
  checks.in_interval('b2', b2, 0.0, 1.0)
  core = scale_by_ratio(
    scale_by_subspace_momentum(
      b1,
      rank,
      update_proj_gap,
      projector,
      momentum_on_refresh=momentum_on_refresh,
      bias_correction=True,
      mask=mask,
      dimension_numbers=dimension_numbers,
      mu_dtype=mu_dtype,
      projector_dtype=projector_dtype,
      seed=seed,
    ),
    scale_by_subset_norm(
      b2,
      eps,
      subset_size,
      bias_correction=True,
      mask=mask,
      dimension_numbers=dimension_numbers,
      nu_dtype=nu_dtype,
    ),
  )
  return chain_with_decay_after_update(core, learning_rate, weight_decay, weight_decay_mask)


def adamsn(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  subset_size: SubsetSize = 'heuristic',
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  weight_decay_mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamSN: Adam's momentum over a subset-norm second moment.

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    v_t^S = \beta_2 v_{t-1}^S + (1-\beta_2) \textstyle\sum_{i\in S} g_{t,i}^2,
    \qquad p_t = p_{t-1} - \eta_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
      \frac{m_t}{\sqrt{v_t^S} + \epsilon},

  then :math:`p_t \leftarrow p_t(1 - \eta_t\lambda)`. The second moment of a
  selected ``(m, n)`` matrix is :math:`\max(m, n)` numbers (heuristic subsets)
  instead of :math:`mn`, about half of Adam's state in all. With ``b1 = 0``
  it is RMSprop-SN with bias correction (the official ``adamw_sn``).
  ``subset_size=1`` gives coordinate-wise Adam.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    b1: Momentum decay, in ``[0, 1)``; ``0`` keeps no momentum.
    b2: Second-moment decay, in ``[0, 1)``.
    eps: Added to the root of the uncorrected second moment.
    weight_decay: Decoupled weight decay, applied after the update.
    subset_size: ``'heuristic'`` or a non-zero int (see
      ``scale_by_subset_norm``).
    mask: Leaves that get SN (default: ``default_mask``, the linear kernels).
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: Momentum dtype (default: the parameter's).
    nu_dtype: Second-moment dtype (default: the parameter's, real for
      complex parameters).
    weight_decay_mask: Leaves to decay (default: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> tx = optax_lean.adamsn(3e-2)
    >>> state = tx.init({'w': jnp.ones((8, 4))})
    >>> state[0].denominator.nu['w'].shape  # one per input unit, not 8 x 4
    (8, 1)

  References:
    Nguyen & Nguyen, `Lean and Mean Adaptive Optimization via Subset-Norm and
    Subspace-Momentum with Convergence Guarantees
    <https://arxiv.org/abs/2411.07120>`_, ICML 2025
  """
  checks.in_interval('b2', b2, 0.0, 1.0)
  core = scale_by_ratio(
    _momentum(b1, debias=True, mu_dtype=mu_dtype),
    scale_by_subset_norm(
      b2,
      eps,
      subset_size,
      bias_correction=True,
      mask=mask,
      dimension_numbers=dimension_numbers,
      nu_dtype=nu_dtype,
    ),
  )
  return chain_with_decay_after_update(core, learning_rate, weight_decay, weight_decay_mask)


def rmsprop_sn(
  learning_rate: optax.ScalarOrSchedule,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  subset_size: SubsetSize = 'heuristic',
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  weight_decay_mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""RMSprop-SN: the gradient over a subset-norm second moment, no momentum.

  .. math::
    v_t^S = \beta_2 v_{t-1}^S + (1-\beta_2) \textstyle\sum_{i\in S} g_{t,i}^2,
    \qquad p_t = p_{t-1} - \eta_t \frac{g_t}{\sqrt{v_t^S} + \epsilon},

  with no bias correction (the official ``rmsprop_sn``: large first steps,
  so use a warmup). The smallest state of the family: :math:`\max(m, n)`
  numbers per selected matrix.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    b2: Second-moment decay, in ``[0, 1)``.
    eps: Added to the root of the second moment.
    weight_decay: Decoupled weight decay, applied after the update.
    subset_size: ``'heuristic'`` or a non-zero int.
    mask: Leaves that get SN (default: ``default_mask``, the linear kernels).
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    nu_dtype: Second-moment dtype (default: the parameter's, real for
      complex parameters).
    weight_decay_mask: Leaves to decay (default: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> tx = optax_lean.rmsprop_sn(1e-2)
    >>> state = tx.init({'w': jnp.ones((8, 4))})
    >>> state[0].nu['w'].shape
    (8, 1)

  References:
    Nguyen & Nguyen, `Lean and Mean Adaptive Optimization via Subset-Norm and
    Subspace-Momentum with Convergence Guarantees
    <https://arxiv.org/abs/2411.07120>`_, ICML 2025
  """
  checks.in_interval('b2', b2, 0.0, 1.0)
  core = scale_by_subset_norm(
    b2,
    eps,
    subset_size,
    mask=mask,
    dimension_numbers=dimension_numbers,
    nu_dtype=nu_dtype,
  )
  return chain_with_decay_after_update(core, learning_rate, weight_decay, weight_decay_mask)


def adagrad_sn(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-6,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  subset_size: SubsetSize = 'heuristic',
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  weight_decay_mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaGrad-SN: momentum over an accumulated subset-norm, no bias correction.

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    v_t^S = v_{t-1}^S + \textstyle\sum_{i\in S} g_{t,i}^2, \qquad
    p_t = p_{t-1} - \eta_t \frac{m_t}{\sqrt{v_t^S} + \epsilon},

  as the official ``adagrad_sn`` (betas ``(b1, 1)``, ``correct_bias=False``).

  Args:
    learning_rate: A float or an ``optax`` schedule.
    b1: Momentum decay, in ``[0, 1)``; ``0`` keeps no momentum.
    eps: Added to the root of the accumulator.
    weight_decay: Decoupled weight decay, applied after the update.
    subset_size: ``'heuristic'`` or a non-zero int.
    mask: Leaves that get SN (default: ``default_mask``, the linear kernels).
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: Momentum dtype (default: the parameter's).
    nu_dtype: Accumulator dtype (default: the parameter's, real for
      complex parameters).
    weight_decay_mask: Leaves to decay (default: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> tx = optax_lean.adagrad_sn(0.1)
    >>> state = tx.init({'w': jnp.ones((8, 4))})
    >>> state[0].numerator.ema['w'].shape, state[0].denominator.nu['w'].shape
    ((8, 4), (8, 1))

  References:
    Nguyen & Nguyen, `Lean and Mean Adaptive Optimization via Subset-Norm and
    Subspace-Momentum with Convergence Guarantees
    <https://arxiv.org/abs/2411.07120>`_, ICML 2025
  """
  core = scale_by_ratio(
    _momentum(b1, debias=False, mu_dtype=mu_dtype),
    scale_by_subset_norm(
      1.0,
      eps,
      subset_size,
      mask=mask,
      dimension_numbers=dimension_numbers,
      nu_dtype=nu_dtype,
    ),
  )
  return chain_with_decay_after_update(core, learning_rate, weight_decay, weight_decay_mask)


def adagrad_snsm(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-6,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  rank: int | None = None,
  update_proj_gap: int | RefreshSchedule = 200,
  subset_size: SubsetSize = 'heuristic',
  projector: str | Projector = 'auto',
  mask: MaskOrFn | None = None,
  momentum_on_refresh: OnRefresh = 'official',
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  projector_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
  weight_decay_mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaGrad-SNSM: subspace momentum over an accumulated subset-norm.

  As ``adamsnsm`` with :math:`\beta_2 = 1` (the second moment is a running
  sum) and no bias correction, as the official ``adagrad_snsm``:

  .. math::
    p_t = p_{t-1} - \eta_t \frac{N_t}{\sqrt{v_t^S} + \epsilon}, \qquad
    v_t^S = v_{t-1}^S + \textstyle\sum_{i\in S} G_{t,i}^2.

  The paper's LLaMA-60M run uses learning rate 1.0, rank 128, gap 100.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    b1: Momentum decay, in ``[0, 1)``.
    eps: Added to the root of the accumulator.
    weight_decay: Decoupled weight decay, applied after the update.
    rank: ``None`` (default: 128) or the subspace rank.
    update_proj_gap: Steps between projector refreshes, or a schedule:
      a function of the 0-based step count that says whether to refresh.
    subset_size: ``'heuristic'`` or a non-zero int.
    projector: See ``scale_by_subspace_momentum``.
    mask: Leaves that get SN/SM (default: ``default_mask``, the linear kernels).
    momentum_on_refresh: ``'official'``, ``'reset'``, ``'keep'`` or ``'rotate'``.
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: Momentum dtype (default: the parameter's).
    nu_dtype: Accumulator dtype (default: the parameter's, real for
      complex parameters).
    projector_dtype: Stored-basis dtype (default: the parameter's).
    seed: Seed of the randomized projectors.
    weight_decay_mask: Leaves to decay (default: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> tx = optax_lean.adagrad_snsm(1.0, rank=2, update_proj_gap=10)
    >>> state = tx.init({'w': jnp.ones((8, 4))})
    >>> state[0].numerator.mu['w'].shape, state[0].denominator.nu['w'].shape
    ((8, 2), (8, 1))

  References:
    Nguyen & Nguyen, `Lean and Mean Adaptive Optimization via Subset-Norm and
    Subspace-Momentum with Convergence Guarantees
    <https://arxiv.org/abs/2411.07120>`_, ICML 2025
  """
  core = scale_by_ratio(
    scale_by_subspace_momentum(
      b1,
      rank,
      update_proj_gap,
      projector,
      momentum_on_refresh=momentum_on_refresh,
      mask=mask,
      dimension_numbers=dimension_numbers,
      mu_dtype=mu_dtype,
      projector_dtype=projector_dtype,
      seed=seed,
    ),
    scale_by_subset_norm(
      1.0,
      eps,
      subset_size,
      mask=mask,
      dimension_numbers=dimension_numbers,
      nu_dtype=nu_dtype,
    ),
  )
  return chain_with_decay_after_update(core, learning_rate, weight_decay, weight_decay_mask)


def sgd_sm(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  rank: int | None = None,
  update_proj_gap: int | RefreshSchedule = 200,
  projector: str | Projector = 'auto',
  mask: MaskOrFn | None = None,
  momentum_on_refresh: OnRefresh = 'official',
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  projector_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
  weight_decay_mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD with subspace momentum: :math:`p_t = p_{t-1} - \eta_t N_t`.

  :math:`N_t = B m_t + (G_t - B R_t)` with the dampened momentum
  :math:`m_t = \beta_1 m_{t-1} + (1 - \beta_1) B^\top G_t` of
  ``scale_by_subspace_momentum``; other leaves get the dampened full
  momentum, as the official ``sgd`` with ``rank``.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    b1: Momentum decay, in ``[0, 1)``.
    weight_decay: Decoupled weight decay, applied after the update.
    rank: ``None`` (default: 128) or the subspace rank.
    update_proj_gap: Steps between projector refreshes, or a schedule:
      a function of the 0-based step count that says whether to refresh.
    projector: See ``scale_by_subspace_momentum``.
    mask: Leaves that get SM (default: ``default_mask``, the linear kernels).
    momentum_on_refresh: ``'official'``, ``'reset'``, ``'keep'`` or ``'rotate'``.
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: Momentum dtype (default: the parameter's).
    projector_dtype: Stored-basis dtype (default: the parameter's).
    seed: Seed of the randomized projectors.
    weight_decay_mask: Leaves to decay (default: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> tx = optax_lean.sgd_sm(0.1, rank=2, update_proj_gap=10)
    >>> state = tx.init({'w': jnp.ones((8, 4))})
    >>> state[0].mu['w'].shape, state[0].projector['w'].shape  # rank 2 of 4
    ((8, 2), (4, 2))

  References:
    Nguyen & Nguyen, `Lean and Mean Adaptive Optimization via Subset-Norm and
    Subspace-Momentum with Convergence Guarantees
    <https://arxiv.org/abs/2411.07120>`_, ICML 2025
  """
  core = scale_by_subspace_momentum(
    b1,
    rank,
    update_proj_gap,
    projector,
    momentum_on_refresh=momentum_on_refresh,
    mask=mask,
    dimension_numbers=dimension_numbers,
    mu_dtype=mu_dtype,
    projector_dtype=projector_dtype,
    seed=seed,
  )
  return chain_with_decay_after_update(core, learning_rate, weight_decay, weight_decay_mask)
