"""Installs: exact versions from the lock, version ranges for library users, no deprecations."""

import os
import re

import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name: str) -> str:
  with open(os.path.join(ROOT, name)) as f:
    return f.read()


def requirement_names(requirements: list[str]) -> set[str]:
  return {
    re.split(r'[\s<>=!~\[;]', r, maxsplit=1)[0].lower().replace('_', '-') for r in requirements
  }


def test_license_is_an_spdx_expression():
  """A TOML-table license makes every setuptools >= 77 build print a deprecation warning."""
  project = tomllib.loads(read('pyproject.toml'))
  assert isinstance(project['project']['license'], str)
  assert 'setuptools>=77' in project['build-system']['requires']


def test_make_install_uses_the_lock_and_the_lock_pins_every_dependency():
  makefile = read('Makefile')
  assert re.search(r'pip install .*-c \$\(LOCK\).* -e', makefile)
  assert re.search(r'^lock:', makefile, re.MULTILINE)
  lock = {
    line.split('==')[0].lower().replace('_', '-')
    for line in read('requirements.lock').splitlines()
    if '==' in line
  }
  project = tomllib.loads(read('pyproject.toml'))['project']
  wanted = requirement_names(project['dependencies'])
  for extra in project['optional-dependencies'].values():
    wanted |= requirement_names(extra) - {'optax-lean'}
  assert wanted <= lock, sorted(wanted - lock)


def test_library_users_keep_version_ranges():
  project = tomllib.loads(read('pyproject.toml'))['project']
  assert all('==' not in r for r in project['dependencies'])
