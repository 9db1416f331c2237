"""Tests of the search report: loading the database, top blocks, plots and the summary page.

The database is faked with the search's schema (written out here, not imported from the
store), filled with valid random blocks whose reward improves as ε drops, some rewards
reused for repeated blocks and some failures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
import random
import sqlite3
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.report import analysis
from blockqnn_jax.report import figures as figures_lib
from blockqnn_jax.report import layout as layout_lib
from blockqnn_jax.report import page as page_lib
from blockqnn_jax.storage import results
from blockqnn_jax.storage import store as store_lib
from blockqnn_jax.storage.store import DB_NAME

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE candidates (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  iteration INTEGER NOT NULL, position INTEGER NOT NULL,
  epsilon REAL NOT NULL,
  nsc TEXT NOT NULL, canonical_key TEXT NOT NULL,
  cached INTEGER NOT NULL,
  status TEXT NOT NULL, failure_reason TEXT NOT NULL,
  reward REAL, val_accuracy REAL, flops INTEGER, density REAL, params INTEGER, final_loss REAL,
  compile_s REAL, train_s REAL, eval_s REAL, total_s REAL, device TEXT,
  created_at REAL NOT NULL,
  UNIQUE(iteration, position));
"""

OOM = 'RESOURCE_EXHAUSTED: out of memory while compiling'
NAN_LOSS = 'non-finite loss at step 120'


def random_block(rng: random.Random, num_layers: int,
                 grammar: nsc.Grammar = nsc.Grammar()) -> nsc.Block:
  """A valid block of ``num_layers`` layers before the terminal, drawn uniformly per field
  (drawn again when it merges a tensor with itself through identity-like layers)."""
  while True:
    try:
      return _draw_block(rng, num_layers, grammar)
    except nsc.NSCError:
      continue


def _draw_block(rng: random.Random, num_layers: int, grammar: nsc.Grammar) -> nsc.Block:
  layers = []
  for index in range(1, num_layers + 1):
    types = grammar.layer_types if index >= 2 else (1, 2, 3, 4)  # layer 1 has one input
    kind = rng.choice(types)
    pred1 = rng.randrange(index)
    pred2 = 0
    if kind in nsc.MERGE_TYPES:
      pred2 = rng.choice([p for p in range(index) if p != pred1])
    layers.append(nsc.Layer(index, kind, rng.choice(grammar.kernels(kind)), pred1, pred2))
  layers.append(nsc.Layer(num_layers + 1, nsc.LayerType.TERMINAL))
  return nsc.validate(nsc.Block(tuple(layers)), grammar)


def make_database(path: Path, phases=((1.0, 4), (0.5, 2), (0.1, 2)), per_iteration: int = 8,
                  seed: int = 0, max_layers: int = 8) -> Path:
  """Writes a fake search database; returns its path.

  Exploitation is mimicked by drawing low-ε blocks from the best blocks seen so far, so the
  reward rises as ε drops and repeats hit the cache (reward reused, no timings, as the
  store records them). Every 7th fresh block fails, with one of two reasons.
  """
  rng = random.Random(seed)
  db = sqlite3.connect(path)
  db.executescript(SCHEMA)
  db.execute('INSERT INTO meta VALUES (?, ?)',
             ('config', json.dumps({'search': {'blocks_per_iteration': per_iteration}})))
  db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
  trained: dict[str, tuple] = {}  # canonical key -> the values a reuse copies
  clock, iteration, fresh = 1.7e9, 0, 0
  for epsilon, iterations in phases:
    for _ in range(iterations):
      for position in range(per_iteration):
        good = sorted((v for v in trained.values() if v[1] == 'ok'), key=lambda v: -v[3])[:3]
        if good and rng.random() > epsilon:
          block = nsc.Block.parse(rng.choice(good)[0])
        else:
          block = random_block(rng, rng.randint(1, max_layers))
        key = canonical.canonical_key(block)
        if key in trained:
          text, status, reason, reward, acc, flops, density, params = trained[key]
          values = (block.to_text(), key, 1, status, reason, reward, acc, flops, density, params,
                    None, None, None, None, None, None)
        else:
          fresh += 1
          total = rng.uniform(20, 60)
          if fresh % 7 == 0:
            status, reason = 'failed', OOM if fresh % 2 else NAN_LOSS
            reward = acc = flops = params = None
            density = block.density()
          else:
            status, reason = 'ok', ''
            acc = min(0.95, 0.35 + 0.4 * (1 - epsilon) + rng.gauss(0, 0.05)
                      + 0.02 * len(block.body))
            flops = int(1e6 * len(block.body) * rng.uniform(5, 50))
            params = int(flops / 50)
            density = block.density()
            reward = acc - 0.01 * math.log(flops / 1e7)
          trained[key] = (block.to_text(), status, reason, reward, acc, flops, density, params)
          values = (block.to_text(), key, 0, status, reason, reward, acc, flops, density, params,
                    None if reward is None else 1.2, 2.0, total - 3.0, 1.0, total, 'cpu:0')
          clock += total
        db.execute(
            'INSERT INTO candidates (iteration, position, epsilon, nsc, canonical_key, cached, '
            'status, failure_reason, reward, val_accuracy, flops, density, params, final_loss, '
            'compile_s, train_s, eval_s, total_s, device, created_at) '
            'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
            (iteration, position, epsilon, *values, clock))
      iteration += 1
  db.commit()
  db.close()
  return path


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp('search')
  make_database(path / DB_NAME)
  return path


@pytest.fixture(scope='module')
def written(workdir) -> Path:
  return page_lib.write_report(workdir, top_k=5)


def assert_png(path: Path, min_side: int = 150):
  assert path.is_file(), path
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  with Image.open(path) as image:
    image.load()
    width, height = image.size
    pixels = np.asarray(image.convert('L'))
  assert width >= min_side and height >= min_side, (path, image.size)
  assert pixels.std() > 5, f'{path} looks blank'


def test_load_candidates(workdir):
  rows = page_lib.load_candidates(workdir)
  assert len(rows) == 8 * 8
  assert [(r.iteration, r.position) for r in rows] == sorted((r.iteration, r.position)
                                                             for r in rows)
  assert any(r.cached for r in rows)
  failed = [r for r in rows if not r.ok]
  assert failed and all(math.isnan(r.reward) and r.failure_reason for r in failed)
  assert page_lib.load_candidates(workdir / DB_NAME) == rows  # the file works too


def test_top_blocks_distinct_and_sorted(workdir):
  rows = page_lib.load_candidates(workdir)
  top = analysis.top_blocks(rows, 5)
  assert len(top) == 5
  rewards = [r.reward for r in top]
  assert rewards == sorted(rewards, reverse=True)
  assert len({r.canonical_key for r in top}) == 5
  best_ok = max(r.reward for r in rows if r.ok)
  assert top[0].reward == best_ok
  assert analysis.top_blocks(rows, 0) == []
  assert len(analysis.top_blocks(rows, 10_000)) == len({r.canonical_key for r in rows if r.ok})


def test_nan_rewards_count_as_failures():
  row = results.Candidate(id=1, iteration=0, position=0, epsilon=1.0,
                          block='1,1,3,0,0 2,7,0,0,0', canonical_key='k', cached=False,
                          status='ok', reward=float('nan'))
  assert not row.ok
  assert analysis.top_blocks([row], 3) == []


def test_a_candidate_stopped_at_a_rung_is_counted_and_never_ranked(tmp_path):
  def row(i, key, reward, stopped_at=0, cached=False):
    return results.Candidate(id=i, iteration=i, position=0, epsilon=1.0,
                             block='1,1,3,0,0 2,7,0,0,0', canonical_key=key, cached=cached,
                             status='ok', reward=reward, stopped_at=stopped_at,
                             created_at=100.0 + i, total_s=1.0)
  # b's rung reward beats c's final one, but b never trained to the end: a lower fidelity.
  rows = [row(1, 'a', 0.6), row(2, 'b', 0.55, stopped_at=1), row(3, 'c', 0.5),
          row(4, 'b', 0.55, stopped_at=1, cached=True)]
  assert [r.canonical_key for r in analysis.top_blocks(rows, 5)] == ['a', 'c']
  summary = analysis.summarize(rows)
  assert summary.stopped == 1  # the reuse of b was not trained
  assert '| Stopped at a rung | 1 ' in page_lib.render_summary(summary, [], {})
  assert 'Stopped at a rung' not in page_lib.render_summary(analysis.summarize(rows[:1]), [], {})


def test_summarize(workdir):
  rows = page_lib.load_candidates(workdir)
  s = analysis.summarize(rows)
  assert s.candidates == 64 and s.iterations == 8
  assert s.cached == sum(r.cached for r in rows) > 0
  assert s.cache_hit_rate == pytest.approx(s.cached / 64)
  assert s.distinct_blocks == len({r.canonical_key for r in rows})
  assert dict(s.failure_reasons).keys() <= {OOM, NAN_LOSS}
  assert sum(n for _, n in s.failure_reasons) == s.failed
  assert [e.epsilon for e in s.by_epsilon] == [1.0, 0.5, 0.1]
  first, last = s.exploration_vs_exploitation()
  assert last.mean_reward > first.mean_reward  # the fake agent learns
  assert s.wall_s > 0 and s.candidates_per_hour > 0


def test_epsilon_phases(workdir):
  phases = analysis.epsilon_phases(page_lib.load_candidates(workdir))
  assert phases == [analysis.Phase(1.0, 0, 3), analysis.Phase(0.5, 4, 5), analysis.Phase(0.1, 6, 7)]


@pytest.mark.slow
def test_report_files(written, workdir):
  out = workdir / 'report'
  assert written == out / 'summary.md'
  for name in ('reward_per_iteration', 'reward_by_epsilon', 'accuracy_vs_flops'):
    assert_png(out / f'{name}.png', min_side=300)
  for rank in range(1, 6):
    assert_png(out / f'block_{rank}.png')


def test_top_blocks_txt_and_json(written, workdir):
  out = workdir / 'report'
  rows = page_lib.load_candidates(workdir)
  lines = (out / 'top_blocks.txt').read_text().splitlines()
  assert len(lines) == 5
  blocks = [nsc.parse(line) for line in lines]
  keys = [canonical.canonical_key(b) for b in blocks]
  assert len(set(keys)) == 5
  best_by_key = {}
  for r in rows:
    if r.ok:
      best_by_key[r.canonical_key] = max(best_by_key.get(r.canonical_key, -1.0), r.reward)
  rewards = [best_by_key[k] for k in keys]
  assert rewards == sorted(rewards, reverse=True)
  assert rewards == sorted(best_by_key.values(), reverse=True)[:5]

  records = json.loads((out / 'top_blocks.json').read_text())
  assert [r['rank'] for r in records] == [1, 2, 3, 4, 5]
  assert [r['nsc'] for r in records] == lines
  assert [r['canonical_key'] for r in records] == keys
  assert [r['reward'] for r in records] == rewards
  for record, block in zip(records, blocks):
    assert nsc.Block.from_tuples(record['layers']) == block
    assert {'val_accuracy', 'flops', 'params', 'density'} <= record.keys()
    assert record['density'] == pytest.approx(block.density())


def test_summary_page(written, workdir):
  page = written.read_text()
  s = analysis.summarize(page_lib.load_candidates(workdir))
  assert 'Cache hit rate' in page and f'{s.cache_hit_rate:.1%}' in page
  for reason, count in s.failure_reasons:
    assert reason in page
  assert 'ε=1' in page and 'ε=0.1' in page
  for image in ('reward_per_iteration.png', 'reward_by_epsilon.png', 'accuracy_vs_flops.png',
                'block_1.png'):
    assert f']({image})' in page
  for line in (workdir / 'report' / 'top_blocks.txt').read_text().splitlines():
    assert f'`{line}`' in page
  assert 'blocks_per_iteration' in page  # the run config, folded


def test_out_dir(workdir, tmp_path):
  summary = page_lib.write_report(workdir, out_dir=tmp_path / 'elsewhere', top_k=2)
  assert summary == tmp_path / 'elsewhere' / 'summary.md'
  assert len((tmp_path / 'elsewhere' / 'top_blocks.txt').read_text().splitlines()) == 2
  assert not (tmp_path / 'elsewhere' / 'block_3.png').exists()


def sampled_block(num_layers: int) -> nsc.Block:
  """A block sampled by the agent itself (ε = 1), cut to its first ``num_layers`` layers."""
  import jax  # pylint: disable=g-import-not-at-top

  from blockqnn_jax.nsc import space as space_lib  # pylint: disable=g-import-not-at-top
  from blockqnn_jax.strategies import qlearning  # pylint: disable=g-import-not-at-top
  space = space_lib.build_space(nsc.Grammar(max_index=num_layers + 1))
  q = qlearning.init_q(space)
  for seed in range(50):
    trajectories = qlearning.sample_blocks(jax.random.PRNGKey(seed), q, space, 1.0, 16)
    for block in space.decode_batch(np.asarray(trajectories.states)):
      if len(block.body) == num_layers:
        return block
  pytest.skip(f'no {num_layers}-layer block sampled')


@pytest.mark.slow
@pytest.mark.parametrize('name', ['residual', 'inception', 'sampled20'])
def test_draw_block(name, tmp_path):
  block = {'residual': lambda: nsc.RESIDUAL_BLOCK, 'inception': lambda: nsc.INCEPTION_BLOCK,
           'sampled20': lambda: sampled_block(20)}[name]()
  path = figures_lib.draw_block(block, tmp_path / f'{name}.png', title=name)
  assert path == tmp_path / f'{name}.png'
  assert_png(path, min_side=200)


def test_layout_points_down_and_covers_every_edge():
  rng = random.Random(3)
  for block in [nsc.RESIDUAL_BLOCK, nsc.INCEPTION_BLOCK] + [random_block(rng, 20)
                                                             for _ in range(5)]:
    layout = layout_lib.layout_block(block)
    edges = layout_lib.block_edges(block)
    assert set(layout.positions) == ({layout_lib.INPUT, layout_lib.OUTPUT}
                                     | {l.index for l in block.body})
    assert set(layout.routes) == set(edges)
    assert sum(1 for _, v in edges if v == layout_lib.OUTPUT) == len(block.leaves())
    for (u, v), route in layout.routes.items():
      assert route[0] == layout.positions[u] and route[-1] == layout.positions[v]
      ys = [y for _, y in route]
      assert all(b == a - 1 for a, b in zip(ys, ys[1:]))  # one level per step, downwards
    # No two nodes share a spot.
    assert len(set(layout.positions.values())) == len(layout.positions)
  assert [layout_lib.node_label(l) for l in nsc.INCEPTION_BLOCK.body] == [
      'conv1', 'conv3', 'conv5', 'max_pool3', 'conv1']
  assert layout_lib.node_label(nsc.Layer(2, 3, 1, 1, 0)) == 'avg_pool1'
  assert layout_lib.node_label(nsc.Layer(2, 6, 0, 0, 1)) == 'concat'
  with pytest.raises(nsc.NSCError):
    layout_lib.layout_block(nsc.Block.parse('1,7,0,0,0'))
  with pytest.raises(nsc.NSCError):
    layout_lib.block_edges(nsc.Block.parse('1,1,3,2,0 2,1,3,0,0 3,7,0,0,0'))


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    page_lib.write_report(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match=DB_NAME):
    page_lib.write_report(tmp_path)
  assert not (tmp_path / DB_NAME).exists()  # reading never creates a database
  db = sqlite3.connect(tmp_path / DB_NAME)
  db.executescript(SCHEMA)
  db.close()
  with pytest.raises(ValueError, match=str(tmp_path)):
    page_lib.write_report(tmp_path)
  other = tmp_path / 'other'
  other.mkdir()
  sqlite3.connect(other / DB_NAME).execute('CREATE TABLE x (y)').connection.close()
  with pytest.raises(ValueError, match='not a search database'):
    page_lib.load_candidates(other)


def test_all_failed_still_reports(tmp_path):
  db = sqlite3.connect(tmp_path / DB_NAME)
  db.executescript(SCHEMA)
  for position in range(3):
    db.execute("INSERT INTO candidates (iteration, position, epsilon, nsc, canonical_key, "
               "cached, status, failure_reason, reward, created_at) VALUES "
               "(0, ?, 1.0, '1,1,3,0,0 2,7,0,0,0', '1,1,3,0,0 2,7,0,0,0', ?, 'failed', "
               "'boom', ?, ?)", (position, int(position > 0), float('nan'), 100.0 + position))
  db.commit()
  db.close()
  summary = page_lib.write_report(tmp_path)
  page = summary.read_text()
  assert 'boom' in page and 'No candidate has succeeded yet' in page
  assert (tmp_path / 'report' / 'top_blocks.txt').read_text() == ''
  assert json.loads((tmp_path / 'report' / 'top_blocks.json').read_text()) == []
  for name in ('reward_per_iteration', 'reward_by_epsilon', 'accuracy_vs_flops'):
    assert_png(tmp_path / 'report' / f'{name}.png', min_side=300)


@pytest.mark.slow
def test_command_line(workdir, tmp_path):
  root = Path(__file__).resolve().parents[1]
  run = lambda *args: subprocess.run([sys.executable, '-m', 'experiments.report', *args],
                                     cwd=root, capture_output=True, text=True, timeout=120)
  done = run(f'--workdir={workdir}', '--top_k=2', f'--out={tmp_path / "cli"}')
  assert done.returncode == 0, done.stderr
  assert str(tmp_path / 'cli' / 'summary.md') in done.stdout
  assert len((tmp_path / 'cli' / 'top_blocks.txt').read_text().splitlines()) == 2
  missing = run(f'--workdir={tmp_path / "nowhere"}')
  assert missing.returncode != 0 and 'nowhere' in missing.stderr


def test_report_does_not_import_jax():
  """The report reads a store and draws: it must work where JAX is absent or slow to load."""
  root = Path(__file__).resolve().parents[1]
  done = subprocess.run(
      [sys.executable, '-c', "import blockqnn_jax.report, sys; assert 'jax' not in sys.modules"],
      cwd=root, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr


def test_compare_searches_by_distinct_candidates(tmp_path):
  """Repeats are free: only trained rows move along the x axis; figures at a common budget."""
  from blockqnn_jax.report import compare

  def search(name, strategy, rewards):
    with store_lib.ResultsStore(tmp_path / name) as store:
      store.set_meta('config', json.dumps({'seed': 1, 'search': {'strategy': strategy}}))
      for i, (reward, cached) in enumerate(rewards):
        store.record(0, i, 1.0, results.EvalResult(
            '1,1,3,0,0 2,7,0,0,0', f'k{i}', 'ok', val_accuracy=reward, reward=reward),
            cached)
    return tmp_path / name

  twelve = [(0.1 * (i % 5), False) for i in range(12)]
  a = search('a', 'qlearning', twelve + [(0.9, True)])  # the cached 0.9 costs nothing...
  b = search('b', 'random', [(0.2, False)] * 11)
  curve = compare.load_curve(a)
  assert curve.trained == 12 and curve.strategy == 'qlearning_paper'
  assert curve.best[-1] == pytest.approx(0.4)  # ...and is not a find of this search
  assert math.isnan(curve.top_mean[8]) and curve.top_mean[9] == pytest.approx(
      np.mean(sorted(0.1 * (i % 5) for i in range(10))[::-1][:10]))
  png, md = compare.compare_searches([a, b], tmp_path / 'out')
  assert png.is_file() and png.stat().st_size > 10_000
  text = md.read_text()
  assert 'common budget of 11 distinct candidates' in text
  assert '| random | 1 | 0.2000 ± 0.0000 | 0.2000 ± 0.0000 |' in text
  # Seed 1 of both: the Q-learner's top-10 at 11 candidates minus random's.
  assert '| qlearning_paper | 1: +0.2000 | +0.2000 ± 0.0000 |' in text


def test_compare_names_the_fast_agent_and_pairs_seeds_with_random(tmp_path):
  from blockqnn_jax.report import compare

  def search(name, config, rewards):
    with store_lib.ResultsStore(tmp_path / name) as store:
      store.set_meta('config', json.dumps(config))
      for i, reward in enumerate(rewards):
        store.record(0, i, 1.0, results.EvalResult(
            f'1,1,3,0,0 2,{i},0,0,0', f'k{i}', 'ok', val_accuracy=reward, reward=reward),
            False, shared=i % 2 == 0)
    return tmp_path / name

  fast = {'search': {'strategy': 'qlearning'}, 'agent': {'exploration': 'mutation'}}
  dirs = [search(f'f{s}', dict(fast, seed=s), [0.3 + 0.01 * s + 0.001 * i for i in range(12)])
          for s in (0, 1, 2)]
  dirs += [search(f'r{s}', {'seed': s, 'search': {'strategy': 'random'}},
                  [0.2 + 0.002 * i for i in range(12)]) for s in (0, 1, 2)]
  curves = [compare.load_curve(d) for d in dirs]
  assert [c.strategy for c in curves[:3]] == ['qlearning_fast'] * 3
  assert curves[0].shared == 6 and curves[0].best_block == '1,1,3,0,0 2,11,0,0,0'
  budget, lines = compare.comparison_table(curves)
  figures = compare.at_budget(curves, budget)
  top = [np.mean([0.3 + 0.01 * s + 0.001 * i for i in range(2, 12)]) for s in (0, 1, 2)]
  assert figures['qlearning_fast']['top_mean'] == pytest.approx(np.mean(top))
  assert figures['qlearning_fast']['top_sem'] == pytest.approx(np.std(top, ddof=1) / np.sqrt(3))
  pairs = compare.paired_with(figures, 'random')['qlearning_fast']
  assert pairs['top_wins'] == 3 and pairs['pairs'] == 3
  assert pairs['seeds'][2][0] == pytest.approx(0.3 + 0.02 + 0.011 - (0.2 + 0.022))
  png, md = compare.compare_searches(dirs, tmp_path / 'out')
  assert '(6 read from the shared evaluation cache)' in md.read_text()
