"""Early stopping at rungs: which candidates stop training, decided so a resumed search
decides the same.

A candidate is scored at each rung (an epoch of its training, a step of a study's trainer);
it goes on while its score is at least the rung's *line*, and stops at the first rung where
it is below. The line of rung ``r`` for a candidate of iteration ``j`` is the score the best
``promote`` fraction of the candidates of iterations before ``j - S`` reached at ``r``
(``S`` = ``search.max_staleness``; with a ``window``, only the last ``window`` of them to
reach ``r`` in the order they were proposed): successive halving, with each rung's
population the candidates that reached it earlier. Those iterations are complete whenever ``j`` is
proposed, so the lines are fixed when a trial is handed out, whatever the order in which
anything finishes, and a resumed search hands out the same lines. A rung with fewer than
``min_history`` earlier scores stops nothing.

No JAX: pure functions over numbers, used by the study (which computes the lines) and by the
trainers (which apply them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

from blockqnn_jax.settings.search import EarlyStop

__all__ = ['StopLines', 'line', 'outcome_shares', 'stop_lines']


@dataclasses.dataclass(frozen=True)
class StopLines:
  """The rungs of one trial and the line of each: ``stops(step, score)`` decides.

  Attributes:
    rungs: the steps (epochs) at which the trial is scored, increasing.
    lines: the least score that goes on at each rung (``-inf``: everything goes on).
  """

  rungs: tuple[int, ...]
  lines: tuple[float, ...]

  def line_at(self, step: int) -> float | None:
    """The line at ``step``, or None when ``step`` is not a rung."""
    return self.lines[self.rungs.index(step)] if step in self.rungs else None

  def stops(self, step: int, score: float) -> bool:
    """Whether a trial scoring ``score`` at ``step`` stops there (never off a rung; a
    score that is not a number stops)."""
    at = self.line_at(step)
    if at is None:
      return False
    return not (score >= at)  # NaN stops too

  def first_stop(self, scores: Mapping[int, float]) -> int | None:
    """The first rung at which ``scores`` (step -> score) stop, or None."""
    return next((r for r in self.rungs if r in scores and self.stops(r, scores[r])), None)


def line(scores: Sequence[float], promote: float, min_history: int) -> float:
  """The least score among the best ``ceil(promote * n)`` of ``n`` scores; ``-inf`` when
  ``n < min_history`` or ``promote == 1`` (scored, nothing stopped). Scores that are not
  numbers count as the worst."""
  values = sorted((s if math.isfinite(s) else -math.inf for s in scores), reverse=True)
  if len(values) < min_history or promote >= 1.0:
    return -math.inf
  return values[math.ceil(promote * len(values)) - 1]


def stop_lines(history: Iterable[Mapping[int, float]], early_stop: EarlyStop) -> StopLines:
  """The lines for a trial from the rung scores of the candidates before it, in the order
  they were proposed (each a mapping step -> score, holding the rungs it reached)."""
  history = list(history)
  def population(rung: int) -> list[float]:
    scores = [h[rung] for h in history if rung in h]
    return scores[-early_stop.window:] if early_stop.window else scores
  return StopLines(early_stop.rungs, tuple(
      line(population(r), early_stop.promote, early_stop.min_history)
      for r in early_stop.rungs))


def outcome_shares(num_rungs: int, promote: float) -> tuple[float, ...]:
  """Of the candidates of a search in its steady state (every rung's line at its
  ``promote`` quantile), the share that stops at each rung, then the share that trains to
  the end: ``(1 - p, p (1 - p), ..., p^n)``, summing to 1."""
  if num_rungs < 0 or not 0.0 < promote <= 1.0:
    raise ValueError(f'need num_rungs >= 0 and promote in (0, 1], got {num_rungs}, {promote}')
  return tuple(promote**k * (1 - promote) for k in range(num_rungs)) + (promote**num_rungs,)
