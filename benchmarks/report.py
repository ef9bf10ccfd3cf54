"""The one place where a benchmark's tables and figures go: ``--out`` and ``--json``."""

from __future__ import annotations

import json
from typing import Any


def write(sections: list[str], path: str | None) -> None:
  """Writes the tables to ``path``, separated by blank lines; nothing if ``path`` is ``None``."""
  if path:
    with open(path, 'w') as f:
      f.write('\n\n'.join(sections) + '\n')


def save(sections: list[str], out: str | None, results: Any, json_path: str | None) -> None:
  """``write``s the tables to ``out`` and dumps ``results`` as JSON to ``json_path`` (if given)."""
  write(sections, out)
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(results, f, indent=2)
