"""state_bytes and its breakdowns count exactly what each optimizer keeps."""

import jax
import jax.numpy as jnp
import optax

import optax_lean

PARAMS = {
  'embed': jax.ShapeDtypeStruct((100, 16), jnp.float32),
  'kernel': jax.ShapeDtypeStruct((16, 48), jnp.float32),  # PyTorch (48, 16): tall
  'scale': jax.ShapeDtypeStruct((16,), jnp.float32),
}
PLAIN = 100 * 16 + 16  # embed and scale: full Adam moments
F32 = 4


def abstract_state(tx):
  return jax.eval_shape(tx.init, PARAMS)


def test_adamw_is_two_copies_plus_a_count():
  numel = 100 * 16 + 16 * 48 + 16
  assert optax_lean.state_bytes(abstract_state(optax.adamw(1e-3))) == 2 * numel * F32 + 4


def test_adamsnsm_counts_moments_and_projector():
  rank = 4
  state = abstract_state(optax_lean.adamsnsm(1e-2, rank=rank))
  kinds = optax_lean.state_bytes_by_kind(state)
  assert kinds['mu'] == (rank * 48 + PLAIN) * F32  # r * max(m, n)
  assert kinds['nu'] == (48 + PLAIN) * F32  # one per output unit
  assert kinds['projector'] == 16 * rank * F32  # r * min(m, n)
  assert kinds['count'] == 3 * 4
  assert optax_lean.state_bytes(state) == sum(kinds.values())


def test_bf16_states_halve_the_bytes():
  f32 = abstract_state(optax_lean.adamsnsm(1e-2, rank=4))
  bf16 = abstract_state(
    optax_lean.adamsnsm(
      1e-2, rank=4, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16, projector_dtype=jnp.bfloat16
    )
  )
  counts = 3 * 4
  assert optax_lean.state_bytes(bf16) - counts == (optax_lean.state_bytes(f32) - counts) // 2


def test_random_projector_stores_only_a_key():
  kinds = optax_lean.state_bytes_by_kind(
    abstract_state(optax_lean.adamsnsm(1e-2, rank=4, projector='random'))
  )
  assert kinds['projector'] == 2 * 4


def test_by_leaf_paths_sum_to_the_total():
  state = abstract_state(optax_lean.adamsn(1e-2))
  by_leaf = optax_lean.state_bytes_by_leaf(state)
  assert by_leaf["[0].denominator.nu['kernel']"] == 48 * F32
  assert sum(by_leaf.values()) == optax_lean.state_bytes(state)


def test_galore_family_counts():
  rank = 4
  lowrank = (rank * 48 + PLAIN) * F32  # r * max(m, n), plus full Adam elsewhere
  galore = optax_lean.state_bytes_by_kind(abstract_state(optax_lean.galore(1e-2, rank=rank)))
  assert galore['mu'] == galore['nu'] == lowrank
  assert galore['projector'] == 16 * rank * F32  # r * min(m, n)

  ldadam = optax_lean.state_bytes_by_kind(abstract_state(optax_lean.ldadam(1e-2, rank=rank)))
  assert ldadam['mu'] == ldadam['nu'] == lowrank
  assert ldadam['error'] == 16 * 48 * F32  # the full-size error-feedback buffer
  no_ef = abstract_state(optax_lean.ldadam(1e-2, rank=rank, error_feedback=False))
  assert 'error' not in optax_lean.state_bytes_by_kind(no_ef)

  osd = optax_lean.state_bytes_by_leaf(
    abstract_state(optax_lean.online_subspace_descent(1e-2, rank=rank))
  )
  basis = 16 * rank * F32
  assert osd["[0].subspace_adam.projector['kernel']"] == basis
  assert osd["[0].projector_adamw[0].mu['kernel']"] == basis  # the basis' own AdamW
  assert osd["[0].projector_adamw[0].nu['kernel']"] == basis

  rso = optax_lean.state_bytes_by_kind(abstract_state(optax_lean.rso(1e-2, rank=rank)))
  assert rso['mu'] == lowrank  # the input axis is the smaller one here
  assert rso['projector'] == 2 * 4  # a PRNG key
