"""Updates of low-precision parameters that do not lose small steps to rounding.

A bfloat16 parameter keeps 8 significant bits: ``optax.apply_updates`` adds
the update and rounds to the nearest bfloat16, so any step smaller than half
the spacing of its neighbours is lost, and late in training most steps are.
Three remedies, each a transformation placed last in the chain:

* ``stochastic_rounding``: rounds ``p + u`` up or down at random, with the
  probabilities that make the result unbiased; no state but a step count.
* ``kahan_summation``: keeps what rounding lost in a compensation buffer
  (the parameters' dtype by default) and adds it to the next update.
* ``master_weights``: keeps a float32 copy of the parameters in the state,
  updates it, and rounds it to the parameters' dtype.

Each turns the update into ``target - p`` in float32, where ``target`` is the
new parameter in its own dtype, so that ``optax.apply_updates`` (which adds in
float32 and casts back) lands on ``target``. Leaves of float32 or wider, and
complex leaves, pass through with no state.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lean._src import sharding

_FLOAT32 = jnp.dtype(jnp.float32)


def is_low_precision(dtype: jax.typing.DTypeLike) -> bool:
  """Whether ``dtype`` is a real floating dtype narrower than float32 (bf16, f16, fp8)."""
  dtype = jnp.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < _FLOAT32.itemsize


def _check_float_dtype(name: str, dtype: jax.typing.DTypeLike | None) -> None:
  if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise ValueError(f'{name} must be a real floating dtype, got {jnp.dtype(dtype)}.')


def landing_update(params: jax.Array, target: jax.Array) -> jax.Array:
  """The float32 update that ``optax.apply_updates`` turns from ``params`` into ``target``.

  Both are values of the parameters' dtype (8 significant bits for bfloat16),
  so their float32 difference is exact unless one is over 2^16 times the
  other, far beyond any step.
  """
  return target.astype(jnp.float32) - params.astype(jnp.float32)


def round_stochastically(x: jax.Array, dtype: jax.typing.DTypeLike, key: jax.Array) -> jax.Array:
  r"""``x`` (float32) rounded to ``dtype`` up or down at random, unbiased.

  With :math:`a` the nearest value of ``dtype`` and :math:`b` its neighbour on
  the other side of :math:`x`, the result is :math:`b` with probability
  :math:`(x - a) / (b - a)` and :math:`a` otherwise, so its expectation is
  :math:`x`. Values of ``dtype`` are kept; infinities and NaNs round to nearest.
  """
  nearest = x.astype(dtype)
  near = nearest.astype(jnp.float32)
  away = jnp.where(near > x, -jnp.inf, jnp.inf).astype(dtype)
  other = jnp.nextafter(nearest, away)
  chance = (x - near) / (other.astype(jnp.float32) - near)
  draw = jax.random.uniform(key, x.shape, jnp.float32, out_sharding=sharding.explicit_sharding(x))
  return jnp.where(draw < chance, other, nearest)


def _low_precision_leaves(params: Any, fn: Any) -> Any:
  """``fn(p)`` for each low-precision leaf of ``params``, ``None`` for the others."""
  return jax.tree.map(lambda p: fn(p) if is_low_precision(p.dtype) else None, params)


_IS_NONE = lambda x: x is None


def _land(
  name: str,
  step: Callable[[int, jax.Array, jax.Array, Any], tuple[jax.Array, Any]],
  updates: optax.Updates,
  params: optax.Params | None,
  buffers: Any = None,
) -> tuple[optax.Updates, Any]:
  """``step(i, u, p, b) -> (update, b')`` on each low-precision leaf ``i``; others unchanged.

  ``buffers`` (a tree with ``None`` at the other leaves, or ``None``) is the
  state kept per leaf; returns the new updates and the new buffers.
  """
  if params is None:
    raise ValueError(f'{name}: update needs the parameters (tx.update(updates, state, params)).')
  leaves, treedef = jax.tree.flatten(updates, is_leaf=_IS_NONE)
  kept = treedef.flatten_up_to(buffers) if buffers is not None else [None] * len(leaves)
  results = [
    step(i, u, p, b) if u is not None and is_low_precision(p.dtype) else (u, b)
    for i, (u, p, b) in enumerate(zip(leaves, treedef.flatten_up_to(params), kept))
  ]
  new_updates = treedef.unflatten([update for update, _ in results])
  new_buffers = treedef.unflatten([buffer for _, buffer in results])
  return new_updates, new_buffers


class StochasticRoundingState(NamedTuple):
  """State of ``stochastic_rounding``.

  Attributes:
    count: Number of updates so far (``shape=(), dtype=int32``); with the
      seed, it names the random numbers of each step.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32


def stochastic_rounding(seed: int = 0) -> optax.GradientTransformationExtraArgs:
  r"""Makes each low-precision parameter's step round up or down at random, unbiased.

  For a parameter :math:`p` of a dtype narrower than float32 and its update
  :math:`u`, the new parameter is :math:`\mathrm{SR}(p + u)`, the sum in
  float32 rounded to one of its two neighbours in :math:`p`'s dtype with
  probabilities that make :math:`\mathbb{E}[\mathrm{SR}(x)] = x`. A step of a
  tenth of the spacing moves :math:`p` one spacing one time in ten, instead
  of never. The returned update is that new parameter minus :math:`p`, in
  float32, for ``optax.apply_updates``. Put it last in the chain.

  The random numbers of step :math:`t` and leaf :math:`i` come from
  ``fold_in(fold_in(key(seed, impl='rbg'), t), i)``, and from the ``layer``
  extra argument too when ``optax_lean.update_layer`` passes one: a run is
  reproducible and resumes exactly from a checkpoint. XLA's bit generator
  (``'rbg'``) fuses into the update with no temporaries, where threefry would
  hold several leaf-sized arrays on CPU; its numbers differ by backend.

  Args:
    seed: The seed of the random numbers.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
    and returns float32 updates for the low-precision leaves (others unchanged).

  Examples:
    >>> import jax.numpy as jnp, optax, optax_lean
    >>> params = {'w': jnp.ones(4, jnp.bfloat16)}
    >>> tx = optax.chain(optax.sgd(1e-3), optax_lean.stochastic_rounding())
    >>> updates, _ = tx.update({'w': jnp.ones(4)}, tx.init(params), params)
    >>> optax.apply_updates(params, updates)['w'].dtype
    dtype(bfloat16)

  References:
    Gupta et al., `Deep Learning with Limited Numerical Precision
    <https://arxiv.org/abs/1502.02551>`_, ICML 2015;
    Zamirai et al., `Revisiting BFloat16 Training
    <https://arxiv.org/abs/2010.06192>`_, 2020
  """
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
    raise ValueError(f'stochastic_rounding: seed must be an int, got {seed!r}.')

  def init_fn(params: optax.Params) -> StochasticRoundingState:
    del params
    return StochasticRoundingState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, layer=None, **extra_args):
    del extra_args
    key = jax.random.fold_in(jax.random.key(seed, impl='rbg'), state.count)
    if layer is not None:
      key = jax.random.fold_in(key, layer)

    def step(i, u, p, _):
      exact = p.astype(jnp.float32) + u.astype(jnp.float32)
      rounded = round_stochastically(exact, p.dtype, jax.random.fold_in(key, i))
      return landing_update(p, rounded), None

    new_updates, _ = _land('stochastic_rounding', step, updates, params)
    return new_updates, StochasticRoundingState(optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class KahanSummationState(NamedTuple):
  """State of ``kahan_summation``.

  Attributes:
    compensation: Per low-precision leaf, what rounding has lost of its
      updates so far (the leaf's shape); ``None`` for the other leaves.
  """

  compensation: optax.Updates


def kahan_summation(
  compensation_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Carries what rounding loses of each low-precision parameter's step into the next one.

  Kahan's compensated summation: for a parameter :math:`p` of a dtype narrower
  than float32, with update :math:`u` and compensation :math:`c` (zero at first),

  .. math::
    y = u + c, \qquad p' = \mathrm{round}(p + y), \qquad c' = y - (p' - p),

  in float32, with :math:`c'` stored in ``compensation_dtype``. Steps smaller
  than the parameter's spacing accumulate in :math:`c` until they move
  :math:`p`. The returned update is :math:`p' - p` in float32, for
  ``optax.apply_updates``. Put it last in the chain.

  Args:
    compensation_dtype: The compensation buffers' dtype; ``None``: each
      parameter's own (2 bytes per bfloat16 parameter).

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_lean
    >>> params = {'w': jnp.ones(4, jnp.bfloat16)}
    >>> tx = optax.chain(optax.sgd(1e-3), optax_lean.kahan_summation())
    >>> state = tx.init(params)
    >>> state[1].compensation['w'].dtype
    dtype(bfloat16)

  References:
    Kahan, `Further Remarks on Reducing Truncation Errors
    <https://doi.org/10.1145/363707.363723>`_, CACM 1965;
    Zamirai et al., `Revisiting BFloat16 Training
    <https://arxiv.org/abs/2010.06192>`_, 2020
  """
  _check_float_dtype('kahan_summation: compensation_dtype', compensation_dtype)

  def init_fn(params: optax.Params) -> KahanSummationState:
    dtype = lambda p: p.dtype if compensation_dtype is None else compensation_dtype
    zeros = lambda p: jnp.zeros_like(p, dtype=dtype(p))
    return KahanSummationState(_low_precision_leaves(params, zeros))

  def update_fn(updates, state, params=None):
    def step(_, u, p, c):
      y = u.astype(jnp.float32) + c.astype(jnp.float32)
      landed = landing_update(p, (p.astype(jnp.float32) + y).astype(p.dtype))
      return landed, sharding.cast_like(y - landed, c)

    new_updates, compensation = _land('kahan_summation', step, updates, params, state.compensation)
    return new_updates, KahanSummationState(compensation)

  return optax.GradientTransformation(init_fn, update_fn)


class MasterWeightsState(NamedTuple):
  """State of ``master_weights``.

  Attributes:
    master: Per low-precision leaf, its parameters in ``dtype``; ``None``
      for the other leaves.
  """

  master: optax.Params


def master_weights(dtype: jax.typing.DTypeLike = jnp.float32) -> optax.GradientTransformation:
  r"""Keeps a float32 master copy of the low-precision parameters and steps that.

  For a parameter :math:`p` of a dtype narrower than float32, the state holds
  :math:`m` (initialised to :math:`p`), and each update :math:`u` gives

  .. math::
    m' = m + u, \qquad p' = \mathrm{round}(m'),

  so the parameters are always the master copy rounded, and no step is lost.
  The returned update is :math:`p' - p` in float32, for
  ``optax.apply_updates``. Put it last in the chain. The copy costs 4 bytes
  per parameter, twice the bfloat16 parameters themselves.

  Args:
    dtype: The master copy's dtype.

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_lean
    >>> params = {'w': jnp.ones(4, jnp.bfloat16)}
    >>> state = optax_lean.master_weights().init(params)
    >>> state.master['w'].dtype
    dtype('float32')

  References:
    Micikevicius et al., `Mixed Precision Training
    <https://arxiv.org/abs/1710.03740>`_, ICLR 2018
  """
  _check_float_dtype('master_weights: dtype', dtype)

  def init_fn(params: optax.Params) -> MasterWeightsState:
    return MasterWeightsState(_low_precision_leaves(params, lambda p: p.astype(dtype)))

  def update_fn(updates, state, params=None):
    def step(_, u, p, m):
      master = m.astype(jnp.float32) + u.astype(jnp.float32)
      return landing_update(p, master.astype(p.dtype)), sharding.cast_like(master, m)

    new_updates, master = _land('master_weights', step, updates, params, state.master)
    return new_updates, MasterWeightsState(master)

  return optax.GradientTransformation(init_fn, update_fn)
