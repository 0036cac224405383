"""The Colab TPU notebook runs top to bottom (on the CPU, tiny, without installing)."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import ROOT, assert_picture

NOTEBOOK = ROOT / 'notebooks' / 'colab_tpu.ipynb'


def test_notebook_parameters_come_first():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c.source for c in nb.cells if c.cell_type == 'code']
  assert code[0].splitlines()[0].startswith('# Parameters')
  assert "REPO_URL = '" in code[0] and 'MIL_JAX_NOTEBOOK_TEST' in code[0]
  assert 'if INSTALL:' in code[1]


def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
  # The kernel inherits this environment: the test switch, the CPU, the checkout.
  monkeypatch.setenv('MIL_JAX_NOTEBOOK_TEST', '1')
  monkeypatch.setenv('MIL_JAX_NOTEBOOK_WORKDIR', str(tmp_path / 'runs'))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(ROOT)}})
  try:
    client.execute()
  except Exception as e:  # nbclient's CellExecutionError carries the cell's traceback
    pytest.fail(f'the notebook failed: {e}')
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) == 3  # loss curve, reconstructions, probe accuracy
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'device(s): cpu' in text and 'linear probe top-1' in text
  for name in ('mae/loss.png', 'mae/reconstructions.png', 'probe/accuracy.png'):
    assert_picture(tmp_path / 'runs' / name, min_side=100, curves=0 if 'recon' in name else 2)
