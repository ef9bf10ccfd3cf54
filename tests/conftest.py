"""Test-session setup: 8 fake CPU devices, strict shapes, warnings as errors.

The device count must be set before the JAX backend starts, so it is set here,
at import time, before any test module touches a device. A persistent
compilation cache, the session's own and removed at exit, lets the many tests
that rebuild one program (a run and its resumption) compile it once. The
suite's programs are small and compiled once each, so XLA's CPU backend skips
its expensive optimisation passes (a quarter less time for the optimizer tests),
here and in the trainer subprocesses, which inherit the environment.
"""

import atexit
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {FAST_COMPILE}'.strip()
jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_numpy_rank_promotion', 'raise')
COMPILATION_CACHE = tempfile.mkdtemp(prefix='optax-lean-jax-cache-')
atexit.register(shutil.rmtree, COMPILATION_CACHE, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', COMPILATION_CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

WORDS = [
  'the',
  'king',
  'queen',
  'lord',
  'fair',
  'doth',
  'speak',
  'night',
  'love',
  'and',
  'thou',
  'art',
  'my',
  'heart',
  'shall',
  'not',
  'be',
  'so',
]


@pytest.fixture(scope='session')
def corpus(tmp_path_factory) -> str:
  """About 60 kB of learnable text: sentences over a small vocabulary."""
  rng = np.random.default_rng(0)
  lines = [
    ' '.join(rng.choice(WORDS, size=rng.integers(4, 10))).capitalize() + '.' for _ in range(1500)
  ]
  path = tmp_path_factory.mktemp('corpus') / 'verse.txt'
  path.write_text('\n'.join(lines))
  return str(path)


@pytest.fixture(scope='session')
def cli_env(tmp_path_factory) -> dict[str, str]:
  """The environment of trainer subprocesses: 8 fake devices, one compilation cache.

  Runs of the same program (a run, its killed twin, the resumption) compile
  once. The cache is not the one of this process: a subprocess killed while
  writing an entry cannot leave it a torn one.
  """
  return {
    **os.environ,
    'JAX_NUM_CPU_DEVICES': '8',
    'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('jax-cache')),
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
  }
