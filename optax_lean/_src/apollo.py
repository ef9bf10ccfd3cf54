"""APOLLO and APOLLO-Mini: AdamW's per-channel scaling, estimated in a random subspace.

Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
<https://arxiv.org/abs/2412.05270>`_, MLSys 2025; official code
https://github.com/zhuhanqing/APOLLO (``apollo_torch/apollo.py``, package
``apollo-torch``). A configuration of the subspace-Adam engine: a Gaussian
sketch (``GaussianProjector``), Adam's moments of the sketch kept across
refreshes, and the ``'channel'`` or ``'tensor'`` output rule
(``subspace_adam.scaled_gradient_step``), followed by the norm-growth limiter
and Adam's bias correction.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import optax

from optax_lean._src import checks
from optax_lean._src import projectors as proj_lib
from optax_lean._src.combine import chain_with_decay_after_update, chain_with_decay_before_update
from optax_lean._src.dimension_numbers import DimensionNumbersOrFn, MaskOrFn
from optax_lean._src.norm_growth import scale_by_norm_growth_limit
from optax_lean._src.selection import selection_mask
from optax_lean._src.subspace import RefreshSchedule
from optax_lean._src.subspace_adam import scale_by_subspace_adam

Rule = Literal['official', 'paper']


def scale_by_apollo(
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  rank: int | None = None,
  update_proj_gap: int | RefreshSchedule = 200,
  *,
  scale_type: Literal['channel', 'tensor'] = 'channel',
  rule: Rule = 'official',
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""APOLLO's scaling of the gradient, without the limiter and bias correction.

  For a selected matrix in its rows view :math:`G` (``(size, c)``, the
  projected axis being the smaller one, the ``in`` axis of a square kernel,
  as the official ``proj_type='std'``), with a Gaussian :math:`P` of entries
  :math:`\mathcal N(0, 1/r)` (``size x r``) drawn anew at steps ``0, T, 2T,
  ...`` and Adam's moments of :math:`R = P^\top G` (kept across refreshes):

  .. math::
    \tilde R = \frac{m}{\sqrt{v} + \epsilon}, \qquad
    u = G \,\mathrm{diag}(s), \qquad
    s_j = \frac{\|\tilde R_{:, j}\|}{\|R_{:, j}\| + 10^{-8}}

  (``scale_type='channel'``; ``'tensor'`` takes one ratio of Frobenius
  norms). With ``rule='official'``, :math:`m, v` are uncorrected (the caller
  applies the bias correction) and other leaves get Hugging Face's AdamW
  direction; with ``rule='paper'``, :math:`m, v` are bias-corrected before
  the ratio and other leaves get PyTorch's Adam direction.

  Args:
    b1: First-moment decay, in ``[0, 1)``.
    b2: Second-moment decay, in ``[0, 1)``.
    eps: Added to the root of the uncorrected second moment (official 1e-6).
    rank: ``None`` (default: 128) or the sketch's rank ``r``.
    update_proj_gap: Steps between new sketches, ``T``, or a schedule:
      a function of the 0-based step count that says whether to refresh.
    scale_type: ``'channel'`` (APOLLO) or ``'tensor'`` (APOLLO-Mini).
    rule: ``'official'`` (the official code) or ``'paper'`` (Algorithm 1).
    mask: Leaves that get the sketch (default: ``default_mask``).
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: First-moment dtype (default: the leaf's).
    nu_dtype: Second-moment dtype (default: the leaf's).
    seed: Seed of the sketches; each matrix and each refresh draws its own.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state ``ScaleBySubspaceAdamState``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> tx = optax_lean.scale_by_apollo(rank=2)
    >>> params = {'w': jnp.ones((8, 4))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones((8, 4))}, state)
    >>> state.mu['w'].shape  # a rank-2 sketch of each of the 8 input rows
    (8, 2)

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025
  """
  checks.one_of('scale_type', scale_type, ('channel', 'tensor'))
  checks.one_of('rule', rule, get_args(Rule))
  return scale_by_subspace_adam(
    b1,
    b2,
    eps,
    128 if rank is None else rank,
    update_proj_gap,
    1.0,
    proj_lib.GaussianProjector(),
    flavour='hf' if rule == 'official' else 'torch',
    output=scale_type,
    mask=mask,
    dimension_numbers=dimension_numbers,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
    seed=seed,
  )


def apollo(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  rank: int | None = None,
  update_proj_gap: int | RefreshSchedule = 200,
  scale: jax.typing.ArrayLike = 1.0,
  scale_type: Literal['channel', 'tensor'] = 'channel',
  norm_growth_limit: jax.typing.ArrayLike | None = 1.01,
  rule: Rule = 'official',
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
  weight_decay_mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""APOLLO: AdamW's channel-wise scaling of the gradient, estimated in a rank-``r`` sketch.

  ``scale_by_apollo``; then, on each selected matrix, the norm-growth
  limiter (``scale_by_norm_growth_limit``) and
  :math:`\sqrt{\mathrm{scale}}\,\sqrt{1-\beta_2^t}/(1-\beta_1^t)`; then the
  learning rate and decoupled weight decay of the updated parameters, as the
  official ``AdamW``:

  .. math::
    W_t = (W_{t-1} - \eta_t \sqrt{\mathrm{scale}}\,
      \tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\, \mathrm{limit}(G_t S_t))
      (1 - \eta_t \lambda).

  Other leaves get Hugging Face's AdamW at the same rate. The state per
  selected ``(m, n)`` kernel is two ``r x max(m, n)`` moments, a key and one
  norm. Where the paper and the official code differ, this follows the code:
  the factor is ``sqrt(scale)`` (the paper's :math:`\alpha` is
  :math:`\sqrt{\mathrm{scale}}`), the limiter acts before the bias correction,
  ``eps = 1e-6`` is added to the uncorrected root, and the moments are not
  reset when the sketch changes. ``rule='paper'`` follows Algorithm 1 and
  eq. (4) instead: the ratios come from bias-corrected moments (``eps`` on
  the corrected root), the update is
  :math:`\sqrt{\mathrm{scale}}\,\mathrm{limit}(G_t S_t)`, and the decay
  applies to the parameters before the update,
  :math:`W_t = W_{t-1} - \eta_t(\ldots + \lambda W_{t-1})`. The official
  seeds advance by a hash of PyTorch's generator; here each matrix and
  refresh folds its index into ``seed``, so runs match the official ones in
  law, not draw by draw.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    b1: First-moment decay, in ``[0, 1)``.
    b2: Second-moment decay, in ``[0, 1)``.
    eps: Added to the root of the uncorrected second moment.
    weight_decay: Decoupled weight decay, ``>= 0``, of the updated parameters.
    rank: ``None`` (default: 128) or the sketch's rank.
    update_proj_gap: Steps between new sketches, or a schedule:
      a function of the 0-based step count that says whether to refresh.
    scale: The official ``scale``: the update of selected matrices is
      multiplied by ``sqrt(scale)`` (1 for APOLLO, 128 for APOLLO-Mini).
    scale_type: ``'channel'`` or ``'tensor'`` (see ``scale_by_apollo``).
    norm_growth_limit: The limiter's ``gamma`` (official 1.01), or ``None``
      for no limiter (the official ``disable_nl``).
    rule: ``'official'`` (default) or ``'paper'``: see above.
    mask: Leaves that get the sketch (default: ``default_mask``; the official
      scripts select the attention and MLP kernels).
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: First-moment dtype (default: the parameter's).
    nu_dtype: Second-moment dtype (default: the parameter's).
    seed: Seed of the sketches.
    weight_decay_mask: Leaves to decay (default: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_lean
    >>> params = {'w': jnp.ones((8, 4)), 'b': jnp.zeros(4)}
    >>> loss = lambda p: jnp.sum((jnp.ones(8) @ p['w'] + p['b'] - 1.0) ** 2)
    >>> tx = optax_lean.apollo(1e-2, rank=2, update_proj_gap=10)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 196.0)
    True

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025
  """
  checks.non_negative('scale', scale)
  core = scale_by_apollo(
    b1,
    b2,
    eps,
    rank,
    update_proj_gap,
    scale_type=scale_type,
    rule=rule,
    mask=mask,
    dimension_numbers=dimension_numbers,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
    seed=seed,
  )

  selected = functools.partial(selection_mask, mask=mask, dimension_numbers=dimension_numbers)

  def factor(count):
    if rule == 'paper':
      return jnp.sqrt(scale)
    t = count + 1
    return jnp.sqrt(scale) * jnp.sqrt(1 - jnp.power(b2, t)) / (1 - jnp.power(b1, t))

  parts = [core]
  if norm_growth_limit is not None:
    parts.append(
      scale_by_norm_growth_limit(
        norm_growth_limit, mask=selected, dimension_numbers=dimension_numbers
      )
    )
  parts.append(optax.masked(optax.scale_by_schedule(factor), selected))
  with_decay = (
    chain_with_decay_after_update if rule == 'official' else chain_with_decay_before_update
  )
  return with_decay(optax.chain(*parts), learning_rate, weight_decay, weight_decay_mask)


def apollo_mini(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  rank: int | None = None,
  update_proj_gap: int | RefreshSchedule = 200,
  scale: jax.typing.ArrayLike = 128.0,
  norm_growth_limit: jax.typing.ArrayLike | None = 1.01,
  rule: Rule = 'official',
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
  weight_decay_mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""APOLLO-Mini: ``apollo`` with a rank-1 sketch and one scaling factor per matrix.

  The official APOLLO-Mini configuration (``rank=1``, ``scale_type='tensor'``,
  ``scale=128``): the state per selected ``(m, n)`` kernel is two vectors of
  ``max(m, n)``, a key and one norm, SGD's memory.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    b1: First-moment decay, in ``[0, 1)``.
    b2: Second-moment decay, in ``[0, 1)``.
    eps: Added to the root of the uncorrected second moment.
    weight_decay: Decoupled weight decay, ``>= 0``.
    rank: ``None`` (default: 1, the official) or the sketch's rank.
    update_proj_gap: Steps between new sketches, or a schedule:
      a function of the 0-based step count that says whether to refresh.
    scale: The official ``scale`` (128; the update is multiplied by its root).
    norm_growth_limit: The limiter's ``gamma``, or ``None``.
    rule: ``'official'`` (default) or ``'paper'`` (see ``apollo``).
    mask: Leaves that get the sketch (default: ``default_mask``).
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: First-moment dtype (default: the parameter's).
    nu_dtype: Second-moment dtype (default: the parameter's).
    seed: Seed of the sketches.
    weight_decay_mask: Leaves to decay (default: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_lean
    >>> params = {'w': jnp.ones((8, 4)), 'b': jnp.zeros(4)}
    >>> tx = optax_lean.apollo_mini(1e-2)
    >>> state = tx.init(params)
    >>> optax.tree_utils.tree_get(state, 'mu')['w'].shape  # one vector of 8
    (8, 1)

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025
  """
  return apollo(
    learning_rate,
    b1,
    b2,
    eps,
    weight_decay,
    rank=1 if rank is None else rank,
    update_proj_gap=update_proj_gap,
    scale=scale,
    scale_type='tensor',
    norm_growth_limit=norm_growth_limit,
    rule=rule,
    mask=mask,
    dimension_numbers=dimension_numbers,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
    seed=seed,
    weight_decay_mask=weight_decay_mask,
  )
