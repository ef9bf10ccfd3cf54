"""GaLore: Adam on the gradient's projection onto a periodically refreshed subspace.

Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024; official code
https://github.com/jiaweizzhao/GaLore (``galore_torch/adamw.py``,
``galore_projector.py``).

``scale_by_subspace_adam`` is the machinery GaLore shares with Online Subspace
Descent (a learned projector) and the random-subspace method (a resampled
random projector with restarted moments).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from optax import tree as otu

from optax_lean._src import checks, dtypes, sharding
from optax_lean._src import projectors as proj_lib
from optax_lean._src.adam import adam_step
from optax_lean._src.combine import chain_with_decay_after_update
from optax_lean._src.dimension_numbers import DimensionNumbersOrFn, MaskOrFn
from optax_lean._src.subspace import plan_subspaces, refresh_due


class ScaleByGaLoreState(NamedTuple):
  """State of ``scale_by_galore``.

  Attributes:
    count: Number of updates so far (``shape=(), dtype=int32``).
    mu: Per leaf, Adam's first moment. For a leaf with a subspace it is the
      ``(…, in, out)`` view with the projected axis shrunk to the rank; other
      leaves keep a full moment.
    nu: Per leaf, Adam's second moment, shaped like ``mu``.
    projector: Per leaf with a subspace, the projector's state (a basis, or a
      PRNG key for ``'random'``); ``None`` for the other leaves.
  """

  count: chex.Array
  mu: optax.Updates
  nu: optax.Updates
  projector: optax.Updates


def validate_adam(b1: chex.Numeric, b2: chex.Numeric, eps: chex.Numeric, prefix: str = '') -> None:
  """The official ``AdamW`` checks: ``0 <= b1, b2 < 1`` and ``eps >= 0``."""
  checks.in_interval(f'{prefix}b1', b1, 0.0, 1.0)
  checks.in_interval(f'{prefix}b2', b2, 0.0, 1.0)
  checks.non_negative(f'{prefix}eps', eps)


def adam_states(
  params: optax.Params,
  plans: list,
  mu_dtype: jax.typing.DTypeLike | None,
  nu_dtype: jax.typing.DTypeLike | None,
  projector_dtype: jax.typing.DTypeLike | None,
) -> tuple[list, list, list]:
  """Per leaf: Adam's two moments and the projector state, as flat lists.

  The moments are low-rank where ``plans`` has a subspace and full
  elsewhere; the projector state is ``None`` where there is no subspace.
  """
  mus, nus, projs = [], [], []
  for p, plan in zip(jax.tree.leaves(params), plans):
    m_dtype = p.dtype if mu_dtype is None else mu_dtype
    v_dtype = dtypes.second_moment_dtype(p.dtype, nu_dtype)
    if plan is None:
      mus.append(otu.zeros_like(p, dtype=m_dtype))
      nus.append(otu.zeros_like(p, dtype=v_dtype))
      projs.append(None)
    else:
      mus.append(plan.lowrank_zeros(p, m_dtype))
      nus.append(plan.lowrank_zeros(p, v_dtype))
      projs.append(plan.projector_zeros(p, projector_dtype))
  return mus, nus, projs


def scale_by_subspace_adam(
  b1: chex.Numeric,
  b2: chex.Numeric,
  eps: chex.Numeric,
  rank: int,
  update_proj_gap: int | None,
  scale: chex.Numeric,
  projector: proj_lib.Projector,
  *,
  flavour: str = 'hf',
  restart: bool = False,
  state_type: type = ScaleByGaLoreState,
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  projector_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Adam inside a subspace of each selected matrix, plain Adam elsewhere.

  The shared engine of ``scale_by_galore``, ``scale_by_random_subspace`` and
  ``scale_by_online_subspace_descent``: for a selected leaf, the projector is
  refreshed (under ``jax.lax.cond`` on the scalar count) at 0-based steps
  ``0, T, 2T, ...`` (only step 0 when ``update_proj_gap`` is ``None``), Adam
  runs on :math:`R = B^\\top G`, and the direction is ``scale * B d``.

  Args:
    b1: First-moment decay.
    b2: Second-moment decay.
    eps: Adam's offset, in the ``flavour``'s place.
    rank: ``None`` (default: 128) or the subspace rank (clipped, with a warning,
      to each matrix's limit).
    update_proj_gap: Steps between refreshes, or ``None`` for a projector
      set at the first step only.
    scale: Factor on the back-projected direction of selected leaves.
    projector: A ``Projector``.
    flavour: ``'hf'`` or ``'torch'`` Adam (see ``optax_lean._src.adam``).
    restart: Zero the moments at each refresh and restart their bias
      correction (a fresh Adam per subspace).
    state_type: The state NamedTuple, with fields ``count, mu, nu, projector``.
    mask: Leaves that get a subspace (default: ``default_mask``).
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: First-moment dtype (default: the leaf's).
    nu_dtype: Second-moment dtype (default: the leaf's, real for
      complex leaves).
    projector_dtype: Stored-basis dtype (default: the leaf's).
    seed: Seed of random projectors.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  checks.positive_int('rank', rank)
  if update_proj_gap is not None or restart:
    checks.positive_count('update_proj_gap', update_proj_gap)
  validate_adam(b1, b2, eps)

  def plans(tree, warn=False):
    return plan_subspaces(tree, projector, rank, mask, dimension_numbers, warn=warn)

  def refreshes(count):
    if update_proj_gap is None:
      return count == 0
    return refresh_due(count, update_proj_gap)

  def init_fn(params):
    params = dtypes.as_arrays(params)
    states = adam_states(params, plans(params, warn=True), mu_dtype, nu_dtype, projector_dtype)
    treedef = jax.tree.structure(params)
    return state_type(jnp.zeros([], jnp.int32), *(jax.tree.unflatten(treedef, xs) for xs in states))

  def update_matrix(g, mu, nu, proj_state, plan, leaf_index, count, layer):
    dtype = dtypes.compute_dtype(g.dtype, mu.dtype, nu.dtype)
    count_inc = optax.safe_increment(count)
    g_a = plan.rows(g)

    def on_refresh(operands):
      moments, old = operands
      if restart:
        moments = jax.tree.map(jnp.zeros_like, moments)
      return moments, plan.refresh(g_a, old, seed, leaf_index, count_inc, layer)

    moments = (plan.lowrank_rows(mu), plan.lowrank_rows(nu))
    (mu_a, nu_a), proj_state = jax.lax.cond(
      refreshes(count), on_refresh, lambda operands: operands, (moments, proj_state)
    )
    basis = plan.basis(proj_state, g_a, g.dtype)
    projected = proj_lib.project(g_a, basis, dtype, like=mu_a)
    # A fresh Adam per subspace counts its steps from the last refresh.
    adam_count = count % update_proj_gap + 1 if restart else count_inc
    direction, mu_a, nu_a = adam_step(projected, mu_a, nu_a, adam_count, b1, b2, eps, flavour)
    full = proj_lib.back_project(direction.astype(g.dtype), basis, g_a, dtype)
    update = jnp.asarray(scale, dtype) * plan.unrows(full)
    return update, plan.lowrank_rows(mu_a), plan.lowrank_rows(nu_a), proj_state

  def update_fn(updates, state, params=None, *, layer=None, **extra_args):
    del params, extra_args
    updates = dtypes.as_arrays(updates)
    leaves, treedef = jax.tree.flatten(updates)
    mus = treedef.flatten_up_to(state.mu)
    nus = treedef.flatten_up_to(state.nu)
    projs = treedef.flatten_up_to(state.projector)
    outputs, new_mus, new_nus = [], [], []
    for index, (g, mu, nu, plan) in enumerate(zip(leaves, mus, nus, plans(updates))):
      if plan is None:
        count_inc = optax.safe_increment(state.count)
        out, new_mu, new_nu = adam_step(g, mu, nu, count_inc, b1, b2, eps, flavour)
      else:
        out, new_mu, new_nu, projs[index] = update_matrix(
          g, mu, nu, projs[index], plan, index, state.count, layer
        )
      outputs.append(sharding.cast_like(out, g))
      new_mus.append(sharding.cast_like(new_mu, mu))
      new_nus.append(sharding.cast_like(new_nu, nu))
    unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
    new_state = state_type(
      optax.safe_increment(state.count), unflatten(new_mus), unflatten(new_nus), unflatten(projs)
    )
    return unflatten(outputs), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_galore(
  b1: chex.Numeric = 0.9,
  b2: chex.Numeric = 0.999,
  eps: chex.Numeric = 1e-6,
  rank: int | None = None,
  update_proj_gap: int = 200,
  scale: chex.Numeric = 0.25,
  projector: str | proj_lib.Projector = 'auto',
  *,
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  projector_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore's scaling: Adam on the gradient projected onto a rank-``r`` subspace.

  For a selected matrix with gradient :math:`G_t` and a basis :math:`B`
  (``size x r``, orthonormal columns) of its smaller axis, recomputed from
  the SVD of :math:`G_t` at 0-based steps :math:`0, T, 2T, \dots`:

  .. math::
    R_t &= B^\top G_t, \qquad
    m_t = \beta_1 m_{t-1} + (1-\beta_1) R_t, \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) R_t^2, \\
    u_t &= \alpha \, \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \,
      B \frac{m_t}{\sqrt{v_t} + \epsilon}.

  As in the official ``GaLoreAdamW``: ``eps`` sits on the root of the
  *uncorrected* :math:`v_t` (Hugging Face flavour), the moments are kept
  as they are when the basis changes (their coordinates then refer to the new
  basis), and the basis spans the smaller axis, the input axis of a square
  kernel (the official ``'std'`` rule for the PyTorch weight ``K.T``), so the
  moments cost :math:`r\max(m, n)` numbers each and the basis
  :math:`r\min(m, n)`. Singular vectors are sign-canonicalised (largest entry
  positive), so runs are reproducible across backends. Leaves without a
  subspace get the same Adam, unprojected and unscaled.

  Args:
    b1: First-moment decay, in ``[0, 1)``.
    b2: Second-moment decay, in ``[0, 1)``.
    eps: Added to the root of the uncorrected second moment, ``>= 0``.
    rank: ``None`` (default: 128) or the subspace rank ``r >= 1`` (clipped, with a warning, to
      ``min(in, out)``).
    update_proj_gap: Steps ``T >= 1`` between basis refreshes.
    scale: :math:`\alpha`, the factor on projected leaves' updates.
    projector: ``'auto'`` (default: ``'svd'`` on CPU, ``'randomized_svd'`` on
      GPU and TPU, see ``get_projector``), ``'svd'`` (official),
      ``'randomized_svd'``, ``'random'`` (the released code's ``random``: a
      random orthonormal basis, only a key is stored) or a ``Projector``.
    mask: Leaves that get a subspace: a pytree (or prefix) of bools, or a
      callable returning one. Default: ``default_mask``, the linear kernels
      (see ``galore`` for how this differs from the official selection).
    dimension_numbers: How selected leaves read as ``(…, in, out)``; see
      ``DimensionNumbers``.
    mu_dtype: First-moment dtype (default: the leaf's).
    nu_dtype: Second-moment dtype (default: the leaf's, real for
      complex leaves).
    projector_dtype: Stored-basis dtype (default: the leaf's).
    seed: Seed of the random projectors.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    ``ScaleByGaLoreState``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> tx = optax_lean.scale_by_galore(rank=2, update_proj_gap=10)
    >>> state = tx.init({'kernel': jnp.ones((4, 6)), 'bias': jnp.ones(6)})
    >>> state.mu['kernel'].shape, state.projector['kernel'].shape
    ((2, 6), (4, 2))
    >>> state.projector['bias'] is None
    True

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024
  """
  rank = 128 if rank is None else rank
  return scale_by_subspace_adam(
    b1,
    b2,
    eps,
    rank,
    update_proj_gap,
    scale,
    proj_lib.get_projector(projector),
    mask=mask,
    dimension_numbers=dimension_numbers,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
    projector_dtype=projector_dtype,
    seed=seed,
  )


def galore(
  learning_rate: optax.ScalarOrSchedule,
  b1: chex.Numeric = 0.9,
  b2: chex.Numeric = 0.999,
  eps: chex.Numeric = 1e-6,
  weight_decay: chex.Numeric = 0.0,
  *,
  rank: int | None = None,
  update_proj_gap: int = 200,
  scale: chex.Numeric = 0.25,
  projector: str | proj_lib.Projector = 'auto',
  mask: MaskOrFn | None = None,
  dimension_numbers: DimensionNumbersOrFn | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  projector_dtype: jax.typing.DTypeLike | None = None,
  seed: int = 0,
  weight_decay_mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore-AdamW, as the official ``GaLoreAdamW``.

  ``scale_by_galore``, then the learning rate, then decoupled weight decay
  on the *updated* parameters (:math:`p \leftarrow p(1 - \eta_t\lambda)`, Hugging
  Face's order). The paper's LLaMA runs use ``learning_rate=0.01``,
  ``scale=0.25``, ``update_proj_gap=200`` and ranks 128 to 512 (1024 in the
  1B script).

  **Which leaves.** The official training script projects only the
  ``nn.Linear`` weights whose name contains ``attn`` or ``mlp``; the output
  head, embeddings and norms get plain AdamW. The default here is the
  library's ``default_mask``: every linear kernel (the output head
  included). To reproduce the official selection pass e.g.
  ``mask=lambda params: jax.tree_util.tree_map_with_path(lambda path, p:
  any(k in jax.tree_util.keystr(path) for k in ('attn', 'mlp')) and p.ndim
  == 2, params)``.

  **Versus** ``optax.contrib.galore``: that one puts the basis on the
  *larger* axis of the ``(in, out)`` view (Adam states :math:`r\min(m, n)`,
  not the official :math:`r\max(m, n)`; both agree on square kernels), uses
  optax's Adam (``eps=1e-8`` added to the corrected root), decays weights
  before the update, stores ``(0, 0)`` placeholder projectors for other
  leaves (which orbax cannot save) and runs its SVD on sharded matrices
  (which fails under an Explicit mesh). Its refresh schedule (0-based
  ``count % T == 0``) is the same. This one matches the official numerics and
  memory, saves with orbax and runs under Auto and Explicit meshes.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    b1: First-moment decay, in ``[0, 1)``.
    b2: Second-moment decay, in ``[0, 1)``.
    eps: Added to the root of the uncorrected second moment, ``>= 0``.
    weight_decay: Decoupled weight decay, ``>= 0``, applied after the update.
    rank: ``None`` (default: 128) or the subspace rank.
    update_proj_gap: Steps between basis refreshes.
    scale: Factor on projected leaves' updates.
    projector: ``'auto'`` (default, see ``get_projector``), ``'svd'``,
      ``'randomized_svd'``, ``'random'`` or a ``Projector``.
    mask: Leaves that get a subspace (default: ``default_mask``, the linear kernels).
    dimension_numbers: How selected leaves read as ``(…, in, out)``.
    mu_dtype: First-moment dtype (default: the parameter's).
    nu_dtype: Second-moment dtype (default: the parameter's, real for
      complex parameters).
    projector_dtype: Stored-basis dtype (default: the parameter's).
    seed: Seed of the random projectors.
    weight_decay_mask: Leaves to decay (default: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_lean
    >>> params = {'w': jnp.ones((8, 4)), 'b': jnp.zeros(4)}
    >>> loss = lambda p: jnp.sum((jnp.ones(8) @ p['w'] + p['b'] - 1.0) ** 2)
    >>> tx = optax_lean.galore(1e-2, rank=2, update_proj_gap=10)
    >>> state = tx.init(params)
    >>> print(f'{loss(params):.2f}')
    196.00
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f'{loss(params):.2f}')
    192.65

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024
  """
  core = scale_by_galore(
    b1,
    b2,
    eps,
    rank,
    update_proj_gap,
    scale,
    projector,
    mask=mask,
    dimension_numbers=dimension_numbers,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
    projector_dtype=projector_dtype,
    seed=seed,
  )
  return chain_with_decay_after_update(core, learning_rate, weight_decay, weight_decay_mask)
