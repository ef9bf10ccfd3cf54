"""Every public symbol is documented, optax-style, and listed in the docs.

Functions need a one-line summary, ``Args:`` naming every parameter,
``Returns:`` and a runnable ``Examples:`` block (run by ``--doctest-modules``);
optimizers and transformations also need ``References:`` with an arXiv link.
Classes need ``Attributes:`` naming every field; classes that are not states
also need an ``Examples:`` block. The API reference (``docs/api.rst``) names every
symbol in ``optax_lean.__all__``, the README links it, and the built pages render
their maths without network.
"""

import dataclasses
import inspect
import os
import re
import subprocess
import sys

import pytest

import optax_lean

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = re.compile(r'^(Args|Attributes|Examples|Raises|References|Returns):$')
# Helpers that implement no published method, so they cite no paper.
NO_PAPER = {
  'default_mask',
  'layer_axes',
  'merge_layers',
  'split_layers',
  'nnx_dimension_numbers',
  'axis_names_dimension_numbers',
  'stacked_dimension_numbers',
  'state_bytes',
  'state_bytes_by_kind',
  'state_bytes_by_leaf',
  'state_sharding',
  'get_projector',
}
PUBLIC = sorted(optax_lean.__all__)


def sections(doc: str) -> dict[str, str]:
  """Google-style sections of a docstring: name -> body (dedented by one level)."""
  found, name = {}, None
  for line in doc.splitlines():
    match = SECTION.match(line)
    if match:
      name = match.group(1)
      found[name] = ''
    elif name is not None:
      if line and not line.startswith(' '):
        name = None  # back to prose
      else:
        found[name] += line[2:] + '\n'
  return found


def documented_names(body: str) -> set[str]:
  """Names introduced in an ``Args:`` or ``Attributes:`` body (``name: text``)."""
  return set(re.findall(r'^(\w+)(?: \(.*?\))?:', body, flags=re.MULTILINE))


def fields(cls) -> list[str]:
  if hasattr(cls, '_fields'):  # a NamedTuple
    return list(cls._fields)
  return [f.name for f in dataclasses.fields(cls)]


def parse(obj) -> dict[str, str]:
  """The sections of ``obj``'s docstring, after checking it has a one-line summary."""
  doc = obj.__doc__
  assert doc and doc.strip(), 'has no docstring'
  summary = inspect.cleandoc(doc).splitlines()[0]
  assert summary.endswith('.'), f'the first line is not a one-line summary: {summary!r}'
  return sections(inspect.cleandoc(doc))


def check_examples(found: dict[str, str]) -> None:
  assert 'Examples' in found, 'has no Examples: section'
  assert '>>>' in found['Examples'], 'its Examples: section has nothing to run'


FUNCTIONS = [n for n in PUBLIC if inspect.isfunction(getattr(optax_lean, n))]


@pytest.mark.parametrize('name', FUNCTIONS)
def test_function_docstring(name):
  fn = getattr(optax_lean, name)
  found = parse(fn)
  assert 'Args' in found, 'has no Args: section'
  assert 'Returns' in found and found['Returns'].strip(), 'has no Returns: section'
  check_examples(found)
  parameters = {
    p.name
    for p in inspect.signature(fn).parameters.values()
    if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
  }
  missing = parameters - documented_names(found['Args'])
  assert not missing, f'Args: does not describe {sorted(missing)}'
  unknown = documented_names(found['Args']) - parameters
  assert not unknown, f'Args: describes {sorted(unknown)}, which are not parameters'
  if name not in NO_PAPER:
    assert 'arxiv.org/abs/' in found.get('References', ''), 'has no References: with an arXiv link'


@pytest.mark.parametrize('name', [n for n in PUBLIC if inspect.isclass(getattr(optax_lean, n))])
def test_class_docstring(name):
  cls = getattr(optax_lean, name)
  found = parse(cls)
  assert 'Attributes' in found, 'has no Attributes: section'
  missing = set(fields(cls)) - documented_names(found['Attributes'])
  assert not missing, f'Attributes: does not describe {sorted(missing)}'
  if not name.endswith('State'):
    check_examples(found)


def test_sections_parser_finds_what_is_missing():
  doc = 'Does a thing.\n\nArgs:\n  x: The input.\n\nReturns:\n  Nothing.\n'
  found = sections(doc)
  assert set(found) == {'Args', 'Returns'}
  assert documented_names(found['Args']) == {'x'}


def test_api_reference_lists_every_public_symbol():
  with open(os.path.join(ROOT, 'docs', 'api.rst')) as f:
    text = f.read()
  entries = r'^\.\. (?:autofunction|autoclass|data):: (\w+)$'
  documented = re.findall(entries, text, flags=re.MULTILINE)
  assert len(documented) == len(set(documented)), 'a symbol is documented twice'
  assert set(documented) == set(PUBLIC)


def test_readme_links_the_api_reference():
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  assert '](docs/api.rst)' in readme, 'README.md does not link the API reference'
  assert os.path.isfile(os.path.join(ROOT, 'docs', 'api.rst'))


def test_built_pages_load_no_remote_script(tmp_path):
  """The built reference renders its maths offline: every script it loads ships with it."""
  build = [sys.executable, '-m', 'sphinx', '-E', '-q', '-b', 'html', 'docs', str(tmp_path)]
  done = subprocess.run(build, cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  loads = re.compile(r'<(?:script|link)\b[^>]*\b(?:src|href)="([^"]+\.(?:js|css)[^"]*)"')
  pages = sorted(tmp_path.glob('*.html'))
  assert pages, 'sphinx-build wrote no pages'
  maths = 0
  for page in pages:
    text = page.read_text()
    for url in loads.findall(text):
      assert '//' not in url, f'{page.name} loads {url} from the network'
      assert (tmp_path / url.split('?')[0]).is_file(), f'{page.name} loads {url}, not built'
    maths += 'mathjax' in text
  assert maths, 'no page loads MathJax, so no page renders maths'
