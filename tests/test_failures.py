"""Failing loudly and early: every bad input, through the real entry points, ends in one line
on stderr and exit status 2, before anything trains, and leaves nothing behind; a busy,
corrupt or foreign workdir is refused and left as it was; the preflight's checks in-process.

The subprocesses run together (they are independent), so the file stays well under two
minutes on two cores; only one of them (the corrected search) gets as far as training.
"""

import concurrent.futures
import dataclasses
import json
import os
from pathlib import Path
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from blockqnn_jax.data import readers
from blockqnn_jax.search import preflight
from blockqnn_jax.settings.final import FinalSettings
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.storage import store as store_lib
from blockqnn_jax.storage import workdir_lock
from blockqnn_jax.training.final import driver
from configs import cifar, cifar_final
from experiments import user_errors

REPO = Path(__file__).resolve().parents[1]
SEARCH = ('experiments.search', '--config=configs/cifar.py:smoke', '--noprogress',
          '--max_iterations=1', '--config.search.blocks_per_iteration=1',
          '--config.train.epochs=1')
TRAIN = ('experiments.train', '--config=configs/cifar_final.py:smoke')
# absl's log records ("I1202 12:57:44.854696 1402 search.py:87] ..."): not ours to count.
ABSL_RECORD = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d')

# name -> (entry point and its flags but --workdir, what the one line must name). Each runs
# on WORKDIRS/<name>, which does not exist unless SETUP makes it.
CASES = {
    'batch_size': (SEARCH + ('--config.train.batch_size=5000',),
                   ('preflight', 'train.batch_size=5000', '1038 training images')),
    'loop': (SEARCH + ('--config.train.loop=foo',), ('train.loop', "'foo'")),
    'validation_size': (SEARCH + ('--config.data.validation_size=0',),
                        ('data.validation_size', 'got 0')),
    'blocks_per_iteration': (SEARCH + ('--config.search.blocks_per_iteration=0',),
                             ('search.blocks_per_iteration', 'got 0')),
    'compute_dtype': (SEARCH + ('--config.train.compute_dtype=float16',),
                      ('train.compute_dtype', "'float16'")),
    'npz_path': (SEARCH + ('--config.data.path=X.npz',),
                 ("data.path='X.npz'", '--config.data.source=npz')),
    'epsilon_schedule': (SEARCH + ('--config.search.epsilon_schedule=((1.5, 2), (0.1, 1))',),
                         ('search.epsilon_schedule', '[0, 1]')),
    'unknown_field': (SEARCH + ('--config.train.batch_sizee=5',),
                      ('--config.train.batch_sizee', 'Did you mean "batch_size"')),
    'devices_per_candidate': (SEARCH + ('--config.executor.devices_per_candidate=2',),
                              ('executor.devices_per_candidate=2', '1 local cpu devices')),
    'corrupt_store': (SEARCH, ('search.sqlite', 'not a usable search database')),
    'foreign_store': (SEARCH, ('search.sqlite', 'something else', 'photos')),
    'report_missing': (('experiments.report',), ('report_missing', 'no search workdir')),
    'report_corrupt': (('experiments.report',), ('search.sqlite', 'not a search database')),
    'train_no_block': (TRAIN + ('--config.block=',), ('no block', 'config.block')),
    'train_bad_block': (TRAIN + ('--config.block=1,1,3',), ('invalid block', "'1,1,3'")),
    'verbose': (SEARCH + ('--config.train.loop=foo', '--verbose'), ('train.loop',)),
}


def _corrupt(workdir: Path) -> None:
  workdir.mkdir()
  (workdir / store_lib.DB_NAME).write_bytes(np.random.default_rng(0).bytes(8192))


def _foreign(workdir: Path) -> None:
  workdir.mkdir()
  db = sqlite3.connect(workdir / store_lib.DB_NAME)
  db.execute('CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT)')
  db.execute("INSERT INTO photos (path) VALUES ('holiday.jpg')")
  db.commit()
  db.close()


SETUP = {'corrupt_store': _corrupt, 'foreign_store': _foreign, 'report_corrupt': _corrupt}


def _env() -> dict[str, str]:
  """One CPU device (not the suite's eight): what a user's CPU-only run sees."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return {**env, 'JAX_PLATFORMS': 'cpu'}


def _command(args, workdir: Path) -> list[str]:
  return [sys.executable, '-m', *args, f'--workdir={workdir}']


def _ours(stderr: str) -> list[str]:
  """The lines of stderr that are not absl's log records."""
  return [line for line in stderr.splitlines() if line.strip() and not ABSL_RECORD.match(line)]


def _one_line(done: subprocess.CompletedProcess, *names: str) -> str:
  """Asserts a run ended with one line of ours on stderr naming ``names``; returns it."""
  assert done.returncode == user_errors.EXIT_STATUS, done.stderr[-3000:]
  assert 'Traceback' not in done.stderr, done.stderr[-3000:]
  lines = _ours(done.stderr)
  assert len(lines) == 1 and lines[0].startswith('error: '), done.stderr[-3000:]
  for name in names:
    assert name in lines[0], lines[0]
  return lines[0]


def _digest(path: Path) -> bytes:
  return path.read_bytes()


@dataclasses.dataclass
class Runs:
  root: Path
  done: dict[str, subprocess.CompletedProcess]
  before: dict[str, bytes]  # the database files the runs were given, byte for byte


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> Runs:
  """Every case of ``CASES``, run three at a time (each is mostly Python starting up)."""
  root = tmp_path_factory.mktemp('workdirs')
  before = {}
  for name, setup in SETUP.items():
    setup(root / name)
    before[name] = _digest(root / name / store_lib.DB_NAME)

  def run(name):
    args, _ = CASES[name]
    return name, subprocess.run(_command(args, root / name), cwd=REPO, env=_env(),
                                capture_output=True, text=True, timeout=300)

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    done = dict(pool.map(run, CASES))
  return Runs(root, done, before)


@pytest.mark.slow
@pytest.mark.parametrize('name', [n for n in CASES if n != 'verbose'])
def test_a_bad_input_ends_in_one_line(runs, name):
  _one_line(runs.done[name], *CASES[name][1])
  workdir = runs.root / name
  if name in SETUP:  # an existing workdir: refused, its database left exactly as it was
    assert _digest(workdir / store_lib.DB_NAME) == runs.before[name]
    assert not (workdir / 'compile_cache').exists() and not (workdir / 'tensorboard').exists()
  else:  # a new one: never made, not even half
    assert not workdir.exists()
    assert not [p for p in runs.root.iterdir() if p.name.startswith(f'.{name}.')]


@pytest.mark.slow
def test_verbose_shows_the_traceback(runs):
  done = runs.done['verbose']
  assert done.returncode == user_errors.EXIT_STATUS
  assert 'Traceback' in done.stderr and 'SettingsError' in done.stderr
  assert _ours(done.stderr)[-1].startswith('error: config: train.loop')  # the line comes last


@pytest.mark.slow
def test_a_refused_config_is_not_stored_and_a_busy_workdir_is_refused(runs):
  """The refused ε schedule left nothing: the corrected command runs on the same workdir,
  and a second search there meanwhile is refused at once, naming the first's pid."""
  workdir = runs.root / 'epsilon_schedule'
  assert not workdir.exists()
  # Long enough to still run while the second is refused; killed once that is shown.
  corrected = SEARCH[:3] + ('--config.search.blocks_per_iteration=1',
                            '--config.train.epochs=1',
                            '--config.search.epsilon_schedule=((1.0, 20), (0.1, 1))')
  log = runs.root / 'first.log'
  with open(log, 'w') as stderr:
    first = subprocess.Popen(_command(corrected, workdir), cwd=REPO, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=stderr)
  try:
    lock = workdir / workdir_lock.LOCK_FILE
    deadline = time.time() + 240
    holder = None
    while holder is None or holder.pid != first.pid:  # the preflight passed, the lock held
      assert first.poll() is None, log.read_text()[-3000:]
      assert time.time() < deadline, 'the corrected search never took its workdir'
      time.sleep(0.1)
      if lock.exists():
        holder = workdir_lock.Holder.from_bytes(lock.read_bytes())
    started = time.perf_counter()
    second = subprocess.run(_command(corrected, workdir), cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=120)
    refused_s = time.perf_counter() - started
    _one_line(second, 'workdir busy', f'pid {first.pid}', str(workdir))
    assert first.poll() is None, log.read_text()[-3000:]  # the first one still runs
    # Refused before loading data: no preflight ran (it takes seconds more than this).
    assert 'data digits' not in second.stderr, refused_s
    # The first one runs the corrected config: it is what the workdir stores.
    stored = None
    while stored is None:
      assert time.time() < deadline and first.poll() is None, log.read_text()[-3000:]
      time.sleep(0.1)
      if (workdir / store_lib.DB_NAME).exists():
        try:
          with store_lib.ResultsStore.open_read_only(workdir) as store:
            stored = store.get_meta('config')
        except store_lib.StoreError:  # caught mid-creation
          pass
    assert json.loads(stored)['search']['epsilon_schedule'] == [[1.0, 20], [0.1, 1]]
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()


@pytest.mark.slow
def test_retraining_holds_its_workdir(tmp_path):
  """A retraining run is refused at once on a workdir someone else holds (here another
  thread), before it resolves its block or loads any data."""
  settings = FinalSettings.from_config(cifar_final.get_config('smoke'))
  taken, done = threading.Event(), threading.Event()

  def hold():
    with workdir_lock.WorkdirLock(tmp_path, purpose='search'):
      taken.set()
      done.wait()

  holder = threading.Thread(target=hold)
  holder.start()
  taken.wait()
  try:
    with pytest.raises(workdir_lock.WorkdirBusy, match='in use by a search in pid'):
      driver.train_and_evaluate(settings, tmp_path)
  finally:
    done.set()
    holder.join()
  assert sorted(p.name for p in tmp_path.iterdir()) == [workdir_lock.LOCK_FILE]


# -- the preflight, in-process --------------------------------------------------------------


def _settings(**sections) -> SearchSettings:
  config = cifar.get_config('smoke')
  for section, fields in sections.items():
    config[section].update(fields)
  return SearchSettings.from_config(config)


@pytest.fixture(scope='module')
def digits():
  return readers.load_splits('digits', validation_size=200, max_train=1000)


def test_the_batch_must_fit_the_training_split(digits):
  with pytest.raises(preflight.PreflightError, match=r'train.batch_size=801 .* 800 training'):
    preflight.check_data(_settings(train=dict(batch_size=801)), digits)
  preflight.check_data(_settings(train=dict(batch_size=800)), digits)


def test_the_validation_split_must_not_be_empty(digits):
  empty = dataclasses.replace(digits, val_images=digits.val_images[:0],
                              val_labels=digits.val_labels[:0])
  with pytest.raises(preflight.PreflightError, match='validation split .* is empty'):
    preflight.check_data(_settings(), empty)


def test_devices_per_candidate_must_divide_the_devices_and_the_batch():
  devices = jax.local_devices()[:8]
  assert len(devices) == 8  # conftest's fake CPU devices
  with pytest.raises(preflight.PreflightError, match='=3 does not divide the 8 .* 1, 2, 4, 8'):
    preflight.check_devices(_settings(executor=dict(devices_per_candidate=3)), devices)
  with pytest.raises(preflight.PreflightError, match='train.batch_size=63 .* multiple of 2'):
    preflight.check_devices(_settings(executor=dict(devices_per_candidate=2),
                                      train=dict(batch_size=63)), devices)
  with pytest.raises(preflight.PreflightError, match='train.eval_batch_size=201'):
    preflight.check_devices(_settings(executor=dict(devices_per_candidate=2),
                                      train=dict(eval_batch_size=201)), devices,
                            streaming=True)
  preflight.check_devices(_settings(executor=dict(devices_per_candidate=4)), devices)


@pytest.mark.slow
def test_a_config_that_cannot_train_stops_at_the_reference_block(digits):
  """A learning rate that makes every candidate diverge is found in two steps, here on a
  group of two devices (the batch sharded), with the search's training settings."""
  settings = _settings(train=dict(learning_rate=1e30, batch_size=32),
                       network=dict(features=4),
                       executor=dict(devices_per_candidate=2))
  with pytest.raises(preflight.PreflightError,
                     match=r'on 2 cpu device\(s\) \(diverged: .*learning_rate'):
    preflight.run(settings, digits, jax.local_devices()[:8])


def test_every_user_error_name_resolves():
  """``USER_ERRORS`` names classes by their qualified names: a renamed one would be a
  traceback again."""
  types = user_errors.user_error_types()
  assert len(types) == len(user_errors.USER_ERRORS)
  for cls, name in zip(types, user_errors.USER_ERRORS):
    assert issubclass(cls, BaseException) and f'{cls.__module__}.{cls.__qualname__}' == name
