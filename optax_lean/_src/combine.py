"""Combinators: a numerator over a denominator, and decay after the update."""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lean._src import checks, dtypes, sharding
from optax_lean._src import warn as warn_lib


class ScaleByRatioState(NamedTuple):
  """State of ``scale_by_ratio``: the states of its two transformations.

  Attributes:
    numerator: The state of the numerator transformation (e.g. a
      ``ScaleBySubspaceMomentumState``).
    denominator: The state of the normalizing transformation (e.g. a
      ``ScaleBySubsetNormState``).
  """

  numerator: optax.OptState
  denominator: optax.OptState


def scale_by_ratio(
  numerator: optax.GradientTransformation,
  denominator: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
  r"""Divides one transformation's output by another's statistic of the gradient.

  Both transformations see the *raw* gradient :math:`g`. With a numerator
  :math:`N(g)` (e.g. a momentum) and a normalizing transformation whose update
  is :math:`g / D(g)` (e.g. ``scale_by_subset_norm``), the result is

  .. math::
    u = N(g) / D(g),

  in the gradient's dtype (a float32 momentum of bfloat16 gradients gives
  bfloat16 updates).

  This is how Adam-type optimizers are built from parts: AdamSNSM is
  ``scale_by_ratio(scale_by_subspace_momentum(...), scale_by_subset_norm(...))``.
  It differs from ``optax.chain(denominator, numerator)``, which would take the
  momentum of already-normalised gradients (a different algorithm), and from
  ``optax.chain(numerator, denominator)``, which would accumulate the second
  moment of the momentum instead of the gradient.

  Args:
    numerator: Any gradient transformation.
    denominator: A normalizing transformation whose ``update`` accepts a
      keyword ``numerator``, a function ``(gradient, divisors) ->
      quotient`` called once the denominators are known
      (``scale_by_subset_norm``). A numerator whose ``update`` takes
      ``divisors`` (``scale_by_subspace_momentum``) divides by them itself,
      matrix by matrix, as it forms its output.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    ``ScaleByRatioState``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_lean
    >>> adam_sn = optax_lean.scale_by_ratio(
    ...     optax.ema(0.9, debias=True),
    ...     optax_lean.scale_by_subset_norm(0.999, bias_correction=True))
    >>> state = adam_sn.init({'w': jnp.ones((4, 3))})
    >>> g = {'w': jnp.ones((4, 3))}
    >>> updates, state = adam_sn.update(g, state)
    >>> print(updates['w'][0].round(4))  # 1 / sqrt(3): subsets of 3 entries
    [0.5773 0.5773 0.5773]

  References:
    Nguyen & Nguyen, `Lean and Mean Adaptive Optimization via Subset-Norm and
    Subspace-Momentum with Convergence Guarantees
    <https://arxiv.org/abs/2411.07120>`_, ICML 2025
  """
  numerator = optax.with_extra_args_support(numerator)
  divides_as_it_goes = 'divisors' in inspect.signature(numerator.update).parameters

  def init_fn(params):
    with warn_lib.once():  # both parts see the same leaves
      return ScaleByRatioState(numerator.init(params), denominator.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    updates = dtypes.as_arrays(updates)
    numerator_states = []

    def quotient(gradient, divisors):
      # A numerator that takes the divisors divides as it goes (the subspace
      # walks, matrix by matrix, in the gradient's own buffers); any other is
      # divided leaf by leaf here.
      if divides_as_it_goes:
        top, numerator_state = numerator.update(
          gradient, state.numerator, params, divisors=divisors, **extra_args
        )
      else:
        top, numerator_state = numerator.update(gradient, state.numerator, params, **extra_args)
        leaves, treedef = jax.tree.flatten(top)
        quotients = [sharding.cast_like(d.divide(t), t) for t, d in zip(leaves, divisors)]
        top = jax.tree.unflatten(treedef, quotients)
      numerator_states.append(numerator_state)
      return top

    ratio, denominator_state = denominator.update(
      updates, state.denominator, params, numerator=quotient, **extra_args
    )
    ratio = optax.tree.cast_like(ratio, updates)
    return ratio, ScaleByRatioState(numerator_states[0], denominator_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class AddDecayedWeightsAfterUpdateState(NamedTuple):
  """State of ``add_decayed_weights_after_update``.

  Attributes:
    count: Number of updates so far (``shape=(), dtype=int32``), the step at
      which the learning-rate schedule is read.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32


def add_decayed_weights_after_update(
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: jax.typing.ArrayLike = 0.0,
  mask: Any | None = None,
) -> optax.GradientTransformation:
  r"""Decoupled weight decay applied to the already-updated parameters.

  Placed after ``optax.scale_by_learning_rate``, it turns an update :math:`u`
  (already scaled by :math:`-\eta_t`) into

  .. math::
    u' = u - \eta_t \lambda (p + u),

  so that :math:`p + u' = (p + u)(1 - \eta_t \lambda)`: the parameters are
  first updated, then decayed, with the scheduled learning rate, as in Hugging
  Face's AdamW and the official SN-SM and GaLore code. ``optax.adamw`` instead
  decays the pre-update parameters; the two differ by :math:`\eta_t^2
  \lambda u`.

  Args:
    learning_rate: The same learning rate (or schedule) as the update's;
      ``None`` (no learning-rate scaling) only with ``weight_decay=0``.
    weight_decay: Decay strength :math:`\lambda`.
    mask: A pytree (or prefix) of bools, or a callable returning one, choosing
      the leaves to decay. Default: all.

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params`` unless
    ``weight_decay`` is a plain ``0``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_lean
    >>> tx = optax.chain(optax.scale_by_learning_rate(0.1),
    ...                  optax_lean.add_decayed_weights_after_update(0.1, 0.5))
    >>> params = jnp.array([1.0, 2.0])
    >>> updates, _ = tx.update(jnp.ones(2), tx.init(params), params)
    >>> new_params = optax.apply_updates(params, updates)  # (p - 0.1) * 0.95
    >>> print([f'{p:.3f}' for p in new_params])
    ['0.855', '1.805']

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, ICLR 2019
  """

  checks.non_negative('weight_decay', weight_decay)
  no_decay = checks.is_zero(weight_decay)
  if learning_rate is None and not no_decay:
    raise ValueError(
      'learning_rate=None (no learning-rate scaling) needs weight_decay=0: weight decay '
      'after the update is scaled by the learning rate.'
    )

  def init_fn(params):
    del params
    return AddDecayedWeightsAfterUpdateState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    new_state = AddDecayedWeightsAfterUpdateState(count=optax.safe_increment(state.count))
    if no_decay:
      return updates, new_state
    if params is None:
      raise ValueError(
        'add_decayed_weights_after_update needs params when weight_decay may be non-zero: '
        'call update(updates, state, params).'
      )
    step_size = learning_rate(state.count) if callable(learning_rate) else learning_rate

    def decay(u, p):
      scale = jnp.asarray(step_size * weight_decay, u.dtype)
      return u - scale * (jnp.asarray(p).astype(u.dtype) + u)

    updates = jax.tree.map(decay, updates, params)
    return updates, new_state

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


def chain_with_decay_after_update(
  core: optax.GradientTransformation,
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: jax.typing.ArrayLike,
  mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """``core``, then the learning rate, then decay after the update (HF order)."""
  return optax.chain(
    core,
    optax.scale_by_learning_rate(learning_rate),
    add_decayed_weights_after_update(learning_rate, weight_decay, mask),
  )


def chain_with_decay_before_update(
  core: optax.GradientTransformation,
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: jax.typing.ArrayLike,
  mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """``core``, decay of the pre-update parameters, then the learning rate.

  :math:`p \\leftarrow p - \\eta_t (u + \\lambda p) = p(1 - \\eta_t\\lambda) -
  \\eta_t u`: the order of ``torch.optim.AdamW`` and ``optax.adamw``. With a
  plain ``weight_decay=0`` the decay is an identity with the same (empty)
  state, so ``update`` then needs no ``params``.
  """
  return optax.chain(
    core, add_decay_before_update(weight_decay, mask), optax.scale_by_learning_rate(learning_rate)
  )


def add_decay_before_update(
  weight_decay: jax.typing.ArrayLike, mask: Any | None = None
) -> optax.GradientTransformation:
  """``optax.add_decayed_weights``, or (for a plain zero) an identity that needs no ``params``."""
  checks.non_negative('weight_decay', weight_decay)
  if checks.is_zero(weight_decay):
    return optax.identity() if mask is None else optax.masked(optax.identity(), mask)
  return optax.add_decayed_weights(weight_decay, mask)
