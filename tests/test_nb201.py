"""NAS-Bench-201 space, table, evaluator and the searches on it (fake tables; real if shared)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import nb201_baselines as bl
from benchmarks import nb201_space as nb201
from blockqnn_jax.settings import agent as agent_lib
from blockqnn_jax.settings.agent import AgentSettings
from blockqnn_jax.strategies import evolution, local_search, qlearner, random_search
from blockqnn_jax.strategies import qlearning as ql

COLUMNS = [*nb201.DATASET_COLUMNS.values(), nb201.ARCH_COLUMN, 'UniqueString']


def fake_accuracy(ops) -> float:
  """A deterministic, planted landscape: every nor_conv_3x3 edge helps, 'none' hurts."""
  ops = np.asarray(ops)
  return float(60 + 5 * (ops == 3).sum() + 1.5 * (ops == 2).sum() - 3 * (ops == 0).sum()
               + 0.01 * (ops * np.arange(1, 7)).sum())


def fake_rows(order_seed: int = 0) -> list[dict[str, str]]:
  """All 15,625 cells, shuffled (index order is the table's, not the codes')."""
  codes = np.random.default_rng(order_seed).permutation(nb201.NUM_CELLS)
  rows = []
  for code in codes:
    ops = nb201.code_ops(int(code))
    acc = fake_accuracy(ops)
    rows.append({COLUMNS[0]: str(acc), COLUMNS[1]: str(acc - 20), COLUMNS[2]: str(acc - 40),
                 nb201.ARCH_COLUMN: nb201.arch_string(ops), 'UniqueString': str(code)})
  return rows


def write_csv(path: Path, rows, columns=COLUMNS) -> Path:
  with path.open('w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  return path


@pytest.fixture(scope='module')
def rows():
  return fake_rows()


@pytest.fixture(scope='module')
def table(rows):
  return nb201.NB201Table.from_rows(rows)


# -- space ------------------------------------------------------------------------------------

def test_space_shape_and_invariants():
  space = nb201.build_nb201_space()
  assert space.num_states == 32 and space.max_index == 7 and space.grammar is None
  assert space.step_widths == (5,) * 6 + (1,)
  steps = np.asarray(space.layers)[:, 0]
  offsets, counts = np.asarray(space.action_offset), np.asarray(space.num_actions)
  for s in range(space.num_states):  # every action leads to a state of the next step
    for a in range(counts[s]):
      assert steps[offsets[s] + a] == steps[s] + 1
  assert np.asarray(space.is_terminal).sum() == 1 and counts[-1] == 0


def test_sampled_paths_decode_to_valid_cells():
  space = nb201.build_nb201_space()
  q = ql.init_q(space)
  traj = ql.sample_blocks(jax.random.PRNGKey(0), q, space, 1.0, 256)
  assert (np.asarray(traj.lengths) == 7).all()
  cells = [nb201.decode(row) for row in np.asarray(traj.states)]
  assert all(len(c) == 6 and all(0 <= o < 5 for o in c) for c in cells)
  assert len(set(cells)) > 200  # uniform over 15,625 cells: few repeats
  codes = np.asarray(nb201.path_codes(traj.states))
  assert [nb201.cell_code(c) for c in cells] == codes.tolist()


def test_round_trips(table):
  rng = np.random.default_rng(1)
  for code in rng.integers(nb201.NUM_CELLS, size=50):
    ops = nb201.code_ops(int(code))
    assert nb201.parse_arch_string(nb201.arch_string(ops)) == ops
    assert nb201.decode(nb201.encode(ops)) == ops
    assert tuple(table.ops[table.index(ops)]) == ops
  example = ('|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|'
             'nor_conv_3x3~1|nor_conv_1x1~2|')
  assert nb201.parse_arch_string(example) == (3, 3, 3, 1, 3, 2)
  assert nb201.arch_string((3, 3, 3, 1, 3, 2)) == example


@pytest.mark.parametrize('bad', [
    '', '|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|',
    '|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|',
    '|none~1|+|none~0|none~1|+|none~0|none~1|none~2|',
    '|none~0|+|none~0|+|none~0|none~1|none~2|', 'none~0+none~0|none~1+x'])
def test_parse_rejects_malformed(bad):
  with pytest.raises(nb201.NB201Error):
    nb201.parse_arch_string(bad)


def test_bad_cells_and_paths_rejected():
  with pytest.raises(nb201.NB201Error):
    nb201.arch_string((0, 1, 2))
  with pytest.raises(nb201.NB201Error):
    nb201.cell_code((0, 1, 2, 3, 4, 5))
  with pytest.raises(nb201.NB201Error):
    nb201.decode([0, 1, 6, 11, 16, 26, 27, 31])  # a step-6 state at step 5


# -- table ------------------------------------------------------------------------------------

def test_load_csv_and_lookups(tmp_path, rows, table):
  loaded = nb201.NB201Table.load(write_csv(tmp_path / 't.csv', rows))
  ops = (3, 3, 3, 3, 3, 3)
  assert loaded.accuracy(ops) == pytest.approx(fake_accuracy(ops))
  assert loaded.accuracy(ops, 'imagenet16') == pytest.approx(fake_accuracy(ops) - 40)
  assert loaded.optimum('cifar10') == pytest.approx(fake_accuracy(ops))
  assert loaded.optimum('cifar100') == pytest.approx(fake_accuracy(ops) - 20)
  i = 123
  assert loaded.accuracy(tuple(loaded.ops[i])) == pytest.approx(float(rows[i][COLUMNS[0]]))
  by_code = table.by_code('cifar10')
  assert by_code[nb201.cell_code(ops)] == pytest.approx(fake_accuracy(ops))
  with pytest.raises(KeyError):
    table.accuracy(ops, 'mnist')


def test_load_errors(tmp_path, rows):
  with pytest.raises(FileNotFoundError):
    nb201.NB201Table.load(tmp_path / 'absent.csv')
  with pytest.raises(nb201.NB201Error, match='missing columns'):
    nb201.NB201Table.load(write_csv(tmp_path / 'a.csv', rows[:10], COLUMNS[1:]))
  with pytest.raises(nb201.NB201Error, match='rows'):
    nb201.NB201Table.load(write_csv(tmp_path / 'b.csv', rows[:-1]))
  repeated = rows[:-1] + [rows[0]]
  with pytest.raises(nb201.NB201Error, match='repeated'):
    nb201.NB201Table.from_rows(repeated)
  garbled = list(rows)
  garbled[5] = dict(rows[5], **{nb201.ARCH_COLUMN: '|oops~0|'})
  with pytest.raises(nb201.NB201Error, match='unparsable'):
    nb201.NB201Table.from_rows(garbled)
  garbled[5] = dict(rows[5], **{COLUMNS[0]: 'n/a'})
  with pytest.raises(nb201.NB201Error, match='unparsable'):
    nb201.NB201Table.from_rows(garbled)


def test_evaluator_counts_distinct(table):
  evaluator = nb201.TabularEvaluator(table)
  a, b = (0,) * 6, (3,) * 6
  assert evaluator(a) == evaluator(a) == pytest.approx(fake_accuracy(a))
  assert evaluator.num_queries == 1
  evaluator(b)
  evaluator(a)
  assert evaluator.num_queries == 2 and evaluator.known(b)
  assert evaluator.history == pytest.approx([fake_accuracy(a), fake_accuracy(b)])


# -- strategies on the table (baselines) ----------------------------------------------------

@pytest.mark.slow
def test_random_search_budget_and_improvement(table):
  result = bl.search_batch(random_search.RandomSearch(), table.by_code('cifar10'), [10, 200],
                           range(20))
  assert result.traces.shape == (1, 2, 20, 200)
  assert (result.queries == np.asarray([10, 200])[None, :, None]).all()
  assert (np.diff(result.traces, axis=-1) >= 0).all()
  finals = {b: result.best(i, b).mean() for i, b in enumerate((10, 200))}
  assert finals[200] > finals[10]
  # Past its budget a search's trace carries its last best.
  np.testing.assert_array_equal(result.traces[0, 0, :, 9:], result.traces[0, 0, :, 9:10]
                                .repeat(191, axis=-1))


@pytest.mark.slow
def test_evolution_budget_and_improvement(table):
  result = bl.search_batch(evolution.AgingEvolution(), table.by_code('cifar10'), [12, 150],
                           range(10))
  assert (result.queries == np.asarray([12, 150])[None, :, None]).all()
  finals = result.best(1, 150)
  # The landscape is additive: evolution climbs to within an edge (one nor_conv_3x3 less
  # costs 5 points).
  assert finals.min() >= table.optimum('cifar10') - 5.1
  assert np.isclose(finals, table.optimum('cifar10')).mean() >= 0.5
  assert finals.mean() > result.best(0, 12).mean()
  with pytest.raises(ValueError):
    evolution.AgingEvolution(population=3, sample=4)


@pytest.mark.slow
def test_datasets_are_lanes_of_one_search(table):
  tables = np.stack([table.by_code(d) for d in ('cifar10', 'imagenet16')])
  both = bl.search_batch(local_search.LocalSearch(), tables, 30, range(3))
  alone = bl.search_batch(local_search.LocalSearch(), tables[1], 30, range(3))
  np.testing.assert_array_equal(both.traces[1], alone.traces[0])
  # The fake imagenet16 column is cifar10 - 40: the same moves, shifted.
  np.testing.assert_allclose(both.traces[0] - 40, both.traces[1], atol=1e-4)


@pytest.mark.slow
def test_qlearner_respects_budget(table):
  result = bl.search_batch(qlearner.QLearner(), table.by_code('cifar10'), 40, range(4), batch=8)
  assert result.traces.shape == (1, 1, 4, 40)
  assert (result.queries == 40).all()
  assert (np.diff(result.traces, axis=-1) >= 0).all()
  trace = bl.search(qlearner.QLearner(), table, 25, 3, batch=8)
  assert trace.shape == (25,) and (np.diff(trace) >= 0).all()


@pytest.mark.slow
def test_qlearner_stops_at_iteration_cap(table):
  # ε = 0 and a tiny cap: the greedy agent resamples few cells and must stop anyway.
  greedy = qlearner.QLearner(schedule=agent_lib.EpsilonSchedule(((0.0, 1),)))
  result = bl.search_batch(greedy, table.by_code('cifar10'), 200, range(3), batch=8,
                           max_iterations_factor=1)
  assert (result.iterations <= 25).all()
  assert (result.queries < 200).all() and result.traces.shape == (1, 1, 3, 200)


@pytest.mark.slow
def test_qlearner_finds_planted_optimum(table):
  # A faster learner (α=0.3) on the additive landscape, the paper's schedule shortened to
  # the budget: the greedy phase must reach the all-nor_conv_3x3 cell, which uniform
  # sampling finds with p ~ 300/15625 per search.
  agent = qlearner.QLearner(AgentSettings(alpha=0.3, budget_sized=True,
                                          schedule_unit='iterations'), budget=300)
  result = bl.search_batch(agent, table.by_code('cifar10'), 300, range(8), batch=8)
  found = np.isclose(result.best(0, 300), table.optimum('cifar10'))
  assert found.mean() >= 0.75


def test_tpe_when_optuna_is_installed(table):
  if not bl.tpe_available():
    pytest.skip('optuna is not installed (the bench extra)')
  trace, kept = bl.tpe_search(table.by_code('cifar10'), 30, seed=0)
  assert trace.shape == (30,) and (np.diff(trace) >= 0).all()
  assert trace[-1] > trace[0]
  np.testing.assert_array_equal(kept, trace)  # no noise: the best observed is the best
  noisy, kept = bl.tpe_search(table.by_code('cifar10'), 30, seed=0, sigma=5.0)
  assert (kept <= noisy).all()


# -- a noisy reward and the confirm rule ---------------------------------------------------

def test_noise_sigma_is_k_times_the_spread_of_the_top_tenth():
  table = np.arange(100, dtype=np.float64)[None]  # the best 10: 90..99, std sqrt(8.25)
  np.testing.assert_allclose(bl.noise_sigmas(table, 2.0), [2 * np.sqrt(8.25)], rtol=1e-6)
  assert bl.noise_sigmas(table, 0.0)[0] == 0


@pytest.mark.slow
def test_without_noise_the_kept_cell_is_the_best_trained(table):
  result = bl.search_batch(local_search.LocalSearch(), table.by_code('cifar10'), 40, range(6))
  np.testing.assert_array_equal(result.kept, result.traces)


def test_noise_changes_what_is_kept_not_what_a_blind_search_trains(table):
  acc = table.by_code('cifar10')
  clean = bl.search_batch(random_search.RandomSearch(), acc, 60, range(8))
  noisy = bl.search_batch(random_search.RandomSearch(), acc, 60, range(8), noise=3.0)
  # Random search ignores rewards: the same cells, the same best true accuracy...
  np.testing.assert_array_equal(clean.traces, noisy.traces)
  # ...but the cell it keeps is the best observed, which is never better than the best.
  assert (noisy.kept <= noisy.traces).all() and (noisy.kept < noisy.traces).any()
  assert (noisy.queries == 60).all()


@pytest.mark.slow
def test_the_confirm_rule_spends_the_budget_on_reevaluations(table):
  acc = table.by_code('cifar10')
  agent = qlearner.fast_qlearner(60, tried_capacity=130)
  rule = agent_lib.Confirm(max_evaluations=3)
  off = bl.search_batch(agent, acc, 60, range(8), noise=1.0)
  on = bl.search_batch(agent, acc, 60, range(8), noise=1.0, confirm=rule)
  assert (on.queries == 60).all() and (off.queries == 60).all()
  assert (on.kept <= on.traces).all()
  # Re-evaluations are trainings too: the rule trains fewer distinct cells, so it asks
  # for fewer proposals.
  assert (on.iterations < off.iterations).any() and (on.iterations <= off.iterations).all()
  # Without noise, two repeats show the reward is exact and the rule stands back.
  # (The kept cell lags the best only while a challenger is being confirmed.)
  exact = bl.search_batch(agent, acc, 60, range(8), confirm=rule)
  np.testing.assert_array_equal(exact.kept[..., -1], exact.traces[..., -1])


# -- the real table, when shared --------------------------------------------------------------

def test_real_table_loads():
  default = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
  path = Path(os.environ.get('BLOCKQNN_SHARED_DATA', default)) / 'nb201-tss-200ep-test-acc.csv'
  if not path.exists():
    pytest.skip(f'NAS-Bench-201 table not found at {path}')
  table = nb201.NB201Table.load(path)
  assert table.optimum('cifar10') == pytest.approx(94.37, abs=0.01)
  example = ('|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|'
             'nor_conv_3x3~1|nor_conv_1x1~2|')
  ops = nb201.parse_arch_string(example)
  assert tuple(table.ops[table.index(ops)]) == ops
