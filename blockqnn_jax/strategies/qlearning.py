"""BlockQNN's Q-learning agent as pure, jit-able functions over a dense Q array.

The agent composes a block layer by layer: from the current state (a layer) it picks the next
layer or the terminal (``nsc.space`` defines both). Everything here is a pure function of
arrays and a PRNG key; nothing holds state between calls.

* ``init_q``: the Q-table, ``(num_states, max_actions)`` float32, filled with ``q_init``.
* ``sample_blocks``: ε-greedy sampling of a whole batch of blocks in one call.
* ``learn``: what the agent does with a batch of (block, reward) pairs. The backward Watkins
  update ``Q(s,a) ← (1-α)·Q(s,a) + α·[r_t + γ·max_a' Q(s',a')]``, the max taken as 0 after
  the terminal, applied from the last transition to the first, block after block (MetaQNN's
  order); with ``reward_shaping`` every transition gets ``r_t = R / T_block`` (BlockQNN),
  without it only the last one gets ``R`` (MetaQNN). Then experience replay: the pairs join
  the ``ReplayMemory`` (``init_memory``) and the update is applied again to a uniform sample
  of past pairs.
* ``epsilon_at``: ε at an iteration of a ``settings.agent.EpsilonSchedule``.

The settings (``QLearningConfig``, ``EpsilonSchedule``) live in ``settings.agent``.

A batch of blocks is a ``Trajectories``: ``states`` ``(B, T+1)`` int32 state ids, the start
state first, padded past the terminal by repeating it; ``lengths`` ``(B,)`` the number of
layers, terminal included (the number of transitions, T_block).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from blockqnn_jax.nsc.space import SearchSpace
from blockqnn_jax.settings.agent import EpsilonSchedule, QLearningConfig


@flax.struct.dataclass
class Trajectories:
  """A batch of sampled blocks as state-id paths (see the module docstring)."""

  states: jnp.ndarray  # (B, T + 1) int32
  lengths: jnp.ndarray  # (B,) int32


def legal_mask(space: SearchSpace) -> jnp.ndarray:
  """``(num_states, max_actions)`` bool: which (state, action) pairs are legal."""
  return jnp.arange(space.max_actions) < space.num_actions[:, None]


def init_q(space: SearchSpace, q_init: float = 0.5) -> jnp.ndarray:
  """The Q-table, ``(num_states, max_actions)`` float32: ``q_init`` where legal, else -inf.

  Illegal entries hold -inf so that a row's plain max is the max over legal actions: the
  hot loops need no mask. Terminal states' rows are all -inf (nothing follows them).
  """
  return jnp.where(legal_mask(space), jnp.float32(q_init), -jnp.inf)


_GOLDEN = np.uint32(0x9E3779B9)


def _mix32(x: jnp.ndarray) -> jnp.ndarray:
  """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with p ~ 1/2."""
  x = (x ^ (x >> 16)) * np.uint32(0x85EBCA6B)
  x = (x ^ (x >> 13)) * np.uint32(0xC2B2AE35)
  return (x ^ (x >> 16)) | np.uint32(1)  # never 0, so a tied action always beats the rest


@functools.partial(jax.jit, static_argnames=('num_blocks',))
def sample_blocks(key: jax.Array, q: jnp.ndarray, space: SearchSpace, epsilon: jax.Array,
                  num_blocks: int) -> Trajectories:
  """Samples ``num_blocks`` blocks ε-greedily, all in one call.

  At every step each unfinished block takes, with probability ε, an action drawn uniformly
  among the legal ones, and otherwise one drawn uniformly among the legal actions tied at
  the maximum Q.

  Args:
    key: PRNG key.
    q: ``(num_states, max_actions)`` Q-table (-inf marks illegal actions, see ``init_q``).
    space: the search space.
    epsilon: scalar in [0, 1].
    num_blocks: B, blocks to sample (static).

  Returns:
    ``Trajectories`` with ``states`` ``(B, T+1)`` and ``lengths`` ``(B,)``.
  """
  # All unfinished blocks are at step t together, so step t reads only the first
  # step_widths[t] columns of Q: the loop is unrolled with a static width per step, and
  # every random number is drawn up front in one call (per-step draws cost compile time).
  coin, explore_bits, seeds = jax.random.bits(key, (3, space.max_index, num_blocks),
                                              jnp.uint32)
  explore = coin.astype(jnp.float32) * (1.0 / 2**32) < epsilon
  state = jnp.zeros((num_blocks,), jnp.int32)
  done = jnp.zeros((num_blocks,), bool)
  length = jnp.zeros((num_blocks,), jnp.int32)
  path = [state]
  for t, width in enumerate(space.step_widths):
    values = q[state, :width]
    # Legal actions are 0 .. num_actions-1: a uniform one is random bits modulo their
    # number (bias below 2^-22 for any space that fits in memory).
    num_legal = jnp.maximum(space.num_actions[state], 1).astype(jnp.uint32)  # 0 once done
    explore_action = explore_bits[t] % num_legal
    # Among the actions tied at the max, the one with the highest random priority; the
    # priorities hash (per-block random seed, column), one draw per block, not per action.
    tied = values == values.max(axis=-1, keepdims=True)
    priority = _mix32(seeds[t][:, None] ^ (jnp.arange(width, dtype=jnp.uint32) * _GOLDEN))
    greedy_action = jnp.argmax(jnp.where(tied, priority, 0), axis=-1)
    action = jnp.where(explore[t], explore_action.astype(jnp.int32), greedy_action)
    state = jnp.where(done, state, space.action_offset[state] + action)
    length = length + (~done).astype(jnp.int32)
    done = done | space.is_terminal[state]
    path.append(state)
  return Trajectories(states=jnp.stack(path, axis=1), lengths=length)


def _transitions(space: SearchSpace, trajectories: Trajectories, rewards: jnp.ndarray,
                 config: QLearningConfig):
  """Everything the update needs that does not depend on Q, computed for all steps at once.

  Returns ``(B, T)`` arrays: state, action, next state, whether the next state is terminal,
  reward r_t, and whether step t is a real transition (t < T_block).
  """
  states, lengths = trajectories.states, trajectories.lengths
  s, s_next = states[:, :-1], states[:, 1:]
  steps = jnp.arange(space.max_index)[None, :]
  valid = steps < lengths[:, None]
  action = jnp.clip(s_next - space.action_offset[s], 0, space.max_actions - 1)
  rewards = rewards.astype(jnp.float32)[:, None]
  if config.reward_shaping:
    r = jnp.broadcast_to(rewards / jnp.maximum(lengths, 1)[:, None], valid.shape)
  else:
    r = jnp.where(steps == lengths[:, None] - 1, rewards, 0.0)
  return s, action, s_next, space.is_terminal[s_next], r, valid


def _q_update(q: jnp.ndarray, space: SearchSpace, trajectories: Trajectories,
              rewards: jnp.ndarray, config: QLearningConfig = QLearningConfig()) -> jnp.ndarray:
  """Applies the backward Q-update for each block of the batch, in order.

  Args:
    q: Q-table (donated: do not reuse the argument after the call).
    space: the search space.
    trajectories: B blocks.
    rewards: ``(B,)`` float rewards R.
    config: α, γ and reward shaping.

  Returns:
    The updated Q-table.
  """
  num_steps = space.max_index
  columns = jnp.arange(space.max_actions)

  def one_block(q, xs):
    s, action, s_next, terminal_next, r, valid = xs  # each (T,)
    # A path visits each step once, so this block writes row s_{t+1} only at a_{t+1}:
    # the rest of that row, and every old Q(s_t, a_t), can be read up front in one gather,
    # leaving a scalar recurrence from the last transition back to the first.
    next_action = jnp.append(action[1:], -1)
    rest_max = jnp.where(columns == next_action[:, None], -jnp.inf, q[s_next]).max(axis=-1)
    old = q[s, action]
    new = [None] * num_steps
    for t in reversed(range(num_steps)):
      if t == num_steps - 1:
        next_value = 0.0  # s_T can only be a terminal
      else:
        next_value = jnp.where(terminal_next[t], 0.0, jnp.maximum(rest_max[t], new[t + 1]))
      new[t] = (1.0 - config.alpha) * old[t] + config.alpha * (r[t] + config.gamma * next_value)
      if config.monotone:
        new[t] = jnp.maximum(old[t], new[t])
    return q.at[s, action].set(jnp.where(valid, jnp.stack(new), old)), None

  q, _ = jax.lax.scan(one_block, q, _transitions(space, trajectories, rewards, config))
  return q


q_update = jax.jit(_q_update, static_argnames=('config',), donate_argnames=('q',))


@flax.struct.dataclass
class ReplayMemory:
  """Past (block, reward) pairs in fixed-size arrays (a ring buffer)."""

  states: jnp.ndarray  # (capacity, T + 1) int32
  lengths: jnp.ndarray  # (capacity,) int32
  rewards: jnp.ndarray  # (capacity,) float32
  size: jnp.ndarray  # () int32, valid entries
  cursor: jnp.ndarray  # () int32, next slot to write

  @property
  def capacity(self) -> int:
    return int(self.rewards.shape[0])


def init_memory(space: SearchSpace, capacity: int) -> ReplayMemory:
  return ReplayMemory(
      states=jnp.zeros((capacity, space.max_index + 1), jnp.int32),
      lengths=jnp.zeros((capacity,), jnp.int32),
      rewards=jnp.zeros((capacity,), jnp.float32),
      size=jnp.zeros((), jnp.int32),
      cursor=jnp.zeros((), jnp.int32),
  )


def _remember(memory: ReplayMemory, trajectories: Trajectories,
             rewards: jnp.ndarray) -> ReplayMemory:
  """Appends B pairs, overwriting the oldest once the memory is full."""
  batch = rewards.shape[0]
  slots = (memory.cursor + jnp.arange(batch)) % memory.capacity
  return ReplayMemory(
      states=memory.states.at[slots].set(trajectories.states),
      lengths=memory.lengths.at[slots].set(trajectories.lengths),
      rewards=memory.rewards.at[slots].set(rewards.astype(jnp.float32)),
      size=jnp.minimum(memory.size + batch, memory.capacity),
      cursor=(memory.cursor + batch) % memory.capacity,
  )


remember = jax.jit(_remember)


def _replay_update(key: jax.Array, q: jnp.ndarray, space: SearchSpace, memory: ReplayMemory,
                  config: QLearningConfig = QLearningConfig()) -> jnp.ndarray:
  """Re-applies the update to ``config.replay_size`` pairs drawn uniformly from memory.

  An empty memory leaves Q unchanged.
  """
  # An empty memory holds only zero-length padding, which the update skips.
  picks = jax.random.randint(key, (config.replay_size,), 0, jnp.maximum(memory.size, 1))
  sample = Trajectories(states=memory.states[picks], lengths=memory.lengths[picks])
  return _q_update(q, space, sample, memory.rewards[picks], config)


replay_update = jax.jit(_replay_update, static_argnames=('config',), donate_argnames=('q',))


@functools.partial(jax.jit, static_argnames=('config',), donate_argnames=('q',))
def learn(key: jax.Array, q: jnp.ndarray, memory: ReplayMemory, space: SearchSpace,
          trajectories: Trajectories, rewards: jnp.ndarray,
          config: QLearningConfig = QLearningConfig()) -> tuple[jnp.ndarray, ReplayMemory]:
  """One iteration's learning: remember the new pairs, update on them, then replay."""
  memory = _remember(memory, trajectories, rewards)
  q = _q_update(q, space, trajectories, rewards, config)
  q = _replay_update(key, q, space, memory, config)
  return q, memory


# -- the ε schedule ---------------------------------------------------------------------------

def epsilon_at(schedule: EpsilonSchedule, iteration) -> jax.Array:
  """ε at a 0-based iteration (array or int); past the end, the last phase's ε."""
  eps = np.asarray([e for e, _ in schedule.phases], np.float32)
  ends = np.cumsum([n for _, n in schedule.phases])
  phase = jnp.searchsorted(jnp.asarray(ends), iteration, side='right')
  return jnp.asarray(eps)[jnp.minimum(phase, len(eps) - 1)]
