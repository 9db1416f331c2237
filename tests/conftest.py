"""Suite-wide set-up: XLA's CPU backend at -O1, one compilation cache for the run, eight fake
CPU devices, the shared real data when it exists, and a note of the quick subset's tests that
have grown slow."""

import atexit
import os
from pathlib import Path
import shutil
import tempfile

import chex
import jax
import pytest

# Must run before any test touches a JAX backend; subprocesses inherit both flags.
# LLVM at -O1 instead of -O2 compiles the suite's many small programs faster at the same
# results (the pinned search digests hold at either level); a level the caller set wins.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = ' '.join(
      [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=1']).strip()
# One persistent compilation cache for the whole run, which subprocesses (searches,
# benchmarks, the notebook) inherit: a program several tests compile (the smoke preset's
# blocks, a module's candidate) compiles once. Empty at the start, so a run is timed cold;
# a cache the caller set wins.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix='blockqnn-tests-xla-cache-')
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
  jax.config.update('jax_compilation_cache_dir', _cache_dir)  # jax read the variables before
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
chex.set_n_cpu_devices(8)

# A test not marked slow should take at most this long (call and set-up) on a 2-core CPU,
# so that `-m "not slow"` stays a loop of about two minutes.
QUICK_LIMIT_S = 2.0


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


_unmarked_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
  if report.when in ('setup', 'call') and 'slow' not in report.keywords:
    _unmarked_seconds[report.nodeid] = _unmarked_seconds.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
  """Names the unmarked tests that took longer than ``QUICK_LIMIT_S`` (a hint: the
  machine may only have been busy)."""
  over = sorted(((s, n) for n, s in _unmarked_seconds.items() if s > QUICK_LIMIT_S),
                reverse=True)
  if over:
    terminalreporter.write_sep('-', f'not marked slow, over {QUICK_LIMIT_S:.0f} s')
    for seconds, nodeid in over:
      terminalreporter.write_line(f'{seconds:6.1f} s  {nodeid}')
