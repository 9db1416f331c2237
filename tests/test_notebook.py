"""The Colab notebook runs, top to bottom, at smoke scale on CPU: it cannot rot."""

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / 'notebooks' / 'blockqnn_colab.ipynb'

# Runs the whole notebook: the suite's slow part.
pytestmark = pytest.mark.slow


def test_notebook_runs_end_to_end(tmp_path):
  cells = json.loads(NOTEBOOK.read_text())['cells']
  code = '\n\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'code')
  script = tmp_path / 'notebook.py'
  script.write_text(code)
  env = {**os.environ, 'NOTEBOOK_SCALE': 'smoke', 'NOTEBOOK_WORKDIR': str(tmp_path / 'wd'),
         'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, str(script)], cwd=NOTEBOOK.parents[1], env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  assert (tmp_path / 'wd' / 'search' / 'report' / 'summary.md').exists()
  assert (tmp_path / 'wd' / 'final' / 'final.json').exists()
  assert (tmp_path / 'wd' / 'export' / 'variables.npz').exists()  # the exported network
