"""What a search's candidates say: the best blocks, the ε phases and the headline numbers.

Pure functions of the store's rows (``results.Candidate``), no I/O and no plotting, so the
figures and the page compute nothing of their own and the tests check the numbers directly.
A row's missing numbers are NaN; a row counts as successful when ``Candidate.ok`` (status
'ok' and a finite reward).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Iterable, Sequence

from blockqnn_jax.storage.results import Candidate


def top_blocks(rows: Iterable[Candidate], k: int) -> list[Candidate]:
  """The ``k`` best distinct blocks by reward, best first.

  Blocks are distinct by canonical key; only ``ok`` rows trained to the end count (one
  stopped at a rung, ``search.early_stop``, has that rung's reward). For each key the row
  with the highest reward represents it (the earliest on ties, i.e. the trained one rather
  than a cached reuse). Ties between keys go to the block found first.
  """
  best: dict[str, Candidate] = {}
  for row in rows:
    if not row.ok or row.stopped:
      continue
    held = best.get(row.canonical_key)
    if held is None or (row.reward, -row.id) > (held.reward, -held.id):
      best[row.canonical_key] = row
  return sorted(best.values(), key=lambda r: (-r.reward, r.id))[:max(k, 0)]


def distinct_trained(rows: Iterable[Candidate]) -> list[Candidate]:
  """One ok row per canonical key: the first trained one (else the first reuse).

  The row that was trained carries the block's timings and the ε it was first trained at;
  a cached reuse only copies its reward.
  """
  chosen: dict[str, Candidate] = {}
  for r in rows:
    if not r.ok:
      continue
    held = chosen.get(r.canonical_key)
    if held is None or (held.cached and not r.cached):
      chosen[r.canonical_key] = r
  return list(chosen.values())


def by_epsilon(rows: Iterable[Candidate]) -> dict[float, list[Candidate]]:
  """The rows grouped by the ε they were sampled at, ε descending (exploration first)."""
  groups: dict[float, list[Candidate]] = collections.defaultdict(list)
  for r in rows:
    groups[r.epsilon].append(r)
  return {eps: groups[eps] for eps in sorted(groups, reverse=True)}


@dataclasses.dataclass(frozen=True)
class Phase:
  """A run of consecutive iterations at one ε."""

  epsilon: float
  first_iteration: int
  last_iteration: int


def epsilon_phases(rows: Iterable[Candidate]) -> list[Phase]:
  """The ε phases of the search, in iteration order (ε read from each iteration's rows)."""
  by_iteration: dict[int, float] = {}
  for row in rows:
    by_iteration.setdefault(row.iteration, row.epsilon)
  phases: list[Phase] = []
  for iteration in sorted(by_iteration):
    epsilon = by_iteration[iteration]
    if phases and phases[-1].epsilon == epsilon:
      phases[-1] = dataclasses.replace(phases[-1], last_iteration=iteration)
    else:
      phases.append(Phase(epsilon, iteration, iteration))
  return phases


@dataclasses.dataclass(frozen=True)
class EpsilonStats:
  """Rewards of all candidates sampled at one ε (cached reuses included: they are samples).

  ``mean_reward`` and ``max_reward`` are None when no candidate at this ε succeeded.
  """

  epsilon: float
  candidates: int
  ok: int
  mean_reward: float | None
  max_reward: float | None


@dataclasses.dataclass(frozen=True)
class Summary:
  """Headline numbers of a search.

  Attributes:
    candidates: rows, i.e. blocks sampled.
    iterations: distinct iterations.
    distinct_blocks: distinct canonical keys.
    cached: candidates whose reward was reused from an earlier identical block.
    cache_hit_rate: cached / candidates.
    failed: candidates that are not ``ok`` (status not 'ok', or no finite reward).
    stopped: trained candidates stopped at a rung (``search.early_stop``).
    failure_reasons: (reason, count), most frequent first.
    wall_s: from the start of the first candidate to the last record (None if unknown).
    compute_s: summed ``total_s`` of the candidates actually trained.
    candidates_per_hour: candidates / wall time (None if the wall time is under a second).
    by_epsilon: reward statistics per ε, ε descending.
    best: the best ok row (None if none succeeded).
  """

  candidates: int
  iterations: int
  distinct_blocks: int
  cached: int
  cache_hit_rate: float
  failed: int
  stopped: int
  failure_reasons: tuple[tuple[str, int], ...]
  wall_s: float | None
  compute_s: float
  candidates_per_hour: float | None
  by_epsilon: tuple[EpsilonStats, ...]
  best: Candidate | None

  def exploration_vs_exploitation(self) -> tuple[EpsilonStats, EpsilonStats] | None:
    """The ε=1 phase (or the highest ε) and the lowest-ε phase; None with a single ε."""
    if len(self.by_epsilon) < 2:
      return None
    return self.by_epsilon[0], self.by_epsilon[-1]


def _mean(values: Sequence[float]) -> float | None:
  return sum(values) / len(values) if values else None


def _seconds(value: float) -> float:
  """A duration, with a missing (NaN) one as 0: it adds nothing to a sum."""
  return value if math.isfinite(value) else 0.0


def summarize(rows: Sequence[Candidate]) -> Summary:
  """Computes the headline numbers of a search from its rows."""
  rows = list(rows)
  failed = [r for r in rows if not r.ok]
  reasons = collections.Counter((r.failure_reason.strip() or '(no reason recorded)')
                                for r in failed)
  # created_at is when a row was recorded, i.e. when its candidate finished: it started
  # total_s earlier. A row without a timestamp (0) says nothing about the wall time.
  starts = [r.created_at - _seconds(r.total_s) for r in rows if r.created_at]
  ends = [r.created_at for r in rows if r.created_at]
  wall = max(ends) - min(starts) if ends else None
  stats = []
  for eps, group in by_epsilon(rows).items():
    rewards = [r.reward for r in group if r.ok]
    stats.append(EpsilonStats(eps, len(group), len(rewards), _mean(rewards),
                              max(rewards) if rewards else None))
  cached = sum(r.cached for r in rows)
  best = top_blocks(rows, 1)
  return Summary(
      candidates=len(rows),
      iterations=len({r.iteration for r in rows}),
      distinct_blocks=len({r.canonical_key for r in rows}),
      cached=cached,
      cache_hit_rate=cached / len(rows) if rows else 0.0,
      failed=len(failed),
      stopped=sum(r.stopped for r in rows if not r.cached),
      # Most frequent first; equal counts alphabetically, so the page is deterministic.
      failure_reasons=tuple(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
      wall_s=wall,
      # A cached row was not trained: its time (none, as the store records reuses) is not
      # compute spent.
      compute_s=sum(_seconds(r.total_s) for r in rows if not r.cached),
      # Under a second of records (e.g. one instant cached row) gives no meaningful rate.
      candidates_per_hour=len(rows) / (wall / 3600) if wall and wall >= 1.0 else None,
      by_epsilon=tuple(stats),
      best=best[0] if best else None,
  )
