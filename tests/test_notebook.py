"""The quick-start notebook runs top to bottom and is committed without outputs."""

import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'quickstart.ipynb')


def read():
  return nbformat.read(NOTEBOOK, as_version=4)


def test_committed_without_outputs():
  for index, cell in enumerate(read().cells):
    if cell.cell_type == 'code':
      assert cell.outputs == [], f'code cell {index} has outputs: strip them before committing'
      assert cell.execution_count is None, f'code cell {index} has an execution count'


@pytest.fixture(scope='module')
def executed():
  notebook = read()
  NotebookClient(
    notebook,
    timeout=600,
    kernel_name='python3',
    resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}},
  ).execute()
  return notebook


def printed(notebook) -> str:
  return ''.join(
    output.get('text', '')
    for cell in notebook.cells
    if cell.cell_type == 'code'
    for output in cell.outputs
    if output.output_type == 'stream'
  )


def test_runs_and_draws_both_figures(executed):
  images = [
    output
    for cell in executed.cells
    if cell.cell_type == 'code'
    for output in cell.outputs
    if 'image/png' in output.get('data', {})
  ]
  assert len(images) == 2  # the memory bar chart and the loss curves


def test_what_the_prose_says_is_what_it_prints(executed):
  text = printed(executed)
  assert 'a NaN step:     notfinite_count = 1 | parameters unchanged: True' in text
  difference = float(re.search(r'stacked vs layer by layer: (\S+)', text).group(1))
  assert difference < 1e-5
  memory = dict(re.findall(r'^(AdamW|AdamSN|AdamSNSM \(rank 512\)) +([\d.]+) GiB', text, re.M))
  assert float(memory['AdamSNSM (rank 512)']) < float(memory['AdamSN']) < float(memory['AdamW'])
  final = dict(re.findall(r'^(\w+) +validation loss ([\d.]+), optimizer state', text, re.M))
  assert set(final) == {'AdamW', 'AdamSN', 'AdamSNSM'}
  # Every optimizer learns: from ln(vocabulary) = 4.5 nats at initialization.
  assert all(float(loss) < 2.5 for loss in final.values())
