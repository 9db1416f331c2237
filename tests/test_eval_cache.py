"""The evaluation cache shared by searches: each block trained once per fidelity and data,
also by searches running at the same time in other processes."""

import dataclasses
import json
import os
from pathlib import Path
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from blockqnn_jax.nsc import canonical
from blockqnn_jax.search import loop as search_lib
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.storage import eval_cache
from blockqnn_jax.storage import store as store_lib
from blockqnn_jax.storage.results import EvalResult
from configs import cifar
from tests.test_search import ScoringExecutor, _config

ROOT = Path(__file__).resolve().parents[1]


def _result(key, reward=0.5, status='ok', reason=''):
  return EvalResult(f'text-of-{key}', key, status, failure_reason=reason, val_accuracy=reward,
                    reward=reward if status == 'ok' else float('nan'), flops=3, density=1.5,
                    params=7)


def test_the_first_result_stored_is_the_one_everybody_reads(tmp_path):
  with eval_cache.EvalCache(tmp_path / 'c.sqlite', 'fid') as cache:
    assert cache.get('k', 1) is None
    first, other = cache.put('k', 1, _result('k', 0.25))
    assert not other and first.reward == 0.25
    again, other = cache.put('k', 1, _result('k', 0.75))  # trained a second time elsewhere
    assert other and again == first
    assert cache.get('k', 1) == first and cache.get('k', 2) is None
    assert np.isnan(cache.get('k', 1).final_loss)  # NaN fields survive the round trip
    # A failure that is about the block is a result; one about where it ran is not.
    cache.put('bad', 1, _result('bad', status='failed', reason='diverged: loss is nan'))
    kept, _ = cache.put('oom', 1, _result('oom', status='failed', reason='out of memory: x'))
    assert cache.get('bad', 1).failure_reason.startswith('diverged')
    assert cache.get('oom', 1) is None and kept.failure_reason.startswith('out of memory')
    assert cache.count() == 2
  with eval_cache.EvalCache(tmp_path / 'c.sqlite', 'other fidelity') as cache:
    assert cache.get('k', 1) is None and cache.count() == 0 and cache.count(True) == 2


def _splits(seed=0):
  from blockqnn_jax.data import readers
  return readers.load_splits('digits', validation_size=100, seed=seed, max_train=400)


def test_the_fidelity_covers_settings_and_data_but_not_how_it_is_compiled():
  s = SearchSettings.from_config(cifar.get_config('smoke'))
  train = dataclasses.replace(s.train, compute_dtype='float32')
  splits = _splits()
  base, description = eval_cache.fidelity_of(train, s.network, s.reward, splits)
  assert description['data'] == eval_cache.data_fingerprint(splits)
  same = lambda **t: eval_cache.fidelity_of(dataclasses.replace(train, **t), s.network,
                                            s.reward, splits)[0]
  assert same(loop='scan') == same(xla_cpu_fusion_emitters=True) == base
  assert same(flat_optimizer=False) == base
  assert same(epochs=train.epochs + 1) != base and same(compute_dtype='bfloat16') != base
  assert eval_cache.fidelity_of(train, dataclasses.replace(s.network, features=16), s.reward,
                                splits)[0] != base
  assert eval_cache.fidelity_of(train, s.network, dataclasses.replace(s.reward, mu=0.0),
                                splits)[0] != base
  assert eval_cache.fidelity_of(train, s.network, s.reward, _splits(seed=1))[0] != base
  assert eval_cache.fidelity_of(train, s.network, s.reward, _splits())[0] == base
  with pytest.raises(ValueError, match='auto'):
    eval_cache.fidelity_of(s.train, s.network, s.reward, splits)


def test_block_seeds_depend_on_the_block_only():
  assert eval_cache.block_seed('a') == eval_cache.block_seed('a') != eval_cache.block_seed('b')
  assert eval_cache.block_seed('a', 1) != eval_cache.block_seed('a')
  assert 0 <= eval_cache.block_seed('a') < 2**31


_WRITER = textwrap.dedent('''
    import json, sys, time
    from blockqnn_jax.storage import eval_cache
    from blockqnn_jax.storage.results import EvalResult
    path, name, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    cache = eval_cache.EvalCache(path, 'fid')
    while time.time() < start:  # both processes write at the same moment
      time.sleep(0.001)
    seen = {}
    for i in range(200):
      key = f'k{i}'
      got, _ = cache.put(key, 0, EvalResult(key, key, 'ok', reward=float(i), device=name))
      seen[key] = got.device
    print(json.dumps(seen))
''')


@pytest.mark.slow
def test_two_processes_writing_one_cache_lose_nothing_and_agree(tmp_path):
  path = tmp_path / 'shared.sqlite'
  eval_cache.EvalCache(path, 'fid').close()  # made before, as a search would find it
  start = time.time() + 3
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  procs = [subprocess.Popen([sys.executable, '-c', _WRITER, str(path), name, str(start)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for name in ('a', 'b')]
  outs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
  seen_a, seen_b = (json.loads(o) for o, _ in outs)
  assert seen_a == seen_b  # every block read the same by both: the one stored first
  with eval_cache.EvalCache(path, 'fid') as cache:
    assert cache.count() == 200  # nothing lost, nothing stored twice
    assert {k: cache.get(k, 0).device for k in seen_a} == seen_a


def _shared_search(config, workdir, cache_path, executor, data):
  config.search.eval_cache = str(cache_path)
  settings = SearchSettings.from_config(config)
  with search_lib.open_eval_cache(settings, data, 'cpu') as cache:
    return search_lib.run_search(settings, workdir, executor, progress=False,
                                 eval_cache=cache)


@pytest.mark.slow
def test_searches_sharing_a_cache_train_no_block_twice(tmp_path):
  data = _splits()
  first, second = ScoringExecutor(), ScoringExecutor()
  config = _config()
  one = _shared_search(config, tmp_path / 'a', tmp_path / 'c.sqlite', first, data)
  config = _config()
  config.seed = 1  # another search: other blocks, many the same
  two = _shared_search(config, tmp_path / 'b', tmp_path / 'c.sqlite', second, data)
  assert not set(first.submitted) & set(second.submitted)
  rows = {w: store_lib.ResultsStore.open_read_only(tmp_path / w).candidates() for w in 'ab'}
  shared = [c for c in rows['b'] if c.shared]
  assert shared and two.shared == len(shared) and one.shared == 0
  assert {c.canonical_key for c in shared} <= set(first.submitted)
  reward_a = {c.canonical_key: c.reward for c in rows['a'] if c.ok}
  for c in shared:
    assert c.cached is False and (not c.ok or c.reward == reward_a[c.canonical_key])
  # Distinct blocks of the second search: trained there or read from the cache.
  assert two.trained == len(set(second.submitted)) + two.shared


def test_a_search_naming_a_cache_needs_it_and_only_then():
  config = _config()
  executor = ScoringExecutor()
  config.search.eval_cache = 'somewhere.sqlite'
  with pytest.raises(ValueError, match='eval_cache'):
    search_lib.run_search(SearchSettings.from_config(config), '/nonexistent', executor)


@pytest.mark.slow
def test_two_searches_at_once_in_real_processes_share_one_cache(tmp_path):
  """Two smoke searches of different seeds run side by side on one cache: every block
  either of them trained is stored once, and each search records it as stored."""
  cache_path = tmp_path / 'cache.sqlite'
  common = ['--noprogress', f'--config.search.eval_cache={cache_path}', '--config.search.blocks_per_iteration=3',
            '--config.search.epsilon_schedule=((1.0,1),(0.1,1))', '--config.train.epochs=1',
            '--config.space.max_index=3', '--config.data.max_train=400',
            '--config.data.validation_size=100', '--config.data.holdout_seed=0']
  procs = [subprocess.Popen([sys.executable, '-m', 'experiments.search',
                             '--config=configs/cifar.py:smoke', f'--workdir={tmp_path / str(seed)}', f'--config.seed={seed}',
                             *common], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for seed in (0, 1)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[-3000:] for o in outs]
  stores = [store_lib.ResultsStore.open_read_only(tmp_path / str(s)) for s in (0, 1)]
  rows = [store.candidates() for store in stores]
  # The smoke preset's confirm rule trains some blocks again, each replicate from its seed.
  again = {(e.canonical_key, e.seed) for store in stores for e in store.evaluations()}
  trained = [c for r in rows for c in r if not c.cached]
  by_key = {}
  for c in trained:  # keyed as the search keys a block (a failed result may lack its key)
    key = canonical.canonical_key(c.parse_block())
    by_key.setdefault(key, set()).add((c.status, c.reward, c.val_accuracy))
  assert all(len(v) == 1 for v in by_key.values()), by_key  # read the same by both
  db = sqlite3.connect(cache_path)
  stored = db.execute('SELECT canonical_key, seed FROM results').fetchall()
  db.close()
  firsts = sorted(k for k, seed in stored if seed == eval_cache.block_seed(k))
  assert firsts == sorted(by_key)  # each block's first evaluation once, none lost
  assert set(stored) - {(k, eval_cache.block_seed(k)) for k in firsts} == again
