"""Search strategies on the NAS-Bench-201 table, all measured in DISTINCT cells queried.

Every search returns its *trace*: the best accuracy found after each distinct query
(``trace[k]`` is the best over the first ``k + 1`` distinct cells). Re-querying a known cell
is free, as it would be for a real search that caches its trained networks.

* ``random_search`` — uniform cells without repetition.
* ``regularized_evolution`` — aging evolution (Real et al. 2019): tournament of S from a
  population of P, mutate one edge of the winner, the oldest member dies.
* ``qlearning_search`` — BlockQNN's agent (``qlearning.sample_blocks`` / ``learn``,
  unchanged) on ``nb201.build_nb201_space()``, reward = accuracy / 100. The whole search,
  lookup and distinct-cell bookkeeping included, runs in one jitted ``while_loop``, vmapped
  over seeds (``qlearning_search_batch``): the agent's per-iteration work is tiny, so
  per-call dispatch, not arithmetic, is what costs on a CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blockqnn_jax import nb201
from blockqnn_jax import qlearning as ql


# -- random search ----------------------------------------------------------------------------

def random_search(evaluator: nb201.TabularEvaluator, budget: int,
                  rng: np.random.Generator | int) -> np.ndarray:
  """Queries ``budget`` distinct uniform cells; returns the best-so-far trace ``(budget,)``."""
  rng = np.random.default_rng(rng)
  start = evaluator.num_queries
  # Uniform draws with repeats skipped = a uniform permutation's prefix.
  for code in rng.permutation(nb201.NUM_CELLS):
    if evaluator.num_queries - start >= budget:
      break
    evaluator(nb201.code_ops(int(code)))
  return np.asarray(evaluator.history[start:start + budget])


# -- regularized evolution --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvolutionParams:
  """Aging evolution's settings (NAS-Bench-201's REA: P=10, S=3).

  Attributes:
    population: P, the population size (also the number of random initial cells).
    sample: S, the tournament size.
    max_steps_factor: cap on evolution steps, as a multiple of the budget (repeated children
      are free, so without a cap a converged population could loop forever).
  """

  population: int = 10
  sample: int = 3
  max_steps_factor: int = 50

  def __post_init__(self):
    if not 1 <= self.sample <= self.population:
      raise ValueError(f'need 1 <= sample <= population, got {self.sample}, {self.population}')


def mutate(ops: Sequence[int], rng: np.random.Generator) -> tuple[int, ...]:
  """Changes one uniformly chosen edge to a uniformly chosen different op."""
  ops = list(ops)
  edge = int(rng.integers(nb201.NUM_EDGES))
  ops[edge] = (ops[edge] + 1 + int(rng.integers(nb201.NUM_OPS - 1))) % nb201.NUM_OPS
  return tuple(ops)


def regularized_evolution(evaluator: nb201.TabularEvaluator, budget: int,
                          rng: np.random.Generator | int,
                          params: EvolutionParams = EvolutionParams()) -> np.ndarray:
  """Aging evolution until ``budget`` distinct cells are queried; returns the trace.

  The trace is shorter than ``budget`` only if the step cap is hit first.
  """
  rng = np.random.default_rng(rng)
  start = evaluator.num_queries
  spent = lambda: evaluator.num_queries - start
  population: list[tuple[tuple[int, ...], float]] = []
  while len(population) < params.population and spent() < budget:
    cell = nb201.code_ops(int(rng.integers(nb201.NUM_CELLS)))
    population.append((cell, evaluator(cell)))
  for _ in range(params.max_steps_factor * budget):
    if spent() >= budget:
      break
    contenders = rng.choice(len(population), params.sample, replace=False)
    parent = max((population[i] for i in contenders), key=lambda member: member[1])
    child = mutate(parent[0], rng)
    population.append((child, evaluator(child)))
    population.pop(0)  # the oldest dies, not the worst: that is the "regularization"
  return np.asarray(evaluator.history[start:start + budget])


# -- Q-learning -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class QLearnerParams:
  """The agent's search settings.

  Attributes:
    blocks_per_iteration: cells sampled per iteration (the paper's batch is 64 at 11,392
      blocks; small budgets need small batches for the schedule to have any resolution).
    config: α, γ, Q init, reward shaping, replay (``replay_size=0`` turns replay off).
    schedule: the ε schedule; its proportions are scaled to ``ceil(budget / batch)``
      iterations, and past its end ε stays at its last value.
    fixed_epsilon: if set, ε is this constant instead of the schedule.
    max_iterations_factor: cap on iterations, as a multiple of the scaled schedule's length
      (greedy sampling may keep resampling known, free cells).
  """

  blocks_per_iteration: int = 8
  config: ql.QLearningConfig = ql.QLearningConfig()
  schedule: ql.EpsilonSchedule = ql.EpsilonSchedule()
  fixed_epsilon: float | None = None
  max_iterations_factor: int = 20

  def planned_iterations(self, budget: int) -> int:
    return max(1, math.ceil(budget / self.blocks_per_iteration))

  def epsilons(self, budget: int) -> np.ndarray:
    """ε for every iteration up to the cap, ``(max_iterations_factor · planned,)``."""
    planned = self.planned_iterations(budget)
    its = np.arange(self.max_iterations_factor * planned)
    if self.fixed_epsilon is not None:
      return np.full(its.shape, self.fixed_epsilon, np.float32)
    return np.asarray(ql.epsilon_at(self.schedule.scaled(planned), its), np.float32)


def _search_one(key, accuracies, epsilons, budget, max_iterations, space,
                config: ql.QLearningConfig, batch: int, trace_len: int):
  """One seed's whole search as a ``while_loop``; returns (trace, queries, iterations)."""

  def cond(carry):
    _, _, _, _, _, count, it = carry
    return (count < budget) & (it < max_iterations)

  def body(carry):
    key, q, memory, seen, trace, count, it = carry
    key, sample_key, learn_key = jax.random.split(key, 3)
    traj = ql.sample_blocks(sample_key, q, space, epsilons[it], batch)
    codes = nb201.path_codes(traj.states)
    acc = accuracies[codes]

    def record(state, x):  # in sample order: a new cell spends one unit of budget
      seen, trace, count = state
      code, value = x
      new = ~seen[code] & (count < budget)
      best = jnp.where(count > 0, trace[jnp.maximum(count - 1, 0)], -jnp.inf)
      trace = trace.at[count].set(jnp.where(new, jnp.maximum(best, value), trace[count]),
                                  mode='drop')
      return (seen.at[code].set(seen[code] | new), trace, count + new), None

    (seen, trace, count), _ = jax.lax.scan(record, (seen, trace, count), (codes, acc))
    q, memory = ql.learn(learn_key, q, memory, space, traj, acc / 100.0, config)
    return key, q, memory, seen, trace, count, it + 1

  carry = (key, ql.init_q(space, config.q_init), ql.init_memory(space, config.memory_capacity),
           jnp.zeros(nb201.NUM_CELLS, bool), jnp.full(trace_len, -jnp.inf, jnp.float32),
           jnp.int32(0), jnp.int32(0))
  _, _, _, _, trace, count, it = jax.lax.while_loop(cond, body, carry)
  return trace, count, it


# Only what shapes the computation is static: ε, budget and cap are data, so the variants
# of a sweep that share α/γ/replay/shaping share one compilation.
@functools.partial(jax.jit, static_argnames=('config', 'batch', 'trace_len'))
def _search_batch(keys, accuracies, epsilons, budget, max_iterations, space, config, batch,
                  trace_len):
  one = functools.partial(_search_one, config=config, batch=batch, trace_len=trace_len)
  return jax.vmap(one, in_axes=(0, None, None, None, None, None))(
      keys, accuracies, epsilons, budget, max_iterations, space)


@dataclasses.dataclass(frozen=True)
class QSearchResult:
  """Q-learning searches over several seeds.

  Attributes:
    traces: ``(seeds, budget)`` best-so-far per distinct query; where a search hit the
      iteration cap before spending its budget, its last best is carried forward.
    queries: ``(seeds,)`` distinct cells actually queried (``< budget`` only at the cap).
    iterations: ``(seeds,)`` agent iterations run.
  """

  traces: np.ndarray
  queries: np.ndarray
  iterations: np.ndarray


def qlearning_search_batch(accuracies: np.ndarray, budget: int, seeds: Sequence[int],
                           params: QLearnerParams = QLearnerParams(),
                           trace_len: int | None = None) -> QSearchResult:
  """Runs one Q-learning search per seed, all in one jitted, vmapped call.

  Args:
    accuracies: ``(15625,)`` accuracies (percent) by cell code (``NB201Table.by_code``).
    budget: distinct cells each search may query.
    seeds: one search per seed.
    params: the agent's settings.
    trace_len: static trace buffer length (>= budget); pass the largest budget of a sweep
      so that every budget reuses one compiled search.

  Returns:
    A ``QSearchResult``.
  """
  trace_len = budget if trace_len is None else trace_len
  if not 1 <= budget <= min(trace_len, nb201.NUM_CELLS):
    raise ValueError(f'budget {budget} must be in [1, min(trace_len={trace_len}, '
                     f'{nb201.NUM_CELLS})]')
  space = nb201.build_nb201_space()
  # One ε buffer length per trace_len keeps budgets of a sweep on one compilation.
  epsilons = params.epsilons(budget)
  cap = epsilons.size  # this budget's iteration cap
  longest = params.max_iterations_factor * params.planned_iterations(trace_len)
  epsilons = np.pad(epsilons, (0, longest - cap), mode='edge')
  keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(np.asarray(seeds, np.uint32)))
  traces, queries, iterations = _search_batch(
      keys, jnp.asarray(accuracies, jnp.float32), jnp.asarray(epsilons),
      jnp.int32(budget), jnp.int32(cap), space, params.config,
      params.blocks_per_iteration, trace_len)
  traces, queries = np.asarray(traces)[:, :budget], np.asarray(queries)
  filled = np.maximum.accumulate(traces, axis=1)  # carry the last best past an early stop
  return QSearchResult(traces=filled, queries=queries, iterations=np.asarray(iterations))


def qlearning_search(table: nb201.NB201Table, budget: int, seed: int,
                     params: QLearnerParams = QLearnerParams(),
                     dataset: str = 'cifar10') -> np.ndarray:
  """One Q-learning search; returns its best-so-far trace, ``(queries,)`` (<= budget)."""
  result = qlearning_search_batch(table.by_code(dataset), budget, [seed], params)
  return result.traces[0, :int(result.queries[0])]
