"""Strategies by name: a plain dict beside what it registers."""

from __future__ import annotations

from typing import Callable

from blockqnn_jax.strategies.evolution import AgingEvolution
from blockqnn_jax.strategies.interface import Strategy
from blockqnn_jax.strategies.local_search import LocalSearch
from blockqnn_jax.strategies.qlearner import QLearner, fast_qlearner
from blockqnn_jax.strategies.random_search import RandomSearch


STRATEGIES: dict[str, Callable[..., Strategy]] = {
    'qlearning': QLearner,
    'qlearning_paper': QLearner,
    'qlearning_fast': fast_qlearner,
    'random': RandomSearch,
    'evolution': AgingEvolution,
    'local_search': LocalSearch,
}


def make_strategy(name: str, **kwargs) -> Strategy:
  """A strategy by name (``STRATEGIES``); ``kwargs`` go to its constructor.

  ``qlearning_fast`` needs ``budget`` (distinct blocks the search will train).
  """
  if name not in STRATEGIES:
    raise KeyError(f'unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}')
  return STRATEGIES[name](**kwargs)
