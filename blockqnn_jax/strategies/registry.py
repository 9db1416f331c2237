"""Strategies by name: a plain dict beside what it registers."""

from __future__ import annotations

from typing import Callable

from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.strategies.evolution import AgingEvolution
from blockqnn_jax.strategies.interface import Strategy
from blockqnn_jax.strategies.local_search import LocalSearch
from blockqnn_jax.strategies.qlearner import QLearner, fast_qlearner
from blockqnn_jax.strategies.random_search import RandomSearch

FACTORIES: dict[str, Callable[..., Strategy]] = {
    'qlearning': QLearner,
    'qlearning_paper': QLearner,
    'qlearning_fast': fast_qlearner,
    'random': RandomSearch,
    'evolution': AgingEvolution,
    'local_search': LocalSearch,
}


def make_strategy(name: str, **kwargs) -> Strategy:
  """A strategy by name (``FACTORIES``); ``kwargs`` go to its constructor.

  ``qlearning_fast`` needs ``budget`` (distinct blocks the search will train).
  """
  if name not in FACTORIES:
    raise KeyError(f'unknown strategy {name!r}; expected one of {sorted(FACTORIES)}')
  return FACTORIES[name](**kwargs)


def for_settings(settings: SearchSettings) -> Strategy:
  """The strategy ``settings.search.strategy`` names, with its settings as they are."""
  loop = settings.search
  if loop.strategy == 'qlearning':
    return QLearner(agent=settings.agent, schedule=loop.schedule, budget=loop.distinct_budget)
  if loop.strategy == 'evolution':
    return AgingEvolution(population=loop.population, sample=loop.tournament)
  return make_strategy(loop.strategy)


def proposal_epsilon(strategy, state, iteration: int, n: int) -> float:
  """What the ε column of the store records: the Q-learner's ε; 1 for random search (all
  exploration) and 0 for evolution and local search (they exploit a population or an
  incumbent)."""
  if isinstance(strategy, QLearner):
    return float(strategy.epsilon(state, iteration, n))
  return 1.0 if isinstance(strategy, RandomSearch) else 0.0
