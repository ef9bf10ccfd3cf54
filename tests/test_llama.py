"""The LLaMA example: model, data stream, training, sharding, resume and CLI."""

import dataclasses
import functools
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_lean
from examples.llama import data as data_lib
from examples.llama import optimizers, rso_layers
from examples.llama import run as run_lib
from examples.llama import train as train_lib
from examples.llama.checkpoint import Checkpointer
from examples.llama.configs import get_config
from examples.llama.metrics import TrainingError
from examples.llama.model import Llama
from examples.llama.steps import loss_fn
from examples.llama.train_config import TrainConfig, build_parser
from tests import cli


def open_text(path) -> str:
  with open(path) as f:
    return f.read()


# GaLore's single-device recipe (with --layerwise): bfloat16, stochastic rounding, 8-bit moments.
LOW_PRECISION = dict(param_dtype='bfloat16', compute_dtype='bfloat16', state_dtype='int8')


def toy_config(corpus, tmp_path, **overrides):
  base = TrainConfig(
    model='toy',
    optimizer='adamsnsm',
    steps=6,
    batch_size=8,
    seq_len=32,
    eval_every=3,
    eval_batches=2,
    checkpoint_every=2,
    rank=4,
    update_proj_gap=3,
    mesh='data=1',
    data=corpus,
    out_dir=str(tmp_path / 'run'),
    progress=False,
  )
  return dataclasses.replace(base, **overrides)


@pytest.mark.parametrize(
  'options',
  [
    {},
    {'scan_layers': True},
    {'n_kv_heads': 1},
    {'tie_embeddings': True},
  ],
)
def test_model_shapes_and_causality(options):
  config = get_config('toy', **options)
  model = Llama(config, nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 12)), jnp.int32)
  logits = model(tokens)
  assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
  changed = model(tokens.at[:, 7].set((tokens[:, 7] + 1) % 64))
  np.testing.assert_allclose(changed[:, :7], logits[:, :7], rtol=1e-6, atol=1e-6)
  assert not np.allclose(changed[:, 7:], logits[:, 7:])
  params = nnx.state(model, nnx.Param)
  kernel = (
    params['blocks']['attn']['q']['kernel']
    if options.get('scan_layers')
    else params['blocks'][0]['attn']['q']['kernel']
  )
  assert kernel.shape == ((2, 32, 32) if options.get('scan_layers') else (32, 32))


def test_paper_configs_have_the_published_sizes():
  sizes = {'60m': 58.1, '130m': 134.1, '350m': 368.0, '1b': 1339.1}
  for name, millions in sizes.items():
    abstract = nnx.eval_shape(lambda name=name: Llama(get_config(name), nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert round(count / 1e6, 1) == millions


def test_batches_are_deterministic_and_resumable():
  tokens = np.arange(1000, dtype=np.int32)
  batches = data_lib.TokenBatches.from_tokens(tokens, batch_size=4, seq_len=10, seed=3)
  stream = batches.stream()
  first = [next(stream) for _ in range(60)]  # crosses epoch boundaries (94 windows)
  resumed = batches.stream(position=37)
  for expected in first[37:]:
    chex.assert_trees_all_equal(next(resumed), expected)
  again = data_lib.TokenBatches.from_tokens(tokens, batch_size=4, seq_len=10, seed=3)
  chex.assert_trees_all_equal(again.batch(11), first[11])
  inputs, targets = first[0]
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  epoch = np.sort(np.concatenate([b[0][:, 0] for b in first[:23]]))  # 92 of 94 windows
  assert len(np.unique(epoch)) == len(epoch)


def test_tokenizers_round_trip(corpus):
  text = data_lib.load_text(corpus)
  for spec in ('byte', 'bpe:300'):
    tokenizer = data_lib.make_tokenizer(spec, text)
    assert tokenizer.decode(tokenizer.encode(text[:500])) == text[:500]
  assert data_lib.make_tokenizer('bpe:300', text).vocab_size == 300


def test_hugging_face_dataset_path_on_local_files(corpus, monkeypatch):
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  text = data_lib.load_text('hf:text', data_files=corpus, max_documents=10)
  assert text.split('\n\n')[:3] == open_text(corpus).split('\n')[:3]


@pytest.mark.parametrize('name', list(optimizers.REGISTRY))
def test_one_step_lowers_the_loss(name):
  config = get_config('toy')
  model = Llama(config, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.integers(0, 64, size=(8, 16)), jnp.int32)
  targets = jnp.roll(inputs, -1, axis=1)
  spec = optimizers.REGISTRY[name]
  # A tenth of the peak: the size of an early warmup step, where one step must help.
  schedule = optax.constant_schedule(spec.learning_rate / 10)
  tx = spec.build(schedule, optimizers.Hyperparameters(rank=4))
  loss = lambda p: loss_fn(graphdef, p, inputs, targets)
  before, grads = jax.value_and_grad(loss)(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert loss(optax.apply_updates(params, updates)) < before


@functools.cache
def toy_problem():
  """The toy model's parameters, and its loss and gradient (each jitted once for every test)."""
  graphdef, params = nnx.split(Llama(get_config('toy'), nnx.Rngs(0)), nnx.Param)
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.integers(0, 64, size=(8, 16)), jnp.int32)
  loss = jax.jit(lambda p: loss_fn(graphdef, p, inputs, jnp.roll(inputs, -1, axis=1)))
  return nnx.to_pure_dict(params), loss, jax.jit(jax.grad(loss))


@pytest.mark.parametrize('name', list(optimizers.REGISTRY))
def test_every_optimizer_trains_with_8bit_states(name):
  # quantize_state around each registered optimizer, every moment in bytes however small:
  # two steps (the second reads the quantised moments back) lower the loss.
  params, loss, grad = toy_problem()
  spec = optimizers.REGISTRY[name]
  schedule = optax.constant_schedule(spec.learning_rate / 10)
  tx = optax_lean.quantize_state(
    spec.build(schedule, optimizers.Hyperparameters(rank=4)), min_size=1
  )
  update = jax.jit(tx.update)
  state = tx.init(params)
  before = loss(params)
  for _ in range(2):
    updates, state = update(grad(params), state, params)
    params = optax.apply_updates(params, updates)
  assert loss(params) < before
  is_quantized = lambda x: isinstance(x, optax_lean.QuantizedArray)
  quantized = sum(map(is_quantized, jax.tree.leaves(state, is_leaf=is_quantized)))
  assert quantized > 0 or name == 'adafactor'  # adafactor's factored moments are not mu or nu


def test_training_lowers_validation_loss_and_writes_metrics(corpus, tmp_path):
  result = train_lib.train(toy_config(corpus, tmp_path, steps=12, eval_every=6))
  evals = [r for r in result.history if 'val_loss' in r]
  assert [r['step'] for r in evals] == [6, 12]
  assert evals[-1]['val_loss'] < evals[0]['val_loss'] < np.log(256) - 0.5
  lines = open_text(tmp_path / 'run' / 'metrics.jsonl').splitlines()
  assert len(lines) == 12
  assert os.path.isdir(tmp_path / 'run' / 'tensorboard')
  assert result.state_bytes < result.adamw_state_bytes


def test_eight_devices_agree_with_one(corpus, tmp_path):
  single = train_lib.train(toy_config(corpus, tmp_path / 'one', optimizer='adamsnsm'))
  sharded = train_lib.train(toy_config(corpus, tmp_path / 'eight', mesh='data=2,fsdp=4'))
  chex.assert_trees_all_close(
    sharded.final_state.params, single.final_state.params, rtol=2e-4, atol=2e-5
  )
  kernel = sharded.final_state.params['blocks'][0]['mlp']['gate']['kernel']
  assert kernel.sharding.shard_shape(kernel.shape) != kernel.shape
  np.testing.assert_allclose(
    [r['loss'] for r in sharded.history], [r['loss'] for r in single.history], rtol=1e-4
  )


@pytest.mark.parametrize(
  'options',
  [
    {},
    {'scan_layers': True, 'grad_accum': 2},
    {'scan_layers': True, 'optimizer': 'adamw', 'state_dtype': 'int8'},
    {'scan_layers': True, 'layerwise': True, **LOW_PRECISION},
  ],
  ids=['plain', 'scan-accumulate', 'int8-states', 'bf16-int8-layerwise'],
)
def test_resume_is_bit_exact(corpus, tmp_path, options):
  straight = train_lib.train(toy_config(corpus, tmp_path / 'straight', **options))
  if options.get('state_dtype') == 'int8':  # the stacked (2, 32, 64) moments are in bytes
    is_quantized = lambda x: isinstance(x, optax_lean.QuantizedArray)
    leaves = jax.tree.leaves(straight.final_state.opt_state, is_leaf=is_quantized)
    assert sum(map(is_quantized, leaves)) >= (6 if options.get('optimizer') == 'adamw' else 1)
  ckpt = tmp_path / 'ckpt'
  train_lib.train(toy_config(corpus, tmp_path / 'first', checkpoint_dir=str(ckpt), **options))
  shutil.rmtree(ckpt / '6')  # as if the run had died after its step-4 checkpoint
  resumed = train_lib.train(
    toy_config(corpus, tmp_path / 'second', checkpoint_dir=str(ckpt), resume=True, **options)
  )
  chex.assert_trees_all_equal(resumed.final_state, straight.final_state)


def test_bfloat16_params_with_8bit_states_train_like_float32(corpus, tmp_path):
  # The 7B single-device recipe at toy size: bfloat16 parameters and compute,
  # stochastic rounding, 8-bit moments, per-layer updates, trained to the
  # plateau (300 steps). Its loss must lie within three times the float32 run's
  # seed-to-seed difference (0.002 here; rounding to nearest lands 0.03 off).
  options = dict(scan_layers=True, layerwise=True, steps=300, eval_every=300, eval_batches=10)
  options.update(update_proj_gap=25, checkpoint_every=300)

  def final_loss(name, **more):
    result = train_lib.train(toy_config(corpus, tmp_path / name, **options, **more))
    return result, [r['val_loss'] for r in result.history if 'val_loss' in r][-1]

  _, float32 = final_loss('f32')
  _, other_seed = final_loss('seed1', seed=1)
  lean, low = final_loss('lean', **LOW_PRECISION)
  assert {x.dtype for x in jax.tree.leaves(lean.final_state.params)} == {jnp.dtype(jnp.bfloat16)}
  is_quantized = lambda x: isinstance(x, optax_lean.QuantizedArray)
  assert any(map(is_quantized, jax.tree.leaves(lean.final_state.opt_state, is_leaf=is_quantized)))
  assert abs(low - float32) <= 3 * abs(other_seed - float32), (low, float32, other_seed)


def test_cli_smoke_run(corpus, tmp_path, cli_env):
  options = cli.toy_options(
    corpus,
    optimizer='adamsn',
    steps=3,
    seq_len=16,
    eval_every=3,
    checkpoint_every=3,
    mesh=None,
    out_dir=str(tmp_path),
  )
  out = cli.run(*cli.flags(options), env=cli_env)
  assert out.returncode == 0, out.stderr
  assert 'optimizer adamsn: state' in out.stdout and 'of adamw' in out.stdout
  assert 'final val loss' in out.stdout


def test_every_flag_has_help_with_its_default():
  parser = build_parser()
  flags = [action for action in parser._actions if action.dest != 'help']
  assert [action.dest for action in flags] == [f.name for f in dataclasses.fields(TrainConfig)]
  for action in flags:
    text, _, default = action.help.rpartition(' (default: ')
    assert text and default == f'{action.default})', action.option_strings
  assert '(default: adamsnsm)' in ' '.join(parser.format_help().split())  # renders, unwrapped


@pytest.mark.parametrize('bad_step', [5, 6], ids=['between_refreshes', 'at_a_refresh'])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(bad_step, corpus, tmp_path):
  ckpt = tmp_path / 'ckpt'
  cfg = toy_config(
    corpus, tmp_path, nonfinite_grad_step=bad_step, checkpoint_every=1, checkpoint_dir=str(ckpt)
  )
  message = f'non-finite loss or gradient at step {bad_step}'
  with pytest.raises(TrainingError, match=message) as e:
    train_lib.train(cfg)
  checkpointer = Checkpointer(str(ckpt))
  assert checkpointer.latest_step() == bad_step - 1
  assert f'Last good checkpoint: step {bad_step - 1}' in str(e.value)
  state, _ = checkpointer.restore(run_lib.build(cfg).restore_target())
  checkpointer.close()
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


def test_apply_if_finite_skips_a_poisoned_step(corpus, tmp_path):
  clean = train_lib.train(toy_config(corpus, tmp_path / 'clean', skip_nonfinite=True))
  poisoned = train_lib.train(  # step 3 refreshes the projectors (gap 3)
    toy_config(corpus, tmp_path / 'poisoned', skip_nonfinite=True, nonfinite_grad_step=3)
  )
  assert [r.get('skipped', False) for r in poisoned.history] == [False, False, True] + [False] * 3
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(poisoned.final_state))
  # The skipped step changed nothing but the step counter: losses up to it agree.
  np.testing.assert_allclose(
    [r['loss'] for r in poisoned.history[:3]], [r['loss'] for r in clean.history[:3]], rtol=1e-6
  )


def test_model_and_data_options_train(corpus, tmp_path):
  cfg = toy_config(
    corpus,
    tmp_path,
    compute_dtype='bfloat16',
    scan_layers=True,
    n_kv_heads=1,
    tie_embeddings=True,
    tokenizer='bpe:300',
    grad_accum=2,
    steps=4,
    eval_every=2,
  )
  result = train_lib.train(cfg)
  evals = [r['val_loss'] for r in result.history if 'val_loss' in r]
  assert len(evals) == 2 and evals[1] < evals[0] < np.log(300) + 0.5
  q = result.final_state.params['blocks']['attn']['q']['kernel']
  assert q.shape == (2, 32, 32) and q.dtype == jnp.float32  # f32 params, bf16 compute
  assert 'lm_head' not in result.final_state.params


def test_rso_merge_keeps_the_function():
  model = Llama(get_config('toy', rso_rank=4, scan_layers=True), nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  state = nnx.to_pure_dict(state)
  trained = jax.tree_util.tree_map_with_path(  # give every factor a value, as training would
    lambda path, x: x + 0.1 if path[-1].key == 'factor' else x, state
  )
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 12)), jnp.int32)
  before = nnx.merge(graphdef, trained)(tokens)
  merged = rso_layers.merge_and_redraw(trained, jax.random.key(1))
  np.testing.assert_allclose(nnx.merge(graphdef, merged)(tokens), before, rtol=1e-5, atol=1e-5)
  q = merged['blocks']['attn']['q']
  assert not jnp.any(q['factor'])
  assert not np.allclose(q['projection'], state['blocks']['attn']['q']['projection'])


def test_rso_layers_train_factors_and_merge_every_period(corpus, tmp_path):
  cfg = toy_config(corpus, tmp_path, optimizer='rso_layers', steps=6, update_proj_gap=3)
  run = run_lib.build(cfg)
  state = run.init_state()
  kernels = [np.asarray(state.params['blocks'][0]['mlp']['up']['kernel'])]  # donated later
  for position in range(6):
    state, _ = run.step_fn(state, *run.batches.batch(position))
    kernels.append(np.asarray(state.params['blocks'][0]['mlp']['up']['kernel']))
    factor = state.params['blocks'][0]['mlp']['up']['factor']
    factor_count = optax.tree.get(state.opt_state, 'inner_states')['factor'].inner_state[0].count
    if (position + 1) % 3:  # between merges: kernel frozen, factor trained
      np.testing.assert_array_equal(kernels[-1], kernels[-2])
      assert jnp.any(factor != 0) and int(factor_count) == (position + 1) % 3
    else:  # at a merge: kernel moved, factor and its Adam state restart
      assert not np.allclose(kernels[-1], kernels[-2])
      assert not jnp.any(factor) and int(factor_count) == 0
  assert 'factor' not in str(jax.tree_util.tree_structure(rso_layers.without_factors(state.params)))
