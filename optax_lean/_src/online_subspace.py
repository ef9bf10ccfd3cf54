"""Online Subspace Descent: GaLore whose projector learns by online PCA.

Liang, Liu, Chen & Liu, `Memory-Efficient LLM Training with Online Subspace
Descent <https://arxiv.org/abs/2408.12857>`_, NeurIPS 2024; official code
https://github.com/kyleliang919/Online-Subspace-Descent
(``galore_torch/galore_projector.py``, proj_type ``continuous``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lean._src import checks, dtypes, sharding
from optax_lean._src import projectors as proj_lib
from optax_lean._src.adam import validate_adam
from optax_lean._src.combine import chain_with_decay_after_update
from optax_lean._src.dimension_numbers import DimensionNumbersOrFn, MaskOrFn
from optax_lean._src.subspace_adam import ScaleBySubspaceAdamState, subspace_adam


class ScaleByOnlineSubspaceDescentState(NamedTuple):
  """State of ``scale_by_online_subspace_descent``.

  Attributes:
    subspace_adam: The weights' subspace Adam (``ScaleBySubspaceAdamState``):
      the step count, the (low-rank) moments, and per leaf with a subspace the
      learned basis ``(…, size, r)`` in its ``projector`` field.
    projector_adamw: The bases' AdamW state (``projector_adamw``'s chain),
      with moments shaped like the bases; its step count starts at the
      second update, the first step the bases learn.
  """

  subspace_adam: ScaleBySubspaceAdamState
  projector_adamw: optax.OptState


def projector_adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  weight_decay: jax.typing.ArrayLike,
) -> optax.GradientTransformation:
  r"""PyTorch's ``AdamW`` of the bases, as a chain of optax parts.

  Adam with ``eps`` on the corrected root, then the decoupled decay, then the
  step size: :math:`P \leftarrow P - \eta (\mathrm{Adam}(\nabla) + \lambda P)`,
  which is PyTorch's decay-then-step :math:`P (1 - \eta\lambda) - \eta\,
  \mathrm{Adam}(\nabla)`. A schedule is of the chain's own step count.
  """
  return optax.chain(
    optax.scale_by_adam(b1, b2, eps),
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )


def _is_float(x: jax.Array) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def pca_loss_gradient(
  basis: jax.Array, g_a: jax.Array, orthogonality_penalty: jax.typing.ArrayLike
) -> jax.Array:
  r"""The gradient in :math:`P` of the online-PCA loss, in closed form.

  .. math::
    L(P) = \|P P^\top \hat G - \hat G\|_F^2 + \lambda \|P^\top P - I\|_F^2,
    \qquad \hat G = G / \|G\|_F,

  for each matrix of ``g_a`` (``(…, size, c)``, the basis ``(…, size, r)``):
  :math:`\nabla L = 2(E \hat G^\top P + \hat G E^\top P) + 4\lambda P (P^\top P
  - I)` with the residual :math:`E = P P^\top \hat G - \hat G`.
  """
  dtype = g_a.dtype
  norm = jnp.sqrt(jnp.sum(jnp.square(g_a), axis=(-2, -1), keepdims=True))
  g_hat = g_a / jnp.where(norm > 0, norm, 1)
  residual = proj_lib.back_project(proj_lib.project(g_hat, basis, dtype), basis, g_hat, dtype)
  residual = residual - g_hat
  spec = sharding.spec_of(basis)

  def outer(x, y):  # x y^T P, as x (P^T y)^T
    y_low = proj_lib.project(y, basis, dtype)
    return sharding.einsum('...kc,...rc->...kr', x, y_low, out_spec=spec, out_dtype=dtype)

  gradient = 2 * (outer(residual, g_hat) + outer(g_hat, residual))
  gram = proj_lib.change_of_basis(basis, basis, dtype)
  identity = jnp.eye(gram.shape[-1], dtype=dtype).reshape((1,) * (gram.ndim - 2) + gram.shape[-2:])
  gram = gram - identity
  penalty = sharding.einsum('...kr,...rs->...ks', basis, gram, out_spec=spec, out_dtype=dtype)
  return gradient + 4 * jnp.asarray(orthogonality_penalty, dtype) * penalty


def scale_by_online_subspace_descent(
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  rank: int | None = None,
  update_proj_gap: int = 200,
  scale: jax.typing.ArrayLike = 0.25,
  *,
  projector_learning_rate: optax.ScalarOrSchedule | None = None,
  projector_b1: jax.typing.ArrayLike = 0.9,
  projector_b2: jax.typing.ArrayLike = 0.999,
  projector_eps: jax.typing.ArrayLike = 1e-8,
  projector_weight_decay: jax.typing.ArrayLike = 0.01,
  orthogonality_penalty: jax.typing.ArrayLike = 0.0,
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  projector_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore's scaling with a projector learned by online PCA instead of SVDs.

  The weight update is ``scale_by_galore``'s (Adam on :math:`P_t^\top G_t`,
  Hugging Face flavour, scaled back-projection). The basis :math:`P_0` is the
  SVD one of the first gradient; after that no SVD is taken: at every step
  :math:`t \geq 1` the basis takes one AdamW step on the online-PCA loss
  (``pca_loss_gradient``),

  .. math::
    P_{t+1} = P_t (1 - \eta^P_t \lambda^P) - \eta^P_t
      \mathrm{Adam}\big(\nabla_P \|P_t P_t^\top \hat G_t - \hat G_t\|_F^2
      + \lambda \nabla_P \|P_t^\top P_t - I\|_F^2\big),

  and is used from the next step on, as in the released code (proj_type
  ``continuous``): PyTorch's ``AdamW`` defaults for the projector (betas
  ``(0.9, 0.999)``, ``eps=1e-8``, ``weight_decay=0.01``, decay before the
  step), step size :math:`\eta^P_t = (1/T)\,\eta_t/\eta_0` following the
  main schedule (see ``online_subspace_descent``), no orthogonality term
  (:math:`\lambda = 0`; the paper's penalty is the
  ``orthogonality_penalty`` option), no re-orthonormalisation and no change
  to the main moments. The side rule is GaLore's. The projector's AdamW adds
  :math:`2r\min(m, n)` numbers per matrix to GaLore's state.

  Args:
    b1: First-moment decay of the weights' Adam, in ``[0, 1)``.
    b2: Second-moment decay, in ``[0, 1)``.
    eps: Added to the root of the uncorrected second moment, ``>= 0``.
    rank: ``None`` (default: 128) or the subspace rank (clipped, with a warning,
      to ``min(in, out)``).
    update_proj_gap: :math:`T`; sets the default projector step size
      :math:`1/T` (there are no periodic refreshes).
    scale: Factor on projected leaves' updates.
    projector_learning_rate: :math:`\eta^P_t`, a float or a schedule of the
      0-based step; default ``1 / update_proj_gap``.
    projector_b1: The projector's AdamW first-moment decay, in ``[0, 1)``.
    projector_b2: Its second-moment decay, in ``[0, 1)``.
    projector_eps: Its ``eps`` (on the corrected root), ``>= 0``.
    projector_weight_decay: Its decoupled weight decay, ``>= 0``.
    orthogonality_penalty: :math:`\lambda \geq 0`, the weight of the
      paper's :math:`\|P^\top P - I\|_F^2` term (0 in the released code).
    mask: Leaves that get a subspace (default: ``default_mask``, the linear kernels).
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: First-moment dtype (default: the leaf's).
    nu_dtype: Second-moment dtype (default: the leaf's, real for
      complex leaves).
    projector_dtype: Dtype of the basis and of its AdamW moments (default:
      the leaf's).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    ``ScaleByOnlineSubspaceDescentState``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> tx = optax_lean.scale_by_online_subspace_descent(rank=2)
    >>> state = tx.init({'kernel': jnp.ones((4, 6))})
    >>> adam, adamw = state.subspace_adam, state.projector_adamw
    >>> adam.projector['kernel'].shape, adamw[0].mu['kernel'].shape
    ((4, 2), (4, 2))

  References:
    Liang et al., `Memory-Efficient LLM Training with Online Subspace Descent
    <https://arxiv.org/abs/2408.12857>`_, NeurIPS 2024
  """
  rank = 128 if rank is None else rank
  checks.positive_count('update_proj_gap', update_proj_gap)
  validate_adam(projector_b1, projector_b2, projector_eps, prefix='projector_')
  checks.non_negative('projector_weight_decay', projector_weight_decay)
  checks.non_negative('orthogonality_penalty', orthogonality_penalty)
  projector = proj_lib.SVDProjector()
  engine = subspace_adam(
    b1,
    b2,
    eps,
    rank,
    None,
    scale,
    projector,
    mask=mask,
    dimension_numbers=dimension_numbers,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
    projector_dtype=projector_dtype,
    real_only='online_subspace_descent',
  )
  if projector_learning_rate is None:
    projector_learning_rate = 1.0 / update_proj_gap
  if callable(projector_learning_rate):
    # The bases first learn at update 1, where the chain's own count is 0.
    schedule = projector_learning_rate
    projector_learning_rate = lambda count: schedule(count + 1)
  bases_optimizer = projector_adamw(
    projector_learning_rate, projector_b1, projector_b2, projector_eps, projector_weight_decay
  )
  # The bases' AdamW runs on float32 copies (float64 ones for float64
  # bases), as every moment of the library: half-precision moments lose too
  # much, and eps = 1e-8 is zero in float16.
  working = lambda x: x.astype(dtypes.compute_dtype(x.dtype)) if _is_float(x) else x

  def init_fn(params):
    subspace_adam = engine.init(dtypes.as_arrays(params))
    return ScaleByOnlineSubspaceDescentState(
      subspace_adam, bases_optimizer.init(subspace_adam.projector)
    )

  def pca_gradient(g_a, basis, stored):
    """The online-PCA gradient of one matrix's basis, read before the walk overwrites ``G``."""
    del basis  # the basis in the gradient's dtype; the loss takes the working one
    stored = working(stored)
    dtype = dtypes.compute_dtype(g_a.dtype, stored.dtype)
    g_a = g_a.astype(dtype)
    basis = sharding.reshard(stored.astype(dtype), (*sharding.spec_of(g_a)[:-1], None))
    return pca_loss_gradient(basis, g_a, orthogonality_penalty)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    outputs, subspace_adam, observed = engine.update(
      updates, state.subspace_adam, observe=pca_gradient
    )
    if all(seen is None for seen in observed):  # no basis (the tree may be a bare leaf)
      return outputs, state._replace(subspace_adam=subspace_adam)
    bases = jax.tree.map(working, subspace_adam.projector)
    leaves, treedef = jax.tree.flatten(bases)
    seen = [g for g in observed if g is not None]
    gradients = jax.tree.unflatten(
      treedef, [sharding.reshard_like(g, b) for g, b in zip(seen, leaves)]
    )
    with jax.numpy_dtype_promotion('standard'):  # optax's Adam raises decays to int counts
      steps, adamw_state = bases_optimizer.update(
        gradients, jax.tree.map(working, state.projector_adamw), bases
      )
    # Update 0 takes the first SVD basis; the bases learn from update 1 on.
    learns = state.subspace_adam.count > 0
    keep = lambda new, old: sharding.cast_like(jnp.where(learns, new, old.astype(new.dtype)), old)
    new_bases = jax.tree.map(keep, optax.apply_updates(bases, steps), subspace_adam.projector)
    adamw_state = jax.tree.map(keep, adamw_state, state.projector_adamw)
    return outputs, ScaleByOnlineSubspaceDescentState(
      subspace_adam._replace(projector=new_bases), adamw_state
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def online_subspace_descent(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  rank: int | None = None,
  update_proj_gap: int = 200,
  scale: jax.typing.ArrayLike = 0.25,
  mask: MaskOrFn | None = None,
  base_learning_rate: jax.typing.ArrayLike | None = None,
  projector_b1: jax.typing.ArrayLike = 0.9,
  projector_b2: jax.typing.ArrayLike = 0.999,
  projector_eps: jax.typing.ArrayLike = 1e-8,
  projector_weight_decay: jax.typing.ArrayLike = 0.01,
  orthogonality_penalty: jax.typing.ArrayLike = 0.0,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  projector_dtype: jax.typing.DTypeLike | None = None,
  weight_decay_mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Online Subspace Descent with AdamW, as the released ``continuous`` GaLore.

  ``scale_by_online_subspace_descent``, then the learning rate, then decay
  after the update (GaLore's Hugging Face order). The projector's step size
  follows the main schedule as in the released code,
  :math:`\eta^P_t = \eta_t / (T \eta_0)`, where :math:`\eta_0` is the
  optimizer's constructor learning rate, i.e. the schedule's peak in the
  official training script: ``learning_rate`` when it is a float (so
  :math:`\eta^P = 1/T`), ``base_learning_rate`` (required) with a schedule.
  Hyperparameters of the paper's runs are GaLore's (``learning_rate=0.01``,
  ``scale=0.25``, ranks 128 to 512, ``update_proj_gap=200``).

  Args:
    learning_rate: A float or an ``optax`` schedule.
    b1: First-moment decay, in ``[0, 1)``.
    b2: Second-moment decay, in ``[0, 1)``.
    eps: Added to the root of the uncorrected second moment.
    weight_decay: Decoupled weight decay, ``>= 0``, applied after the update.
    rank: ``None`` (default: 128) or the subspace rank.
    update_proj_gap: :math:`T` in the projector's step size.
    scale: Factor on projected leaves' updates.
    mask: Leaves that get a subspace (default: ``default_mask``, the linear kernels;
      the official scripts select the attention and MLP kernels).
    base_learning_rate: :math:`\eta_0`; default ``learning_rate`` when it is
      a float.
    projector_b1: The projector's AdamW first-moment decay.
    projector_b2: Its second-moment decay.
    projector_eps: Its ``eps``.
    projector_weight_decay: Its decoupled weight decay.
    orthogonality_penalty: Weight of the paper's orthogonality term.
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: First-moment dtype (default: the parameter's).
    nu_dtype: Second-moment dtype (default: the parameter's, real for
      complex parameters).
    projector_dtype: Dtype of the basis and its moments (default: the
      parameter's).
    weight_decay_mask: Leaves to decay (default: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_lean
    >>> params = {'w': jnp.ones((8, 4)), 'b': jnp.zeros(4)}
    >>> loss = lambda p: jnp.sum((jnp.ones(8) @ p['w'] + p['b'] - 1.0) ** 2)
    >>> schedule = optax.linear_schedule(1e-2, 1e-3, 100)
    >>> tx = optax_lean.online_subspace_descent(
    ...     schedule, rank=1, update_proj_gap=10, base_learning_rate=1e-2)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f'{loss(params):.2f}')
    192.69

  References:
    Liang et al., `Memory-Efficient LLM Training with Online Subspace Descent
    <https://arxiv.org/abs/2408.12857>`_, NeurIPS 2024
  """
  if learning_rate is None or base_learning_rate is None:
    if callable(learning_rate):
      raise ValueError(
        'base_learning_rate must be given with a learning-rate schedule: the '
        "projector's step size is (1 / update_proj_gap) * lr_t / base_learning_rate "
        "(the official code's constructor lr, the schedule's peak)."
      )
    projector_learning_rate = None
  elif callable(learning_rate):
    projector_learning_rate = lambda count: (
      learning_rate(count) / (base_learning_rate * update_proj_gap)
    )
  else:
    projector_learning_rate = learning_rate / (base_learning_rate * update_proj_gap)
  core = scale_by_online_subspace_descent(
    b1,
    b2,
    eps,
    rank,
    update_proj_gap,
    scale,
    projector_learning_rate=projector_learning_rate,
    projector_b1=projector_b1,
    projector_b2=projector_b2,
    projector_eps=projector_eps,
    projector_weight_decay=projector_weight_decay,
    orthogonality_penalty=orthogonality_penalty,
    mask=mask,
    dimension_numbers=dimension_numbers,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
    projector_dtype=projector_dtype,
  )
  return chain_with_decay_after_update(core, learning_rate, weight_decay, weight_decay_mask)
