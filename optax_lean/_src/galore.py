"""GaLore: Adam on the gradient's projection onto a periodically refreshed subspace.

Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024; official code
https://github.com/jiaweizzhao/GaLore (``galore_torch/adamw.py``,
``galore_projector.py``).

GaLore is the subspace-Adam engine (``subspace_adam.py``) with an SVD
projector refreshed every ``T`` steps, Hugging Face's Adam and the moments kept
across refreshes.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from optax_lean._src import projectors as proj_lib
from optax_lean._src.combine import chain_with_decay_after_update
from optax_lean._src.dimension_numbers import DimensionNumbersOrFn, MaskOrFn
from optax_lean._src.subspace import RefreshSchedule
from optax_lean._src.subspace_adam import ScaleBySubspaceAdamState, scale_by_subspace_adam

ScaleByGaLoreState = ScaleBySubspaceAdamState


def scale_by_galore(
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  rank: int | None = None,
  update_proj_gap: int | RefreshSchedule = 200,
  scale: jax.typing.ArrayLike = 0.25,
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
    update_proj_gap: Steps ``T >= 1`` between basis refreshes, or a schedule:
      a function of the 0-based step count that says whether to refresh.
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
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  rank: int | None = None,
  update_proj_gap: int | RefreshSchedule = 200,
  scale: jax.typing.ArrayLike = 0.25,
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
    update_proj_gap: Steps between basis refreshes, or a schedule:
      a function of the 0-based step count that says whether to refresh.
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
