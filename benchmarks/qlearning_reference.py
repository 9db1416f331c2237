"""The same agent written the way MetaQNN writes it: Python dicts, one block at a time.

This is not used by the search. It is the oracle the tests hold ``qlearning`` to (same
update, same order, same values) and the baseline ``benchmarks/agent.py`` measures the array
version against. States and actions are NSC tuples; Q is ``{state: {action: value}}``.
"""

from __future__ import annotations

import random

from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.nsc.space import legal_layers

START = (0, 0, 0, 0, 0)
State = tuple[int, int, int, int, int]


class DictQLearner:
  """MetaQNN-style Q-learning over NSC tuples."""

  def __init__(self, grammar: nsc.Grammar, alpha=0.01, gamma=1.0, q_init=0.5,
               reward_shaping=True, seed=0):
    self.grammar = grammar
    self.alpha, self.gamma, self.q_init = alpha, gamma, q_init
    self.reward_shaping = reward_shaping
    self.rng = random.Random(seed)
    self.q: dict[State, dict[State, float]] = {}
    self.replay: list[tuple[list[State], float]] = []

  def actions(self, state: State) -> list[State]:
    index, layer_type = state[0], state[1]
    if layer_type == nsc.LayerType.TERMINAL:
      return []
    nxt = index + 1
    out = [tuple(l) for l in legal_layers(self.grammar, nxt)] if nxt < self.grammar.max_index \
        else []
    if index >= 1:
      out.append((nxt, int(nsc.LayerType.TERMINAL), 0, 0, 0))
    return out

  def _row(self, state: State) -> dict[State, float]:
    if state not in self.q:
      self.q[state] = {a: self.q_init for a in self.actions(state)}
    return self.q[state]

  def sample(self, epsilon: float) -> list[State]:
    """One block as the list of states, start state first."""
    path = [START]
    while path[-1][1] != nsc.LayerType.TERMINAL:
      row = self._row(path[-1])
      if self.rng.random() < epsilon:
        path.append(self.rng.choice(list(row)))
      else:
        best = max(row.values())
        path.append(self.rng.choice([a for a, v in row.items() if v == best]))
    return path

  def update(self, path: list[State], reward: float) -> None:
    """Backward update along one block."""
    steps = len(path) - 1
    for t in reversed(range(steps)):
      s, a = path[t], path[t + 1]
      if self.reward_shaping:
        r = reward / steps
      else:
        r = reward if t == steps - 1 else 0.0
      next_row = self._row(a)
      next_max = max(next_row.values()) if next_row else 0.0
      row = self._row(s)
      row[a] = (1 - self.alpha) * row[a] + self.alpha * (r + self.gamma * next_max)

  def iteration(self, epsilon: float, rewards: list[float], replay_size: int) -> None:
    """Samples ``len(rewards)`` blocks, updates on them, then replays ``replay_size``."""
    paths = [self.sample(epsilon) for _ in rewards]
    for path, reward in zip(paths, rewards):
      self.replay.append((path, reward))
      self.update(path, reward)
    for _ in range(replay_size):
      path, reward = self.rng.choice(self.replay)
      self.update(path, reward)
