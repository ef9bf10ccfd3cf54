"""The README's and the guide's Python blocks run, in order, as one program each.

So the quick start and the guide's snippets stay true.
"""

import os
import re
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(path: str = 'README.md') -> list[str]:
  with open(os.path.join(ROOT, path)) as f:
    return re.findall(r'^```python\n(.*?)^```$', f.read(), flags=re.MULTILINE | re.DOTALL)


def test_readme_has_the_blocks_it_promises():
  text = '\n'.join(python_blocks())
  for needle in ('optax_lean.adamsnsm(', 'state_sharding(', 'ocp.CheckpointManager'):
    assert needle in text


def test_readme_python_blocks_run_in_order(monkeypatch, tmp_path):
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))  # checkpoints go under tmp_path
  namespace = {'__name__': 'readme'}
  for index, block in enumerate(python_blocks()):
    exec(compile(block, f'README.md python block {index}', 'exec'), namespace)
  assert int(namespace['state'].notfinite_count) == 0  # the steps ran and were finite
  assert os.listdir(tmp_path), 'the checkpoint block saved nothing'


def test_guide_python_blocks_run_in_order():
  blocks = python_blocks(os.path.join('docs', 'guide.md'))
  assert blocks
  namespace = {'__name__': 'guide'}
  for index, block in enumerate(blocks):
    exec(compile(block, f'docs/guide.md python block {index}', 'exec'), namespace)
