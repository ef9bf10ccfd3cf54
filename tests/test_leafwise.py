"""The leaf walk's ordering keeps every value and survives compilation."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_lean._src import leafwise
from optax_lean._src.dimension_numbers import MatrixLayout

VALUES = {
  'float32': jnp.array([-0.0, 0.0, jnp.nan, -jnp.inf, 1.5e-45, 3.0], jnp.float32),
  'bfloat16': jnp.array([-0.0, jnp.nan, 2.0], jnp.bfloat16),
  'complex64': jnp.array([complex(-0.0, -0.0), complex(1.0, jnp.nan)], jnp.complex64),
  'int8': jnp.array([-128, 0, 127], jnp.int8),
  'uint32': jnp.array([0, 2**32 - 1], jnp.uint32),
  'bool': jnp.array([True, False]),
  'empty': jnp.zeros((0, 3), jnp.float32),
  'scalar': jnp.asarray(-0.0, jnp.float32),
}


def bits(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x).tobytes()


@pytest.mark.parametrize('source', ['float32', 'int8', 'bool', 'empty'])
def test_after_keeps_every_bit(source):
  tree = {**VALUES, 'key': jax.random.key(3)}

  @jax.jit
  def ordered(first, tree):
    return leafwise.after(leafwise.token_of(first), tree)

  out = ordered(VALUES[source], tree)
  for name, x in tree.items():
    assert out[name].dtype == x.dtype, name
    assert bits(out[name]) == bits(x), name


def test_the_dependency_survives_compilation():
  # Were the zero folded, ``b`` would come back untouched and nothing would read ``a``.
  compiled = (
    jax.jit(lambda a, b: leafwise.after(leafwise.token_of(a), b))
    .lower(jnp.zeros(8), jnp.zeros(8))
    .compile()
  )
  assert 'reduce' in compiled.as_text()


def test_a_tree_without_entries_has_no_token():
  assert leafwise.token_of({'a': jnp.zeros((0,)), 'b': None}) is None
  tree = {'a': jnp.ones(3)}
  assert leafwise.after(None, tree) is tree


def test_map_leaves_in_sequence_gives_the_same_updates():
  grads = {'a': jnp.arange(6.0).reshape(2, 3), 'b': jnp.zeros((0,)), 'c': jnp.full((4,), -0.0)}
  state = jax.tree.map(lambda g: g + 1, grads)

  def update_leaf(index, g, s, plan):
    del plan
    return g * s + index, s * 2

  def walk(in_sequence):
    return leafwise.map_leaves(update_leaf, grads, (state,), [None] * 3, in_sequence=in_sequence)

  plain = walk(False)
  for in_sequence in (True, [False, True, True]):
    ordered = jax.jit(lambda in_sequence=in_sequence: walk(in_sequence))()
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(ordered)):
      assert bits(x) == bits(y)


def test_only_separate_matrices_are_gated():
  matrix = types.SimpleNamespace(layout=MatrixLayout((4, 6), (), (0,), (1,)))
  stack = types.SimpleNamespace(layout=MatrixLayout((3, 4, 6), (0,), (1,), (2,)))
  assert leafwise.gated([matrix, None, stack]) == [True, False, False]
