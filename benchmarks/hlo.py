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
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # source paths shown from here
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
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
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
      trips = _TRIP_COUNT.search(line) if ' while(' in line else None
      for called in _CALLED.findall(line):
        work = work_of(called)
        for _ in range(int(trips.group(1)) if trips else 1):  # a loop's body, each trip
          total.add(work)
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


@dataclasses.dataclass(frozen=True)
class Buffer:
  """One buffer live at a compiled program's peak: what makes it, its shape, where from."""

  name: str  # the HLO instruction, with its tuple index when it is part of a tuple
  size: int  # bytes on one device
  op: str  # the HLO opcode (a fusion names its kind), or 'parameter'
  shape: str
  jax_op: str  # the JAX operation it lowers (metadata op_name)
  source: str  # the innermost Python frame, ``file:line (function)``


_INSTRUCTION = re.compile(r'^%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$')
_LIVE = re.compile(r'^\s+([\w.\-]+)\{([\d,]*)\}: (\d+) bytes')
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_FRAME = re.compile(r'stack_frame_id=(\d+)')
_FUSION_KIND = re.compile(r'kind=(k\w+)')


def _split_tuple(shape: str) -> list[str]:
  """The element shapes of a tuple shape ``(a, b, ...)`` (nesting kept whole)."""
  inner, parts, depth, start = shape[1:-1], [], 0, 0
  for i, char in enumerate(inner):
    depth += char in '([{'
    depth -= char in ')]}'
    if char == ',' and depth == 0:
      parts.append(inner[start:i].strip())
      start = i + 1
  parts.append(inner[start:].strip())
  return [re.sub(r'/\*index=\d+\*/', '', part).strip() for part in parts if part]


def _stack_frames(text: str) -> dict[int, str]:
  """``stack_frame_id -> 'file:line (function)'`` from the module's frame tables."""
  tables: dict[str, dict[int, str]] = {}
  table = None
  for line in text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      table = tables.setdefault(line, {})
      continue
    match = re.match(r'^(\d+) (.*)$', line)
    if table is not None and match is not None:
      table[int(match.group(1))] = match.group(2)
    else:
      table = None
  files = {k: v.strip('"') for k, v in tables.get('FileNames', {}).items()}
  functions = {k: v.strip('"') for k, v in tables.get('FunctionNames', {}).items()}
  fields = lambda entry: dict(re.findall(r'(\w+)=(\d+)', entry))
  locations = {}
  for key, entry in tables.get('FileLocations', {}).items():
    f = fields(entry)
    path = files.get(int(f['file_name_id']), '?')
    for marker in ('site-packages/', f'{ROOT}/'):
      path = path.split(marker, 1)[-1]
    locations[key] = f'{path}:{f["line"]} ({functions.get(int(f["function_name_id"]), "?")})'
  return {
    key: locations.get(int(fields(entry)['file_location_id']), '?')
    for key, entry in tables.get('StackFrames', {}).items()
  }


def peak_buffers(live_range_text: str, hlo_text: str) -> list[Buffer]:
  """The buffers live at the peak of a compiled program, largest first.

  Args:
    live_range_text: XLA's ``*-live-range.txt`` dump of the program (its
      ``Live ranges at N (peak)`` section lists each live buffer's bytes).
    hlo_text: The optimized HLO dump of the same program, for each buffer's
      opcode, shape, JAX operation and source line.
  """
  instructions = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line.strip())
    if match:
      instructions[match.group(1)] = match
  frames = _stack_frames(hlo_text)
  lines = live_range_text.splitlines()
  start = next((i for i, line in enumerate(lines) if '(peak)' in line), len(lines))
  buffers = []
  for line in lines[start + 1 :]:
    live = _LIVE.match(line)
    if live is None:
      break
    name, index, size = live.group(1), live.group(2), int(live.group(3))
    found = instructions.get(name)
    op = shape = jax_op = source = '?'
    if found is not None:
      shape, op, rest = found.group(2), found.group(3), found.group(4)
      if index and shape.startswith('('):
        parts = _split_tuple(shape)
        shape = parts[int(index.split(',')[0])] if int(index.split(',')[0]) < len(parts) else shape
      shape = re.sub(r'\{[\d,]*\}', '', shape)
      kind = _FUSION_KIND.search(rest)
      op = f'fusion:{kind.group(1)[1:]}' if op == 'fusion' and kind else op
      op_name = _OP_NAME.search(rest)
      jax_op = op_name.group(1).replace("\\'", "'") if op_name else ''
      frame = _FRAME.search(rest)
      source = frames.get(int(frame.group(1)), '') if frame else ''
    buffers.append(Buffer(f'{name}{{{index}}}' if index else name, size, op, shape, jax_op, source))
  return sorted(buffers, key=lambda b: -b.size)


@dataclasses.dataclass(frozen=True)
class BufferGroup:
  """The buffers live at a peak that one source line makes with one HLO op."""

  count: int
  size: int  # bytes on one device, all of them
  largest: Buffer


def group_buffers(buffers: list[Buffer]) -> list[BufferGroup]:
  """``buffers`` grouped by HLO op, JAX op and source line, largest total first.

  A step holds many buffers of one kind (every layer's gathered weight), so
  the groups say what the peak is made of where single buffers tie.
  """
  groups: dict[tuple[str, str, str], list[Buffer]] = {}
  for buffer in buffers:
    groups.setdefault((buffer.op, buffer.jax_op, buffer.source), []).append(buffer)
  return sorted(
    (
      BufferGroup(len(members), sum(b.size for b in members), max(members, key=lambda b: b.size))
      for members in groups.values()
    ),
    key=lambda g: -g.size,
  )
