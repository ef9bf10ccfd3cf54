"""Default leaf selection on the standard Flax layouts, and warnings that name leaves.

With default arguments, every layout the default rule can read gets SN/SM
(linear kernels, stacks of them with their biases, attention, ``LinearGeneral``
and convolution kernels), biases, norm scales and embeddings never do, and a
kernel it cannot read (a stack without biases) is named in a warning that points
at the user's line. ``nnx_dimension_numbers`` reads every kernel of an NNX model
from its modules; ``nnx.Optimizer`` trains such models with either.
"""

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import optax_lean
from examples.llama import configs as llama_configs
from examples.llama import model as llama_model
from optax_lean._src.dimension_numbers import path_names
from optax_lean._src.selection import resolve_layouts
from tests.family import FAMILY, LOW_RANK, projected_leaves


class Stack(nnx.Module):
  """``depth`` linear layers made with ``nnx.vmap``, run with ``nnx.scan``."""

  def __init__(self, dim: int, depth: int, *, use_bias: bool, rngs: nnx.Rngs):
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
      return nnx.Linear(dim, dim, use_bias=use_bias, rngs=nnx.Rngs(key))

    self.layers = create(jax.random.split(rngs.params(), depth))

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, layer):
      return jnp.tanh(layer(x))

    return body(x, self.layers)


class Model(nnx.Module):
  """Every standard layout: embedding, stacks, attention, einsum, conv, norms, head."""

  def __init__(self, rngs: nnx.Rngs, *, stack_bias: bool = True):
    self.embed = nnx.Embed(11, 8, rngs=rngs)
    self.stack = Stack(8, 3, use_bias=stack_bias, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs
    )
    self.general = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
    self.conv = nnx.Conv(8, 8, kernel_size=(3,), rngs=rngs)
    self.norm = nnx.RMSNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 11, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = self.stack(x)
    x = x + self.attn(x)
    x = x + self.general(x).reshape(x.shape)
    x = x + self.conv(x)
    return self.head(self.norm(x))


SELECTED = {
  'stack/layers/kernel': (3, 8, 8),
  'attn/query/kernel': (8, 8),
  'attn/key/kernel': (8, 8),
  'attn/value/kernel': (8, 8),
  'attn/out/kernel': (8, 8),
  'general/kernel': (8, 8),
  'conv/kernel': (24, 8),
  'head/kernel': (8, 11),
}


def matrix_views(tx, params, dimension_numbers=None) -> dict[str, tuple[int, ...]]:
  """Leaf path -> ``(*batch, in, out)`` of each leaf that got a subspace from ``tx``.

  The views are the library's own reading (``resolve_layouts``, which every rule
  uses); the state shows which leaves got a projector.
  """
  projector = tx.init(params)[0].numerator.projector
  layouts = resolve_layouts(params, None, dimension_numbers)
  with_projector = [p is not None for p in jax.tree.leaves(projector, is_leaf=lambda x: x is None)]
  assert with_projector == [layout is not None for layout in layouts]
  return {
    '/'.join(path_names(path)): layout.matrix_shape
    for (path, _), layout in zip(jax.tree.leaves_with_path(params), layouts)
    if layout is not None
  }


def loss_fn(model, tokens):
  logits = model(tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()


TOKENS = jnp.arange(12).reshape(2, 6) % 11


def test_default_reads_every_standard_layout():
  params = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    views = matrix_views(optax_lean.adamsnsm(1e-2, rank=2), params)
  assert views == SELECTED


@pytest.mark.parametrize('name', LOW_RANK)
def test_every_low_rank_member_selects_the_standard_layouts(name):
  params = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    state = jax.eval_shape(FAMILY[name].make().init, params)
  assert projected_leaves(state) == set(SELECTED)


def test_default_mask_leaves_out_biases_scales_and_embeddings():
  mask = optax_lean.default_mask(nnx.state(Model(nnx.Rngs(0)), nnx.Param))
  chosen = {'/'.join(path_names(p)) for p, m in jax.tree.leaves_with_path(mask) if m}
  assert chosen == set(SELECTED)


def test_stack_without_bias_is_named_in_a_warning_at_the_callers_line():
  params = nnx.state(Model(nnx.Rngs(0), stack_bias=False), nnx.Param)
  tx = optax_lean.adamsnsm(1e-2, rank=2)
  with pytest.warns(UserWarning) as caught:
    views = matrix_views(tx, params)
  layout = [w for w in caught if 'cannot tell how' in str(w.message)]
  assert len(layout) == 1
  assert 'stack/layers/kernel (3, 8, 8)' in str(layout[0].message)
  assert 'nnx_dimension_numbers' in str(layout[0].message)
  assert layout[0].filename == __file__
  assert 'stack/layers/kernel' not in views


def test_rank_warning_names_the_leaf_at_the_callers_line():
  tx = optax_lean.adamsnsm(1e-2, rank=8)
  with pytest.warns(UserWarning, match=r'for the leaf dense/kernel of shape \(6, 4\)') as caught:
    jax.jit(tx.init)({'dense': {'kernel': jnp.ones((6, 4))}})
  assert {w.filename for w in caught} == {__file__}


def test_nnx_dimension_numbers_reads_a_stack_without_bias():
  model = Model(nnx.Rngs(0), stack_bias=False)
  params = nnx.state(model, nnx.Param)
  dims = optax_lean.nnx_dimension_numbers(model)
  tx = optax_lean.adamsnsm(1e-2, rank=2, dimension_numbers=dims)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    views = matrix_views(tx, params, dims)
  assert views == SELECTED


@pytest.mark.parametrize('stack_bias', [True, False])
def test_nnx_optimizer_trains_with_the_default_selection(stack_bias):
  """Default arguments where the default rule reads every kernel, else the helper."""
  model = Model(nnx.Rngs(0), stack_bias=stack_bias)
  dims = None if stack_bias else optax_lean.nnx_dimension_numbers(model)
  tx = optax_lean.adamsnsm(3e-2, rank=2, update_proj_gap=5, dimension_numbers=dims)
  assert matrix_views(tx, nnx.state(model, nnx.Param), dims) == SELECTED
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  traces = []

  @nnx.jit
  def step(model, optimizer):
    traces.append(None)
    loss, grads = nnx.value_and_grad(loss_fn)(model, TOKENS)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(12)]
  assert losses[-1] < 0.8 * losses[0]
  assert len(traces) == 1  # refreshes at steps 1, 5 and 10 ran in the one compile


def test_llama_scanned_layers_read_with_nnx_dimension_numbers():
  config = llama_configs.get_config('toy', scan_layers=True)
  model = llama_model.Llama(config, nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  kernels = {
    '/'.join(path_names(p)): x.shape
    for p, x in jax.tree.leaves_with_path(params)
    if path_names(p)[-1] == 'kernel'
  }
  dims = optax_lean.nnx_dimension_numbers(model)
  tx = optax_lean.adamsnsm(1e-2, rank=2, dimension_numbers=dims)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    views = matrix_views(tx, params, dims)
  assert set(views) == set(kernels)
  for name, shape in kernels.items():
    assert views[name] == shape  # (layers, in, out) blocks; (in, out) head
  assert all(len(shape) == 3 for name, shape in kernels.items() if 'blocks' in name)
  # The default rule alone cannot tell a bias-free stack from an attention
  # kernel, so it names each scanned kernel once and reads the 2-D head.
  with pytest.warns(UserWarning) as caught:
    default_views = matrix_views(optax_lean.adamsnsm(1e-2, rank=2), params)
  named = [w for w in caught if 'cannot tell how' in str(w.message)]
  assert len(named) == sum(len(shape) == 3 for shape in kernels.values())
  assert set(default_views) == {n for n, s in kernels.items() if len(s) == 2}


@pytest.mark.parametrize('mask_name', ['linear_kernels', 'attn_mlp_kernels'])
def test_trainer_masks_read_the_scanned_model_as_its_modules_do(mask_name):
  """The trainer's masks with the default axes, on ``--scan-layers``: as the modules say."""
  from examples.llama import optimizers

  config = llama_configs.get_config('toy', scan_layers=True)
  model = llama_model.Llama(config, nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # the trainer's parameter tree
  modules = resolve_layouts(params, None, optax_lean.nnx_dimension_numbers(model))
  chosen = resolve_layouts(params, getattr(optimizers, mask_name), None)
  assert any(layout is not None for layout in chosen)
  for got, want in zip(chosen, modules):
    if got is not None:
      assert want is not None and got.matrix_shape == want.matrix_shape
