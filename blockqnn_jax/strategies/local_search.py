"""Local search (White, Nolen, Savani 2020): first improvement, random restarts."""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from blockqnn_jax.nsc.space import SearchSpace
from blockqnn_jax.strategies.paths import neighbours, random_paths
from blockqnn_jax.strategies.qlearning import Trajectories


@flax.struct.dataclass
class LocalSearchState:
  """The incumbent and how far through its neighbourhood the search has asked."""

  incumbent: jnp.ndarray  # (T+1,) int32
  length: jnp.ndarray  # () int32
  reward: jnp.ndarray  # () float32
  has_incumbent: jnp.ndarray  # () bool; False: the next ask starts from random blocks
  order: jnp.ndarray  # (num_states,) int32, a random order of the neighbour slots
  cursor: jnp.ndarray  # () int32, next position in ``order``; num_states once exhausted
  restarts: jnp.ndarray  # () int32, local optima reached


@dataclasses.dataclass(frozen=True)
class LocalSearch:
  """Local search (White, Nolen, Savani 2020) with first improvement and random restarts.

  Each ask proposes the incumbent's next unasked neighbours (``neighbours``) in a random
  order drawn when the incumbent was set; slots beyond its last neighbour are filled with
  random blocks. Each tell moves to the first proposal (in ask order) better than the
  incumbent; if none is better and the neighbourhood is exhausted, the incumbent is a
  local optimum and the search restarts: the next ask proposes random blocks and the best
  of them becomes the incumbent. At n = 1 this is exactly the sequential algorithm.
  """

  def init(self, space: SearchSpace, key: jax.Array, budget=None) -> LocalSearchState:
    del key, budget  # nothing here depends on the budget
    num_states = space.layers.shape[0]
    return LocalSearchState(
        incumbent=jnp.zeros((space.max_index + 1,), jnp.int32), length=jnp.zeros((), jnp.int32),
        reward=jnp.full((), -jnp.inf, jnp.float32), has_incumbent=jnp.zeros((), bool),
        order=jnp.arange(num_states, dtype=jnp.int32), cursor=jnp.zeros((), jnp.int32),
        restarts=jnp.zeros((), jnp.int32))

  def ask(self, space, state, key, n, iteration=0):
    del iteration
    return _local_ask(space, state, key, n)

  def tell(self, space, state, proposals, rewards, key):
    del space
    return _local_tell(state, proposals, rewards, key)


@functools.partial(jax.jit, static_argnames=('n',))
def _local_ask(space, state: LocalSearchState, key, n: int):
  num_states = state.order.shape[0]
  paths, lengths, ok = neighbours(space, state.incumbent, state.length)
  ok = ok & state.has_incumbent
  remaining = ok[state.order] & (jnp.arange(num_states) >= state.cursor)
  rank = jnp.cumsum(remaining)  # rank[p]: neighbours left up to and including position p
  wanted = jnp.arange(1, n + 1)
  position = jnp.minimum(jnp.searchsorted(rank, wanted, side='left'), num_states - 1)
  have = wanted <= rank[-1]
  chosen = state.order[position]
  fresh = random_paths(space, key, n)
  proposals = Trajectories(
      states=jnp.where(have[:, None], paths[chosen], fresh.states),
      lengths=jnp.where(have, lengths[chosen], fresh.lengths))
  # Past the last neighbour asked; at the end when none is left after this ask.
  cursor = jnp.where(rank[-1] <= n, num_states, position[n - 1] + 1)
  return state.replace(cursor=jnp.where(state.has_incumbent, cursor, state.cursor)), proposals


@jax.jit
def _local_tell(state: LocalSearchState, proposals, rewards, key):
  rewards = jnp.asarray(rewards, jnp.float32)
  better = rewards > state.reward
  move = state.has_incumbent & better.any()
  start = ~state.has_incumbent
  pick = jnp.where(move, jnp.argmax(better), jnp.argmax(rewards))  # first better / best
  settle = move | start
  exhausted = state.has_incumbent & ~move & (state.cursor >= state.order.shape[0])
  order = jax.random.permutation(key, state.order.shape[0]).astype(jnp.int32)
  return LocalSearchState(
      incumbent=jnp.where(settle, proposals.states[pick], state.incumbent),
      length=jnp.where(settle, proposals.lengths[pick], state.length),
      reward=jnp.where(settle, rewards[pick], state.reward),
      has_incumbent=settle | (state.has_incumbent & ~exhausted),
      order=jnp.where(settle, order, state.order),
      cursor=jnp.where(settle, 0, state.cursor),
      restarts=state.restarts + exhausted.astype(jnp.int32))
