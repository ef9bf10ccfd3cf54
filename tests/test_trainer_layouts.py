"""Real Equinox, Haiku and Flax Linen stacks, and a MaxText-layout Linen model, read right.

Each model is a stack of bias-free LLaMA-style blocks built with the library's
own modules and stacking transform (``eqx.filter_vmap``, ``hk.layer_stack``,
``nn.scan`` with the layer axis first or second), with an unstacked output
head or without one. For ``adamsnsm``, ``galore`` and ``rso`` with defaults
(or the documented one-line helper), the tests check which leaves get a
subspace, and that training equals the same network written as separate 2-D
``(in, out)`` layers, whose reading is unambiguous. Both run in float64, so
the comparison is to rounding. ``rso`` draws each matrix's basis from its
leaf's index and its position in the stack, which separate leaves do not
share; its run is compared with the same tree read through hand-written
``DimensionNumbers`` instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import haiku as hk
import haliax as hax
import haliax.nn as hnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lean
from optax_lean._src.dimension_numbers import DimensionNumbers
from tests.family import projected_leaves

DIM, HIDDEN, VOCAB, LAYERS, HEADS, HEAD_DIM = 8, 12, 11, 3, 2, 4
RANK, GAP, STEPS = 4, 2, 4
EPS = 1e-5
OPTIMIZERS = {
  'adamsnsm': lambda **kw: optax_lean.adamsnsm(3e-2, rank=RANK, update_proj_gap=GAP, **kw),
  'galore': lambda **kw: optax_lean.galore(3e-2, rank=RANK, update_proj_gap=GAP, **kw),
  'rso': lambda **kw: optax_lean.rso(3e-2, rank=RANK, update_proj_gap=GAP, **kw),
}


def rms_norm(x, scale):
  scale = scale.reshape((1,) * (x.ndim - 1) + scale.shape)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS) * scale


def separate_forward(params: dict[str, Any], x: jax.Array) -> jax.Array:
  """The network as separate 2-D ``(in, out)`` layers: ``params[f'block{i}']`` and ``head``."""
  for i in range(LAYERS):
    block = params[f'block{i}']
    x = x + jnp.tanh(rms_norm(x, block['norm']) @ block['up']) @ block['down']
  return x @ params['head'] if 'head' in params else x


def train(tx: optax.GradientTransformation, params: Any, forward: Callable) -> tuple[Any, Any]:
  """``STEPS`` steps of ``tx`` on a fixed regression; the final parameters and state."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, x):
    grads = jax.grad(lambda p: regression_loss(forward(p, x), x))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(STEPS):
    params, state = step(params, state, batch(i))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
  return params, state


def batch(i: int) -> jax.Array:
  return jax.random.normal(jax.random.key(i), (4, DIM), jnp.float64)


def regression_loss(y: jax.Array, x: jax.Array) -> jax.Array:
  target = jnp.sin(jnp.arange(y.shape[-1])[None, :] + x.sum(axis=-1, keepdims=True))
  return jnp.mean((y - target) ** 2)


def f64(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, tree)


def separate_blocks(norm, up, down, head=None, *, axis: int = 0, out_first: bool = False):
  """Stacked arrays as the separate layers ``separate_forward`` takes, kernels ``(in, out)``."""
  kernel = (lambda w: w.T) if out_first else (lambda w: w)
  layers = {
    f'block{i}': {
      'norm': jnp.take(norm, i, axis=axis),
      'up': kernel(jnp.take(up, i, axis=axis)),
      'down': kernel(jnp.take(down, i, axis=axis)),
    }
    for i in range(LAYERS)
  }
  return layers if head is None else {**layers, 'head': kernel(head)}


# --- Equinox: eqx.filter_vmap of a block of eqx.nn.Linear(use_bias=False), weight (L, out, in)


class EqxBlock(eqx.Module):
  norm: eqx.nn.RMSNorm
  up: eqx.nn.Linear
  down: eqx.nn.Linear

  def __init__(self, key):
    k_up, k_down = jax.random.split(key)
    self.norm = eqx.nn.RMSNorm(DIM, eps=EPS, use_bias=False)
    self.up = eqx.nn.Linear(DIM, HIDDEN, use_bias=False, key=k_up)
    self.down = eqx.nn.Linear(HIDDEN, DIM, use_bias=False, key=k_down)

  def __call__(self, x):
    return x + self.down(jnp.tanh(self.up(self.norm(x))))


class EqxModel(eqx.Module):
  blocks: EqxBlock
  head: eqx.nn.Linear | None

  def __init__(self, key, head: bool):
    k_blocks, k_head = jax.random.split(key)
    self.blocks = eqx.filter_vmap(EqxBlock)(jax.random.split(k_blocks, LAYERS))
    self.head = eqx.nn.Linear(DIM, VOCAB, use_bias=False, key=k_head) if head else None

  def __call__(self, x):
    dynamic, static = eqx.partition(self.blocks, eqx.is_array)

    def body(x, layer):
      return jax.vmap(eqx.combine(layer, static))(x), None

    x, _ = jax.lax.scan(body, x, dynamic)
    return x if self.head is None else jax.vmap(self.head)(x)


def equinox_case(head: bool):
  model = f64(EqxModel(jax.random.key(0), head))
  params, static = eqx.partition(model, eqx.is_array)
  forward = lambda p, x: eqx.combine(p, static)(x)

  def separate(p):
    blocks, head = p.blocks, None if p.head is None else p.head.weight
    return separate_blocks(
      blocks.norm.weight, blocks.up.weight, blocks.down.weight, head, out_first=True
    )

  explicit = jax.tree.map(lambda _: None, params)
  explicit = eqx.tree_at(
    lambda p: (p.blocks.up.weight, p.blocks.down.weight),
    explicit,
    (DimensionNumbers(2, 1), DimensionNumbers(2, 1)),
    is_leaf=lambda x: x is None,
  )
  if head:
    explicit = eqx.tree_at(
      lambda p: p.head.weight, explicit, DimensionNumbers(1, 0), is_leaf=lambda x: x is None
    )
  selected = {'blocks/up/weight', 'blocks/down/weight'} | ({'head/weight'} if head else set())
  return params, forward, separate, {}, explicit, selected


# --- Haiku: hk.layer_stack of a block of hk.Linear(with_bias=False), w (L, in, out)


def haiku_case(head: bool):
  def network(x):
    def block(x):
      h = hk.RMSNorm(-1, eps=EPS, name='norm')(x)
      return x + hk.Linear(DIM, with_bias=False, name='down')(
        jnp.tanh(hk.Linear(HIDDEN, with_bias=False, name='up')(h))
      )

    x = hk.layer_stack(LAYERS)(block)(x)
    return hk.Linear(VOCAB, with_bias=False, name='head')(x) if head else x

  transformed = hk.without_apply_rng(hk.transform(network))
  params = f64(transformed.init(jax.random.key(0), batch(0)))
  stack = '__layer_stack_no_per_layer'

  def separate(p):
    head_w = p['head']['w'] if head else None
    return separate_blocks(
      p[f'{stack}/norm']['scale'], p[f'{stack}/up']['w'], p[f'{stack}/down']['w'], head_w
    )

  explicit = jax.tree.map(lambda _: None, params)
  for name in ('up', 'down'):
    explicit[f'{stack}/{name}']['w'] = DimensionNumbers(1, 2)
  if head:
    explicit['head']['w'] = DimensionNumbers(0, 1)
  selected = {f'{stack}/up/w', f'{stack}/down/w'} | ({'head/w'} if head else set())
  return params, transformed.apply, separate, {}, explicit, selected


# --- Flax Linen: nn.scan of a block of nn.Dense(use_bias=False), the layer axis first or second


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.RMSNorm(epsilon=EPS, param_dtype=jnp.float64, name='norm')(x)
    up = nn.Dense(HIDDEN, use_bias=False, param_dtype=jnp.float64, name='up')
    down = nn.Dense(DIM, use_bias=False, param_dtype=jnp.float64, name='down')
    return x + down(jnp.tanh(up(h))), None


class LinenModel(nn.Module):
  scan_axis: int
  head: bool

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(
      LinenBlock,
      variable_axes={'params': self.scan_axis},
      split_rngs={'params': True},
      length=LAYERS,
    )
    x, _ = stack(name='layers')(x, None)
    if self.head:
      x = nn.Dense(VOCAB, use_bias=False, param_dtype=jnp.float64, name='head')(x)
    return x


def linen_case(scan_axis: int, head: bool = True):
  model = LinenModel(scan_axis, head)
  params = model.init(jax.random.key(0), batch(0))['params']
  forward = lambda p, x: model.apply({'params': p}, x)

  def separate(p):
    layers, kernel = p['layers'], lambda name: p['layers'][name]['kernel']
    head_kernel = p['head']['kernel'] if head else None
    return separate_blocks(
      layers['norm']['scale'], kernel('up'), kernel('down'), head_kernel, axis=scan_axis
    )

  reading = DimensionNumbers(1, 2) if scan_axis == 0 else DimensionNumbers(0, 2)
  explicit = jax.tree.map(lambda _: None, params)
  explicit['layers']['up']['kernel'] = explicit['layers']['down']['kernel'] = reading
  if head:
    explicit['head']['kernel'] = DimensionNumbers(0, 1)
  helper = {'dimension_numbers': optax_lean.stacked_dimension_numbers({'layers': scan_axis})}
  selected = {'layers/up/kernel', 'layers/down/kernel'} | ({'head/kernel'} if head else set())
  return params, forward, separate, helper, explicit, selected


# --- A MaxText-layout model: Linen with logical axis names on every parameter, scanned with
# the layer axis second (MaxText's param_scan_axis=1), attention kernels (embed, heads, head_dim)


def logical(names: tuple[str, ...], init=None):
  return nn.with_logical_partitioning(init or nn.initializers.lecun_normal(), names)


class MaxTextBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    norm = lambda name: nn.RMSNorm(
      epsilon=EPS,
      param_dtype=jnp.float64,
      scale_init=logical(('norm',), nn.initializers.ones),
      name=name,
    )
    dense = lambda features, names, name, axis=-1: nn.DenseGeneral(
      features,
      axis=axis,
      use_bias=False,
      kernel_init=logical(names),
      param_dtype=jnp.float64,
      name=name,
    )
    q = dense((HEADS, HEAD_DIM), ('embed', 'q_heads', 'kv'), 'query')(norm('pre_norm')(x))
    x = x + dense(DIM, ('heads', 'kv', 'embed'), 'out', axis=(-2, -1))(jnp.tanh(q))
    h = dense(HIDDEN, ('embed', 'mlp'), 'wi')(norm('post_norm')(x))
    return x + dense(DIM, ('mlp', 'embed'), 'wo')(jnp.tanh(h)), None


class MaxTextModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    embedding = logical(('vocab', 'embed_vocab'), nn.initializers.normal(1.0))
    x = nn.Embed(
      VOCAB, DIM, embedding_init=embedding, param_dtype=jnp.float64, name='token_embedder'
    )(tokens(x))
    stack = nn.scan(
      MaxTextBlock,
      variable_axes={'params': 1},
      split_rngs={'params': True},
      length=LAYERS,
      metadata_params={nn.PARTITION_NAME: 'layers'},
    )
    x, _ = stack(name='layers')(x, None)
    x = nn.RMSNorm(
      epsilon=EPS,
      param_dtype=jnp.float64,
      scale_init=logical(('norm',), nn.initializers.ones),
      name='decoder_norm',
    )(x)
    logits = nn.DenseGeneral(
      VOCAB,
      use_bias=False,
      kernel_init=logical(('embed_vocab', 'vocab')),
      param_dtype=jnp.float64,
      name='logits_dense',
    )(x)
    return logits.mean(axis=1)


def tokens(x: jax.Array) -> jax.Array:
  return (jnp.abs(x[:, :2]) * 5).astype(jnp.int32) % VOCAB


def maxtext_separate_forward(params: dict[str, Any], x: jax.Array) -> jax.Array:
  h = params['token_embedder'][tokens(x)]
  for i in range(LAYERS):
    block = params[f'block{i}']
    h = h + jnp.tanh(rms_norm(h, block['pre_norm']) @ block['query']) @ block['out']
    h = h + jnp.tanh(rms_norm(h, block['post_norm']) @ block['wi']) @ block['wo']
  return (rms_norm(h, params['decoder_norm']) @ params['head']).mean(axis=1)


def maxtext_case(boxed: bool):
  model = MaxTextModel()
  variables = model.init(jax.random.key(0), batch(0))
  params = variables['params'] if boxed else nn.unbox(variables['params'])
  forward = lambda p, x: model.apply({'params': p}, x)

  def separate(p):
    p = nn.unbox(p)
    layers = p['layers']
    kernel = lambda name, i, shape: layers[name]['kernel'][:, i].reshape(shape)
    out = {
      f'block{i}': {
        'pre_norm': layers['pre_norm']['scale'][:, i],
        'post_norm': layers['post_norm']['scale'][:, i],
        'query': kernel('query', i, (DIM, HEADS * HEAD_DIM)),
        'out': layers['out']['kernel'][:, i].reshape(HEADS * HEAD_DIM, DIM),
        'wi': kernel('wi', i, (DIM, HIDDEN)),
        'wo': layers['wo']['kernel'][:, i],
      }
      for i in range(LAYERS)
    }
    out['token_embedder'] = p['token_embedder']['embedding']
    out['decoder_norm'] = p['decoder_norm']['scale']
    out['head'] = p['logits_dense']['kernel']
    return out

  explicit = jax.tree.map(lambda _: None, nn.unbox(params))
  layers = explicit['layers']
  layers['query']['kernel'] = DimensionNumbers(0, (2, 3))
  layers['out']['kernel'] = DimensionNumbers((0, 2), 3)
  layers['wi']['kernel'] = layers['wo']['kernel'] = DimensionNumbers(0, 2)
  explicit['logits_dense']['kernel'] = DimensionNumbers(0, 1)
  helper = {}
  if not boxed:
    names = nn.get_partition_spec(variables['params'])
    helper = {'dimension_numbers': optax_lean.axis_names_dimension_numbers(names)}
  selected = {f'layers/{name}/kernel' for name in ('query', 'out', 'wi', 'wo')}
  selected.add('logits_dense/kernel')
  return params, forward, separate, helper, explicit, selected, maxtext_separate_forward


# --- haliax (Levanter): hnn.Stacked blocks of hnn.Linear(use_bias=False), weight (layers, out, in)


class HaliaxBlock(eqx.Module):
  norm: hnn.RmsNorm
  up: hnn.Linear
  down: hnn.Linear

  @staticmethod
  def init(*, key):
    k_up, k_down = jax.random.split(key)
    embed, mlp = hax.Axis('embed', DIM), hax.Axis('mlp', HIDDEN)
    return HaliaxBlock(
      hnn.RmsNorm.init(embed, eps=EPS, use_bias=False, dtype=jnp.float64),
      hnn.Linear.init(In=embed, Out=mlp, key=k_up, use_bias=False),
      hnn.Linear.init(In=mlp, Out=embed, key=k_down, use_bias=False),
    )


def haliax_case():
  stack = hnn.Stacked.init(hax.Axis('layers', LAYERS), HaliaxBlock)(
    key=jax.random.split(jax.random.key(0), LAYERS)
  )
  head = hnn.Linear.init(
    In=hax.Axis('embed', DIM), Out=hax.Axis('vocab', VOCAB), key=jax.random.key(1), use_bias=False
  )
  params = f64(eqx.filter({'transformer': stack, 'lm_head': head}, eqx.is_array))

  def separate(p):
    blocks = p['transformer'].stacked
    weights = (blocks.norm.weight, blocks.up.weight, blocks.down.weight, p['lm_head'].weight)
    return separate_blocks(*(w.array for w in weights), out_first=True)

  forward = lambda p, x: separate_forward(separate(p), x)  # the arrays as haliax stores them
  explicit = eqx.tree_at(
    lambda t: (
      t['transformer'].stacked.up.weight,
      t['transformer'].stacked.down.weight,
      t['lm_head'].weight,
    ),
    jax.tree.map(lambda _: None, params),
    (DimensionNumbers(2, 1), DimensionNumbers(2, 1), DimensionNumbers(1, 0)),
    is_leaf=lambda x: x is None,
  )
  selected = {
    'transformer/stacked/up/weight/0',
    'transformer/stacked/down/weight/0',
    'lm_head/weight/0',
  }
  return params, forward, separate, {}, explicit, selected


CASES = {
  'equinox': lambda: equinox_case(head=True),
  'equinox-no-head': lambda: equinox_case(head=False),
  'haiku': lambda: haiku_case(head=True),
  'haiku-no-head': lambda: haiku_case(head=False),
  'linen-layers-first': lambda: linen_case(scan_axis=0),
  'linen-layers-second': lambda: linen_case(scan_axis=1, head=False),
  'haliax': haliax_case,
  'maxtext-boxed': lambda: maxtext_case(boxed=True),
  'maxtext-unboxed': lambda: maxtext_case(boxed=False),
}


def assert_close(actual: Any, expected: Any, atol: float = 1e-10) -> None:
  """float64 rounding: the steps are ``3e-2`` at most; SVD bases of well-separated spectra."""
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=atol), actual, expected
  )


@pytest.mark.parametrize('name', OPTIMIZERS)
@pytest.mark.parametrize('case', CASES)
def test_stack_trains_as_separate_layers(case, name):
  with jax.enable_x64(True):
    params, forward, separate, helper, explicit, selected, *reference = CASES[case]()
    reference_forward = reference[0] if reference else separate_forward
    make = OPTIMIZERS[name]
    with warnings.catch_warnings():
      warnings.simplefilter('error')
      tx = make(**helper)
      assert projected_leaves(jax.eval_shape(tx.init, params)) == selected
      trained, _ = train(tx, params, forward)
    if name == 'rso':
      expected, _ = train(make(dimension_numbers=explicit), params, forward)
      assert_close(trained, expected, atol=0)
    else:
      expected, _ = train(make(), separate(params), reference_forward)
      assert_close(separate(trained), expected)


def fallback_warnings(tx: optax.GradientTransformation, params: Any) -> list[str]:
  """The messages of the fallback warnings ``tx.init`` raises, each pointing at this file."""
  with pytest.warns(UserWarning) as caught:
    tx.init(params)
  found = [w for w in caught if 'cannot tell how' in str(w.message)]
  assert {w.filename for w in found} == {__file__}
  return [str(w.message) for w in found]


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_fallback_warning_names_the_leaf_and_the_stack_helper(name):
  with jax.enable_x64(True):
    params, *_ = linen_case(scan_axis=0, head=False)
    messages = fallback_warnings(OPTIMIZERS[name](), params)
  assert len(messages) == 2
  for leaf, message in zip(
    ('layers/down/kernel (3, 12, 8)', 'layers/up/kernel (3, 8, 12)'), messages
  ):
    assert leaf in message
    assert "optax_lean.stacked_dimension_numbers({'<name>': <axis>})" in message


def test_fallback_warning_on_unreadable_axis_names_names_the_names_helper():
  box = nn.LogicallyPartitioned(jnp.ones((4, 2, 3)), ('embed', 'groups', 'experts_per_group'))
  params = {'moe': {'kernel': box}}
  (message,) = fallback_warnings(optax_lean.adamsnsm(1e-2, rank=2), params)
  assert 'moe/kernel (4, 2, 3)' in message
  assert 'axis_names_dimension_numbers(names, roles=' in message
  roles = {'groups': 'heads', 'experts_per_group': 'heads'}
  dims = optax_lean.axis_names_dimension_numbers(nn.get_partition_spec(params), roles=roles)
  assert dims['moe']['kernel'] == DimensionNumbers(0, (1, 2))


@pytest.mark.parametrize('case', ['equinox', 'haiku'])
def test_rank_warning_names_the_stacked_leaf(case):
  with jax.enable_x64(True):
    params, *_ = CASES[case]()
    stack = {'equinox': 'blocks/{}/weight', 'haiku': '__layer_stack_no_per_layer/{}/w'}[case]
    tx = optax_lean.galore(1e-2, rank=DIM + 1)
    with pytest.warns(UserWarning) as caught:
      jax.eval_shape(tx.init, params)
  messages = {str(w.message) for w in caught}
  for name in ('up', 'down'):
    leaf = stack.format(name)
    assert any(f'for the leaf {leaf} of shape' in message for message in messages), messages
  assert {w.filename for w in caught} == {__file__}


def test_haliax_attention_projections_read_their_in_and_out_axes():
  embed, heads, head_size = (
    hax.Axis('embed', DIM),
    hax.Axis('heads', HEADS),
    hax.Axis('head_size', HEAD_DIM),
  )
  q = hnn.Linear.init(In=embed, Out=(heads, head_size), key=jax.random.key(0), use_bias=False)
  o = hnn.Linear.init(In=(heads, head_size), Out=embed, key=jax.random.key(1), use_bias=False)
  params = eqx.filter({'q_proj': q, 'o_proj': o}, eqx.is_array)
  assert q.weight.array.shape == (HEADS, HEAD_DIM, DIM)  # output side first
  dims = optax_lean.stacked_dimension_numbers({})(params)
  assert dims['q_proj'].weight.array == DimensionNumbers(2, (0, 1))
  assert dims['o_proj'].weight.array == DimensionNumbers((1, 2), 0)
  named = optax_lean.axis_names_dimension_numbers({'q': q.weight, 'o': o.weight}, output_first=True)
  assert named == {'q': DimensionNumbers(2, (0, 1)), 'o': DimensionNumbers((1, 2), 0)}


def test_nnx_parameters_with_axis_names_read_by_default_and_by_nnx_dimension_numbers():
  from flax import nnx

  class Experts(nnx.Module):  # not a module nnx_dimension_numbers knows: read from the names
    def __init__(self, rngs):
      init = jax.random.normal(rngs.params(), (3, DIM, HIDDEN))
      self.kernel = nnx.Param(init, out_sharding=('exp', 'embed', 'mlp'), eager_sharding=False)

  model = Experts(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    opt_state = optax_lean.adamsnsm(1e-2, rank=2).init(state)
  assert projected_leaves(opt_state) == {'kernel'}
  assert optax_lean.nnx_dimension_numbers(model)(state)['kernel'].get_value() == DimensionNumbers(
    1, 2
  )


def test_axis_names_read_stacks_head_sides_and_exclusions():
  read = optax_lean.axis_names_dimension_numbers
  names = {
    'query': ('embed', 'layers', 'q_heads', 'kv'),
    'out': ('heads', 'layers', 'kv', 'embed'),
    'experts': ('exp', 'embed', 'mlp'),
    'fused': ('embed', 'num_activations', 'mlp'),
    'logits': ('embed_vocab', 'vocab'),
    'norm': ('norm', 'layers'),
    'three_sides': ('embed', 'mlp', 'vocab'),
    'unnamed': (None, None),
    'scalar': (),
  }
  assert read(names) == {
    'query': DimensionNumbers(0, (2, 3)),
    'out': DimensionNumbers((0, 2), 3),
    'experts': DimensionNumbers(1, 2),
    'fused': DimensionNumbers(0, 2),
    'logits': DimensionNumbers(0, 1),
    'norm': None,
    'three_sides': None,
    'unnamed': DimensionNumbers(0, 1),
    'scalar': None,
  }
  assert read({'w': ('mlp', 'embed')}, output_first=True) == {'w': DimensionNumbers(1, 0)}
  assert read({'w': ('blocks', 'embed', 'mlp')}, roles={'blocks': 'stack'}) == {
    'w': DimensionNumbers(1, 2)
  }


def test_layout_helpers_refuse_bad_arguments_in_one_line():
  with pytest.raises(ValueError, match='stacks must map names to non-negative axes'):
    optax_lean.stacked_dimension_numbers({'layers': -1})
  with pytest.raises(ValueError, match='axis_names: each leaf must be a tuple'):
    optax_lean.axis_names_dimension_numbers({'w': 3})
  with pytest.raises(ValueError, match="roles: axis 'blocks' has role 'batch'"):
    optax_lean.axis_names_dimension_numbers({'w': ('blocks',)}, roles={'blocks': 'batch'})


def test_haiku_stack_with_its_own_name_reads_with_the_stack_helper():
  def network(x):
    return hk.layer_stack(LAYERS, name='blocks')(lambda x: hk.Linear(DIM, with_bias=False)(x))(x)

  params = hk.transform(network).init(jax.random.key(0), jnp.ones((1, DIM)))
  (message,) = fallback_warnings(optax_lean.adamsnsm(1e-2, rank=2), params)
  assert 'blocks/linear/w (3, 8, 8)' in message
  assert 'stacked_dimension_numbers' in message
  tx = optax_lean.adamsnsm(
    1e-2, rank=2, dimension_numbers=optax_lean.stacked_dimension_numbers({'blocks': 0})
  )
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert projected_leaves(tx.init(params)) == {'blocks/linear/w'}


def test_names_that_do_not_read_fall_back_to_the_bias():
  kernel = nn.LogicallyPartitioned(jnp.ones((4, 2, 3)), ('embed', 'groups', 'experts_per_group'))
  params = {'moe': {'kernel': kernel, 'bias': jnp.zeros((2, 3))}}
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert nn.unbox(optax_lean.default_mask(params)) == {'moe': {'kernel': True, 'bias': False}}
