"""Per-layer updates: one layer of a stack at a time equals the whole stack at once.

``layer_axes`` finds the state leaves that carry the layer axis,
``split_layers`` / ``merge_layers`` take the state apart and back, and
``update_layer`` applies the optimizer to one layer's slice; run over every
layer of a stack, step after step (through refreshes), it gives the whole-stack
update and state, with the shared step count advanced once per step.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lean

LAYERS, GAP, STEPS = 3, 3, 7
STACK = {'kernel': (LAYERS, 10, 6), 'wide': (LAYERS, 6, 10), 'scale': (LAYERS, 6)}
MASK = {'kernel': True, 'wide': True, 'scale': False}
FACTORIES = {
  'adamsnsm': lambda: optax_lean.adamsnsm(1e-2, rank=2, update_proj_gap=GAP, mask=MASK),
  'adamsnsm_topk_rotate': lambda: optax_lean.adamsnsm(
    1e-2, rank=2, update_proj_gap=GAP, projector='topk', momentum_on_refresh='rotate', mask=MASK
  ),
  'adamsn': lambda: optax_lean.adamsn(1e-2, mask=MASK, weight_decay=0.1),
  'galore': lambda: optax_lean.galore(1e-2, rank=2, update_proj_gap=GAP, mask=MASK),
  'ldadam': lambda: optax_lean.ldadam(1e-2, rank=2, mask=MASK),
  'online_subspace_descent': lambda: optax_lean.online_subspace_descent(
    1e-2, rank=2, update_proj_gap=GAP, mask=MASK
  ),
  'adamw_clipped': lambda: optax.chain(optax.clip(1.0), optax.adamw(1e-2)),
}


def draw(seed):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in STACK.items()}


def layer(tree, index):
  return jax.tree.map(lambda x: x[index], tree)


def test_layer_axes_marks_the_stacked_leaves():
  tx = FACTORIES['adamsnsm']()
  axes = optax_lean.layer_axes(tx, draw(0))
  core = axes[0]
  assert not core.numerator.count and not core.denominator.count
  assert all(jax.tree.leaves(core.numerator.mu)) and all(jax.tree.leaves(core.denominator.nu))
  assert core.numerator.projector['kernel'] and core.numerator.projector['scale'] is None


def test_layer_axes_needs_one_layer_axis():
  with pytest.raises(ValueError, match='same leading layer axis'):
    optax_lean.layer_axes(optax.adam(1e-3), {'a': jnp.zeros((3, 4)), 'b': jnp.zeros((2, 4))})


@pytest.mark.parametrize('name', list(FACTORIES))
def test_layer_by_layer_equals_the_whole_stack(name):
  tx = FACTORIES[name]()
  params = draw(0)
  axes = optax_lean.layer_axes(tx, params)
  whole_state = tx.init(params)
  per_layer, shared = optax_lean.split_layers(tx.init(params), axes)
  whole_params, layer_params = params, params

  @jax.jit
  def layerwise_step(params, per_layer, shared, grads):
    outs = []
    for i in range(LAYERS):
      updates, state_i, stepped = optax_lean.update_layer(
        tx, layer(grads, i), layer(per_layer, i), shared, axes, layer(params, i)
      )
      outs.append((optax.apply_updates(layer(params, i), updates), state_i))
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    return stack([p for p, _ in outs]), stack([s for _, s in outs]), stepped

  whole_step = jax.jit(
    lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p))
  )
  for step in range(STEPS):
    grads = draw(1 + step)
    whole_params, whole_state = whole_step(whole_params, whole_state, grads)
    layer_params, per_layer, shared = layerwise_step(layer_params, per_layer, shared, grads)
  # The same float32 maths per matrix (batched decompositions are per-matrix
  # ones), in another order of fused operations: rounding only.
  chex.assert_trees_all_close(layer_params, whole_params, rtol=1e-5, atol=1e-6)
  merged = optax_lean.merge_layers(per_layer, shared, axes)
  chex.assert_trees_all_close(merged, whole_state, rtol=1e-4, atol=1e-6)
  # Every step count is shared and counts the updates; OSD's bases learn from
  # the second update on, so their AdamW counts one fewer.
  counts = {
    jax.tree_util.keystr(path): int(x)
    for (path, x), a in zip(jax.tree_util.tree_leaves_with_path(merged), jax.tree.leaves(axes))
    if x.dtype == jnp.int32 and not a
  }
  expected = {path: STEPS - ('projector_adamw' in path) for path in counts}
  assert counts and counts == expected
