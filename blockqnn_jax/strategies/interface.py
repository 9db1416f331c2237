"""The ask/tell interface every strategy implements (see the package docstring)."""

from __future__ import annotations

from typing import Any, Protocol

import jax

from blockqnn_jax.nsc.space import SearchSpace
from blockqnn_jax.strategies.qlearning import Trajectories


class Strategy(Protocol):
  """What the search loop calls (see the module docstring)."""

  def init(self, space: SearchSpace, key: jax.Array, budget: int | None = None) -> Any: ...

  def ask(self, space: SearchSpace, state: Any, key: jax.Array, n: int,
          iteration: int | jax.Array = 0) -> tuple[Any, Trajectories]: ...

  def tell(self, space: SearchSpace, state: Any, proposals: Trajectories,
           rewards: jax.Array, key: jax.Array) -> Any: ...
