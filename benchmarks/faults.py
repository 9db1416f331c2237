r"""Fault injection: a real search killed with ``kill -9`` at random moments, then finished,
must end exactly as an uninterrupted one; and every bad input fails fast, in one line.

  python -m benchmarks.faults                  # 3 kills (seeded), then the comparison
  python -m benchmarks.faults --kills=5 --seed=1
  python -m benchmarks.faults --bad_inputs     # each bad input: its one line and seconds

The fault run is the smoke search (real training on scikit-learn's digits, through
``experiments.search``, each attempt a fresh process), sized by ``--blocks``, ``--schedule``
and ``--epochs``. Each kill lands at a seeded random moment of an attempt's search proper
(once its preflight passed and it holds the workdir), drawn uniformly within the time the
reference run needed for the candidates still missing; the next attempt resumes.
Afterwards every row ((iteration, position) -> nsc, reward, status) and the agent's Q
(``ResultsStore.load_agent``, bit for bit) must equal the uninterrupted run's; the exit
status says whether they do.

``--bad_inputs`` runs each bad command line once, alone, and prints the message it ended
with and how long it took to fail (wall seconds, process start to exit).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import numpy as np

from blockqnn_jax.storage import store as store_lib
from blockqnn_jax.storage import workdir_lock

_SEED = flags.DEFINE_integer('seed', 0, 'Seeds the kill moments.')
_KILLS = flags.DEFINE_integer('kills', 3, 'How many times the search is killed.')
_BLOCKS = flags.DEFINE_integer('blocks', 2, 'Blocks per iteration.')
_SCHEDULE = flags.DEFINE_string('schedule', '((1.0, 2), (0.5, 1))',
                                'The search\'s epsilon schedule, ((ε, iterations), ...).')
_EPOCHS = flags.DEFINE_integer('epochs', 1, 'Training epochs per candidate.')
_BAD_INPUTS = flags.DEFINE_bool('bad_inputs', False,
                                'Time the bad inputs instead of injecting faults.')
_ROOT = flags.DEFINE_string('root', None, 'Where the workdirs go (default: a temporary one).')

REPO = Path(__file__).resolve().parents[1]
SMOKE = ('experiments.search', '--config=configs/cifar.py:smoke', '--noprogress')
# absl's log records: not part of the one line.
_ABSL_RECORD = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d')


def _env() -> dict[str, str]:
  """A CPU-only user's environment: one device."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return {**env, 'JAX_PLATFORMS': 'cpu'}


def _start(args, workdir: Path, log: Path) -> subprocess.Popen:
  with open(log, 'ab') as out:
    return subprocess.Popen([sys.executable, '-m', *args, f'--workdir={workdir}'], cwd=REPO,
                            env=_env(), stdout=out, stderr=subprocess.STDOUT)


def _holds(workdir: Path, pid: int) -> bool:
  """Whether process ``pid`` holds ``workdir`` (its preflight passed, its search began)."""
  try:
    holder = workdir_lock.Holder.from_bytes((workdir / workdir_lock.LOCK_FILE).read_bytes())
  except OSError:
    return False
  return holder is not None and holder.pid == pid


def _rows(workdir: Path) -> list[tuple]:
  """(iteration, position, nsc, reward, status) of every recorded candidate; a missing
  reward (a failure) reads as None, so rows compare with ==."""
  if not (workdir / store_lib.DB_NAME).exists():
    return []
  try:
    with store_lib.ResultsStore.open_read_only(workdir) as store:
      return [(c.iteration, c.position, c.nsc,
               None if math.isnan(c.reward) else c.reward, c.status)
              for c in store.candidates()]
  except store_lib.StoreError:  # created but not yet initialised
    return []


def _agent(workdir: Path) -> tuple[int, dict[str, bytes]] | None:
  """The saved agent: its next iteration and every array (Q first of all) as exact bytes,
  with dtype and shape, so == compares them bit for bit."""
  with store_lib.ResultsStore.open_read_only(workdir) as store:
    saved = store.load_agent()
  if saved is None:
    return None
  exact = lambda a: a.dtype.str.encode() + repr(a.shape).encode() + a.tobytes()
  return saved[0], {k: exact(np.asarray(v)) for k, v in saved[1].items()}


def _wait_for_lock(process: subprocess.Popen, workdir: Path, log: Path | None = None) -> bool:
  """Waits until ``process`` holds ``workdir`` (and, given its ``log``, has passed its
  preflight: its search proper has begun); False if it exited first."""
  while not (_holds(workdir, process.pid) and
             (log is None or b'preflight passed' in log.read_bytes())):
    if process.poll() is not None:
      return False
    time.sleep(0.02)
  return True


@dataclasses.dataclass
class Attempt:
  started_s: float  # since the run's first start
  ready_s: float  # from process start to its search proper (preflight passed, workdir held)
  kill_after_s: float | None  # after that; None: run to completion
  killed: bool
  rows_before: int
  rows_after: int
  wall_s: float


def _search_args() -> tuple[str, ...]:
  return SMOKE + (f'--config.search.blocks_per_iteration={_BLOCKS.value}',
                  f'--config.search.epsilon_schedule={_SCHEDULE.value}',
                  f'--config.train.epochs={_EPOCHS.value}')


def _attempt(workdir: Path, log: Path, origin: float, kill_after: float | None) -> Attempt:
  rows_before = len(_rows(workdir))
  log.unlink(missing_ok=True)  # one attempt's log: its own "preflight passed"
  start = time.perf_counter()
  process = _start(_search_args(), workdir, log)
  held = _wait_for_lock(process, workdir, log)
  ready_s = time.perf_counter() - start
  killed = False
  if held and kill_after is not None:
    deadline = time.perf_counter() + kill_after
    while process.poll() is None and time.perf_counter() < deadline:
      time.sleep(0.01)
    if process.poll() is None:
      process.send_signal(signal.SIGKILL)
      killed = True
  code = process.wait()
  if not killed and code != 0:
    raise SystemExit(f'the search failed (exit {code}); see {log}')
  return Attempt(start - origin, ready_s, kill_after, killed, rows_before,
                 len(_rows(workdir)), time.perf_counter() - start)


def inject_faults(root: Path) -> bool:
  """The fault run against the reference; prints the table; True if they are equal."""
  reference, faulted = root / 'reference', root / 'faulted'
  origin = time.perf_counter()
  ref = _attempt(reference, root / 'reference.log', origin, None)
  ref_rows, ref_agent = _rows(reference), _agent(reference)
  search_s = ref.wall_s - ref.ready_s  # the reference's search proper, after its preflight
  print(f'reference: {len(ref_rows)} candidates, {ref.wall_s:.1f} s '
        f'({ref.ready_s:.1f} s start-up, data and preflight, {search_s:.1f} s searching)')

  rng = np.random.default_rng(_SEED.value)
  attempts = []
  origin = time.perf_counter()
  for _ in range(_KILLS.value):
    done = len(_rows(faulted))
    left = search_s * max(0.05, 1 - done / len(ref_rows))  # the reference's time for it
    attempt = _attempt(faulted, root / f'faulted{len(attempts) + 1}.log', origin,
                       float(rng.uniform(0, left)))
    attempts.append(attempt)
    if not attempt.killed:  # finished before its kill moment
      break
  if attempts[-1].killed:
    attempts.append(_attempt(faulted, root / f'faulted{len(attempts) + 1}.log', origin, None))
  total_s = time.perf_counter() - origin
  rows, agent = _rows(faulted), _agent(faulted)
  rows_equal, q_equal = rows == ref_rows, agent == ref_agent and 'q' in (agent or (0, {}))[1]

  print(f'\n{"attempt":>7} {"started":>8} {"ready":>7} {"kill at":>8} {"killed":>6} '
        f'{"rows before":>11} {"rows after":>10} {"wall":>7}')
  for i, a in enumerate(attempts, 1):
    kill = '-' if a.kill_after_s is None else f'{a.kill_after_s:.1f}'
    print(f'{i:>7} {a.started_s:>7.1f}s {a.ready_s:>6.1f}s {kill:>7}s '
          f'{"yes" if a.killed else "no":>6} {a.rows_before:>11} {a.rows_after:>10} '
          f'{a.wall_s:>6.1f}s')
  print('(started: since the first start; ready: process start to its search proper '
        '(start-up, data, preflight, workdir held); kill at: seconds after that; rows: '
        'candidates recorded when it started and ended)')
  kills = sum(a.killed for a in attempts)
  print(f'\n{kills} kill(s); faulted run {total_s:.1f} s in all vs {ref.wall_s:.1f} s '
        'uninterrupted')
  print(f'rows equal (nsc, reward, status per (iteration, position)): '
        f'{"yes" if rows_equal else "NO"} ({len(rows)} vs {len(ref_rows)})')
  print(f'Q (and every other saved agent array) and the next iteration equal, bit for bit: '
        f'{"yes" if q_equal else "NO"}')
  if not rows_equal:
    for a, b in zip(rows, ref_rows):
      if a != b:
        print(f'  first difference: {a} != {b}')
        break
  return rows_equal and q_equal and kills == _KILLS.value


# -- bad inputs -----------------------------------------------------------------------------

_SEARCH = SMOKE + ('--max_iterations=1', '--config.search.blocks_per_iteration=1',
                   '--config.train.epochs=1')
_TRAIN = ('experiments.train', '--config=configs/cifar_final.py:smoke')
BAD_INPUTS = (
    ('train.batch_size=5000', _SEARCH + ('--config.train.batch_size=5000',)),
    ('train.loop=foo', _SEARCH + ('--config.train.loop=foo',)),
    ('data.validation_size=0', _SEARCH + ('--config.data.validation_size=0',)),
    ('search.blocks_per_iteration=0', _SEARCH + ('--config.search.blocks_per_iteration=0',)),
    ('train.compute_dtype=float16', _SEARCH + ('--config.train.compute_dtype=float16',)),
    ('data.path=X.npz (source digits)', _SEARCH + ('--config.data.path=X.npz',)),
    ('search.epsilon_schedule=((1.5, 2), (0.1, 1))',
     _SEARCH + ('--config.search.epsilon_schedule=((1.5, 2), (0.1, 1))',)),
    ('executor.devices_per_candidate=2 (1 device)',
     _SEARCH + ('--config.executor.devices_per_candidate=2',)),
    ('train.learning_rate=1e30', _SEARCH + ('--config.train.learning_rate=1e30',)),
    ('train.batch_sizee=5 (typo)', _SEARCH + ('--config.train.batch_sizee=5',)),
    ('train.batch_size=abc', _SEARCH + ('--config.train.batch_size=abc',)),
    ('--config=configs/nope.py', _SEARCH + ('--config=configs/nope.py',)),
    ('corrupt search.sqlite', _SEARCH),
    ('foreign SQLite file', _SEARCH),
    ('busy workdir (a search runs)', _SEARCH),
    ('report: missing workdir', ('experiments.report',)),
    ('report: corrupt search.sqlite', ('experiments.report',)),
    ('train: no block', _TRAIN + ('--config.block=',)),
    ('train: block 1,1,3', _TRAIN + ('--config.block=1,1,3',)),
)


def _prepare(name: str, workdir: Path, log: Path) -> subprocess.Popen | None:
  """Makes the workdir a case needs; a busy one gets a search holding it (returned)."""
  if 'corrupt' in name:
    workdir.mkdir()
    (workdir / store_lib.DB_NAME).write_bytes(np.random.default_rng(0).bytes(8192))
  elif 'foreign' in name:
    import sqlite3  # pylint: disable=import-outside-toplevel
    workdir.mkdir()
    db = sqlite3.connect(workdir / store_lib.DB_NAME)
    db.execute('CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT)')
    db.commit()
    db.close()
  elif 'busy' in name:
    holder = _start(SMOKE + ('--config.search.epsilon_schedule=((1.0, 50),)',), workdir, log)
    if not _wait_for_lock(holder, workdir):
      raise SystemExit(f'the holding search failed; see {log}')
    return holder
  return None


def time_bad_inputs(root: Path) -> bool:
  """Runs each bad input alone; prints its one line and seconds; True if all failed in one
  line with exit status 2 and left no new workdir."""
  rows, good = [], True
  for i, (name, args) in enumerate(BAD_INPUTS):
    workdir = root / f'case{i}'
    holder = _prepare(name, workdir, root / f'holder{i}.log')
    existed = workdir.exists()
    before = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()} if existed else {}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, '-m', *args, f'--workdir={workdir}'], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if holder is not None:
      holder.send_signal(signal.SIGKILL)
      holder.wait()
    ours = [l for l in done.stderr.splitlines() if l.strip() and not _ABSL_RECORD.match(l)]
    left = 'no'
    if existed:
      db = store_lib.DB_NAME
      if db in before and (workdir / db).read_bytes() != before[db]:
        left, good = 'DB CHANGED', False
    elif workdir.exists() or any(p.name.startswith(f'.{workdir.name}.') for p in root.iterdir()):
      left, good = 'YES', False
    ok = done.returncode == 2 and len(ours) == 1 and 'Traceback' not in done.stderr
    good &= ok
    rows.append((name, done.returncode, seconds, left, ours[-1] if ours else '(nothing)', ok))
  print(f'{"bad input":<46} {"exit":>4} {"seconds":>7}  {"left behind":<11} one line')
  for name, code, seconds, left, line, ok in rows:
    print(f'{name:<46} {code:>4} {seconds:>7.1f}  {left:<11} {line}'
          + ('' if ok else '   <-- NOT ONE LINE / EXIT 2'))
  return good


def main(argv):
  del argv
  root = Path(_ROOT.value) if _ROOT.value else Path(tempfile.mkdtemp(prefix='faults_'))
  root.mkdir(parents=True, exist_ok=True)
  try:
    good = time_bad_inputs(root) if _BAD_INPUTS.value else inject_faults(root)
  finally:
    if not _ROOT.value:
      shutil.rmtree(root, ignore_errors=True)
  if not good:
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
