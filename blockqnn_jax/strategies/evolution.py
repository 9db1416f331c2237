"""Aging (regularized) evolution, Real et al. 2019."""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from blockqnn_jax.nsc.space import SearchSpace
from blockqnn_jax.strategies.paths import select, mutate, mutation_uniforms, random_paths
from blockqnn_jax.strategies.qlearning import Trajectories


@flax.struct.dataclass
class EvolutionState:
  """The population: the last P blocks told, in a ring (``cursor`` is the oldest once full)."""

  states: jnp.ndarray  # (P, T+1) int32
  lengths: jnp.ndarray  # (P,) int32
  rewards: jnp.ndarray  # (P,) float32
  born: jnp.ndarray  # (P,) int32, when each member was told (0, 1, 2, ...)
  size: jnp.ndarray  # () int32
  cursor: jnp.ndarray  # () int32
  told: jnp.ndarray  # () int32


@dataclasses.dataclass(frozen=True)
class AgingEvolution:
  """Aging (regularized) evolution, Real et al. 2019.

  The first P blocks told are uniform random; after that each proposal is a one-layer
  mutation (``mutate``) of the best of S members drawn without replacement, and each block
  told joins the population while the oldest member leaves. With n > 1 all n children of
  one ask come from the same population. Repeats join the population too, as in the
  original (a repeat costs no training, only a slot).

  Attributes:
    population: P (NAS-Bench-201's REA uses 10).
    sample: S, the tournament size (3).
  """

  population: int = 10
  sample: int = 3

  def __post_init__(self):
    if not 1 <= self.sample <= self.population:
      raise ValueError(f'need 1 <= sample <= population, got {self.sample}, {self.population}')

  def init(self, space: SearchSpace, key: jax.Array, budget=None) -> EvolutionState:
    del key, budget  # nothing here depends on the budget
    p = self.population
    return EvolutionState(
        states=jnp.zeros((p, space.max_index + 1), jnp.int32),
        lengths=jnp.zeros((p,), jnp.int32), rewards=jnp.full((p,), -jnp.inf, jnp.float32),
        born=jnp.full((p,), -1, jnp.int32), size=jnp.zeros((), jnp.int32),
        cursor=jnp.zeros((), jnp.int32), told=jnp.zeros((), jnp.int32))

  def ask(self, space, state, key, n, iteration=0):
    del iteration
    return state, _evolution_ask(self, space, state, key, n)

  def tell(self, space, state, proposals, rewards, key):
    del space, key
    return _evolution_tell(self, state, proposals, rewards)


@functools.partial(jax.jit, static_argnames=('self', 'n'))
def _evolution_ask(self: AgingEvolution, space, state: EvolutionState, key, n: int):
  random_key, uniform_key = jax.random.split(key)
  fresh = random_paths(space, random_key, n)
  p = self.population
  u = jax.random.uniform(uniform_key, (n, p + mutation_uniforms(space)))
  priorities = jnp.where(jnp.arange(p) < state.size, u[:, :p], -1.0)
  _, contenders = jax.lax.top_k(priorities, self.sample)  # (n, S) distinct members
  winner = jnp.take_along_axis(
      contenders, jnp.argmax(state.rewards[contenders], axis=-1)[:, None], axis=1)[:, 0]
  parents = Trajectories(states=state.states[winner], lengths=state.lengths[winner])
  children = mutate(space, None, parents, u[:, p:])
  # Slot j is still part of the random initial population if fewer than P blocks will have
  # been told before it (an empty population has no parent at all).
  initial = (state.told + jnp.arange(n) < p) | (state.size == 0)
  return select(initial, fresh, children)


@functools.partial(jax.jit, static_argnames=('self',))
def _evolution_tell(self: AgingEvolution, state: EvolutionState, proposals, rewards):
  def one(state, x):
    states, length, reward = x
    slot = state.cursor
    return EvolutionState(
        states=state.states.at[slot].set(states), lengths=state.lengths.at[slot].set(length),
        rewards=state.rewards.at[slot].set(reward), born=state.born.at[slot].set(state.told),
        size=jnp.minimum(state.size + 1, self.population),
        cursor=(slot + 1) % self.population, told=state.told + 1), None

  state, _ = jax.lax.scan(one, state, (proposals.states, proposals.lengths,
                                       jnp.asarray(rewards, jnp.float32)))
  return state
