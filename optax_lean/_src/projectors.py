"""Subspace projectors: how a rank-r basis is chosen, stored and refreshed.

A projector spans ``r`` directions of one axis of a matrix gradient ``G``
(canonical ``(*batch, in, out)`` view). Which axis is the projector's own rule
(``side`` and ``square_side``): the SVD family takes the smaller one (the
official code's "right" projection for a PyTorch weight with ``out >= in``),
coordinate projectors take the larger one. All projections go through a dense
basis ``B`` with orthonormal columns,

.. math::
  R = B^\\top G_a, \\qquad \\mathrm{back}(X) = B X,

where ``G_a`` is ``G`` with the projected axis moved to the rows. What a
projector *stores* is as small as its rule allows: the basis itself (SVD),
only a PRNG key (random), or ``r`` indices (coordinate subsets).

For complex leaves the basis is complex and :math:`B^\top` is the conjugate
transpose :math:`B^H` (complex SVD and QR).

All refreshes are traced under ``jax.lax.cond`` on one scalar step count, run
in float32 (float64 for 64-bit leaves, complex for complex ones) on a copy of
``G`` whose matrix axes are gathered (SVD and QR need them whole), and keep the
previous projector when the result is not finite or the gradient is all zeros.
A refresh takes the selected matrices one round at a time, one matrix per
device (``walk.refresh_in_rounds``): each device decomposes its own.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from optax_lean._src import dtypes, sharding


def canonicalize_signs(basis: jax.Array) -> jax.Array:
  """Flips each column so that its entry of largest magnitude is positive.

  Singular vectors are defined up to sign (up to a phase for complex ones), and
  different SVD implementations (CPU, GPU, TPU, NumPy) pick different ones.
  Fixing it makes runs reproducible across them. A complex column is rotated
  so that its entry of largest magnitude is real and positive.
  """
  index = jnp.argmax(jnp.abs(basis), axis=-2, keepdims=True)
  pivot = jnp.take_along_axis(basis, index, axis=-2)
  if dtypes.is_complex(basis.dtype):
    magnitude = jnp.abs(pivot)
    phase = jnp.where(magnitude > 0, jnp.conj(pivot) / jnp.where(magnitude > 0, magnitude, 1), 1)
    return basis * phase.astype(basis.dtype)
  return basis * jnp.where(pivot < 0, -1, 1).astype(basis.dtype)


def per_key(draw, keys: jax.Array) -> jax.Array:
  """``draw(key)`` for each key of an array of keys, stacked in the keys' shape."""
  if not keys.ndim:
    return draw(keys)
  drawn = jax.vmap(draw)(keys.reshape(-1))
  return drawn.reshape(keys.shape + drawn.shape[1:])


def orthonormal_columns(y: jax.Array) -> jax.Array:
  """The ``Q`` of the thin QR of each matrix of ``y``, on the devices holding it."""
  return sharding.per_matrix(lambda y: jnp.linalg.qr(y)[0], y)


def left_singular_vectors(x: jax.Array) -> jax.Array:
  """``U`` of the thin SVD of each matrix of ``x`` (``(…, m, n)``), without ``V``.

  A wide matrix (``m < n``) goes through the ``R`` of the QR factorisation
  of its adjoint, :math:`x^H = Q R`, so :math:`x = R^H Q^H` and the left
  singular vectors of ``x`` are those of the ``m x m`` matrix :math:`R^H`.
  Each device decomposes the matrices it holds whole (``sharding.per_matrix``).
  """

  def decompose(x):
    m, n = x.shape[-2:]
    if m < n:
      x = dtypes.adjoint(jnp.linalg.qr(dtypes.adjoint(x), mode='r'))
    return jnp.linalg.svd(x, full_matrices=False)[0]

  return sharding.per_matrix(decompose, x)


def orthogonal_factor(x: jax.Array) -> jax.Array:
  r"""The polar factor :math:`U V^H` of each matrix of ``x`` (``(…, m, n)``), by its thin SVD.

  The semi-orthogonal matrix nearest to ``x`` in Frobenius norm (Muon's
  target, computed exactly instead of by Newton-Schulz iterations). Singular
  values at or below ``max(m, n) * eps * sigma_max`` (beneath the numerical
  rank) are dropped, so a zero matrix maps to zero rather than to an
  arbitrary :math:`U V^H`. The matrix axes are gathered first (an SVD needs
  them whole); each device decomposes the matrices it holds
  (``sharding.per_matrix``), and the result is sharded like ``x``.
  """

  def factor(x):
    u, s, vh = jnp.linalg.svd(x, full_matrices=False)
    floor = s[..., :1] * max(x.shape[-2:]) * jnp.finfo(s.dtype).eps
    kept = (s > floor).astype(u.dtype)
    return (u * kept[..., None, :]) @ vh

  whole = sharding.spread_over_batch(x, matrix_axes=2)
  return sharding.reshard_like(sharding.per_matrix(factor, whole), x)


def to_projected_rows(x: jax.Array, axis: int) -> jax.Array:
  """Moves the projected ``axis`` (-2 or -1) of ``x`` to the rows (-2)."""
  return x if axis == -2 else jnp.swapaxes(x, -1, -2)


def project(
  g_a: jax.Array,
  basis: jax.Array,
  out_dtype: jax.typing.DTypeLike,
  like: jax.Array | None = None,
) -> jax.Array:
  """``B^H G_a``: coordinates of ``G_a``'s columns in the subspace.

  Sharded like ``like`` (a stored low-rank state) when given: the contraction
  over a sharded axis then ends in a reduce-scatter straight into the state's
  layout; else like ``G_a``'s columns.
  """
  spec = sharding.spec_of(g_a)
  out_spec = (*spec[:-2], None, spec[-1]) if like is None else sharding.spec_of(like)
  return sharding.einsum(
    '...kr,...kc->...rc',
    dtypes.conj(basis),
    g_a,
    out_spec=out_spec,
    out_dtype=out_dtype,
  )


def back_project(
  x_a: jax.Array,
  basis: jax.Array,
  like: jax.Array,
  out_dtype: jax.typing.DTypeLike,
) -> jax.Array:
  """``B X_a``: back to the full space, sharded like ``like``."""
  return sharding.einsum(
    '...kr,...rc->...kc',
    basis,
    x_a,
    out_spec=sharding.spec_of(like),
    out_dtype=out_dtype,
  )


def change_of_basis(new: jax.Array, old: jax.Array, out_dtype: jax.typing.DTypeLike) -> jax.Array:
  """``B_new^H B_old``, which carries subspace coordinates to the new basis."""
  spec = sharding.spec_of(new)
  return sharding.einsum(
    '...kr,...ks->...rs',
    dtypes.conj(new),
    old,
    out_spec=(*spec[:-2], None, None),
    out_dtype=out_dtype,
  )


def rotate(rotation: jax.Array, x_a: jax.Array, like: jax.Array) -> jax.Array:
  """``C X_a``: subspace coordinates (or their moments) carried to a new basis.

  ``rotation`` is ``(…, r, s)`` (e.g. ``change_of_basis``); ``x_a`` is
  ``(…, s, c)``; the result is sharded like ``like``.
  """
  return sharding.einsum('...rs,...sc->...rc', rotation, x_a, out_spec=sharding.spec_of(like))


SIDES = ('smaller', 'larger', 'in', 'out')


@dataclasses.dataclass(frozen=True)
class Projector(abc.ABC):
  """The rule behind a subspace: which axis, what is stored, how it refreshes.

  Subclasses are frozen dataclasses holding only static configuration, so a
  projector can be built at factory time and closed over by ``update``.

  Attributes:
    side: Which axis of the ``(…, in, out)`` view the basis spans:
      ``'smaller'``, ``'larger'``, ``'in'`` or ``'out'``.
    square_side: For ``'smaller'``/``'larger'``, the axis of a square matrix:
      ``'in'`` (a PyTorch "right" projector, as official GaLore and SN-SM) or
      ``'out'`` (a "left" one, as official LDAdam).

  Examples:
    >>> import optax_lean
    >>> svd = optax_lean.SVDProjector()  # the smaller axis
    >>> svd.axis(in_size=64, out_size=256), svd.max_rank(64, 256)  # -2: in
    (-2, 64)
    >>> optax_lean.TopKProjector().axis(64, 256)  # the larger axis: out
    -1
  """

  name: ClassVar[str]
  reads_gradient: ClassVar[bool] = True
  splits_state: ClassVar[bool] = True  # the state may be split over spare mesh axes
  basis_is_drawn: ClassVar[bool] = False  # ``basis`` decomposes a drawn matrix at every use
  side: str = dataclasses.field(default='smaller', kw_only=True)
  square_side: str = dataclasses.field(default='in', kw_only=True)

  def __post_init__(self):
    if self.side not in SIDES:
      raise ValueError(f'side must be one of {SIDES}, got {self.side!r}.')
    if self.square_side not in ('in', 'out'):
      raise ValueError(f"square_side must be 'in' or 'out', got {self.square_side!r}.")

  def axis(self, in_size: int, out_size: int) -> int:
    """The projected axis of the ``(…, in, out)`` view: -2 (in) or -1 (out)."""
    if self.side in ('in', 'out'):
      side = self.side
    elif in_size == out_size:
      side = self.square_side
    else:
      in_is_smaller = in_size < out_size
      side = 'in' if in_is_smaller == (self.side == 'smaller') else 'out'
    return -2 if side == 'in' else -1

  def max_rank(self, in_size: int, out_size: int) -> int:
    """The largest rank this projector can give a matrix of this shape."""
    return min(in_size, out_size)

  @abc.abstractmethod
  def state_shape(
    self, batch_shape: tuple[int, ...], size: int, rank: int
  ) -> tuple[tuple[int, ...], jax.typing.DTypeLike | None]:
    """Shape and dtype (``None``: the state dtype) of the stored state."""

  @abc.abstractmethod
  def state_spec(self, batch_spec: tuple[Any, ...], axis_spec: Any) -> tuple[Any, ...]:
    """Sharding of the stored state, given those of the batch and the axis."""

  @abc.abstractmethod
  def compute(self, g_a: jax.Array, rank: int, keys: jax.Array) -> jax.Array:
    """A fresh state from a gathered ``G_a`` of shape (…, size, c), in its compute dtype.

    ``keys`` holds one PRNG key per matrix (the shape of ``G_a``'s batch), so
    that each matrix draws the same numbers whether it is refreshed alone or
    in a stack.
    """

  def compute_from(
    self, g_a: jax.Array, previous: jax.Array, rank: int, keys: jax.Array
  ) -> jax.Array:
    """A new state from ``G_a`` and the ``previous`` state (as stored).

    Projectors that warm-start from their last basis (power iteration)
    override this; the others start afresh with ``compute``.
    """
    del previous
    return self.compute(g_a, rank, keys)

  @abc.abstractmethod
  def basis(
    self, state: jax.Array, shape: tuple[int, ...], dtype: jax.typing.DTypeLike
  ) -> jax.Array:
    """The dense orthonormal basis ``(…, size, rank)`` a state stands for."""

  def refresh(
    self,
    g_a: jax.Array,
    state: jax.Array,
    rank: int,
    keys: jax.Array,
  ) -> jax.Array:
    """Recomputes the state from ``G_a``, keeping ``state`` where that fails.

    ``G_a`` (a matrix, or a round of them with one key each) is gathered over
    its matrix axes and cast to its compute dtype (float32, float64 or
    complex, see ``dtypes.compute_dtype``) first. For a round, the mesh's axes
    move to the round's axis (see ``sharding.spread_over_batch``): each device
    then decomposes whole matrices of its own share, and receives the others'
    results as ``state``'s sharding asks. For a projector that reads the
    gradient, a matrix whose gradient is not finite or all zeros, or whose new
    basis is not finite, keeps its old state. The result is cast and
    resharded back to ``state``'s type.
    """
    dtype = dtypes.compute_dtype(g_a.dtype)
    g_a = sharding.spread_over_batch(g_a, matrix_axes=2).astype(dtype)
    fresh = self.compute_from(g_a, state, rank, keys)
    if self.reads_gradient:
      shape = (*g_a.shape[:-1], rank)
      basis = self.basis(fresh, shape, dtype)
      ok = jnp.all(jnp.isfinite(basis), axis=(-2, -1))
      ok &= jnp.all(jnp.isfinite(g_a), axis=(-2, -1))
      ok &= jnp.any(g_a != 0, axis=(-2, -1))
      ok = jnp.expand_dims(ok, tuple(range(ok.ndim, fresh.ndim)))
      old = sharding.reshard(state, sharding.spec_of(fresh))
      fresh = jnp.where(ok, fresh, old.astype(fresh.dtype))
    return sharding.cast_like(fresh, state)


@dataclasses.dataclass(frozen=True)
class _DenseProjector(Projector):
  """A projector that stores its orthonormal basis."""

  def state_shape(self, batch_shape, size, rank):
    return (*batch_shape, size, rank), None

  def state_spec(self, batch_spec, axis_spec):
    return (*batch_spec, axis_spec, None)

  def basis(self, state, shape, dtype):
    del shape
    return state.astype(dtype)


@dataclasses.dataclass(frozen=True)
class SVDProjector(_DenseProjector):
  """The top-``r`` singular vectors of the gradient (official ``svd``).

  The basis spans the smaller axis, as in the official code: for a PyTorch
  weight ``(out, in)`` with ``out >= in`` (also square) the first ``r`` rows of
  ``V^T`` (a "right" projector), otherwise the first ``r`` columns of ``U``
  (``square_side='out'`` gives square matrices a "left" one, as LDAdam).
  Signs are canonicalised: each basis vector's largest entry is positive.

  Only the singular vectors of the projected axis are formed. For a wide
  ``G_a`` (``size < c``) they are those of the small triangle :math:`R^H` of
  the QR factorisation :math:`G_a^H = Q R` (LAPACK's own route for such
  shapes), whose ``Q`` is never formed: the workspace is the gathered matrix
  alone, where a full SVD also writes a copy of it and the ``size x c``
  right factor.

  Attributes:
    side: The axis the basis spans (see ``Projector``); default ``'smaller'``.
    square_side: The axis of a square matrix; default ``'in'``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> tx = optax_lean.scale_by_subspace_momentum(
    ...     rank=2, projector=optax_lean.SVDProjector(square_side='out'))
    >>> tx.init({'w': jnp.ones((4, 4))}).projector['w'].shape  # a dense basis
    (4, 2)
  """

  name: ClassVar[str] = 'svd'

  def compute(self, g_a, rank, keys):
    del keys
    return canonicalize_signs(left_singular_vectors(g_a)[..., :rank])


@dataclasses.dataclass(frozen=True)
class PowerIterationProjector(SVDProjector):
  """One warm-started block power iteration per refresh (official LDAdam).

  From the previous basis :math:`B_{old}` the new one is the (sign-canonical)
  thin QR of :math:`G_a G_a^\\top B_{old}`: one step of subspace iteration
  towards the top-``r`` singular vectors, two matmuls and a QR instead of an
  SVD. Refreshed every step, it tracks a slowly moving subspace. A refresh
  from the all-zero initial state is an exact SVD (``SVDProjector``).

  Attributes:
    side: The axis the basis spans (see ``Projector``); default ``'smaller'``.
    square_side: The axis of a square matrix; default ``'in'``; ``ldadam`` uses ``'out'``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_lean
    >>> g = jax.random.normal(jax.random.key(0), (6, 4))
    >>> power = optax_lean.PowerIterationProjector()
    >>> first = power.compute_from(g, jnp.zeros((6, 2)), 2, jax.random.key(1))
    >>> later = power.compute_from(g, first, 2, jax.random.key(1))
    >>> bool(jnp.allclose(later.T @ later, jnp.eye(2), atol=1e-5))  # orthonormal
    True
  """

  name: ClassVar[str] = 'power_iteration'

  def compute_from(self, g_a, previous, rank, keys):
    spec = sharding.spec_of(g_a)
    previous = sharding.reshard(previous, (*spec[:-2], None, None)).astype(g_a.dtype)

    def iterate():
      sketch = dtypes.adjoint(g_a) @ previous
      return canonicalize_signs(orthonormal_columns(g_a @ sketch))

    return jax.lax.cond(jnp.any(previous != 0), iterate, lambda: self.compute(g_a, rank, keys))


@dataclasses.dataclass(frozen=True)
class RandomizedSVDProjector(_DenseProjector):
  """A randomized range finder (Halko, Martinsson & Tropp, 2011).

  Sketches ``Y = G_a Ω`` with a Gaussian ``Ω`` of ``rank + oversample``
  columns, optionally sharpens it with power iterations, and orthonormalises
  it by QR. With ``oversample > 0`` the best rank-``r`` basis inside the
  sketch is then taken from the SVD of the small matrix ``Q^T G_a``. With the
  defaults (no oversampling, no power iteration) a refresh costs one matmul
  and one thin QR: tens of times cheaper than a full SVD, which matters most
  on TPU, where SVD is slow to compile and to run.

  Attributes:
    side: The axis the basis spans (see ``Projector``); default ``'smaller'``.
    square_side: The axis of a square matrix; default ``'in'``.
    oversample: Extra sketch columns.
    power_iterations: Subspace iterations ``Y <- G_a G_a^T Y``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> tx = optax_lean.adamsnsm(
    ...     1e-2, rank=2, projector=optax_lean.RandomizedSVDProjector(oversample=2))
    >>> tx.init({'w': jnp.ones((8, 16))})[0].numerator.projector['w'].shape
    (8, 2)

  References:
    Halko, Martinsson & Tropp, `Finding structure with randomness:
    Probabilistic algorithms for constructing approximate matrix
    decompositions <https://arxiv.org/abs/0909.4061>`_, SIAM Review 2011
  """

  name: ClassVar[str] = 'randomized_svd'
  oversample: int = 0
  power_iterations: int = 0

  def compute(self, g_a, rank, keys):
    size, cols = g_a.shape[-2:]
    width = min(rank + self.oversample, size, cols)
    omega = per_key(lambda key: jax.random.normal(key, (cols, width), g_a.dtype), keys)
    omega = sharding.reshard(omega, (*sharding.spec_of(g_a)[:-2], None, None))
    q = g_a @ omega
    for _ in range(self.power_iterations):
      q = orthonormal_columns(q)
      q = g_a @ (dtypes.adjoint(g_a) @ q)
    q = orthonormal_columns(q)
    if width > rank:
      small = left_singular_vectors(dtypes.adjoint(q) @ g_a)
      q = q @ small[..., :rank]
    return canonicalize_signs(q[..., :rank])


@dataclasses.dataclass(frozen=True)
class RandomProjector(Projector):
  """A seeded random orthonormal basis; only its PRNG key is stored.

  The basis is the (sign-canonical) QR of a Gaussian matrix drawn from the key,
  regenerated at every step, so the projector costs 8 bytes per matrix (each
  matrix of a stack has its own key) instead of ``r * size`` numbers, at the
  price of one thin QR per step (shared out over the devices for a stack,
  as a refresh is).

  Attributes:
    side: The axis the basis spans (see ``Projector``); default
      ``'smaller'``; ``rso`` uses ``'in'``.
    square_side: The axis of a square matrix; default ``'in'``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> tx = optax_lean.sgd_sm(0.1, rank=2, projector=optax_lean.RandomProjector())
    >>> key = tx.init({'w': jnp.ones((8, 16))})[0].projector['w']
    >>> key.shape, key.dtype  # only the key data is stored
    ((2,), dtype('uint32'))
  """

  name: ClassVar[str] = 'random'
  reads_gradient: ClassVar[bool] = False
  splits_state: ClassVar[bool] = False  # PRNG key data stays whole
  basis_is_drawn: ClassVar[bool] = True

  def state_shape(self, batch_shape, size, rank):
    del size, rank
    return (*batch_shape, 2), jnp.uint32

  def state_spec(self, batch_spec, axis_spec):
    del axis_spec
    return (*batch_spec, None)

  def compute(self, g_a, rank, keys):
    del g_a, rank
    return jax.random.key_data(keys)

  def _gaussian(self, state: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Standard normal matrices of ``shape``, one per key of ``state``, in the real compute dtype.

    Each device draws those of its own part of a stack.
    """
    state = sharding.spread_over_batch(state, matrix_axes=1)
    real = dtypes.real_dtype(dtypes.compute_dtype(dtype))
    draw = lambda key: jax.random.normal(key, shape[-2:], real)
    return per_key(draw, jax.random.wrap_key_data(state))

  def basis(self, state, shape, dtype):
    gaussian = self._gaussian(state, shape, dtype)
    return canonicalize_signs(orthonormal_columns(gaussian)).astype(dtype)


@dataclasses.dataclass(frozen=True)
class GaussianProjector(RandomProjector):
  """A seeded Gaussian basis with entries of variance ``1 / r``, not orthonormalised.

  APOLLO's projection (``apollo_torch/random_projector.py`` of the official
  code): a Johnson-Lindenstrauss sketch, so that column norms of the
  projected gradient approximate the full ones. Only the PRNG key is stored,
  a new one at each refresh. Meant for rules that only compare norms in the
  subspace (``scale_by_apollo``); projecting back through a basis that is not
  orthonormal is not a projection.

  Attributes:
    side: The axis the sketch reduces; default ``'smaller'``.
    square_side: The axis of a square matrix; default ``'in'`` (the official
      ``proj_type='std'`` sketches a square PyTorch weight's ``in`` axis).

  Examples:
    >>> import jax, jax.numpy as jnp, optax_lean
    >>> projector = optax_lean.GaussianProjector()
    >>> key = jax.random.key_data(jax.random.key(0))
    >>> projector.basis(key, (512, 4), jnp.float32).shape
    (512, 4)
  """

  name: ClassVar[str] = 'gaussian'

  def basis(self, state, shape, dtype):
    gaussian = self._gaussian(state, shape, dtype)
    return (gaussian / jnp.sqrt(jnp.asarray(shape[-1], gaussian.dtype))).astype(dtype)


@dataclasses.dataclass(frozen=True)
class _CoordinateProjector(Projector):
  """A subset of ``r`` coordinates of the larger axis, stored as indices.

  As in the official code, the subset is taken along the larger axis (the
  rows of a PyTorch weight with ``out >= in``); the other coordinates get plain
  SGD through the orthogonal complement.
  """

  side: str = dataclasses.field(default='larger', kw_only=True)
  square_side: str = dataclasses.field(default='out', kw_only=True)

  def max_rank(self, in_size: int, out_size: int) -> int:
    return in_size if self.axis(in_size, out_size) == -2 else out_size

  def state_shape(self, batch_shape, size, rank):
    del size
    return (*batch_shape, rank), jnp.int32

  def state_spec(self, batch_spec, axis_spec):
    del axis_spec
    return (*batch_spec, None)

  def basis(self, state, shape, dtype):
    one_hot = jax.nn.one_hot(state, shape[-2], dtype=dtypes.real_dtype(dtype), axis=-2)
    return one_hot.astype(dtype)


@dataclasses.dataclass(frozen=True)
class UniformProjector(_CoordinateProjector):
  """``r`` coordinates drawn uniformly without replacement (official ``uniform``).

  Momentum is kept for ``r`` rows (or columns) of the larger axis, redrawn at
  every refresh; the state is their ``r`` indices.

  Attributes:
    side: The axis the basis spans (see ``Projector``); default ``'larger'``.
    square_side: The axis of a square matrix; default ``'out'``.

  Examples:
    >>> import jax.numpy as jnp, optax_lean
    >>> tx = optax_lean.sgd_sm(0.1, rank=3, projector=optax_lean.UniformProjector())
    >>> indices = tx.init({'w': jnp.ones((8, 16))})[0].projector['w']
    >>> indices.shape, indices.dtype  # 3 of the 16 output units
    ((3,), dtype('int32'))
  """

  name: ClassVar[str] = 'uniform'
  reads_gradient: ClassVar[bool] = False

  def compute(self, g_a, rank, keys):
    scores = per_key(lambda key: jax.random.uniform(key, g_a.shape[-2:-1]), keys)
    scores = sharding.reshard(scores, sharding.spec_of(g_a)[:-1])
    return jax.lax.top_k(scores, rank)[1].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopKProjector(_CoordinateProjector):
  """The ``r`` coordinates of largest gradient norm (official ``topk``).

  Momentum is kept for the ``r`` rows (or columns) of the larger axis whose
  gradient had the largest norm at the last refresh; the state is their
  indices.

  Attributes:
    side: The axis the basis spans (see ``Projector``); default ``'larger'``.
    square_side: The axis of a square matrix; default ``'out'``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_lean
    >>> tx = optax_lean.sgd_sm(0.1, rank=2, projector=optax_lean.TopKProjector())
    >>> params = {'w': jnp.zeros((4, 6))}
    >>> grads = {'w': jnp.zeros((4, 6)).at[:, 1].set(1.0).at[:, 4].set(2.0)}
    >>> _, state = tx.update(grads, tx.init(params), params)
    >>> sorted(state[0].projector['w'].tolist())  # the two largest columns
    [1, 4]
  """

  name: ClassVar[str] = 'topk'

  def compute(self, g_a, rank, keys):
    del keys
    norms = jnp.sum(dtypes.abs_sq(g_a), axis=-1)
    return jax.lax.top_k(norms, rank)[1].astype(jnp.int32)


#: The built-in projectors by name: what ``projector='name'`` means anywhere.
PROJECTORS: dict[str, type[Projector]] = {
  cls.name: cls
  for cls in (
    SVDProjector,
    PowerIterationProjector,
    RandomizedSVDProjector,
    RandomProjector,
    UniformProjector,
    TopKProjector,
  )
}


#: What ``projector='auto'`` stands for on each JAX backend (others: randomized).
AUTO_PROJECTORS: dict[str, str] = {'cpu': 'svd', 'gpu': 'randomized_svd', 'tpu': 'randomized_svd'}


def get_projector(projector: str | Projector) -> Projector:
  """The projector a ``projector=`` argument names.

  ``'auto'`` (the default of the SVD-family optimizers) is the exact SVD on
  CPU and the randomized range finder (one matrix product and one thin QR) on
  GPU and TPU, read from ``jax.default_backend()`` when the optimizer is
  built. The SVD is what the official code takes; on accelerators it is slow
  to run (seconds for a 4096-wide matrix on a GPU, against milliseconds for a
  matrix product) and, on TPU, to compile, while the randomized basis trains
  as well (docs/benchmarks.md: "Projector refresh at scale"). Both store the
  same dense basis, so checkpoints move between backends.

  Args:
    projector: ``'auto'``, a name from ``PROJECTORS`` (its class with
      default settings) or a ``Projector``, returned as is.

  Returns:
    A ``Projector``. An unknown name raises a ``ValueError`` listing the names.

  Examples:
    >>> import optax_lean
    >>> optax_lean.get_projector('randomized_svd')
    RandomizedSVDProjector(side='smaller', square_side='in', oversample=0, power_iterations=0)
    >>> optax_lean.get_projector('auto').name  # on a CPU
    'svd'
    >>> sorted(optax_lean.PROJECTORS)
    ['power_iteration', 'random', 'randomized_svd', 'svd', 'topk', 'uniform']
  """
  if isinstance(projector, Projector):
    return projector
  if projector == 'auto':
    projector = AUTO_PROJECTORS.get(jax.default_backend(), 'randomized_svd')
  if projector not in PROJECTORS:
    raise ValueError(
      f"projector must be 'auto', one of {sorted(PROJECTORS)} or a Projector, got {projector!r}."
    )
  return PROJECTORS[projector]()
