"""The family table (``tests/family.py``) is complete and true to the constructors."""

import importlib
import inspect

import pytest

from tests.family import FAMILY, public_optimizers


def test_the_table_lists_every_public_optimizer():
  missing = sorted(set(public_optimizers()) - set(FAMILY))
  assert not missing, f'public optimizers missing from tests/family.py: {missing}'
  assert sorted(FAMILY) == sorted(public_optimizers())


@pytest.mark.parametrize('name', list(FAMILY))
def test_each_member_names_its_reference_test(name):
  path, test = FAMILY[name].reference.split('::')
  module = importlib.import_module(path.removesuffix('.py').replace('/', '.'))
  assert inspect.isfunction(getattr(module, test, None)), FAMILY[name].reference


@pytest.mark.parametrize('name', list(FAMILY))
def test_each_members_properties_match_its_constructor(name):
  member = FAMILY[name]
  accepted = inspect.signature(member.factory).parameters
  assert member.low_rank == ('rank' in accepted)
  assert member.refresh_gap == ('update_proj_gap' in accepted or not member.low_rank)
  assert set(member.options) <= set(accepted)
