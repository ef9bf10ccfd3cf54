"""What a compiled SPMD program does per device, read from its optimized HLO text.

``compiled.cost_analysis()`` counts the matrix decompositions of a program
(LAPACK and cuSOLVER custom calls) as zero FLOPs. ``decomposition_flops``
finds them in the per-device HLO instead and applies the standard flop counts
to their operand shapes; ``collective_bytes`` adds up what the collectives
move. A conditional counts its cheapest branch: the only ones left in a
refresh are warm starts (an exact SVD only from an all-zero basis).
"""

from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {'f16': 2, 'bf16': 2, 'f32': 4, 'f64': 8, 'c64': 8, 'c128': 16, 's32': 4, 'u32': 4}
COLLECTIVES = ('all-gather', 'all-to-all', 'reduce-scatter', 'all-reduce', 'collective-permute')
# custom-call target fragment -> flops of one real (m, n) matrix.
DECOMPOSITIONS = {
  'gesdd': lambda m, n: 6 * max(m, n) * min(m, n) ** 2 + 20 * min(m, n) ** 3,  # R-SVD, thin U
  'gesvd': lambda m, n: 6 * max(m, n) * min(m, n) ** 2 + 20 * min(m, n) ** 3,
  'geqrf': lambda m, n: 2 * m * n * min(m, n) - 2 * min(m, n) ** 3 // 3,  # Householder QR
  'orgqr': lambda m, n: 2 * m * n * min(m, n) - 2 * min(m, n) ** 3 // 3,  # forming thin Q
  'ungqr': lambda m, n: 2 * m * n * min(m, n) - 2 * min(m, n) ** 3 // 3,
  'syevd': lambda m, n: 9 * n**3,  # symmetric eigendecomposition with vectors
  'heevd': lambda m, n: 9 * n**3,
}
_SHAPE = re.compile(r'\b([a-z]+\d*)\[([\d,]*)\]')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_BRANCHES = re.compile(
  r'(?:branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+), '
  r'false_computation=%?([\w.\-]+))'
)
_CALLED = re.compile(r'(?:calls|body|to_apply)=%?([\w.\-]+)')


@dataclasses.dataclass
class Work:
  """Per-device decomposition work: flops and how many matrices, by kind."""

  flops: float = 0.0
  matrices: dict[str, int] = dataclasses.field(default_factory=dict)

  def add(self, other: Work) -> None:
    self.flops += other.flops
    for kind, count in other.matrices.items():
      self.matrices[kind] = self.matrices.get(kind, 0) + count


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  """The HLO module's computations (name -> instruction lines) and the entry's name."""
  computations, entry, name = {}, '', None
  for line in text.splitlines():
    match = _COMPUTATION.match(line)
    if match and not line.startswith(' '):
      name = match.group(1)
      computations[name] = []
      if line.startswith('ENTRY'):
        entry = name
    elif name is not None and line.strip() == '}':
      name = None
    elif name is not None:
      computations[name].append(line.strip())
  return computations, entry


def _decomposition(line: str) -> Work | None:
  """The work of one decomposition custom call, from its first result's shape."""
  target = _TARGET.search(line)
  if 'custom-call(' not in line or target is None:
    return None
  kind = next((k for k in DECOMPOSITIONS if k in target.group(1)), None)
  if kind is None:
    return None
  dtype, dims = _SHAPE.search(line.split('=', 1)[1]).groups()
  *batch, m, n = (int(d) for d in dims.split(','))
  count = math.prod(batch)
  complex_factor = 4 if dtype.startswith('c') else 1
  return Work(complex_factor * count * DECOMPOSITIONS[kind](m, n), {kind: count})


def decomposition_work(text: str) -> Work:
  """Per-device flops of the decompositions in a compiled program's HLO text."""
  computations, entry = _computations(text)
  memo: dict[str, Work] = {}

  def work_of(name: str) -> Work:
    if name in memo:
      return memo[name]
    total = Work()
    memo[name] = total  # guards against recursion
    for line in computations.get(name, ()):
      found = _decomposition(line)
      if found is not None:
        total.add(found)
      branches = _BRANCHES.search(line) if ' conditional(' in line else None
      if branches is not None:
        names = (
          [b.strip().lstrip('%') for b in branches.group(1).split(',')]
          if branches.group(1)
          else [branches.group(2), branches.group(3)]
        )
        total.add(min((work_of(b) for b in names), key=lambda w: w.flops))
        continue
      for called in _CALLED.findall(line):
        total.add(work_of(called))
    return total

  return work_of(entry)


def collective_bytes(text: str) -> dict[str, int]:
  """Bytes each kind of collective produces per device (its results' sizes), summed."""
  moved: dict[str, int] = {}
  for line in text.splitlines():
    for kind in COLLECTIVES:
      if f' {kind}(' in line or f' {kind}-start(' in line:
        result = line.split('=', 1)[1].split(kind, 1)[0]
        size = sum(
          DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(',') if d)
          for dtype, dims in _SHAPE.findall(result)
        )
        moved[kind] = moved.get(kind, 0) + size
  return moved
