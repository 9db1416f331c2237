"""BlockQNN's Q-learning agent as a strategy: the paper's, and the fast one beyond it."""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from blockqnn_jax.nsc.space import SearchSpace
from blockqnn_jax.settings.agent import FAST_AGENT, FAST_SCHEDULE, AgentSettings, EpsilonSchedule
from blockqnn_jax.strategies import qlearning as ql
from blockqnn_jax.strategies.paths import (
  select,
  mutate,
  mutation_uniforms,
  path_valid,
  random_paths,
)
from blockqnn_jax.strategies.tried import (
  TriedSet,
  first_acceptable,
  init_tried,
  key_hash,
  tried_add,
  tried_contains,
)


@flax.struct.dataclass
class QLearnerState:
  """The agent's Q-table and replay memory (as the search saves them), plus what only
  the budget-sized agent reads: the blocks already told and how many distinct ones."""

  q: jnp.ndarray  # (num_states, max_actions) float32
  memory: ql.ReplayMemory
  tried: TriedSet
  told: jnp.ndarray  # () int32, distinct blocks told (all blocks when none are tracked)
  horizon: jnp.ndarray  # () int32, the budget the schedule is stretched over (0: none)
  restarts: jnp.ndarray  # () int32, times Q was reset at a local optimum (``restart``)


@dataclasses.dataclass(frozen=True)
class QLearner:
  """BlockQNN's tabular Q-learning agent, configured by ``settings.AgentSettings`` as it is.

  With the default agent (``qlearning_paper``) it samples with ``qlearning.sample_blocks``
  at the ε of ``schedule`` for the ask's ``iteration`` and learns with ``qlearning.learn``:
  the paper's agent, bit for bit. The agent's fields beyond the paper (``FAST_AGENT`` sets
  them; ``fast_qlearner``) change how it explores; see ``AgentSettings`` for each. In short:
  ``budget_sized`` stretches ``schedule``'s phases over the budget of distinct blocks
  (``init``'s ``budget``, else ``budget`` here; past the end the last ε holds);
  'mutation' exploration proposes, with probability ε, a uniform random block and
  otherwise the greedy block perturbed by one-layer mutations (``paths.mutate``);
  ``avoid_repeats`` redraws a block already told (compared by ``tried.key_hash``:
  canonically), also an invalid one on NSC spaces; ``restart`` resets Q and the replay
  memory at a local optimum.

  Attributes:
    agent: the agent's settings.
    schedule: the ε schedule.
    budget: distinct blocks the schedule is stretched over when ``init`` is given none
      (budget-sized agents only).
  """

  agent: AgentSettings = AgentSettings()
  schedule: EpsilonSchedule = EpsilonSchedule()
  budget: int | None = None

  def __post_init__(self):
    if self.budget is not None and self.budget < 1:
      raise ValueError(f'budget must be positive, got {self.budget}')

  @property
  def is_paper(self) -> bool:
    """Whether asks are exactly ``qlearning.sample_blocks`` (no field beyond the paper)."""
    return self.agent.is_paper

  @property
  def _tracks_tried(self) -> bool:
    a = self.agent
    return a.avoid_repeats or (a.budget_sized and a.schedule_unit == 'blocks')

  def init(self, space: SearchSpace, key: jax.Array, budget=None) -> QLearnerState:
    del key
    if budget is None:
      budget = self.budget or 0
    return QLearnerState(
        q=ql.init_q(space, self.agent.q_init),
        memory=ql.init_memory(space, self.agent.memory_capacity),
        tried=init_tried(self.agent.tried_capacity if self._tracks_tried else 0),
        told=jnp.zeros((), jnp.int32), horizon=jnp.asarray(budget, jnp.int32),
        restarts=jnp.zeros((), jnp.int32))

  def epsilon(self, state: QLearnerState, iteration, n: int) -> jax.Array:
    """ε for an ask of ``n``: at ``iteration`` of the schedule (paper), or stretched over
    ``state.horizon`` distinct blocks or ``ceil(horizon / n)`` iterations (budget-sized)."""
    if not self.agent.budget_sized:
      return ql.epsilon_at(self.schedule, iteration)
    return _stretched_epsilon(self.schedule, state, iteration, n, self.agent.schedule_unit)

  def ask(self, space, state, key, n, iteration=0):
    if self.is_paper:
      # Exactly the search loop's call: same function, key and ε, so the same samples.
      return state, ql.sample_blocks(key, state.q, space, self.epsilon(state, iteration, n), n)
    moved, proposals = _qlearner_ask(self, space, state, key, n, iteration)
    # Only a restart moves the state on an ask: otherwise hand back the very object, so a
    # caller can tell (``is``) that there is nothing new to save.
    return (moved if self._restarts else state), proposals

  @property
  def _restarts(self) -> bool:
    a = self.agent
    return a.restart and a.avoid_repeats and a.exploration == 'mutation'

  def tell(self, space, state, proposals, rewards, key):
    rewards = jnp.asarray(rewards, jnp.float32)
    # ``learn`` donates Q: hand it a copy, so the caller's old state stays usable.
    q, memory = ql.learn(key, jnp.array(state.q, copy=True), state.memory, space, proposals,
                         rewards, self.agent.qlearning)
    tried, new = tried_add(state.tried, key_hash(space, proposals.states))
    return state.replace(q=q, memory=memory, tried=tried, told=state.told + new)


def _stretched_epsilon(schedule: EpsilonSchedule, state: QLearnerState, iteration, n: int,
                       unit: str) -> jax.Array:
  """ε of ``schedule`` with its phases stretched over the horizon (a traced value).

  Phase k covers the fraction [C_{k-1}, C_k) / C of the horizon, C_k the cumulative
  iterations of the written schedule; so a 10% random phase is the first 10% of the budget.
  """
  eps = np.asarray([e for e, _ in schedule.phases], np.float32)
  fractions = np.cumsum([c for _, c in schedule.phases]) / schedule.num_iterations
  horizon = jnp.maximum(state.horizon, 1).astype(jnp.float32)
  if unit == 'iterations':
    position = jnp.asarray(iteration, jnp.float32)
    horizon = jnp.ceil(horizon / n)
  else:
    position = state.told.astype(jnp.float32)
  phase = jnp.searchsorted(jnp.asarray(fractions, jnp.float32) * horizon, position,
                           side='right')
  return jnp.asarray(eps)[jnp.minimum(phase, len(eps) - 1)]


@functools.partial(jax.jit, static_argnames=('self', 'n'))
def _qlearner_ask(self: QLearner, space, state: QLearnerState, key, n: int, iteration):
  agent = self.agent
  rate = agent.mutation_rate or None  # 0: as few mutations as give an untried block
  epsilon = self.epsilon(state, iteration, n)
  draws = agent.max_resamples + 1
  total = draws * n
  # Few random draws of many numbers each: every draw site costs compile time.
  greedy_key, random_key, uniform_key = jax.random.split(key, 3)
  rand = random_paths(space, random_key, total + n)
  fallback = jax.tree.map(lambda x: x[total:], rand)
  rand = jax.tree.map(lambda x: x[:total], rand)
  if agent.exploration == 'epsilon':  # the paper's per-step ε, redrawn up to K times
    candidates = ql.sample_blocks(greedy_key, state.q, space, epsilon, total)
  else:
    per_mutation = mutation_uniforms(space)
    # Column 0: the Poisson count, column 1: the ε coin, then each mutation pass's share.
    u = jax.random.uniform(uniform_key, (total, 2 + agent.max_mutations * per_mutation))
    candidates = ql.sample_blocks(greedy_key, state.q, space, 0.0, total)
    if rate is None:  # draw-major rows: row k*n + j is draw k of slot j
      count = jnp.asarray(np.repeat(_mutation_levels(draws, agent.max_mutations,
                                                     agent.avoid_repeats), n))
    else:  # a Poisson number per draw, from the uniform in column 0
      count = jnp.searchsorted(_poisson_cdf(rate, agent.max_mutations),
                               u[:, 0], side='right')
    for m in range(agent.max_mutations):
      mutant = mutate(space, None, candidates,
                      u[:, 2 + m * per_mutation:2 + (m + 1) * per_mutation])
      candidates = select(count > m, mutant, candidates)
    candidates = select(u[:, 1] < epsilon, rand, candidates)  # ε: a uniform random block
  acceptable = path_valid(space, candidates.states, candidates.lengths)
  if agent.avoid_repeats:
    acceptable &= ~tried_contains(state.tried, key_hash(space, candidates.states))
  candidates = jax.tree.map(lambda x: x.reshape(draws, n, *x.shape[1:]), candidates)
  acceptable = acceptable.reshape(draws, n)
  levels = _mutation_levels(draws, agent.max_mutations, agent.avoid_repeats)
  proposals = first_acceptable(space, candidates, acceptable, fallback,
                               agent.avoid_repeats)
  if not self._restarts:
    return state, proposals
  # Slot 0 sees only the told blocks (later slots also avoid earlier ones): if nothing
  # within one mutation of its greedy block is new, the climb is over.
  stuck = ~acceptable[(levels <= 1) if rate is None else slice(None), 0].any()
  fresh = self.init(space, key, 0)
  state = state.replace(
      q=jnp.where(stuck, fresh.q, state.q),
      memory=jax.tree.map(lambda a, b: jnp.where(stuck, a, b), fresh.memory, state.memory),
      restarts=state.restarts + stuck.astype(jnp.int32))
  return state, select(jnp.broadcast_to(stuck, (n,)), fallback, proposals)


def _poisson_cdf(rate: float, cap: int) -> np.ndarray:
  """``(cap,)`` P(X <= k) for X ~ Poisson(rate), k < cap: a uniform's rank is X capped."""
  k = np.arange(cap)
  pmf = np.exp(-rate + k * np.log(max(rate, 1e-30)) - np.cumsum(np.log(np.maximum(k, 1))))
  return np.cumsum(pmf).astype(np.float32)


def _mutation_levels(draws: int, max_mutations: int, greedy_first: bool) -> np.ndarray:
  """``(draws,)`` mutations per draw: 0 (the greedy block itself) if ``greedy_first`` and
  there are two draws or more, then equal levels 1 .. ``max_mutations``."""
  head = [0] if greedy_first and draws > 1 else []
  rest = draws - len(head)
  return np.concatenate([head, 1 + np.arange(rest) * max_mutations // rest]).astype(np.int32)


def fast_qlearner(budget: int, schedule=FAST_SCHEDULE, **agent) -> QLearner:
  """The Q-learner tuned for a budget of ``budget`` distinct blocks (beyond the paper):
  ``settings.FAST_AGENT`` over ``FAST_SCHEDULE``; ``agent`` overrides its fields (one
  ablation each in ``benchmarks/nb201.py``)."""
  return QLearner(agent=dataclasses.replace(FAST_AGENT, **agent),
                  schedule=EpsilonSchedule(schedule), budget=budget)
