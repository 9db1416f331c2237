"""One iteration of the Q-learning agent at paper scale: arrays under jit vs MetaQNN's dicts.

An iteration samples ``--blocks`` blocks ε-greedily, applies the backward update to them,
and replays ``--replay`` past blocks. Both versions run the same algorithm on the same space
(``benchmarks.qlearning_reference`` is the dict version) in this one process; the figure that
matters is the ratio, since absolute times on a shared machine are noisy.

  python -m benchmarks.agent                 # T=23, 64 blocks, replay 128
  python -m benchmarks.agent --max_index=11
"""

from __future__ import annotations

import time

from absl import app, flags
import jax
import numpy as np

from benchmarks import qlearning_reference as reference
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.nsc import space as space_lib
from blockqnn_jax.settings import agent
from blockqnn_jax.strategies import qlearning as ql

_MAX_INDEX = flags.DEFINE_integer('max_index', 23, 'T, the largest layer index.')
_BLOCKS = flags.DEFINE_integer('blocks', 64, 'Blocks sampled per iteration.')
_REPLAY = flags.DEFINE_integer('replay', 128, 'Blocks replayed per iteration.')
_ITERATIONS = flags.DEFINE_integer('iterations', 50, 'Timed iterations (array version).')
_DICT_ITERATIONS = flags.DEFINE_integer('dict_iterations', 3, 'Timed iterations (dicts).')
_WARMUP = flags.DEFINE_integer('warmup', 10, 'Untimed iterations first (both versions).')
_EPSILONS = flags.DEFINE_list('epsilons', ['1.0', '0.5', '0.1'], 'ε values to time at.')


def time_arrays(space, config, epsilon, iterations, blocks, warmup):
  """Seconds per iteration in the steady state, and the first call (compilation) alone."""
  key = jax.random.PRNGKey(0)
  q = ql.init_q(space, config.q_init)
  memory = ql.init_memory(space, config.memory_capacity)
  # Rewards stand in for trained accuracies; a search hands them over from the host too.
  rewards = np.random.default_rng(0).uniform(size=(warmup + iterations + 1, blocks))

  def iteration(i, q, memory):
    sample_key, replay_key = jax.random.split(jax.random.fold_in(key, i))
    traj = ql.sample_blocks(sample_key, q, space, epsilon, blocks)
    return ql.learn(replay_key, q, memory, space, traj, rewards[i], config)

  start = time.perf_counter()
  q, memory = iteration(0, q, memory)
  jax.block_until_ready(q)
  first = time.perf_counter() - start
  for i in range(1, warmup + 1):
    q, memory = iteration(i, q, memory)
  jax.block_until_ready(q)
  start = time.perf_counter()
  for i in range(warmup + 1, warmup + iterations + 1):
    q, memory = iteration(i, q, memory)
  jax.block_until_ready(q)
  return (time.perf_counter() - start) / iterations, first


def time_dicts(grammar, config, epsilon, iterations, blocks):
  learner = reference.DictQLearner(grammar, config.alpha, config.gamma, config.q_init,
                                   config.reward_shaping, seed=0)
  rng = np.random.default_rng(0)
  for _ in range(_WARMUP.value):  # fill the lazily built dict rows: time the steady state
    learner.iteration(epsilon, rng.uniform(size=blocks).tolist(), config.replay_size)
  start = time.perf_counter()
  for _ in range(iterations):
    learner.iteration(epsilon, rng.uniform(size=blocks).tolist(), config.replay_size)
  return (time.perf_counter() - start) / iterations


def main(argv):
  del argv
  grammar = nsc.Grammar(max_index=_MAX_INDEX.value)
  space = space_lib.build_space(grammar)
  config = agent.QLearningConfig(replay_size=_REPLAY.value)
  print(f'backend={jax.default_backend()} T={grammar.max_index} states={space.num_states} '
        f'max_actions={space.max_actions} blocks={_BLOCKS.value} replay={_REPLAY.value}')
  print(f'{"epsilon":>8} {"arrays ms/iter":>15} {"first call s":>13} {"dicts ms/iter":>14} '
        f'{"speed-up":>9}')
  for epsilon in (float(e) for e in _EPSILONS.value):
    arrays, first = time_arrays(space, config, epsilon, _ITERATIONS.value, _BLOCKS.value,
                                _WARMUP.value)
    dicts = time_dicts(grammar, config, epsilon, _DICT_ITERATIONS.value, _BLOCKS.value)
    print(f'{epsilon:>8.2f} {arrays * 1e3:>15.1f} {first:>13.2f} {dicts * 1e3:>14.1f} '
          f'{dicts / arrays:>8.1f}x')


if __name__ == '__main__':
  app.run(main)
