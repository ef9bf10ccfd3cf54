"""The one place where a benchmark's tables go to the file named by ``--out``."""

from __future__ import annotations


def write(sections: list[str], path: str | None) -> None:
  """Writes the tables to ``path``, separated by blank lines; nothing if ``path`` is ``None``."""
  if path:
    with open(path, 'w') as f:
      f.write('\n\n'.join(sections) + '\n')
