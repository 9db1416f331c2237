"""Suite-wide set-up: eight fake CPU devices, and the shared real data when it exists."""

import os
from pathlib import Path

import chex
import pytest

# Must run before any test touches a JAX backend.
chex.set_n_cpu_devices(8)


@pytest.fixture
def shared_data() -> Path:
  """``../shared/data`` beside the repository (``BLOCKQNN_SHARED_DATA`` overrides).

  A user's clone has no ``../shared``: tests that need it skip.
  """
  default = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
  path = Path(os.environ.get('BLOCKQNN_SHARED_DATA', default))
  if not (path / 'README.md').exists():
    pytest.skip(f'shared data not found at {path}')
  return path
