"""Search strategies behind one ask/tell interface, on a small NSC space and NAS-Bench-201."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import nb201_baselines as bl
from benchmarks import nb201_space as nb201
from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.nsc import space as space_lib
from blockqnn_jax.settings import agent
from blockqnn_jax.settings.agent import AgentSettings
from blockqnn_jax.strategies import (
  evolution,
  local_search,
  qlearner,
  random_search,
  registry,
  tried,
)
from blockqnn_jax.strategies import paths as paths_lib
from blockqnn_jax.strategies import qlearning as ql
from blockqnn_jax.strategies import state as state_lib

# Small enough to compile fast; identity and 1x1 pooling present, so the self-merge rule
# (add(x, identity(x))) matters.
GRAMMAR = nsc.Grammar(max_index=5, conv_kernels=(3,), max_pool_kernels=(1,),
                      avg_pool_kernels=(1, 3))
NAMES = ('qlearning', 'qlearning_fast', 'random', 'evolution', 'local_search')


@pytest.fixture(scope='module')
def nsc_space():
  return space_lib.build_space(GRAMMAR)


@pytest.fixture(scope='module')
def nb_space():
  return nb201.build_nb201_space()


def _make(name: str):
  if name == 'qlearning_fast':
    return registry.make_strategy(name, budget=40, tried_capacity=128)
  if name == 'evolution':
    return registry.make_strategy(name, population=4, sample=2)
  return registry.make_strategy(name)


N = 4  # proposals per ask everywhere, so that the tests share compilations


def _reward(states: np.ndarray) -> np.ndarray:
  """A deterministic synthetic reward per path (a hash of its states, in [0, 1))."""
  h = np.asarray(tried.path_hash(jnp.asarray(states)))[..., 0]
  return (h % 1000).astype(np.float32) / 1000


def _run(strategy, space, asks: int, n: int = N, seed: int = 0, reward=_reward):
  """Asks and tells ``asks`` times; returns the final state and every proposal."""
  key = jax.random.PRNGKey(seed)
  state = strategy.init(space, key)
  proposals = []
  for it in range(asks):
    ask_key, tell_key = jax.random.split(jax.random.fold_in(key, it))
    state, prop = strategy.ask(space, state, ask_key, n, it)
    state = strategy.tell(space, state, prop, reward(np.asarray(prop.states)), tell_key)
    proposals.append(prop)
  return state, proposals


# -- the interface ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_every_strategy_proposes_legal_nsc_blocks(name, nsc_space):
  strategy = _make(name)
  _, proposals = _run(strategy, nsc_space, asks=6)
  for prop in proposals:
    chex.assert_shape(prop.states, (N, GRAMMAR.max_index + 1))
    for row, length in zip(np.asarray(prop.states), np.asarray(prop.lengths)):
      block = nsc_space.decode(row)
      if name != 'qlearning':  # the paper's agent samples what it always sampled
        nsc.validate(block, GRAMMAR)
      assert len(block.layers) == length
      assert (row[length:] == row[length]).all()  # padded with the terminal


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_every_strategy_runs_on_nb201(name, nb_space):
  _, proposals = _run(_make(name), nb_space, asks=5)
  for prop in proposals:
    assert (np.asarray(prop.lengths) == 7).all()
    cells = [nb201.decode(row) for row in np.asarray(prop.states)]  # raises if not a cell
    assert all(len(c) == 6 for c in cells)


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_saved_state_gives_identical_next_proposals(name, nsc_space, tmp_path):
  strategy = _make(name)
  state, _ = _run(strategy, nsc_space, asks=4)
  np.savez(tmp_path / 'state.npz', **state_lib.state_arrays(state))
  with np.load(tmp_path / 'state.npz') as saved:
    restored = state_lib.restore_state(strategy, nsc_space, dict(saved))
  chex.assert_trees_all_equal(restored, state)
  key = jax.random.PRNGKey(99)
  _, a = strategy.ask(nsc_space, state, key, N, 4)
  _, b = strategy.ask(nsc_space, restored, key, N, 4)
  chex.assert_trees_all_equal(a, b)


def test_restore_rejects_mismatched_state(nsc_space, nb_space):
  strategy = evolution.AgingEvolution(population=4, sample=2)
  arrays = state_lib.state_arrays(strategy.init(nb_space, jax.random.PRNGKey(0)))
  with pytest.raises(ValueError, match='states'):
    state_lib.restore_state(strategy, nsc_space, arrays)
  del arrays['rewards']
  with pytest.raises(KeyError):
    state_lib.restore_state(strategy, nb_space, arrays)


@pytest.mark.slow
def test_asks_are_deterministic_given_the_key(nsc_space):
  strategy = _make('qlearning_fast')
  state = strategy.init(nsc_space, jax.random.PRNGKey(0))
  a = strategy.ask(nsc_space, state, jax.random.PRNGKey(3), N, 0)
  b = strategy.ask(nsc_space, state, jax.random.PRNGKey(3), N, 0)
  chex.assert_trees_all_equal(a, b)


def test_registry():
  assert set(NAMES) | {'qlearning_paper'} == set(registry.FACTORIES)
  assert registry.make_strategy('qlearning_paper') == qlearner.QLearner()
  assert registry.make_strategy('qlearning_fast', budget=10).budget == 10
  with pytest.raises(KeyError, match='unknown strategy'):
    registry.make_strategy('annealing')
  with pytest.raises(ValueError):
    AgentSettings(exploration='boltzmann')


# -- the paper's agent, bit for bit -----------------------------------------------------------

@pytest.mark.slow
def test_paper_preset_is_todays_agent_bit_for_bit(nsc_space):
  """The search loop's calls, key for key: sample_blocks at the schedule's ε, then learn."""
  strategy = registry.make_strategy('qlearning_paper')
  config, schedule = agent.QLearningConfig(), agent.EpsilonSchedule()
  state = strategy.init(nsc_space, jax.random.PRNGKey(0))
  q, memory = ql.init_q(nsc_space, config.q_init), ql.init_memory(nsc_space,
                                                                  config.memory_capacity)
  base = jax.random.PRNGKey(5)
  for index in (0, 1, 96, 170):  # ε = 1, 1, 0.9, 0.1
    sample_key, replay_key = jax.random.split(jax.random.fold_in(base, index))
    epsilon = float(ql.epsilon_at(schedule, index))
    expected = ql.sample_blocks(sample_key, q, nsc_space, epsilon, N)
    state, got = strategy.ask(nsc_space, state, sample_key, N, index)
    chex.assert_trees_all_equal(got, expected)
    rewards = jnp.asarray(_reward(np.asarray(got.states)))
    q, memory = ql.learn(replay_key, q, memory, nsc_space, expected, rewards, config)
    state = strategy.tell(nsc_space, state, got, rewards, replay_key)
    np.testing.assert_array_equal(state.q, q)
    chex.assert_trees_all_equal(state.memory, memory)


# -- the one-layer moves ----------------------------------------------------------------------

def test_nb201_neighbours_are_the_24_one_edge_changes(nb_space):
  ops = (3, 0, 1, 4, 2, 3)
  paths, lengths, ok = paths_lib.neighbours(nb_space, jnp.asarray(nb201.encode(ops)), jnp.int32(7))
  cells = {nb201.decode(row) for row in np.asarray(paths)[np.asarray(ok)]}
  assert len(cells) == 24 and (np.asarray(lengths)[np.asarray(ok)] == 7).all()
  assert all(sum(a != b for a, b in zip(ops, c)) == 1 for c in cells)


def test_nb201_mutation_changes_exactly_one_edge(nb_space):
  rng = np.random.default_rng(0)
  cells = rng.integers(5, size=(200, 6))
  parents = ql.Trajectories(states=jnp.asarray(np.stack([nb201.encode(c) for c in cells])),
                            lengths=jnp.full((200,), 7, jnp.int32))
  children = paths_lib.mutate(nb_space, jax.random.PRNGKey(1), parents)
  changed = [sum(a != b for a, b in zip(c, nb201.decode(row)))
             for c, row in zip(cells, np.asarray(children.states))]
  assert changed == [1] * 200


def _one_layer_apart(a: nsc.Block, b: nsc.Block) -> bool:
  la, lb = a.body, b.body
  if len(la) == len(lb):
    return sum(x != y for x, y in zip(la, lb)) == 1
  short, long = sorted((la, lb), key=len)
  return len(long) == len(short) + 1 and long[:len(short)] == short


@pytest.mark.slow
def test_nsc_neighbours_and_mutations_are_valid_and_one_layer_away(nsc_space):
  paths = ql.sample_blocks(jax.random.PRNGKey(2), ql.init_q(nsc_space), nsc_space, 1.0, 40)
  valid = np.asarray(paths_lib.path_valid(nsc_space, paths.states, paths.lengths))
  parents = jax.tree.map(lambda x: x[np.flatnonzero(valid)[:8]], paths)
  for row, length in zip(np.asarray(parents.states), np.asarray(parents.lengths)):
    block = nsc_space.decode(row)
    cand, lengths, ok = paths_lib.neighbours(nsc_space, jnp.asarray(row), jnp.int32(length))
    assert np.asarray(ok).sum() > 0
    for c in np.asarray(cand)[np.asarray(ok)]:
      other = nsc.validate(nsc_space.decode(c), GRAMMAR)
      assert _one_layer_apart(block, other)
  children = paths_lib.mutate(nsc_space, jax.random.PRNGKey(3), parents)
  for row, child in zip(np.asarray(parents.states), np.asarray(children.states)):
    assert _one_layer_apart(nsc_space.decode(row), nsc.validate(nsc_space.decode(child),
                                                                GRAMMAR))


def _merges_a_tensor_with_itself(block: nsc.Block) -> bool:
  """A merge whose two operands are one tensor read through identity-like layers."""
  root = {0: 0}
  for layer in block.body:
    if canonical.is_identity_like(layer):
      root[layer.index] = root[layer.pred1]
      continue
    root[layer.index] = layer.index
    if layer.type in nsc.MERGE_TYPES and root[layer.pred1] == root[layer.pred2]:
      return True
  return False


def test_path_valid_skips_exactly_the_merges_of_a_tensor_with_itself(nsc_space):
  """Every path is a valid block; path_valid marks the degenerate ones (add(x, id(x)) = 2x)
  that the strategies beyond the paper do not propose."""
  paths = ql.sample_blocks(jax.random.PRNGKey(4), ql.init_q(nsc_space), nsc_space, 1.0, 300)
  valid = np.asarray(paths_lib.path_valid(nsc_space, paths.states, paths.lengths))
  assert 0 < valid.mean() < 1  # both kinds occur
  for row, ok in zip(np.asarray(paths.states), valid):
    block = nsc.validate(nsc_space.decode(row), GRAMMAR)
    assert ok == (not _merges_a_tensor_with_itself(block))
  assert np.asarray(paths_lib.path_valid(nb201.build_nb201_space(), paths.states[:, :8],
                                         paths.lengths)).all()


def test_random_search_is_uniform_over_nb201_cells(nb_space):
  _, prop = random_search.RandomSearch().ask(nb_space, None, jax.random.PRNGKey(0), 5000)
  first = np.asarray([nb201.decode(r)[0] for r in np.asarray(prop.states)])
  counts = np.bincount(first, minlength=5)
  assert ((counts - 1000) ** 2 / 1000).sum() < 18.5  # chi-square, 4 dof, 0.999 quantile


# -- evolution, local search, the fast agent --------------------------------------------------

@pytest.mark.slow
def test_evolution_population_is_the_last_p_told(nb_space):
  strategy = evolution.AgingEvolution(population=5, sample=3)
  state, proposals = _run(strategy, nb_space, asks=4)
  told = np.concatenate([np.asarray(p.states) for p in proposals])  # 16 blocks in order
  assert int(state.size) == 5 and int(state.told) == 16
  order = np.argsort(np.asarray(state.born))
  np.testing.assert_array_equal(np.asarray(state.born)[order], np.arange(11, 16))
  np.testing.assert_array_equal(np.asarray(state.states)[order], told[11:])
  np.testing.assert_array_equal(np.asarray(state.rewards)[order], _reward(told[11:]))
  # The oldest member (born 11) is the one the next block replaces.
  assert int(state.cursor) == int(np.argmin(np.asarray(state.born)))


def test_evolution_children_are_one_edge_from_a_member(nb_space):
  strategy = evolution.AgingEvolution(population=4, sample=2)
  state, _ = _run(strategy, nb_space, asks=1)  # the random initial population
  _, children = strategy.ask(nb_space, state, jax.random.PRNGKey(8), N)
  members = [nb201.decode(r) for r in np.asarray(state.states)]
  for row in np.asarray(children.states):
    child = nb201.decode(row)
    assert any(sum(a != b for a, b in zip(child, m)) == 1 for m in members)


@pytest.mark.slow
def test_local_search_moves_to_first_better_and_restarts_at_local_optimum():
  space = nb201.build_nb201_space()
  strategy = local_search.LocalSearch()
  state = strategy.init(space, jax.random.PRNGKey(0))
  start = nb201.encode((0,) * 6)
  state = strategy.tell(space, state, ql.Trajectories(jnp.asarray(start[None]),
                                                      jnp.asarray([7])),
                        jnp.asarray([0.5]), jax.random.PRNGKey(1))
  assert bool(state.has_incumbent)
  # Ask all 24 neighbours; the third is better, the fifth better still: move to the third.
  state, prop = strategy.ask(space, state, jax.random.PRNGKey(2), 24)
  rewards = np.full(24, 0.4, np.float32)
  rewards[2], rewards[4] = 0.6, 0.7
  assert int(state.cursor) == space.num_states  # the neighbourhood is used up
  moved = strategy.tell(space, state, prop, jnp.asarray(rewards), jax.random.PRNGKey(3))
  np.testing.assert_array_equal(moved.incumbent, prop.states[2])
  assert float(moved.reward) == pytest.approx(0.6) and int(moved.cursor) == 0
  # No neighbour better and none left: a local optimum, so the next ask starts afresh.
  stuck = strategy.tell(space, state, prop, jnp.full((24,), 0.1), jax.random.PRNGKey(3))
  assert not bool(stuck.has_incumbent) and int(stuck.restarts) == 1


def _planted(ops: np.ndarray) -> np.ndarray:
  """An additive landscape: every nor_conv_3x3 edge helps, 'none' hurts (max: all 3s)."""
  return 60 + 5 * (ops == 3).sum(-1) + 1.5 * (ops == 2).sum(-1) - 3 * (ops == 0).sum(-1) \
      + 0.01 * (ops * np.arange(1, 7)).sum(-1)


@pytest.fixture(scope='module')
def planted():
  codes = np.arange(nb201.NUM_CELLS)
  return _planted(np.asarray([nb201.code_ops(int(c)) for c in codes]))


@pytest.mark.slow
def test_local_search_finds_the_optimum_of_a_synthetic_table(planted):
  result = bl.search_batch(local_search.LocalSearch(), planted, 150, range(8))
  assert np.isclose(result.traces[0, 0, :, -1], planted.max()).all()


@pytest.mark.slow
def test_local_search_finds_the_optimum_of_a_tiny_nsc_table():
  grammar = nsc.Grammar(max_index=3, conv_kernels=(1, 3), layer_types=(1, 4))
  space = space_lib.build_space(grammar)
  everything = ql.sample_blocks(jax.random.PRNGKey(0), ql.init_q(space), space, 1.0, 4000)
  table = {tuple(r): v for r, v in zip(np.asarray(everything.states).tolist(),
                                       _reward(np.asarray(everything.states)))}
  strategy = local_search.LocalSearch()
  state = strategy.init(space, jax.random.PRNGKey(1))
  best = -1.0
  for it in range(60):
    ask_key, tell_key = jax.random.split(jax.random.PRNGKey(it))
    state, prop = strategy.ask(space, state, ask_key, 1)
    reward = table[tuple(np.asarray(prop.states)[0].tolist())]
    best = max(best, reward)
    state = strategy.tell(space, state, prop, jnp.asarray([reward]), tell_key)
  assert best == max(table.values())


@pytest.mark.slow
def test_fast_agent_climbs_without_repeats(nb_space, planted):
  strategy = _make('qlearning_fast')
  reward = lambda states: planted[np.asarray(nb201.path_codes(states))] / 100
  state, proposals = _run(strategy, nb_space, asks=25, reward=reward)
  codes = np.concatenate([np.asarray(nb201.path_codes(p.states)) for p in proposals])
  assert len(set(codes.tolist())) == codes.size == 100  # never a repeat
  assert int(state.told) == 100
  # From a random phase of 4 blocks, one-edge moves climb the additive landscape to its
  # top (90.63); random search's best of 100 cells averages about 81.
  assert planted[codes].max() == planted.max()


def test_fast_agent_schedule_is_sized_to_the_budget(nb_space):
  strategy = qlearner.fast_qlearner(1000)  # 10% random phase of whatever budget init gets
  state = strategy.init(nb_space, jax.random.PRNGKey(0), budget=50)
  eps = [float(strategy.epsilon(state.replace(told=jnp.int32(t)), 0, 8)) for t in (0, 4, 5, 49)]
  assert eps == [1.0, 1.0, 0.0, 0.0]
  paper_short = qlearner.QLearner(AgentSettings(budget_sized=True, schedule_unit='iterations'),
                                  budget=80)
  state = paper_short.init(nb_space, jax.random.PRNGKey(0))  # 10 iterations of 8
  eps = [float(paper_short.epsilon(state, it, 8)) for it in (0, 5, 9, 20)]
  assert eps == pytest.approx([1.0, 1.0, 0.2, 0.1])  # phases at fractions of 10


def test_canonical_keys_of_proposals_match_their_blocks(nsc_space):
  # Strategies keep raw NSC codes; the search loop dedups them by canonical key.
  _, proposals = _run(_make('random'), nsc_space, asks=2)
  for row in np.asarray(proposals[0].states):
    block = nsc_space.decode(row)
    assert canonical.canonical_key(block) == canonical.canonical_key(
        canonical.canonical_block(block))


@pytest.mark.slow
def test_ask_returns_the_same_state_object_unless_it_can_move(nb_space):
  key = jax.random.PRNGKey(0)
  for strategy, moves in ((qlearner.QLearner(), False),
                          (qlearner.fast_qlearner(20, restart=False), False),
                          (qlearner.fast_qlearner(20), True), (random_search.RandomSearch(), False),
                          (evolution.AgingEvolution(), False), (local_search.LocalSearch(), True)):
    state = strategy.init(nb_space, key)
    asked, _ = strategy.ask(nb_space, state, key, N, 0)
    assert (asked is not state) == moves, strategy


# -- "already tried" is canonical on NSC --------------------------------------------------

def test_key_hash_is_equal_exactly_for_equivalent_blocks(nsc_space):
  forms = [  # the residual block, written three equivalent ways
      '1,4,0,0,0 2,1,3,1,0 3,1,3,2,0 4,5,0,1,3 5,7,0,0,0',
      '1,4,0,0,0 2,1,3,1,0 3,1,3,2,0 4,5,0,3,1 5,7,0,0,0',  # add's operands swapped
      '1,1,3,0,0 2,1,3,1,0 3,5,0,0,2 4,7,0,0,0',  # the identity contracted
  ]
  other = '1,1,3,0,0 2,1,3,1,0 3,5,0,1,2 4,7,0,0,0'
  blocks = [nsc.parse(t, GRAMMAR) for t in forms + [other]]
  rows = jnp.asarray(np.stack([nsc_space.encode(b) for b in blocks]))
  hashes = np.asarray(tried.key_hash(nsc_space, rows))
  assert (hashes[0] == hashes[1]).all() and (hashes[0] == hashes[2]).all()
  assert (hashes[0] != hashes[3]).any()
  # The same under jit and vmap.
  np.testing.assert_array_equal(jax.jit(tried.key_hash)(nsc_space, rows), hashes)
  np.testing.assert_array_equal(jax.vmap(lambda r: tried.key_hash(nsc_space, r))(rows), hashes)
  # Raw paths differ for the swapped form: path_hash alone would call them two blocks.
  raw = np.asarray(tried.path_hash(rows))
  assert (raw[0] != raw[2]).any()


@pytest.mark.slow
def test_the_fast_agent_never_proposes_a_block_equivalent_to_one_it_was_told(nsc_space):
  strategy = registry.make_strategy('qlearning_fast', budget=48, tried_capacity=256)
  reward = lambda states: np.asarray(
      [len(canonical.canonical_key(nsc_space.decode(r))) % 97 / 97 for r in states],
      np.float32)
  _, proposals = _run(strategy, nsc_space, asks=12, reward=reward)
  keys = [canonical.canonical_key(nsc_space.decode(r)) for p in proposals
          for r in np.asarray(p.states)]
  assert len(set(keys)) == len(keys) == 48


def test_mutations_and_neighbours_are_other_blocks_canonically(nsc_space):
  # Identity-like layers make many one-layer changes equivalent to the block itself.
  block = nsc.parse('1,4,0,0,0 2,1,3,1,0 3,3,1,2,0 4,7,0,0,0', GRAMMAR)
  row = jnp.asarray(nsc_space.encode(block))
  own = canonical.canonical_key(block)
  paths, _, ok = paths_lib.neighbours(nsc_space, row, jnp.int32(len(block.layers)))
  keys = [canonical.canonical_key(nsc_space.decode(p)) for p in np.asarray(paths)[np.asarray(ok)]]
  assert keys and own not in keys
  parents = ql.Trajectories(jnp.tile(row, (32, 1)), jnp.full((32,), len(block.layers)))
  children = paths_lib.mutate(nsc_space, jax.random.PRNGKey(0), parents)
  assert all(canonical.canonical_key(nsc_space.decode(c)) != own
             for c in np.asarray(children.states))
