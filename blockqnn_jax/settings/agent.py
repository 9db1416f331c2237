"""The agent's settings: the paper's Q-learning hyper-parameters, the ε schedule, and the fast
agent beyond the paper."""

from __future__ import annotations

import dataclasses

from blockqnn_jax.settings.base import check, one_of

# -- the agent --------------------------------------------------------------------------------

# BlockQNN's ε schedule: (ε, iterations at it), 178 iterations of 64 blocks [reconstructed:
# consistent across reimplementations and the best recollection of the paper].
PAPER_EPSILON_SCHEDULE = ((1.0, 95), (0.9, 7), (0.8, 7), (0.7, 7), (0.6, 10), (0.5, 10),
                          (0.4, 10), (0.3, 10), (0.2, 10), (0.1, 12))


@dataclasses.dataclass(frozen=True)
class EpsilonSchedule:
  """Piecewise-constant ε: ``phases`` is a sequence of (ε, number of iterations).

  The default is BlockQNN's: 95 iterations at ε=1 then 7, 7, 7, 10, 10, 10, 10, 10, 12 at
  0.9 .. 0.1 — 178 iterations in all (11,392 blocks at 64 per iteration).
  """

  phases: tuple[tuple[float, int], ...] = PAPER_EPSILON_SCHEDULE

  def __post_init__(self):
    phases = tuple((float(e), int(n)) for e, n in self.phases)
    if not phases:
      raise ValueError('an ε schedule needs at least one phase')
    for e, n in phases:
      if not 0.0 <= e <= 1.0 or n < 0:
        raise ValueError(f'bad ε phase ({e}, {n}): ε must be in [0, 1], iterations >= 0')
    object.__setattr__(self, 'phases', phases)

  @property
  def num_iterations(self) -> int:
    return sum(n for _, n in self.phases)

  def scaled(self, num_iterations: int) -> 'EpsilonSchedule':
    """The same phase proportions over ``num_iterations`` (largest-remainder rounding)."""
    total = self.num_iterations
    exact = [n * num_iterations / total for _, n in self.phases]
    counts = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in order[:num_iterations - sum(counts)]:
      counts[i] += 1
    return EpsilonSchedule(tuple((e, c) for (e, _), c in zip(self.phases, counts)))


@dataclasses.dataclass(frozen=True)
class QLearningConfig:
  """Hyper-parameters of the agent (hashable: pass it as a static argument).

  Attributes:
    alpha: learning rate α, 0.01 as in MetaQNN [consistent].
    gamma: discount γ, 1.0 [consistent].
    q_init: the constant Q starts at, MetaQNN's 0.5 [reconstructed].
    reward_shaping: BlockQNN's ``r_t = R / T_block`` on every transition [consistent];
      False gives MetaQNN's reward on the last transition only.
    replay_size: (block, reward) pairs replayed after each iteration, MetaQNN's 128
      [reconstructed: the paper replays, how many is not known here].
    memory_capacity: most pairs the replay memory keeps; the oldest are overwritten
      once it is full. The default holds a whole paper-scale search (11,392 blocks).
    monotone: beyond the paper (False is the paper's update): never lower a Q value,
      ``Q ← max(Q, (1-α)·Q + α·target)``. With α = 1, γ = 1 and reward shaping, each
      Q(s_t, a_t) then keeps the best shaped return seen through it, so the greedy block is
      the best block found so far (without shaping only the last step tells blocks apart,
      and the greedy block is a random splice ending like the best one).
  """

  alpha: float = 0.01
  gamma: float = 1.0
  q_init: float = 0.5
  reward_shaping: bool = True
  replay_size: int = 128
  memory_capacity: int = 16384
  monotone: bool = False


# The values of ``search.strategy`` (the agent's own fields say which Q-learner);
# ``strategies.registry.FACTORIES`` also names the Q-learner's two forms for ``Study``.
STRATEGIES = ('qlearning', 'random', 'evolution', 'local_search')
EXPLORATIONS = ('epsilon', 'mutation')
SCHEDULE_UNITS = ('blocks', 'iterations')


@dataclasses.dataclass(frozen=True)
class AgentSettings(QLearningConfig):
  """The Q-learning agent: the paper's hyper-parameters (``QLearningConfig``'s fields) and,
  beyond the paper, what makes it learn within a few hundred candidates. Every field beyond
  the paper is off by default, so the defaults are the paper's agent bit for bit;
  ``FAST_AGENT`` turns them on (the cpu and gpu presets), ``benchmarks/nb201.py`` has an
  ablation of each. ``strategies.QLearner`` takes this value as it is.

  Attributes (beyond ``QLearningConfig``'s):
    budget_sized: stretch the ε schedule's phases over the search's budget of distinct
      blocks, so a short search gets a short random phase however its iterations are cut.
    schedule_unit: with ``budget_sized``, what the stretched schedule counts: 'blocks'
      (distinct blocks told, as MetaQNN counts) or 'iterations' (asks, over
      ``ceil(budget / n)`` of them: the paper's schedule merely shortened).
    exploration: 'epsilon' (the paper: every step ε-greedy on its own) or 'mutation' (with
      probability ε a random block, otherwise the greedy block with one-layer mutations,
      as evolution and local search explore).
    mutation_rate: the mean number of mutations per draw (Poisson, capped at
      ``max_mutations``); 0: as few mutations as give an untried block (the first draw the
      greedy block itself, the rest split into ``max_mutations`` levels of 1, 2, ...).
    max_mutations: most layers changed (that many mutation passes are computed).
    avoid_repeats: do not propose a block already told or already in the same ask
      (compared canonically): redraw up to ``max_resamples`` times, then take a uniform
      random block.
    max_resamples: redraws per proposal.
    restart: with 'mutation' exploration and ``avoid_repeats``, at a local optimum (the
      greedy block and every one-mutation draw of it already told) reset Q and the replay
      memory and propose random blocks, as local search restarts.
    tried_capacity: most told blocks remembered for ``avoid_repeats`` and the budget count.
  """

  budget_sized: bool = False
  schedule_unit: str = 'blocks'
  exploration: str = 'epsilon'
  mutation_rate: float = 0.0
  max_mutations: int = 3
  avoid_repeats: bool = False
  max_resamples: int = 0
  restart: bool = False
  tried_capacity: int = 16384

  def __post_init__(self):
    check(0 < self.alpha <= 1, 'agent.alpha', 'must be in (0, 1]', self.alpha)
    check(0 <= self.gamma <= 1, 'agent.gamma', 'must be in [0, 1]', self.gamma)
    check(self.replay_size >= 0, 'agent.replay_size', 'must be >= 0', self.replay_size)
    check(self.memory_capacity >= 1, 'agent.memory_capacity', 'must be >= 1',
          self.memory_capacity)
    one_of(self.exploration, EXPLORATIONS, 'agent.exploration')
    one_of(self.schedule_unit, SCHEDULE_UNITS, 'agent.schedule_unit')
    check(self.max_mutations >= 1, 'agent.max_mutations', 'must be >= 1', self.max_mutations)
    for name in ('mutation_rate', 'max_resamples', 'tried_capacity'):
      check(getattr(self, name) >= 0, f'agent.{name}', 'must be >= 0', getattr(self, name))

  @property
  def qlearning(self) -> QLearningConfig:
    """The update's hyper-parameters alone (what ``qlearning.learn`` reads)."""
    return QLearningConfig(**{f.name: getattr(self, f.name)
                              for f in dataclasses.fields(QLearningConfig)})

  @property
  def is_paper(self) -> bool:
    """No field beyond the paper is on: the asks are exactly ``qlearning.sample_blocks``."""
    return (not self.budget_sized and self.exploration == 'epsilon'
            and not self.avoid_repeats)


# The fast agent, beyond the paper (tuned on NAS-Bench-201, benchmarks/nb201.py): the first
# 10% of the budget uniform random (FAST_SCHEDULE, stretched over the budget); then the
# greedy block with one layer changed, never a block already told (up to 16 redraws), a
# restart once nothing within one layer of it is new; α = 1 with the monotone update and
# reward shaping, so the greedy block is the best found since the last restart; Q from 0.
FAST_AGENT = AgentSettings(alpha=1.0, q_init=0.0, reward_shaping=True, replay_size=0,
                           monotone=True, budget_sized=True, exploration='mutation',
                           mutation_rate=0.0, max_mutations=1, avoid_repeats=True,
                           max_resamples=16, restart=True)
FAST_SCHEDULE = ((1.0, 1), (0.0, 9))
# With the fast agent, a block is evaluated up to 3 times under the incumbent/challenger rule
# (``search.confirm``): on NAS-Bench-201 with noise of the top cells' spread
# (``benchmarks.nb201 --noise=1``, 100 trainings) it cut the kept cell's regret by 15-20%,
# where 2 evaluations gained less and 4 or more spent too much of the budget.
FAST_CONFIRM = 3


@dataclasses.dataclass(frozen=True)
class Confirm:
  """The incumbent/challenger rule's settings (``search.confirm``; see the module docstring).

  Attributes:
    max_evaluations: most evaluations of one block (1: never evaluate a block again, and
      the kept block is the best single reward: the rule is off).
    slack: a challenger stays in while its mean is no more than ``slack`` standard errors
      of the difference below the incumbent's (0: while it is at least as good).
    decisive: a gap of more than this many standard errors decides without another
      evaluation (once the noise is known).
    min_repeats: degrees of freedom of the pooled noise estimate (repeats beyond a block's
      first evaluation) before it is trusted.
  """

  max_evaluations: int = 3
  slack: float = 0.0
  decisive: float = 3.0
  min_repeats: int = 2

  def __post_init__(self):
    if self.max_evaluations < 1:
      raise ValueError(f'confirm.max_evaluations must be >= 1, got {self.max_evaluations}')
    if self.slack < 0 or self.decisive < 0:
      raise ValueError('confirm.slack and confirm.decisive must be >= 0')
    if self.min_repeats < 1:
      raise ValueError(f'confirm.min_repeats must be >= 1, got {self.min_repeats}')

  @property
  def active(self) -> bool:
    """Whether any block is ever evaluated twice."""
    return self.max_evaluations > 1


# The rule off: every block evaluated once, the kept block the best single reward.
OFF = Confirm(max_evaluations=1)
