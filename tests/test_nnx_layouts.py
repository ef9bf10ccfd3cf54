"""nnx_dimension_numbers: per-leaf matrix readings of a Flax NNX model, from its modules."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import optax_lean
from examples.llama import configs as llama_configs
from examples.llama import model as llama_model
from optax_lean._src.dimension_numbers import DimensionNumbers, MatrixLayout
from optax_lean._src.nnx_layouts import nnx_dimension_numbers
from optax_lean._src.selection import resolve_layouts

DN = DimensionNumbers


def is_dims(x) -> bool:
  return x is None or isinstance(x, DimensionNumbers)


def path_name(path) -> str:
  """'a.b.kernel' for a pure-dict path or an nnx.State path (whose last key is `.value`)."""
  keys = [getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', None))) for k in path]
  if keys and keys[-1] == 'value' and isinstance(path[-1], jax.tree_util.GetAttrKey):
    keys = keys[:-1]
  return '.'.join(str(k) for k in keys)


def readings(model, tree=None) -> dict:
  """Path name -> reading, checked to be the same for the nnx.State and the pure dict."""
  fn = nnx_dimension_numbers(model)
  state = nnx.state(model, nnx.Param) if tree is None else tree
  found = {}
  for tree in (state, nnx.to_pure_dict(state)):
    out = fn(tree)
    assert jax.tree.structure(out, is_leaf=is_dims) == jax.tree.structure(
      jax.tree.map(lambda _: 0, tree)
    )
    found[type(tree)] = {
      path_name(p): d for p, d in jax.tree.leaves_with_path(out, is_leaf=is_dims)
    }
  by_state, by_dict = found.values()
  assert by_state == by_dict
  return by_state


def shapes(model) -> dict:
  return {
    path_name(p): tuple(x.shape)
    for p, x in jax.tree.leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  }


def matrix_shapes(model) -> dict:
  """Path name -> (*batch, in, out) of each leaf read as a matrix."""
  dims, shape = readings(model), shapes(model)
  return {
    name: MatrixLayout.from_dimension_numbers(shape[name], d).matrix_shape
    for name, d in dims.items()
    if d is not None
  }


def stacked(n: int, make):
  """`n` copies of the module `make(rngs)` made by nnx.vmap: every parameter gains axis 0."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def build(rngs):
    return make(rngs)

  return build(nnx.Rngs(0))


def test_linear():
  model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  assert readings(model) == {'kernel': DN(0, 1), 'bias': None}


def test_stacked_linear():
  model = stacked(3, lambda rngs: nnx.Linear(4, 5, rngs=rngs))
  assert shapes(model) == {'kernel': (3, 4, 5), 'bias': (3, 5)}
  assert readings(model) == {'kernel': DN(1, 2), 'bias': None}
  model = stacked(3, lambda rngs: nnx.Linear(4, 5, use_bias=False, rngs=rngs))
  assert readings(model) == {'kernel': DN(1, 2)}
  assert matrix_shapes(model) == {'kernel': (3, 4, 5)}


def test_attention():
  model = nnx.MultiHeadAttention(
    num_heads=2, in_features=6, qkv_features=8, out_features=5, decode=False, rngs=nnx.Rngs(0)
  )
  # q/k/v kernels (in, heads, head_dim), their biases (heads, head_dim): 2-D, yet not matrices
  assert shapes(model)['query.kernel'] == (6, 2, 4)
  assert shapes(model)['query.bias'] == (2, 4)
  assert shapes(model)['out.kernel'] == (2, 4, 5)
  expected = {'out.kernel': DN((0, 1), 2), 'out.bias': None}
  for name in ('query', 'key', 'value'):
    expected |= {f'{name}.kernel': DN(0, (1, 2)), f'{name}.bias': None}
  assert readings(model) == expected
  assert matrix_shapes(model) == {
    'query.kernel': (6, 8),
    'key.kernel': (6, 8),
    'value.kernel': (6, 8),
    'out.kernel': (8, 5),
  }


def test_stacked_attention():
  model = stacked(
    2,
    lambda rngs: nnx.MultiHeadAttention(num_heads=2, in_features=4, decode=False, rngs=rngs),
  )
  dims = readings(model)
  assert dims['query.kernel'] == DN(1, (2, 3))
  assert dims['out.kernel'] == DN((1, 2), 3)
  assert matrix_shapes(model)['out.kernel'] == (2, 4, 4)


def test_linear_general():
  model = nnx.LinearGeneral((2, 3), (4, 5), axis=(1, -1), rngs=nnx.Rngs(0))
  assert shapes(model) == {'kernel': (2, 3, 4, 5), 'bias': (4, 5)}
  assert readings(model) == {'kernel': DN((0, 1), (2, 3)), 'bias': None}
  assert matrix_shapes(model) == {'kernel': (6, 20)}
  # batch_axis: leading kernel axes are batch
  model = nnx.LinearGeneral(3, 4, batch_axis={0: 2}, rngs=nnx.Rngs(0))
  assert shapes(model)['kernel'] == (2, 3, 4)
  assert readings(model) == {'kernel': DN(1, 2), 'bias': None}
  assert matrix_shapes(model) == {'kernel': (2, 3, 4)}


def test_einsum():
  model = nnx.Einsum('bd,dnh->bnh', (4, 2, 3), (2, 3), rngs=nnx.Rngs(0))
  assert readings(model) == {'kernel': DN(0, (1, 2)), 'bias': None}
  assert matrix_shapes(model) == {'kernel': (4, 6)}
  # n in input, kernel and output: a batch axis
  model = nnx.Einsum('bnd,ndh->bnh', (2, 4, 3), rngs=nnx.Rngs(0))
  assert readings(model) == {'kernel': DN(1, 2)}
  assert matrix_shapes(model) == {'kernel': (2, 4, 3)}
  # output axes before the reduction axis; an ellipsis in the input only
  model = nnx.Einsum('...d,hd->...h', (3, 4), rngs=nnx.Rngs(0))
  assert readings(model) == {'kernel': DN(1, 0)}
  assert matrix_shapes(model) == {'kernel': (4, 3)}
  stack = stacked(2, lambda rngs: nnx.Einsum('bd,dnh->bnh', (4, 2, 3), rngs=rngs))
  assert readings(stack) == {'kernel': DN(1, (2, 3))}
  assert matrix_shapes(stack) == {'kernel': (2, 4, 6)}


@pytest.mark.parametrize(
  'einsum_str',
  [
    '...d,...dh->...h',  # an ellipsis in the kernel
    'bd,dh->b',  # no output axis
    'bnd,nd->bn',  # no output axis, n batch
    'bd,dhk->bh',  # k summed over the kernel alone
  ],
)
def test_einsum_unreadable(einsum_str):
  n_kernel = len(einsum_str.split(',')[1].split('->')[0].replace('...', ''))
  model = nnx.Einsum(einsum_str, (2, 3, 4)[:n_kernel], rngs=nnx.Rngs(0))
  assert readings(model) == {'kernel': None}


def test_conv():
  model = nnx.Conv(3, 5, (3, 3), rngs=nnx.Rngs(0))
  assert shapes(model) == {'kernel': (3, 3, 3, 5), 'bias': (5,)}
  assert readings(model) == {'kernel': DN((0, 1, 2), 3), 'bias': None}
  assert matrix_shapes(model) == {'kernel': (27, 5)}
  stack = stacked(2, lambda rngs: nnx.Conv(3, 5, (3,), use_bias=False, rngs=rngs))
  assert readings(stack) == {'kernel': DN((1, 2), 3)}
  assert matrix_shapes(stack) == {'kernel': (2, 9, 5)}


def test_conv_transpose():
  model = nnx.ConvTranspose(3, 5, (2, 2), rngs=nnx.Rngs(0))
  assert shapes(model)['kernel'] == (2, 2, 3, 5)
  assert readings(model) == {'kernel': DN((0, 1, 2), 3), 'bias': None}
  # transpose_kernel: the kernel is (*kernel_size, out, in)
  model = nnx.ConvTranspose(3, 5, (2, 2), transpose_kernel=True, rngs=nnx.Rngs(0))
  assert shapes(model)['kernel'] == (2, 2, 5, 3)
  assert readings(model) == {'kernel': DN((0, 1, 3), 2), 'bias': None}
  assert matrix_shapes(model) == {'kernel': (12, 5)}
  assert model(jnp.ones((1, 4, 4, 3))).shape[-1] == 5


def test_embed_and_norms():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(10, 4, rngs=rngs)
      self.rms = nnx.RMSNorm(4, rngs=rngs)
      self.layer = nnx.LayerNorm(4, rngs=rngs)
      self.batch = nnx.BatchNorm(4, rngs=rngs)
      self.group = nnx.GroupNorm(4, num_groups=2, rngs=rngs)
      self.norms = stacked(3, lambda rngs: nnx.RMSNorm(4, rngs=rngs))

  model = Model(nnx.Rngs(0))
  assert shapes(model)['norms.scale'] == (3, 4)
  # The table is read as the (vocabulary, features) matrix of a one-hot product; only rules
  # that take embeddings (SCALE) select it by default.
  layouts = readings(model)
  assert layouts.pop('embed.embedding') == DN(0, 1)
  assert set(layouts.values()) == {None}


def test_llama_scanned():
  config = llama_configs.get_config('toy', scan_layers=True)
  model = llama_model.Llama(config, nnx.Rngs(0))
  kernels = ['attn.q', 'attn.k', 'attn.v', 'attn.o', 'mlp.gate', 'mlp.up', 'mlp.down']
  expected = {f'blocks.{name}.kernel': DN(1, 2) for name in kernels}
  expected |= {
    'blocks.attn_norm.scale': None,
    'blocks.mlp_norm.scale': None,
    'embed.embedding': DN(0, 1),
    'final_norm.scale': None,
    'lm_head.kernel': DN(0, 1),
  }
  assert readings(model) == expected
  assert matrix_shapes(model)['blocks.mlp.down.kernel'] == (2, 64, 32)


def test_gradients_and_shape_structs():
  model = nnx.MultiHeadAttention(num_heads=2, in_features=4, decode=False, rngs=nnx.Rngs(0))
  fn = nnx_dimension_numbers(model)
  x = jnp.ones((1, 3, 4))
  grads = nnx.grad(lambda m: jnp.sum(m(x)))(model)
  expected = readings(model)
  assert readings(model, grads) == expected
  structs = jax.eval_shape(lambda: nnx.state(model, nnx.Param))
  assert {path_name(p): d for p, d in jax.tree.leaves_with_path(fn(structs), is_leaf=is_dims)} == (
    expected
  )


def test_broadcasts_onto_state():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=4, decode=False, rngs=rngs)
      self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
      self.norm = nnx.RMSNorm(4, rngs=rngs)

  model = Model(nnx.Rngs(0))
  fn = nnx_dimension_numbers(model)
  state = nnx.state(model, nnx.Param)
  # the readings are a prefix of the state: one reading per nnx.Param
  pairs = jax.tree.map(lambda d, x: (d, x.shape), fn(state), state, is_leaf=is_dims)
  pairs = jax.tree.leaves(pairs, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2)
  assert [shape for _, shape in pairs] == [x.shape for x in jax.tree.leaves(state)]
  assert pairs[0] == (None, (2, 2))  # attn.key.bias, 2-D
  mask = lambda tree: jax.tree.map(lambda d: d is not None, fn(tree), is_leaf=is_dims)
  layouts = resolve_layouts(state, mask=mask, dimension_numbers=fn)
  names = [path_name(p) for p, _ in jax.tree.leaves_with_path(state)]
  got = {n: layout.matrix_shape for n, layout in zip(names, layouts) if layout is not None}
  assert got == {
    'attn.key.kernel': (4, 4),
    'attn.out.kernel': (4, 4),
    'attn.query.kernel': (4, 4),
    'attn.value.kernel': (4, 4),
    'conv.kernel': (27, 4),
  }
  tx = optax_lean.adamsnsm(1e-2, rank=2, mask=mask, dimension_numbers=fn)
  opt_state = tx.init(state)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, state), opt_state, state)
  assert jax.tree.structure(updates) == jax.tree.structure(state)


def test_foreign_tree():
  fn = nnx_dimension_numbers(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r'^nnx_dimension_numbers: leaf w\.kernel is not a para'):
    fn({'w': {'kernel': jnp.zeros((3, 4))}})
  # unknown leaves with fewer than 2 axes are not matrices either way
  assert fn({'kernel': jnp.zeros((3, 4)), 'step': jnp.zeros(()), 'b': jnp.zeros(4)}) == {
    'kernel': DN(0, 1),
    'step': None,
    'b': None,
  }
  with pytest.raises(ValueError, match=r'leaf kernel has shape \(2, 3, 4\), but the parameter'):
    fn({'kernel': jnp.zeros((2, 3, 4))})
  assert fn({'kernel': jnp.zeros((0, 4))}) == {'kernel': None}


def test_wrt():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.BatchNorm(4, rngs=rngs)

  model = Model(nnx.Rngs(0))
  state = nnx.state(model)  # every variable: parameters, batch statistics
  fn = nnx_dimension_numbers(model, wrt=nnx.Variable)
  out = fn(nnx.to_pure_dict(state))
  assert out['linear'] == {'kernel': DN(0, 1), 'bias': None}
  assert out['norm']['mean'] is None
  # batch statistics are 1-D, so a Param-only reading still maps the whole state
  assert nnx_dimension_numbers(model)(nnx.to_pure_dict(state))['norm']['var'] is None
