"""The search loop: resume after an interrupt (also a real kill -9), reuse, config guard."""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
import shlex
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

from blockqnn_jax.nsc import canonical
from blockqnn_jax.search import loop as search_lib
from blockqnn_jax.settings import base
from blockqnn_jax.settings.agent import AgentSettings
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.storage import store as store_lib
from blockqnn_jax.storage.results import EvalResult
from blockqnn_jax.training import compile_cache
from configs import cifar


def _search(config, workdir, executor, **kwargs):
  """The search of a config file's ConfigDict, as the entry point runs it."""
  return search_lib.run_search(SearchSettings.from_config(config), workdir, executor, **kwargs)


def paper_search(config):
  """``config`` with the paper's agent and no budget or confirm rule: the smoke preset runs
  the fast agent with its confirm rule (tests/test_study.py covers those), and these tests
  count iterations, repeats and trainings as the paper's search makes them."""
  config.agent.update(dataclasses.asdict(AgentSettings()))
  config.search.budget = 0
  config.search.confirm = 1
  return config


def _config(iterations=((1.0, 3), (0.5, 2), (0.1, 2)), blocks=4, max_index=4):
  config = paper_search(cifar.get_config('smoke'))
  config.space.max_index = max_index
  config.search.blocks_per_iteration = blocks
  config.search.epsilon_schedule = iterations
  config.agent.replay_size = 8
  return config


class ScoringExecutor:
  """Stands in for training: a deterministic reward per canonical block, instantly.

  It counts what it was asked to train, so tests can tell whether anything trained twice.
  Blocks with a 5x5 convolution "fail", to exercise failures as results.
  """

  def __init__(self):
    self.submitted = []

  def submit(self, block, seed=0):
    key = canonical.canonical_key(block)
    self.submitted.append(key)
    score = int(hashlib.sha256(key.encode()).hexdigest()[:6], 16) / 16**6
    future = concurrent.futures.Future()
    if any(l.type == 1 and l.kernel == 5 for l in block.layers):
      future.set_result(EvalResult(block.to_text(), key, 'failed',
                                   failure_reason='error: RuntimeError: boom'))
    else:
      future.set_result(EvalResult(block.to_text(), key, 'ok', val_accuracy=score,
                                   reward=score, flops=1, density=1.0, params=1))
    return future


def _rows(workdir):
  store = store_lib.ResultsStore(workdir)
  rows = [(c.iteration, c.position, c.nsc, c.reward, c.status) for c in store.candidates()]
  next_iteration, arrays = store.load_agent()
  store.close()
  return rows, next_iteration, arrays


@pytest.mark.slow
def test_search_records_every_candidate_and_never_trains_a_block_twice(tmp_path):
  executor = ScoringExecutor()
  summary = _search(_config(), tmp_path, executor, progress=False)
  assert summary.iterations_done == 7 and summary.candidates == 28
  assert len(executor.submitted) == len(set(executor.submitted)) == summary.trained
  assert summary.trained + summary.cached == 28
  store = store_lib.ResultsStore(tmp_path)
  by_key = {}
  for c in store.candidates():
    by_key.setdefault(c.canonical_key, set()).add((c.status, c.reward))
  assert all(len(v) == 1 for v in by_key.values())  # a reused reward is the trained one
  assert summary.failed == store.count("WHERE status = 'failed'")
  assert (tmp_path / 'tensorboard').is_dir() and any((tmp_path / 'tensorboard').iterdir())


@pytest.mark.parametrize('stop_at', [(0, 0), (2, 1), (4, 3)])
def test_interrupted_search_resumes_exactly(tmp_path, stop_at):
  config = _config()
  reference = tmp_path / 'reference'
  _search(config, reference, ScoringExecutor(), progress=False)

  def interrupt(iteration, position, result):
    if (iteration, position) == stop_at:
      raise KeyboardInterrupt

  interrupted = tmp_path / 'interrupted'
  with pytest.raises(KeyboardInterrupt):
    _search(config, interrupted, ScoringExecutor(), progress=False,
                          on_recorded=interrupt)
  store = store_lib.ResultsStore(interrupted)
  finished = {c.canonical_key for c in store.candidates() if not c.cached}
  store.close()
  assert finished
  resumed = ScoringExecutor()
  _search(config, interrupted, resumed, progress=False)

  rows, next_iteration, arrays = _rows(interrupted)
  ref_rows, ref_next, ref_arrays = _rows(reference)
  assert rows == ref_rows and next_iteration == ref_next == 7
  np.testing.assert_array_equal(arrays['q'], ref_arrays['q'])  # same Q, bit for bit
  # Nothing finished was trained again, and nothing twice.
  assert not set(resumed.submitted) & finished
  assert len(resumed.submitted) == len(set(resumed.submitted))


def test_changed_config_is_refused_unless_allowed(tmp_path):
  _search(_config(), tmp_path, ScoringExecutor(), max_iterations=1,
                        progress=False)
  changed = _config()
  changed.agent.alpha = 0.5
  with pytest.raises(base.ConfigMismatch, match='agent.alpha'):
    _search(changed, tmp_path, ScoringExecutor(), progress=False)
  summary = _search(changed, tmp_path, ScoringExecutor(), max_iterations=1,
                                  allow_config_change=True, progress=False)
  assert summary.iterations_done == 2
  moved = changed.copy_and_resolve_references()
  moved.executor.devices_per_candidate = 2  # how, not what: resumes without the flag
  summary = _search(moved, tmp_path, ScoringExecutor(), max_iterations=1,
                                  progress=False)
  assert summary.iterations_done == 3


_KILLABLE = textwrap.dedent('''
    import concurrent.futures, hashlib, sys, time
    from blockqnn_jax.nsc import canonical
    from blockqnn_jax.search import loop as search
    from blockqnn_jax.storage.results import EvalResult
    from blockqnn_jax.settings.search import SearchSettings
    from configs import cifar

    class SlowExecutor:
      def submit(self, block, seed=0):
        key = canonical.canonical_key(block)
        with open(sys.argv[2], 'a') as log:
          log.write(key + '\\n')
        time.sleep(0.05)
        score = int(hashlib.sha256(key.encode()).hexdigest()[:6], 16) / 16**6
        future = concurrent.futures.Future()
        future.set_result(EvalResult(block.to_text(), key, 'ok', val_accuracy=score,
                                     reward=score, flops=1, density=1.0, params=1))
        return future

    from tests.test_search import paper_search
    config = paper_search(cifar.get_config('smoke'))
    config.space.max_index = 5
    config.search.blocks_per_iteration = 6
    config.search.epsilon_schedule = ((1.0, 6), (0.3, 6))
    search.run_search(SearchSettings.from_config(config), sys.argv[1], SlowExecutor(),
                      progress=False)
''')


@pytest.mark.slow
def test_kill_9_loses_only_candidates_in_flight(tmp_path):
  script = tmp_path / 'search_script.py'
  script.write_text(_KILLABLE)
  env = {**os.environ, 'PYTHONPATH': os.getcwd(), 'JAX_PLATFORMS': 'cpu'}
  run = lambda workdir, log: subprocess.Popen([sys.executable, str(script), str(workdir),
                                               str(log)], env=env)
  reference, killed = tmp_path / 'reference', tmp_path / 'killed'
  assert run(reference, tmp_path / 'ref.log').wait(timeout=300) == 0

  process = run(killed, tmp_path / 'first.log')
  deadline = time.time() + 120
  while time.time() < deadline:  # kill it mid-search, once a few candidates are recorded
    if (killed / 'search.sqlite').exists():
      store = store_lib.ResultsStore(killed)
      done = store.count()
      store.close()
      if done >= 20:
        break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  store = store_lib.ResultsStore(killed)
  recorded_before = {c.canonical_key for c in store.candidates() if not c.cached}
  assert 20 <= store.count() < 72  # killed mid-search: 12 iterations x 6 blocks in all
  store.close()
  assert run(killed, tmp_path / 'second.log').wait(timeout=300) == 0

  rows, _, arrays = _rows(killed)
  ref_rows, _, ref_arrays = _rows(reference)
  assert rows == ref_rows
  np.testing.assert_array_equal(arrays['q'], ref_arrays['q'])
  retrained = set((tmp_path / 'second.log').read_text().split())
  assert not retrained & recorded_before  # no finished candidate trained again


def _readme_search_command() -> list[str]:
  """The search command of the README's "Set up and run" section, as a new user runs it."""
  text = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
  section = text.split('\n## Set up and run\n', 1)[1].split('\n## ', 1)[0]
  line = next(l for l in section.splitlines() if l.startswith('python -m experiments.search'))
  return shlex.split(line)


@pytest.mark.slow
def test_the_readme_search_command_runs(tmp_path):
  """The main job exactly as the README gives it (smoke preset, digits that ship with
  scikit-learn), in a workdir of its own; scripts/smoke runs the same command."""
  command = _readme_search_command()
  root = Path(__file__).resolve().parents[1]
  assert ' '.join(command[2:]) in (root / 'scripts' / 'smoke').read_text().replace(
      ' \\\n  ', ' ')
  command = [sys.executable] + command[1:-1] + [f'--workdir={tmp_path}']
  out = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=root,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'best reward' in out.stdout and 'kept block:' in out.stdout
  assert 'TPU' not in out.stderr  # JAX's INFO lines a CPU user cannot act on are hidden
  store = store_lib.ResultsStore(tmp_path)
  # The preset's budget of 28 trainings, spent (the last iteration's confirmations may
  # overshoot it by a few), on blocks that learn: far above chance on ten digits.
  assert 28 <= store.trainings() <= 28 + 4
  assert store.best().val_accuracy > 0.8
  store.close()
  # The README's export of that search's block runs as written on its workdir.
  text = (root / 'README.md').read_text()
  section = text.split('\n## Use the found block elsewhere\n', 1)[1].split('\n## ', 1)[0]
  line = next(l for l in section.splitlines() if '--workdir=workdirs/smoke ' in l)
  export = shlex.split(line.replace('workdirs/smoke', str(tmp_path)).replace(
      'workdirs/export_torch', str(tmp_path / 'export')))
  out = subprocess.run([sys.executable] + export[1:], capture_output=True, text=True,
                       timeout=300, cwd=root, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'BLOCK = ' in (tmp_path / 'export' / 'network.py').read_text()
  # The persistent compilation cache: the workdir's, or the suite's (conftest).
  assert any(compile_cache.search_directory(tmp_path).iterdir())


def test_a_search_keeps_its_programs_in_the_users_jax_cache_else_in_its_workdir(tmp_path):
  previous = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update('jax_compilation_cache_dir', None)
    assert compile_cache.search_directory(tmp_path) == tmp_path.resolve() / 'compile_cache'
    jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'mine'))
    assert compile_cache.search_directory(tmp_path) == tmp_path / 'mine'
  finally:
    jax.config.update('jax_compilation_cache_dir', previous)


class ThreadedScoringExecutor(ScoringExecutor):
  """ScoringExecutor's rewards, but each candidate takes a while on one of three workers, in
  an order set by ``jitter``: results come back out of order, as from a real cluster."""

  def __init__(self, jitter=0):
    super().__init__()
    self.pool = concurrent.futures.ThreadPoolExecutor(3)
    self.jitter = jitter
    self.outstanding = self.max_outstanding = 0
    self.lock = threading.Lock()

  def submit(self, block, seed=0):
    delay = (hash((canonical.canonical_key(block), self.jitter)) % 7) / 500
    with self.lock:
      self.outstanding += 1
      self.max_outstanding = max(self.max_outstanding, self.outstanding)
    done = super().submit(block, seed).result()

    def run():
      time.sleep(delay)
      with self.lock:
        self.outstanding -= 1
      return done
    return self.pool.submit(run)


class _CollectedFuture(concurrent.futures.Future):
  """A candidate's future that tells its executor when the search first reads the result."""

  def __init__(self, executor):
    super().__init__()
    self.executor = executor
    self.collected = False

  def result(self, timeout=None):
    value = super().result(timeout)
    if not self.collected:
      self.collected = True
      self.executor.uncollected -= 1
    return value


class _AheadCountingExecutor(ThreadedScoringExecutor):
  """ThreadedScoringExecutor that also counts, as each candidate is submitted, the candidates
  the search has sent out and not yet read a result of: how far the search feeds the workers
  ahead of what it has learned from.

  The workers' own backlog (``max_outstanding``) depends on how fast they run against the
  search's thread: under load they can finish one iteration before the search submits the
  next, however far ahead it may sample. This count moves only on the search's own calls,
  so it is the same on every run.
  """

  def __init__(self, jitter):
    super().__init__(jitter)
    self.uncollected = self.max_uncollected = 0

  def submit(self, block, seed=0):
    training = super().submit(block, seed)
    handed = _CollectedFuture(self)
    training.add_done_callback(lambda done: handed.set_result(done.result()))
    self.uncollected += 1
    self.max_uncollected = max(self.max_uncollected, self.uncollected)
    return handed


@pytest.mark.slow
@pytest.mark.parametrize('staleness', [0, 2])
def test_asynchronous_search_samples_the_same_blocks_whatever_the_timing(tmp_path, staleness):
  config = _config(iterations=((1.0, 3), (0.5, 3), (0.1, 3)), blocks=6, max_index=5)
  config.search.max_staleness = staleness
  runs = []
  for jitter in (1, 2):  # two timings: the workers finish the candidates in other orders
    executor = _AheadCountingExecutor(jitter)
    _search(config, tmp_path / f'run{jitter}', executor, progress=False)
    runs.append(_rows(tmp_path / f'run{jitter}'))
    # Strict iterations never have more than one iteration's blocks out; S > 0 feeds the
    # workers the next iterations' blocks before it has the current one's results.
    assert (executor.max_uncollected > 6) == (staleness > 0)
    if staleness == 0:
      assert executor.max_outstanding <= 6  # holds however fast the workers run
    assert len(executor.submitted) == len(set(executor.submitted))  # nothing twice
  (rows, next_iteration, arrays), (rows2, _, arrays2) = runs
  assert rows == rows2 and next_iteration == 9 and len(rows) == 54
  np.testing.assert_array_equal(arrays['q'], arrays2['q'])


@pytest.mark.slow
def test_asynchronous_search_resumes_exactly(tmp_path):
  config = _config(iterations=((1.0, 3), (0.5, 3), (0.1, 3)), blocks=6, max_index=5)
  config.search.max_staleness = 2
  _search(config, tmp_path / 'reference', ThreadedScoringExecutor(),
                        progress=False)
  seen = []

  def interrupt(iteration, position, result):
    seen.append(iteration)
    if len(seen) == 20:
      raise KeyboardInterrupt
  interrupted = tmp_path / 'interrupted'
  with pytest.raises(KeyboardInterrupt):
    _search(config, interrupted, ThreadedScoringExecutor(3), progress=False,
                          on_recorded=interrupt)
  # Split the rest over calls too: the sampled-ahead iterations are kept for the next call.
  _search(config, interrupted, ThreadedScoringExecutor(4), max_iterations=2,
                        progress=False)
  _search(config, interrupted, ThreadedScoringExecutor(5), progress=False)
  rows, next_iteration, arrays = _rows(interrupted)
  ref_rows, _, ref_arrays = _rows(tmp_path / 'reference')
  assert rows == ref_rows and next_iteration == 9
  np.testing.assert_array_equal(arrays['q'], ref_arrays['q'])


def test_workdir_from_before_a_config_field_existed_resumes(tmp_path):
  """A stored config without a later-added field ran with its default: not a change."""
  config = _config()
  _search(config, tmp_path, ScoringExecutor(), max_iterations=1, progress=False)
  store = store_lib.ResultsStore(tmp_path)
  old = json.loads(store.get_meta('config'))
  del old['search']['max_staleness'], old['train']['loop']
  store.set_meta('config', json.dumps(old))
  store.close()
  summary = _search(config, tmp_path, ScoringExecutor(), max_iterations=1,
                                  progress=False)
  assert summary.iterations_done == 2
  config.search.max_staleness = 1  # but a value other than the default is a change
  with pytest.raises(base.ConfigMismatch, match='search.max_staleness'):
    _search(config, tmp_path, ScoringExecutor(), progress=False)


_STRATEGIES = {
    'qlearning': {},
    'qlearning_fast': {'agent.budget_sized': True, 'agent.exploration': 'mutation',
                       'agent.avoid_repeats': True, 'agent.max_resamples': 8,
                       'agent.alpha': 1.0, 'agent.q_init': 0.0, 'agent.replay_size': 0},
    'random': {'search.strategy': 'random'},
    'evolution': {'search.strategy': 'evolution', 'search.population': 4,
                  'search.tournament': 2},
    'local_search': {'search.strategy': 'local_search'},
}


def _strategy_config(name, staleness):
  config = _config(iterations=((1.0, 2), (0.5, 2), (0.1, 2)), blocks=3, max_index=5)
  config.search.max_staleness = staleness
  for field, value in _STRATEGIES[name].items():
    section, key = field.split('.')
    config[section][key] = value
  return config


@pytest.mark.slow
@pytest.mark.parametrize('staleness', [0, 1])
@pytest.mark.parametrize('name', sorted(_STRATEGIES))
def test_every_strategy_resumes_exactly(tmp_path, name, staleness):
  """Killed after any record, each strategy samples what it would have: its state is saved
  with the search (and an ask that moves it, with what it sampled)."""
  config = _strategy_config(name, staleness)
  _search(config, tmp_path / 'reference', ScoringExecutor(), progress=False)
  ref_rows, ref_next, ref_arrays = _rows(tmp_path / 'reference')
  assert ref_next == 6 and len(ref_rows) == 18
  for stop in ((1, 1), (3, 2)):
    def interrupt(iteration, position, result, stop=stop):
      if (iteration, position) == stop:
        raise KeyboardInterrupt
    workdir = tmp_path / f'interrupted{stop[0]}'
    with pytest.raises(KeyboardInterrupt):
      _search(config, workdir, ScoringExecutor(), progress=False, on_recorded=interrupt)
    _search(config, workdir, ScoringExecutor(), progress=False)
    rows, next_iteration, arrays = _rows(workdir)
    assert rows == ref_rows and next_iteration == ref_next
    assert sorted(arrays) == sorted(ref_arrays)
    for key in arrays:
      np.testing.assert_array_equal(arrays[key], ref_arrays[key])


@pytest.mark.slow
def test_strategies_differ_and_the_paper_agent_is_the_default(tmp_path):
  sampled = {}
  for name in ('qlearning', 'random', 'evolution'):
    _search(_strategy_config(name, 0), tmp_path / name, ScoringExecutor(), progress=False)
    sampled[name] = [r[2] for r in _rows(tmp_path / name)[0]]
  assert len({tuple(v) for v in sampled.values()}) == 3
  with store_lib.ResultsStore(tmp_path / 'evolution') as store:
    assert json.loads(store.get_meta('config'))['search']['strategy'] == 'evolution'


def test_a_workdir_saved_before_strategies_resumes_as_the_paper_agent(tmp_path):
  """Older workdirs saved the agent as ``q`` and ``memory_<field>``."""
  config = _config()
  _search(config, tmp_path / 'reference', ScoringExecutor(), progress=False)
  old = tmp_path / 'old'
  _search(config, old, ScoringExecutor(), max_iterations=2, progress=False)
  with store_lib.ResultsStore(old) as store:
    next_iteration, arrays = store.load_agent()
    legacy = {'q': arrays['q'], **{f'memory_{k[len("memory."):]}': v
                                   for k, v in arrays.items() if k.startswith('memory.')}}
    store.save_agent(next_iteration, legacy)
  _search(config, old, ScoringExecutor(), progress=False)
  rows, _, arrays = _rows(old)
  ref_rows, _, ref_arrays = _rows(tmp_path / 'reference')
  assert rows == ref_rows
  np.testing.assert_array_equal(arrays['q'], ref_arrays['q'])


def test_a_store_being_created_shows_another_process_no_tables_or_all_of_them(
    tmp_path, monkeypatch):
  """A reader that opens the store while the search is creating it (the kill -9 test polls
  this way) must not find a half-made schema, which it would refuse as someone else's data."""
  connect, seen = sqlite3.connect, []

  def tables(connect_with):  # what a new connection to the store sees
    with contextlib.closing(connect_with(tmp_path / store_lib.DB_NAME)) as db:
      names = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {r[0] for r in names} - {'sqlite_sequence'}

  def look(statement):  # runs as each statement of the creating connection starts
    if statement.lstrip().upper().startswith('CREATE'):
      seen.append(tables(connect))

  def watched(*args, **kwargs):
    db = connect(*args, **kwargs)
    db.set_trace_callback(look)
    return db

  monkeypatch.setattr(sqlite3, 'connect', watched)
  store_lib.ResultsStore(tmp_path).close()
  monkeypatch.undo()
  every_table = tables(sqlite3.connect)
  assert len(seen) >= 6 and {'meta', 'candidates'} <= every_table
  assert all(tables in (set(), every_table) for tables in seen), seen


def test_the_agent_state_is_stored_compressed_and_read_back_exactly(tmp_path):
  """A replay memory sized to its capacity is mostly empty: stored as it is, a fast agent's
  iteration took 675 KB of the store, and a search keeps one per iteration."""
  rng = np.random.default_rng(0)
  memory = np.zeros((16384, 6), np.int32)
  memory[:40] = rng.integers(0, 24, (40, 6))
  arrays = {'state.q': rng.random((95, 41), dtype=np.float32), 'state.memory.states': memory}
  with store_lib.ResultsStore(tmp_path) as store:
    store.save_sampled(0, arrays)
    store.save_agent(1, arrays)
    got_sampled, (next_iteration, got_agent) = store.load_sampled(0), store.load_agent()
  assert next_iteration == 1
  for got in (got_sampled, got_agent):
    assert got.keys() == arrays.keys()
    for k, v in arrays.items():
      np.testing.assert_array_equal(got[k], v)
      assert got[k].dtype == v.dtype
  raw = memory.nbytes + arrays['state.q'].nbytes
  assert (tmp_path / 'search.sqlite').stat().st_size < raw / 4


def test_compact_shrinks_a_store_written_uncompressed_and_keeps_what_it_holds(tmp_path):
  memory = np.zeros((16384, 6), np.int32)
  memory[:3] = 7
  arrays = {'state.memory.states': memory, 'states': np.arange(12, dtype=np.int32)}
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)  # how stores were written before compression
  with store_lib.ResultsStore(tmp_path) as store:
    store.record(0, 0, 1.0, EvalResult(block='1,1,3,0,0 2,7,0,0,0', canonical_key='k',
                                       status='ok', val_accuracy=0.5, reward=0.5),
                 cached=False)
    for i in range(5):
      store._db.execute('INSERT INTO sampled VALUES (?, ?)', (i, buffer.getvalue()))
    store._db.execute('INSERT INTO agent_state VALUES (0, 5, ?, 0.0)', (buffer.getvalue(),))
    store._db.commit()
  with store_lib.ResultsStore(tmp_path) as store:
    before = store.path.stat().st_size
    saved = store.compact()
    assert saved > 0.8 * 6 * memory.nbytes and store.path.stat().st_size < before / 5
    assert [c.reward for c in store.candidates()] == [0.5]
    for got in [store.load_sampled(i) for i in range(5)] + [store.load_agent()[1]]:
      for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
    assert store.load_agent()[0] == 5
  compacted = (tmp_path / 'search.sqlite').read_bytes()
  with store_lib.ResultsStore(tmp_path) as store:
    assert store.compact() == 0
  assert (tmp_path / 'search.sqlite').read_bytes() == compacted  # no churn in git


def test_a_search_stops_at_its_budget_of_distinct_candidates_and_stays_stopped(tmp_path):
  config = _config(iterations=((1.0, 2), (0.5, 20)), blocks=4)
  config.search.budget = 10
  executor = ScoringExecutor()
  summary = _search(config, tmp_path, executor, progress=False)
  assert 10 <= summary.trained < 10 + 4  # stops after the iteration that reached it
  assert summary.iterations_done < 22
  again = ScoringExecutor()
  resumed = _search(config, tmp_path, again, progress=False)
  assert again.submitted == [] and resumed.candidates == summary.candidates


@pytest.mark.slow
def test_the_progress_bar_counts_what_ends_the_search_and_resumes_where_it_was(tmp_path,
                                                                                capsys):
  """With a budget the bar counts trainings (re-evaluations too) up to the budget; a resumed
  search's bar starts at what the workdir has."""
  config = cifar.get_config('smoke')  # a budget of 28 trainings, the confirm rule on
  config.space.max_index = 4
  settings = SearchSettings.from_config(config)
  search_lib.run_search(settings, tmp_path, ScoringExecutor(), max_iterations=2)
  first = capsys.readouterr().err
  store = store_lib.ResultsStore(tmp_path)
  half = store.trainings()
  store.close()
  assert f'{half}/28 [' in first and 'training' in first
  search_lib.run_search(settings, tmp_path, ScoringExecutor())
  resumed = capsys.readouterr().err
  store = store_lib.ResultsStore(tmp_path)
  trainings = store.trainings()
  store.close()
  frames = [f for f in resumed.split('\r') if f.strip()]
  assert f'{half}/28 [' in frames[0]  # where the interrupted search stopped
  assert trainings >= 28 and f'{trainings}/{trainings} [' in frames[-1]  # done: a full bar
