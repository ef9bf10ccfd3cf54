"""The family: every public optimizer of optax_lean, declared once for the tests.

Each ``Member`` says how to build the optimizer at test size, which NumPy
reference checks its update rule, and the properties the shared tests branch
on. The contract, input, sharding and checkpoint tests take their optimizers
from ``FAMILY`` (adding their own variants), and ``test_family_table.py``
fails when a public optimizer is missing from it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax

import optax_lean
from optax_lean._src.dimension_numbers import path_names


@dataclasses.dataclass(frozen=True)
class Member:
  """One optimizer of the family, as the tests build and classify it.

  Attributes:
    factory: The public constructor, ``factory(learning_rate, ...)``.
    options: Keyword arguments of a test-size run besides the rate, rank and
      gap (which ``make`` adds).
    reference: The test (``tests/<file>::<test>``) that checks its update
      against an independent NumPy reference of the official rule.
    learning_rate: A rate at which the contract's problems converge.
    low_rank: Whether it keeps a projector per selected matrix (takes ``rank``).
    refresh_gap: Whether it takes ``update_proj_gap`` (LDAdam refreshes every step).
    complex_leaves: Whether it handles complex matrices; otherwise it refuses
      them with a ``ValueError``.
    decays_after_update: Whether its weight decay is applied to the parameters
      after the update (the SN/SM family and GaLore-style chains) rather than
      folded into the direction (LDAdam, RSO).
  """

  factory: Callable[..., optax.GradientTransformation]
  reference: str
  options: dict[str, Any] = dataclasses.field(default_factory=dict)
  learning_rate: float = 1e-2
  low_rank: bool = True
  refresh_gap: bool = True
  complex_leaves: bool = True
  decays_after_update: bool = True

  def sizes(self, rank: int = 2, gap: int = 5) -> dict[str, Any]:
    """The options of a test-size run: ``rank`` and ``gap`` where the member takes them."""
    return {
      **({'rank': rank} if self.low_rank else {}),
      **({'update_proj_gap': gap} if self.low_rank and self.refresh_gap else {}),
      **self.options,
    }

  def make(self, *, rank: int = 2, gap: int = 5, **overrides: Any) -> optax.GradientTransformation:
    """The optimizer at test size, with ``overrides`` on top."""
    kwargs = {'learning_rate': self.learning_rate, **self.sizes(rank, gap), **overrides}
    return self.factory(**kwargs)


FAMILY: dict[str, Member] = {
  'adamsnsm': Member(optax_lean.adamsnsm, 'tests/test_reference.py::test_adamsnsm'),
  'adamsn': Member(optax_lean.adamsn, 'tests/test_reference.py::test_adamsn', low_rank=False),
  'rmsprop_sn': Member(
    optax_lean.rmsprop_sn, 'tests/test_reference.py::test_rmsprop_sn', low_rank=False
  ),
  'adagrad_sn': Member(
    optax_lean.adagrad_sn,
    'tests/test_reference.py::test_adagrad_sn',
    learning_rate=0.3,
    low_rank=False,
  ),
  'adagrad_snsm': Member(
    optax_lean.adagrad_snsm, 'tests/test_reference.py::test_adagrad_snsm', learning_rate=0.3
  ),
  'sgd_sm': Member(optax_lean.sgd_sm, 'tests/test_reference.py::test_sgd_sm'),
  'galore': Member(optax_lean.galore, 'tests/test_reference_family.py::test_galore'),
  'ldadam': Member(
    optax_lean.ldadam,
    'tests/test_reference_family.py::test_ldadam',
    refresh_gap=False,
    complex_leaves=False,
    decays_after_update=False,
  ),
  'online_subspace_descent': Member(
    optax_lean.online_subspace_descent,
    'tests/test_reference_family.py::test_online_subspace_descent',
    options={'base_learning_rate': 1e-2},
    complex_leaves=False,
  ),
  'rso': Member(
    optax_lean.rso, 'tests/test_reference_family.py::test_rso', decays_after_update=False
  ),
  'apollo': Member(optax_lean.apollo, 'tests/test_reference_family.py::test_apollo'),
  'apollo_mini': Member(optax_lean.apollo_mini, 'tests/test_reference_family.py::test_apollo'),
  'scale': Member(
    optax_lean.scale,
    'tests/test_reference_family.py::test_scale',
    options={'output_layer': False},  # the test problems have no head; variants name one
    low_rank=False,
    decays_after_update=False,
  ),
  'sumo': Member(optax_lean.sumo, 'tests/test_reference_family.py::test_sumo'),
}
LOW_RANK = [name for name, member in FAMILY.items() if member.low_rank]
REAL_ONLY = [name for name, member in FAMILY.items() if not member.complex_leaves]


def public_optimizers() -> list[str]:
  """The names optax_lean exports that build a whole optimizer.

  As in optax, those are the functions whose first argument is the learning
  rate, apart from the building blocks named ``scale_by_*`` and ``add_*``.
  """
  takes_rate = lambda f: list(inspect.signature(f).parameters)[:1] == ['learning_rate']
  return [
    name
    for name in optax_lean.__all__
    if not name.startswith(('scale_by_', 'add_'))
    and inspect.isfunction(getattr(optax_lean, name))
    and takes_rate(getattr(optax_lean, name))
  ]


def projected_leaves(state) -> set[str]:
  """Paths of the parameter leaves that hold a projector in ``state`` (any family member's)."""
  paths = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]:
    names = [getattr(key, 'name', None) for key in path]
    if 'projector' in names:
      paths.add('/'.join(path_names(path[names.index('projector') + 1 :])))
  return paths
