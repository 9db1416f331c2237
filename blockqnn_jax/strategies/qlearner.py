"""BlockQNN's Q-learning agent as a strategy: the paper's, and the fast one beyond it."""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from blockqnn_jax import qlearning as ql
from blockqnn_jax.space import SearchSpace
from blockqnn_jax.strategies.paths import _select, mutate, mutation_uniforms, path_valid, random_paths
from blockqnn_jax.strategies.tried import TriedSet, _first_acceptable, init_tried, key_hash, tried_add, tried_contains


@flax.struct.dataclass
class QLearnerState:
  """The agent's Q-table and replay memory (as the search saves them today), plus what only
  the budget-sized agent reads: the blocks already told and how many distinct ones."""

  q: jnp.ndarray  # (num_states, max_actions) float32
  memory: ql.ReplayMemory
  tried: TriedSet
  told: jnp.ndarray  # () int32, distinct blocks told (all blocks when none are tracked)
  horizon: jnp.ndarray  # () int32, the budget the schedule is stretched over (0: none)
  restarts: jnp.ndarray  # () int32, times Q was reset at a local optimum (``restart``)


EXPLORATIONS = ('epsilon', 'mutation')
SCHEDULE_UNITS = ('blocks', 'iterations')


@dataclasses.dataclass(frozen=True)
class QLearner:
  """BlockQNN's tabular Q-learning agent; the defaults are the paper's agent, bit for bit.

  The default (``qlearning_paper``) samples with ``qlearning.sample_blocks`` at the ε of
  ``schedule`` for the ask's ``iteration`` and learns with ``qlearning.learn`` — exactly the
  calls the search loop makes today, with the same keys, so the samples are identical.

  The other fields go beyond the paper (``fast_qlearner`` sets them; each has an ablation in
  ``benchmarks/nb201.py``):

  Attributes:
    config: α, γ, Q init (optimism for untried actions), reward shaping, replay
      (``replay_size=0`` turns replay off).
    schedule: the ε schedule.
    budget: None (paper): ``schedule`` runs over ask iterations as written. An int: the
      schedule is sized to a budget of that many distinct blocks (``init``'s ``budget``
      overrides it per search): its phase proportions are kept and stretched over the
      budget, so a search of a few hundred blocks gets a short ε = 1 random phase however
      many blocks each ask makes; past the end the last ε holds.
    schedule_unit: with ``budget``, what the stretched schedule counts: 'blocks' (distinct
      blocks told, as MetaQNN counts its schedule) or 'iterations' (asks, over
      ``ceil(budget / n)`` of them: the paper's schedule merely shortened).
    exploration: 'epsilon' (paper): per-step ε-greedy. 'mutation': with probability ε a
      uniform random block, otherwise the greedy block (ties broken at random) perturbed
      by one-layer mutations (``mutate``) — evolution's and local search's move — instead
      of ε perturbing every step independently.
    mutation_rate: None: as few mutations as give an untried block — of the
      ``max_resamples + 1`` draws the first is the greedy block itself (new when Q prefers
      a splice of good blocks), the rest are split into ``max_mutations`` equal levels of
      1, 2, ... mutations (without ``avoid_repeats`` the greedy block is not a draw: it
      would be proposed again and again). A float: every draw makes a Poisson number of
      mutations with this mean, capped at ``max_mutations``.
    max_mutations: most layers changed (static: that many mutation passes are computed).
    avoid_repeats: do not propose a block already told or already in the same ask: redraw
      up to ``max_resamples`` times (blocks compared by ``key_hash``: canonically), then take
      a uniform random block. On NSC spaces this also redraws invalid blocks.
    max_resamples: redraws per proposal.
    restart: with 'mutation' exploration and ``avoid_repeats``, when the greedy block and
      every one-mutation draw of it (with a ``mutation_rate``: every draw) are already told
      (a local optimum, as far as the draws can tell), reset Q and the replay memory to
      their initial values and propose random blocks: local search's restart, with the
      told blocks still never repeated. With the monotone update the greedy block is the
      best since the last restart; the search's best is in its store.
    tried_capacity: most told blocks remembered for ``avoid_repeats`` and the budget count.
  """

  config: ql.QLearningConfig = ql.QLearningConfig()
  schedule: ql.EpsilonSchedule = ql.EpsilonSchedule()
  budget: int | None = None
  schedule_unit: str = 'blocks'
  exploration: str = 'epsilon'
  mutation_rate: float | None = None
  max_mutations: int = 3
  avoid_repeats: bool = False
  max_resamples: int = 0
  restart: bool = False
  tried_capacity: int = 16384

  def __post_init__(self):
    if self.exploration not in EXPLORATIONS:
      raise ValueError(f'exploration must be one of {EXPLORATIONS}, got {self.exploration!r}')
    if self.schedule_unit not in SCHEDULE_UNITS:
      raise ValueError(f'schedule_unit must be one of {SCHEDULE_UNITS}, got '
                       f'{self.schedule_unit!r}')
    if self.budget is not None and self.budget < 1:
      raise ValueError(f'budget must be positive, got {self.budget}')
    if self.max_mutations < 1 or self.max_resamples < 0:
      raise ValueError('max_mutations must be >= 1 and max_resamples >= 0')
    if self.mutation_rate is not None and self.mutation_rate < 0:
      raise ValueError(f'mutation_rate must be >= 0, got {self.mutation_rate}')

  @property
  def is_paper(self) -> bool:
    """Whether asks are exactly ``qlearning.sample_blocks`` (no field beyond the paper)."""
    return self.budget is None and self.exploration == 'epsilon' and not self.avoid_repeats

  @property
  def _tracks_tried(self) -> bool:
    return self.avoid_repeats or (self.budget is not None and self.schedule_unit == 'blocks')

  def init(self, space: SearchSpace, key: jax.Array, budget=None) -> QLearnerState:
    del key
    if budget is None:
      budget = self.budget or 0
    return QLearnerState(
        q=ql.init_q(space, self.config.q_init),
        memory=ql.init_memory(space, self.config.memory_capacity),
        tried=init_tried(self.tried_capacity if self._tracks_tried else 0),
        told=jnp.zeros((), jnp.int32), horizon=jnp.asarray(budget, jnp.int32),
        restarts=jnp.zeros((), jnp.int32))

  def epsilon(self, state: QLearnerState, iteration, n: int) -> jax.Array:
    """ε for an ask of ``n``: at ``iteration`` of the schedule (paper), or stretched over
    ``state.horizon`` distinct blocks or ``ceil(horizon / n)`` iterations (``budget``)."""
    if self.budget is None:
      return ql.epsilon_at(self.schedule, iteration)
    return _stretched_epsilon(self.schedule, state, iteration, n, self.schedule_unit)

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
    return self.restart and self.avoid_repeats and self.exploration == 'mutation'

  def tell(self, space, state, proposals, rewards, key):
    rewards = jnp.asarray(rewards, jnp.float32)
    # ``learn`` donates Q: hand it a copy, so the caller's old state stays usable.
    q, memory = ql.learn(key, jnp.array(state.q, copy=True), state.memory, space, proposals,
                         rewards, self.config)
    tried, new = tried_add(state.tried, key_hash(space, proposals.states))
    return state.replace(q=q, memory=memory, tried=tried, told=state.told + new)


def _stretched_epsilon(schedule: ql.EpsilonSchedule, state: QLearnerState, iteration, n: int,
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
  epsilon = self.epsilon(state, iteration, n)
  draws = self.max_resamples + 1
  total = draws * n
  # Few random draws of many numbers each: every draw site costs compile time.
  greedy_key, random_key, uniform_key = jax.random.split(key, 3)
  rand = random_paths(space, random_key, total + n)
  fallback = jax.tree.map(lambda x: x[total:], rand)
  rand = jax.tree.map(lambda x: x[:total], rand)
  if self.exploration == 'epsilon':  # the paper's per-step ε, redrawn up to K times
    candidates = ql.sample_blocks(greedy_key, state.q, space, epsilon, total)
  else:
    per_mutation = mutation_uniforms(space)
    # Column 0: the Poisson count, column 1: the ε coin, then each mutation pass's share.
    u = jax.random.uniform(uniform_key, (total, 2 + self.max_mutations * per_mutation))
    candidates = ql.sample_blocks(greedy_key, state.q, space, 0.0, total)
    if self.mutation_rate is None:  # draw-major rows: row k*n + j is draw k of slot j
      count = jnp.asarray(np.repeat(_mutation_levels(draws, self.max_mutations,
                                                     self.avoid_repeats), n))
    else:  # a Poisson number per draw, from the uniform in column 0
      count = jnp.searchsorted(_poisson_cdf(self.mutation_rate, self.max_mutations),
                               u[:, 0], side='right')
    for m in range(self.max_mutations):
      mutant = mutate(space, None, candidates,
                      u[:, 2 + m * per_mutation:2 + (m + 1) * per_mutation])
      candidates = _select(count > m, mutant, candidates)
    candidates = _select(u[:, 1] < epsilon, rand, candidates)  # ε: a uniform random block
  acceptable = path_valid(space, candidates.states, candidates.lengths)
  if self.avoid_repeats:
    acceptable &= ~tried_contains(state.tried, key_hash(space, candidates.states))
  candidates = jax.tree.map(lambda x: x.reshape(draws, n, *x.shape[1:]), candidates)
  acceptable = acceptable.reshape(draws, n)
  levels = _mutation_levels(draws, self.max_mutations, self.avoid_repeats)
  proposals = _first_acceptable(space, candidates, acceptable, fallback,
                                self.avoid_repeats)
  if not self._restarts:
    return state, proposals
  # Slot 0 sees only the told blocks (later slots also avoid earlier ones): if nothing
  # within one mutation of its greedy block is new, the climb is over.
  stuck = ~acceptable[(levels <= 1) if self.mutation_rate is None else slice(None), 0].any()
  fresh = self.init(space, key, 0)
  state = state.replace(
      q=jnp.where(stuck, fresh.q, state.q),
      memory=jax.tree.map(lambda a, b: jnp.where(stuck, a, b), fresh.memory, state.memory),
      restarts=state.restarts + stuck.astype(jnp.int32))
  return state, _select(jnp.broadcast_to(stuck, (n,)), fallback, proposals)


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


def fast_qlearner(budget: int, **overrides) -> QLearner:
  """The Q-learner tuned for a budget of ``budget`` distinct blocks (beyond the paper).

  Tuned on NAS-Bench-201 (``benchmarks/nb201.py``, which runs one ablation per field): the
  first 10% of the budget uniform random; then the greedy block with one layer changed,
  never a block already told (up to 16 redraws), and a restart (Q reset) once nothing
  within one layer of the greedy block is new; α = 1 with the monotone update, γ = 1 and
  reward shaping, so the greedy block is the best block found since the last restart; Q
  starts at 0 (no optimism), no replay.
  """
  fields = dict(
      config=ql.QLearningConfig(alpha=1.0, q_init=0.0, reward_shaping=True, replay_size=0,
                                monotone=True),
      schedule=ql.EpsilonSchedule(((1.0, 1), (0.0, 9))),
      budget=budget, exploration='mutation', max_mutations=1, avoid_repeats=True,
      max_resamples=16, restart=True)
  fields.update(overrides)
  return QLearner(**fields)
