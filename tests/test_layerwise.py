"""The trainer's ``--layerwise`` step: each layer updated as soon as its gradient exists.

Without clipping it equals the ordinary step (on 1 and on 8 devices, through
projector refreshes); it resumes bit-exactly after ``kill -9``; its compiled
temporaries drop by at least half the stacked blocks' gradient, which it never
holds whole; and its clipping uses the previous step's global norm.
"""

import signal
import time

import chex
import jax
import numpy as np
import pytest

from examples.llama import run as run_lib
from examples.llama import train as train_lib
from tests import cli
from tests.test_llama import toy_config


def toy(corpus, tmp_path, **overrides):
  """The toy run of test_llama.py, scanned, unclipped, 7 steps (refreshes at 1, 3 and 6)."""
  options = dict(steps=7, eval_every=7, eval_batches=1, scan_layers=True, clip_norm=0.0)
  return toy_config(corpus, tmp_path, **{**options, **overrides})


# The two steps do the same float32 maths per layer in another order (measured
# on one device: 2e-6 apart after 7 steps), on either mesh.
TOLERANCE = {'data=1': dict(rtol=5e-5, atol=5e-6), 'data=2,fsdp=4': dict(rtol=5e-5, atol=5e-6)}


@pytest.mark.parametrize('mesh', list(TOLERANCE))
@pytest.mark.parametrize('optimizer', ['adamsnsm', 'galore', 'adamw'])
def test_layerwise_equals_the_ordinary_step(corpus, tmp_path, mesh, optimizer):
  ordinary = train_lib.train(toy(corpus, tmp_path / 'a', mesh=mesh, optimizer=optimizer))
  layerwise = train_lib.train(
    toy(corpus, tmp_path / 'b', mesh=mesh, optimizer=optimizer, layerwise=True)
  )
  chex.assert_trees_all_close(
    layerwise.final_state.params, ordinary.final_state.params, **TOLERANCE[mesh]
  )
  losses = lambda run: [r['loss'] for r in run.history if 'loss' in r]
  np.testing.assert_allclose(losses(layerwise), losses(ordinary), rtol=1e-4)


def test_layerwise_clips_by_the_previous_steps_norm(corpus, tmp_path):
  free = train_lib.train(toy(corpus, tmp_path / 'free', layerwise=True, steps=3))
  huge = train_lib.train(toy(corpus, tmp_path / 'huge', layerwise=True, steps=3, clip_norm=1e9))
  chex.assert_trees_all_equal(huge.final_state.params, free.final_state.params)
  clipped = train_lib.train(toy(corpus, tmp_path / 'clip', layerwise=True, steps=3, clip_norm=0.1))
  norms = [r['grad_norm'] for r in free.history if 'grad_norm' in r]
  assert norms[0] > 0.1  # so steps 2 and 3 are clipped, step 1 (no previous norm) is not
  losses = lambda run: [r['loss'] for r in run.history if 'loss' in r]
  assert losses(clipped)[:2] == losses(free)[:2]  # step 2's loss is measured before its update
  assert losses(clipped)[2] != losses(free)[2]


def test_layerwise_temporaries_drop(corpus, tmp_path):
  """Compiled, never run: the whole stacked-blocks gradient is never live at once."""

  def compiled(layerwise):
    run = run_lib.build(toy(corpus, tmp_path, batch_size=1, layerwise=layerwise))
    batch = jax.ShapeDtypeStruct((1, 32), 'int32', sharding=run.batch_sharding)
    return run, run.step_fn.lower(run.restore_target(), batch, batch).compile().memory_analysis()

  run, ordinary = compiled(False)
  _, layerwise = compiled(True)
  block_bytes = sum(
    x.size * x.dtype.itemsize for x in jax.tree.leaves(run.abstract_state.params['blocks'])
  )
  assert ordinary.temp_size_in_bytes - layerwise.temp_size_in_bytes >= block_bytes / 2


def test_killed_layerwise_run_resumes_bit_exactly(corpus, cli_env, tmp_path):
  options = cli.toy_options(corpus, scan_layers=True, layerwise=True)
  straight = cli.run(
    *cli.flags({**options, 'checkpoint_dir': str(tmp_path / 'a'), 'out_dir': str(tmp_path / 'ao')}),
    env=cli_env,
  )
  assert straight.returncode == 0, straight.stderr
  args = [
    *cli.flags(options),
    '--checkpoint-dir',
    str(tmp_path / 'b'),
    '--out-dir',
    str(tmp_path / 'bo'),
  ]
  process = cli.start(*args, '--resume', env=cli_env, log=str(tmp_path / 'killed.log'))
  deadline = time.monotonic() + 120
  while not (tmp_path / 'b' / '8').exists():
    assert process.poll() is None and time.monotonic() < deadline
    time.sleep(0.002)
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL
  resumed = cli.run(*args, '--resume', env=cli_env)
  assert resumed.returncode == 0, resumed.stderr
  state, _ = cli.restore(str(tmp_path / 'b'), options)
  want, _ = cli.restore(str(tmp_path / 'a'), options)
  chex.assert_trees_all_equal(state, want)


@pytest.mark.parametrize(
  'optimizer, projector', [('rso', 'svd'), ('adamsnsm', 'random'), ('adamsnsm', 'uniform')]
)
def test_layerwise_draws_a_subspace_per_layer(corpus, tmp_path, optimizer, projector):
  """Random projectors fold the layer into their keys: every layer gets its own subspace."""
  run = train_lib.train(
    toy(corpus, tmp_path, optimizer=optimizer, projector=projector, layerwise=True, steps=4)
  )
  leaves = jax.tree_util.tree_leaves_with_path(run.final_state.opt_state.blocks)
  projectors = [
    x for path, x in leaves if 'projector' in jax.tree_util.keystr(path) and 'kernel' in str(path)
  ]
  assert projectors
  for stacked in projectors:  # (layers, ...) keys or indices, one slice per layer
    layers = [np.asarray(stacked[i]).tobytes() for i in range(stacked.shape[0])]
    assert len(set(layers)) == len(layers)
