"""Random search: uniform legal blocks (``paths.random_paths``); it learns nothing."""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from blockqnn_jax.nsc.space import SearchSpace
from blockqnn_jax.strategies.paths import random_paths


@flax.struct.dataclass
class RandomState:
  told: jnp.ndarray  # () int32, blocks told


@dataclasses.dataclass(frozen=True)
class RandomSearch:
  """Uniform legal blocks (see ``random_paths``); it learns nothing."""

  def init(self, space: SearchSpace, key: jax.Array, budget=None) -> RandomState:
    del space, key, budget
    return RandomState(told=jnp.zeros((), jnp.int32))

  def ask(self, space, state, key, n, iteration=0):
    del iteration
    return state, random_paths(space, key, n)

  def tell(self, space, state, proposals, rewards, key):
    del space, proposals, key
    return RandomState(told=state.told + jnp.asarray(rewards).shape[0])
