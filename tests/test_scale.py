"""SCALE's choice of leaves: the matrices it normalises and the output layer that keeps a momentum.

The update rule itself is checked against the official step in
``test_reference_family.py::test_scale``.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import optax_lean
from examples.llama import configs as llama_configs
from examples.llama import model as llama_model
from optax_lean._src.dimension_numbers import path_names


def tree(**leaves):
  """A parameter tree of zeros from ``name=shape``; ``a__b`` nests as ``{'a': {'b': ...}}``."""
  out = {}
  for name, shape in leaves.items():
    *parents, last = name.split('__')
    node = out
    for parent in parents:
      node = node.setdefault(parent, {})
    node[last] = jnp.zeros(shape)
  return out


def with_momentum(state) -> set[str]:
  """Paths of the matrices that keep a momentum (a first moment but no second)."""
  is_none = lambda x: x is None
  mus = jax.tree_util.tree_flatten_with_path(state.mu, is_leaf=is_none)[0]
  nus = jax.tree.leaves(state.nu, is_leaf=is_none)
  return {
    '/'.join(path_names(path)) for (path, mu), nu in zip(mus, nus) if mu is not None and nu is None
  }


LM = dict(embed__embedding=(12, 6), block__kernel=(6, 6), norm__scale=(6,))


def test_the_output_layer_is_found_by_name():
  params = tree(**LM, lm_head__kernel=(6, 12))
  state = optax_lean.scale_by_column_norm().init(params)
  assert with_momentum(state) == {'lm_head/kernel'}
  assert state.mu['block']['kernel'] is None and state.mu['embed']['embedding'] is None
  assert state.nu['norm']['scale'].shape == (6,)  # AdamW on the vector


def test_the_output_layer_is_found_by_the_vocabulary_it_maps_to():
  params = tree(**LM, proj__kernel=(6, 12))
  assert with_momentum(optax_lean.scale_by_column_norm().init(params)) == {'proj/kernel'}


@pytest.mark.parametrize(
  'leaves, named',
  [
    (dict(head__kernel=(6, 12), output__kernel=(6, 12)), 'head/kernel, output/kernel'),
    (dict(a__kernel=(6, 12), b__kernel=(6, 12)), 'a/kernel, b/kernel'),
  ],
)
def test_several_candidates_raise_a_value_error_naming_them(leaves, named):
  with pytest.raises(ValueError, match=f'output_layer: .*: {named}; name it'):
    optax_lean.scale(1e-3).init(tree(**LM, **leaves))


def test_no_output_layer_warns_and_names_the_argument():
  with pytest.warns(UserWarning, match='output_layer=') as caught:
    optax_lean.scale(1e-3).init(tree(**LM))
  assert caught[0].filename == __file__  # the user's line, not the library's


def test_a_user_names_the_output_layer():
  params = tree(**LM, lm_head__kernel=(6, 12))
  tied = optax_lean.scale_by_column_norm(output_layer='embedding').init(params)
  assert with_momentum(tied) == {'embed/embedding'}
  as_mask = optax_lean.scale_by_column_norm(
    output_layer={**jax.tree.map(lambda _: False, params), 'block': True}
  )
  assert with_momentum(as_mask.init(params)) == {'block/kernel'}
  assert with_momentum(optax_lean.scale_by_column_norm(output_layer=False).init(params)) == set()
  with pytest.raises(ValueError, match="output_layer: 'missing' names no leaf"):
    optax_lean.scale_by_column_norm(output_layer='missing').init(params)
  with pytest.raises(ValueError, match='output_layer: norm/scale is not one of the matrices'):
    optax_lean.scale_by_column_norm(output_layer='norm').init(params)


@pytest.mark.parametrize('tie_embeddings', [False, True])
def test_llama_reads_with_nnx_dimension_numbers(tie_embeddings):
  """The example LLaMA, scanned: every kernel and the table normalised, the head found."""
  config = llama_configs.get_config('toy', scan_layers=True, tie_embeddings=tie_embeddings)
  model = llama_model.Llama(config, nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  dims = optax_lean.nnx_dimension_numbers(model)
  output_layer = 'embedding' if tie_embeddings else None
  state = optax_lean.scale_by_column_norm(output_layer=output_layer, dimension_numbers=dims).init(
    params
  )
  adam = {'/'.join(path_names(p)) for p, nu in jax.tree_util.tree_flatten_with_path(state.nu)[0]}
  assert all(name.endswith('scale') for name in adam)  # only the norm scales get AdamW
  assert with_momentum(state) == ({'embed/embedding'} if tie_embeddings else {'lm_head/kernel'})


def test_inject_hyperparams_keeps_a_function_output_layer_static():
  """optax calls a function hyperparameter as a schedule: ``static_args`` keeps it a function."""
  choose = lambda params: jax.tree_util.tree_map_with_path(
    lambda path, _: 'lm_head' in path_names(path), params
  )
  params = tree(**LM, lm_head__kernel=(6, 12))
  injected = optax.inject_hyperparams(optax_lean.scale, static_args=('output_layer',))
  state = injected(learning_rate=1e-2, output_layer=choose).init(params)
  assert with_momentum(state.inner_state[0]) == {'lm_head/kernel'}
  with pytest.raises(ValueError, match=r"got an array: .*static_args=\('output_layer',\)"):
    optax_lean.scale(1e-2, output_layer=jnp.asarray(True))
