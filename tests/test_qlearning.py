"""The Q-learning agent: update against hand values and the dict oracle, sampling laws."""

import collections

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import qlearning_reference as reference
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.nsc import space as space_lib
from blockqnn_jax.settings import agent
from blockqnn_jax.strategies import qlearning as ql


@pytest.fixture(scope='module')
def space4():
  return space_lib.build_space(nsc.Grammar(max_index=4))


def _encode(space, block):
  """A block as a path of state ids, without ``nsc.validate``: the agent samples (and must
  learn from) blocks the space holds even where validation rejects them (a merge of one
  tensor through identity-like layers)."""
  ids = [0] + [space.state_id(l if l.type not in nsc.MERGE_TYPES or l.pred1 < l.pred2 else
                              nsc.Layer(l.index, l.type, l.kernel, l.pred2, l.pred1))
               for l in block.layers]
  return np.asarray(ids + [ids[-1]] * (space.max_index + 1 - len(ids)), np.int32)


def _trajectories(space, blocks):
  states = np.stack([_encode(space, b) for b in blocks])
  lengths = np.asarray([len(b.layers) for b in blocks], np.int32)
  return ql.Trajectories(states=jnp.asarray(states), lengths=jnp.asarray(lengths))


def _q_of(q, space, states, t):
  """Q(s_t, a_t) along an encoded block."""
  s, s_next = states[t], states[t + 1]
  return float(q[s, s_next - int(space.action_offset[s])])


@pytest.mark.parametrize('shaping, expected', [
    # Block conv3(0) -> terminal, R = 0.8, α = 0.01, γ = 1, Q starts at 0.5.
    # Shaped, r_t = 0.8 / 2 = 0.4, updated last transition first:
    #   Q(conv, term)  = 0.99*0.5 + 0.01*(0.4 + 0)   = 0.499   (nothing follows the terminal)
    #   Q(start, conv) = 0.99*0.5 + 0.01*(0.4 + 0.5) = 0.504   (conv's best action still 0.5)
    (True, (0.504, 0.499)),
    # MetaQNN, reward on the last transition only:
    #   Q(conv, term)  = 0.99*0.5 + 0.01*0.8               = 0.503
    #   Q(start, conv) = 0.99*0.5 + 0.01*(0 + 0.503)       = 0.50003
    (False, (0.50003, 0.503)),
])
def test_update_matches_hand_values(space4, shaping, expected):
  block = nsc.parse('1,1,3,0,0 2,7,0,0,0')
  traj = _trajectories(space4, [block])
  config = agent.QLearningConfig(reward_shaping=shaping)
  q = ql.q_update(ql.init_q(space4), space4, traj, jnp.asarray([0.8]), config)
  states = _encode(space4, block)
  np.testing.assert_allclose([_q_of(q, space4, states, 0), _q_of(q, space4, states, 1)],
                             expected, rtol=1e-6)
  # Nothing else moved.
  assert int(((q != 0.5) & ql.legal_mask(space4)).sum()) == 2


def test_update_three_layers_by_hand(space4):
  # conv3(0) -> identity(1) -> terminal, R = 0.9, shaped r = 0.3, α = 0.5 (large, so every
  # step shows), γ = 0.9:
  #   Q(id, term)     = 0.5*0.5 + 0.5*(0.3 + 0)             = 0.4
  #   Q(conv, id)     = 0.5*0.5 + 0.5*(0.3 + 0.9*0.5)       = 0.625 (id's other actions: 0.5)
  #   Q(start, conv)  = 0.5*0.5 + 0.5*(0.3 + 0.9*0.625)     = 0.25 + 0.43125 = 0.68125
  block = nsc.parse('1,1,3,0,0 2,4,0,1,0 3,7,0,0,0')
  config = agent.QLearningConfig(alpha=0.5, gamma=0.9)
  q = ql.q_update(ql.init_q(space4), space4, _trajectories(space4, [block]),
                  jnp.asarray([0.9]), config)
  states = _encode(space4, block)
  np.testing.assert_allclose([_q_of(q, space4, states, t) for t in range(3)],
                             [0.68125, 0.625, 0.4], rtol=1e-6)


@pytest.mark.slow
@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), shaping=st.booleans(),
                  max_index=st.integers(2, 5))
def test_batch_update_equals_dict_oracle(seed, shaping, max_index):
  """Sequential semantics: block after block, each backwards, exactly as MetaQNN's dicts."""
  grammar = nsc.Grammar(max_index=max_index)
  space = space_lib.build_space(grammar)
  oracle = reference.DictQLearner(grammar, alpha=0.3, gamma=0.9, reward_shaping=shaping,
                                  seed=seed)
  rng = np.random.default_rng(seed)
  paths = [oracle.sample(1.0) for _ in range(12)]
  paths += paths[:4]  # repeated blocks interact through shared states
  rewards = rng.uniform(0, 1, len(paths))
  for path, reward in zip(paths, rewards):
    oracle.update(path, reward)
  blocks = [nsc.Block.from_tuples(p[1:]) for p in paths]
  config = agent.QLearningConfig(alpha=0.3, gamma=0.9, reward_shaping=shaping)
  q = ql.q_update(ql.init_q(space), space, _trajectories(space, blocks),
                  jnp.asarray(rewards, jnp.float32), config)
  for state, row in oracle.q.items():
    s = space.state_id(state)
    for action, value in row.items():
      a = space.state_id(action) - int(space.action_offset[s])
      np.testing.assert_allclose(float(q[s, a]), value, rtol=1e-5)


@pytest.mark.slow
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), max_index=st.integers(2, 7),
                  epsilon=st.sampled_from([0.0, 0.3, 1.0]))
def test_sampled_blocks_are_valid(seed, max_index, epsilon):
  grammar = nsc.Grammar(max_index=max_index)
  space = space_lib.build_space(grammar)
  key_q, key_s = jax.random.split(jax.random.PRNGKey(seed))
  q = ql.init_q(space) + jax.random.uniform(key_q, (space.num_states, space.max_actions))
  traj = ql.sample_blocks(key_s, q, space, epsilon, 16)
  chex.assert_shape(traj.states, (16, max_index + 1))
  for row, length in zip(np.asarray(traj.states), np.asarray(traj.lengths)):
    block = space.decode(row)
    nsc.validate(block, grammar)
    assert len(block.layers) == length
    assert (row[length:] == row[length]).all()  # terminal padding


def test_epsilon_one_is_uniform_over_legal_actions():
  space = space_lib.build_space(nsc.Grammar(max_index=3))
  q = ql.init_q(space).at[0, 0].set(100.0)  # a planted maximum must not matter at ε = 1
  traj = ql.sample_blocks(jax.random.PRNGKey(1), q, space, 1.0, 8000)
  first = np.asarray(traj.states)[:, 1]
  counts = np.bincount(first - 1, minlength=8)
  assert counts.size == 8  # only the 8 legal index-1 layers
  # Chi-square goodness of fit to uniform, 7 degrees of freedom: 0.999 quantile = 24.3.
  expected = len(first) / 8
  assert ((counts - expected) ** 2 / expected).sum() < 24.3


def test_greedy_follows_planted_argmax(space4):
  block = nsc.parse('1,2,3,0,0 2,1,5,1,0 3,6,0,1,2 4,7,0,0,0')
  states = _encode(space4, block)
  q = ql.init_q(space4)
  for t in range(4):
    s, s_next = states[t], states[t + 1]
    q = q.at[s, s_next - int(space4.action_offset[s])].set(0.9)
  traj = ql.sample_blocks(jax.random.PRNGKey(0), q, space4, 0.0, 32)
  assert all(space4.decode(row) == block for row in np.asarray(traj.states))


def test_greedy_breaks_ties_uniformly(space4):
  q = ql.init_q(space4).at[0, 2].set(0.9).at[0, 5].set(0.9)
  traj = ql.sample_blocks(jax.random.PRNGKey(3), q, space4, 0.0, 2000)
  first = collections.Counter((np.asarray(traj.states)[:, 1] - 1).tolist())
  assert set(first) == {2, 5}
  assert abs(first[2] - 1000) < 120  # binomial sd ~22


def test_sampling_is_deterministic_given_the_key(space4):
  q = ql.init_q(space4)
  a = ql.sample_blocks(jax.random.PRNGKey(7), q, space4, 0.5, 8)
  b = ql.sample_blocks(jax.random.PRNGKey(7), q, space4, 0.5, 8)
  chex.assert_trees_all_equal(a, b)


def test_replay_reapplies_the_update(space4):
  # With a single remembered block every replay pick is that block, so a replay of 3 equals
  # three more updates on it.
  block = nsc.parse('1,1,3,0,0 2,7,0,0,0')
  traj = _trajectories(space4, [block])
  rewards = jnp.asarray([0.8])
  config = agent.QLearningConfig(replay_size=3)
  memory = ql.remember(ql.init_memory(space4, 10), traj, rewards)
  replayed = ql.replay_update(jax.random.PRNGKey(0), ql.init_q(space4), space4, memory, config)
  expected = ql.init_q(space4)
  for _ in range(3):
    expected = ql.q_update(expected, space4, traj, rewards, config)
  np.testing.assert_allclose(replayed, expected, rtol=1e-6)


def test_replay_of_empty_memory_changes_nothing(space4):
  q = ql.replay_update(jax.random.PRNGKey(0), ql.init_q(space4), space4,
                       ql.init_memory(space4, 4), agent.QLearningConfig())
  np.testing.assert_array_equal(q, ql.init_q(space4))


def test_memory_is_a_ring_buffer(space4):
  traj = ql.sample_blocks(jax.random.PRNGKey(0), ql.init_q(space4), space4, 1.0, 3)
  memory = ql.init_memory(space4, 4)
  memory = ql.remember(memory, traj, jnp.asarray([1.0, 2.0, 3.0]))
  memory = ql.remember(memory, traj, jnp.asarray([4.0, 5.0, 6.0]))
  assert int(memory.size) == 4 and int(memory.cursor) == 2
  np.testing.assert_array_equal(memory.rewards, [5.0, 6.0, 3.0, 4.0])


@pytest.mark.slow
def test_learn_is_remember_update_replay(space4):
  key = jax.random.PRNGKey(4)
  traj = ql.sample_blocks(key, ql.init_q(space4), space4, 1.0, 5)
  rewards = jnp.linspace(0.1, 0.5, 5)
  config = agent.QLearningConfig(replay_size=7)
  q, memory = ql.learn(key, ql.init_q(space4), ql.init_memory(space4, 16), space4, traj,
                       rewards, config)
  expected_memory = ql.remember(ql.init_memory(space4, 16), traj, rewards)
  expected = ql.q_update(ql.init_q(space4), space4, traj, rewards, config)
  expected = ql.replay_update(key, expected, space4, expected_memory, config)
  chex.assert_trees_all_close(memory, expected_memory)
  np.testing.assert_allclose(q, expected, rtol=1e-6)


def test_paper_epsilon_schedule():
  schedule = agent.EpsilonSchedule()
  assert schedule.num_iterations == 178  # 11,392 blocks at 64 per iteration
  eps = np.asarray(ql.epsilon_at(schedule, jnp.arange(180)))
  assert (eps[:95] == 1.0).all() and (eps[95:102] == np.float32(0.9)).all()
  assert (eps[166:] == np.float32(0.1)).all()
  assert float(ql.epsilon_at(schedule, 101)) == pytest.approx(0.9)
  assert float(ql.epsilon_at(schedule, 102)) == pytest.approx(0.8)
  assert float(jax.jit(lambda i: ql.epsilon_at(schedule, i))(177)) == pytest.approx(0.1)


def test_scaled_schedule_keeps_proportions_and_total():
  scaled = agent.EpsilonSchedule().scaled(89)  # half the paper's length
  assert scaled.num_iterations == 89
  assert scaled.phases[0] == (1.0, 48) or scaled.phases[0] == (1.0, 47)
  assert [e for e, _ in scaled.phases] == [e for e, _ in agent.PAPER_EPSILON_SCHEDULE]


def test_greedy_on_untouched_q_is_uniform_over_the_ties():
  # Q at its initial constant: every legal action is tied at the max, so ε = 0 must sample
  # as uniformly as ε = 1 (chi-square, 7 degrees of freedom, 0.999 quantile = 24.3).
  space = space_lib.build_space(nsc.Grammar(max_index=3))
  traj = ql.sample_blocks(jax.random.PRNGKey(2), ql.init_q(space), space, 0.0, 8000)
  counts = np.bincount(np.asarray(traj.states)[:, 1] - 1, minlength=8)
  assert counts.size == 8
  assert ((counts - 1000) ** 2 / 1000).sum() < 24.3


def test_monotone_update_never_lowers_q(space4):
  # α = 1, γ = 1, no shaping: Watkins keeps the latest reward, the monotone update the
  # best one; on the terminal transition Q(conv, term) is exactly the block's reward.
  block = nsc.parse('1,1,3,0,0 2,7,0,0,0')
  traj = _trajectories(space4, [block, block])
  states = _encode(space4, block)
  rewards = jnp.asarray([0.8, 0.3])
  for monotone, expected in ((False, 0.3), (True, 0.8)):
    config = agent.QLearningConfig(alpha=1.0, q_init=0.0, reward_shaping=False, monotone=monotone)
    q = ql.q_update(ql.init_q(space4, 0.0), space4, traj, rewards, config)
    assert _q_of(q, space4, states, 1) == pytest.approx(expected)
    assert _q_of(q, space4, states, 0) == pytest.approx(expected)  # max over its successor


def test_monotone_greedy_block_is_the_best_block(space4):
  # With shaping each Q(s_t, a_t) on the best block's path holds its share of the best
  # reward, so ε = 0 retraces the best block even after worse blocks share its states.
  blocks = [nsc.parse('1,1,3,0,0 2,1,1,1,0 3,7,0,0,0'),   # the best, R = 0.9
            nsc.parse('1,1,3,0,0 2,2,3,1,0 3,7,0,0,0'),   # shares layer 1, R = 0.2
            nsc.parse('1,4,0,0,0 2,1,1,1,0 3,7,0,0,0')]   # shares layer 2, R = 0.1
  config = agent.QLearningConfig(alpha=1.0, q_init=0.0, replay_size=0, monotone=True)
  q = ql.q_update(ql.init_q(space4, 0.0), space4, _trajectories(space4, blocks),
                  jnp.asarray([0.9, 0.2, 0.1]), config)
  traj = ql.sample_blocks(jax.random.PRNGKey(0), q, space4, 0.0, 16)
  assert all(space4.decode(row) == blocks[0] for row in np.asarray(traj.states))
