"""Saving a strategy's state as flat arrays and restoring it, checked against its shapes."""

from __future__ import annotations

import math
from typing import Any

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from blockqnn_jax.nsc.space import SearchSpace
from blockqnn_jax.strategies.interface import Strategy


def state_arrays(state) -> dict[str, np.ndarray]:
  """A state as flat ``{name: array}`` (names like ``memory.states``), for ``np.savez``."""
  nested = flax.serialization.to_state_dict(state)
  flat = flax.traverse_util.flatten_dict(nested, sep='.')
  return {name: np.asarray(value) for name, value in flat.items()}


def restore_state(strategy: Strategy, space: SearchSpace, arrays) -> Any:
  """The state saved by ``state_arrays`` (e.g. an ``np.load`` result), checked against the
  shapes and dtypes ``strategy.init(space)`` makes.

  Raises:
    KeyError: a field is missing. ValueError: a shape or dtype differs.
  """
  template = strategy.init(space, jax.random.PRNGKey(0), budget=1)
  names = state_arrays(template)
  restored = {}
  for name, like in names.items():
    if name not in arrays:
      raise KeyError(f'saved state lacks {name!r}')
    value = np.asarray(arrays[name])
    if value.shape != like.shape or value.dtype != like.dtype:
      raise ValueError(f'saved {name!r} is {value.dtype}{list(value.shape)}, expected '
                       f'{like.dtype}{list(like.shape)}')
    restored[name] = jnp.asarray(value)
  nested = flax.traverse_util.unflatten_dict(restored, sep='.')
  return flax.serialization.from_state_dict(template, nested)


def planned_iterations(budget: int, n: int) -> int:
  """Asks of ``n`` proposals needed for ``budget`` blocks without repeats."""
  return max(1, math.ceil(budget / n))


def restore_saved_state(strategy: Strategy, space: SearchSpace, arrays, budget: int) -> Any:
  """``restore_state`` of what a search saved; a workdir from before strategies existed saved
  the Q-learner as ``q`` and ``memory_<field>``, and resumes as that agent."""
  from blockqnn_jax.strategies.qlearner import QLearner  # pylint: disable=import-outside-toplevel
  if 'memory_states' in arrays and isinstance(strategy, QLearner):
    fresh = state_arrays(strategy.init(space, jax.random.PRNGKey(0), budget))
    fresh.update({'q': arrays['q'], **{
        f'memory.{k[len("memory_"):]}': v for k, v in arrays.items()
        if k.startswith('memory_')}})
    arrays = fresh
  return restore_state(strategy, space, arrays)
