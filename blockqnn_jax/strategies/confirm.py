"""Believe a block only once its evidence supports it: the incumbent/challenger rule.

A reward is one short training, and the same block trained again (another seed) scores
differently. Taken at face value, the top of a search's ranking is partly luck (the winner's
curse): the search climbs from a lucky block and hands its user one. This module decides,
from a block's evaluations alone, when a block earns another evaluation and which block is
*kept* (handed to the user), in the manner of SMAC's intensification (Hutter et al. 2011):

* the **incumbent** is the block kept so far: the first block evaluated, then every
  challenger that beats it;
* a newly trained block is a **challenger** while its mean reward is at least the
  incumbent's (less ``slack`` standard errors of the difference): it is evaluated again until
  it has as many evaluations as the incumbent; the incumbent, when matched, is evaluated
  again too, up to ``max_evaluations``; the challenger replaces the incumbent once it has as
  many evaluations and a higher mean, and is dropped as soon as it falls behind;
* once the seed noise is known from the repeats (``min_repeats`` degrees of freedom, the
  pooled within-block variance), a gap of more than ``decisive`` standard errors decides at
  once: a deterministic reward (noise 0) costs a couple of repeats and nothing more.

The rule (``next_action``) is a pure function of a few numbers: the search's ``Study`` runs it
over its store's evaluations (``Evidence``), the NAS-Bench-201 benchmark (``baselines``)
inside a jitted loop (``xp=jax.numpy``). The Study takes its decisions in a fixed order (by
the records, never by timing), so a resumed search takes the same decisions. No JAX here.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from blockqnn_jax.settings.agent import Confirm

# The entry of a search's saved agent state that names the incumbent (a canonical key).
INCUMBENT_KEY = 'confirm.incumbent'
# What ``next_action`` says about a challenger.
DROP, AGAIN, AGAIN_INCUMBENT, ACCEPT = 0, 1, 2, 3
ACTION_NAMES = ('drop', 'again', 'again_incumbent', 'accept')


def next_action(rule: Confirm, mean_c, n_c, mean_i, n_i, noise_ss, noise_df, xp=np):
  """What to do next with a challenger ``c`` against the incumbent ``i``.

  Args:
    rule: the settings.
    mean_c, n_c: the challenger's mean reward and number of evaluations (>= 1).
    mean_i, n_i: the incumbent's.
    noise_ss, noise_df: the pooled within-block sum of squares and its degrees of freedom
      (``noise_update``), over every block evaluated so far.
    xp: ``numpy`` or ``jax.numpy`` (traced, in a jitted loop).

  Returns:
    ``DROP`` (the incumbent stays), ``AGAIN`` (evaluate the challenger again),
    ``AGAIN_INCUMBENT`` (evaluate the incumbent again) or ``ACCEPT`` (the challenger is the
    new incumbent).
  """
  mean_c, n_c, mean_i, n_i, noise_ss, noise_df = (
      xp.asarray(v) for v in (mean_c, n_c, mean_i, n_i, noise_ss, noise_df))
  known = noise_df >= rule.min_repeats
  variance = xp.where(known, noise_ss / xp.maximum(noise_df, 1), 0.0)
  se = xp.sqrt(variance * (1.0 / n_c + 1.0 / n_i))
  gap = mean_c - mean_i
  behind = gap < -rule.slack * se
  decided = known & (xp.abs(gap) > rule.decisive * se)
  ahead = gap > 0
  matched = n_c >= n_i
  i_full = n_i >= rule.max_evaluations
  c_full = n_c >= rule.max_evaluations
  action = xp.where(
      behind | (decided & ~ahead), DROP,
      xp.where(decided & ahead, ACCEPT,
               xp.where(~matched & ~c_full, AGAIN,
                        xp.where(~i_full, AGAIN_INCUMBENT,
                                 xp.where(ahead, ACCEPT, DROP)))))
  return action


def noise_update(mean, m2, n, x, xp=np):
  """One evaluation ``x`` added to a block's ``(mean, m2, n)`` (Welford); returns the new
  triple and the increase of the pooled within-block sum of squares (``m2``'s increase)."""
  n1 = n + 1
  delta = x - mean
  mean1 = xp.where(n > 0, mean + delta / xp.maximum(n1, 1), x)
  m2_1 = xp.where(n > 0, m2 + delta * (x - mean1), 0.0)
  return mean1, m2_1, n1, m2_1 - m2


class Evidence:
  """The evaluations of a search's blocks, by block (a canonical key): each block's mean,
  spread and count, and the noise pooled over every block evaluated more than once.

  ``failed`` counts the evaluations that gave no reward (they take no part in the mean)."""

  def __init__(self):
    self._stats: dict[str, tuple[float, float, int]] = {}
    self.failed: dict[str, int] = {}
    self.noise_ss = 0.0
    self.noise_df = 0

  def add(self, key: str, reward: float | None) -> None:
    """One more evaluation of ``key``: its reward, or None for one that failed."""
    if reward is None:
      self.failed[key] = self.failed.get(key, 0) + 1
      return
    mean, m2, n = self._stats.get(key, (0.0, 0.0, 0))
    mean1, m2_1, n1, ss = noise_update(mean, m2, n, float(reward))
    self._stats[key] = (float(mean1), float(m2_1), int(n1))
    self.noise_ss += float(ss)
    self.noise_df += int(n > 0)

  @property
  def total(self) -> int:
    """Evaluations added, failed ones included."""
    return sum(n for _, _, n in self._stats.values()) + sum(self.failed.values())

  def __contains__(self, key: str) -> bool:
    return key in self._stats

  def keys(self) -> list[str]:
    return list(self._stats)

  def mean(self, key: str) -> float:
    return self._stats[key][0]

  def count(self, key: str) -> int:
    """Evaluations of ``key`` with a reward."""
    return self._stats[key][2] if key in self._stats else 0

  def made(self, key: str) -> int:
    """Evaluations of ``key`` made, failed ones included (the next one's replicate)."""
    return self.count(key) + self.failed.get(key, 0)

  @property
  def noise_std(self) -> float:
    """The pooled seed noise of one evaluation (NaN before any block was repeated)."""
    return math.sqrt(self.noise_ss / self.noise_df) if self.noise_df else float('nan')

  def standard_error(self, key: str) -> float:
    """The standard error of ``key``'s mean: the pooled noise over its count."""
    return self.noise_std / math.sqrt(max(self.count(key), 1))

  def action(self, rule: Confirm, challenger: str, incumbent: str) -> int:
    """``next_action`` for two blocks of this evidence."""
    return int(next_action(rule, self.mean(challenger), self.count(challenger),
                           self.mean(incumbent), self.count(incumbent), self.noise_ss,
                           self.noise_df))


@dataclasses.dataclass(frozen=True)
class Kept:
  """The block a search hands its user, with its evidence.

  Attributes:
    canonical_key: the block (canonically).
    block: its NSC text (as first proposed).
    reward: its mean reward over ``evaluations``.
    evaluations: how many evaluations the mean is over.
    standard_error: the mean's standard error (NaN while no block was evaluated twice).
    rule: 'confirmed' (the incumbent of the ``Confirm`` rule) or 'best single reward'.
  """

  canonical_key: str
  block: str
  reward: float
  evaluations: int
  standard_error: float
  rule: str

  def describe(self) -> str:
    se = '' if math.isnan(self.standard_error) else f' ± {self.standard_error:.4f}'
    plural = 's' if self.evaluations != 1 else ''
    return (f'{self.block}  reward {self.reward:.4f}{se} over {self.evaluations} '
            f'evaluation{plural} ({self.rule})')


def store_evidence(store, iteration: int | None = None) -> tuple[Evidence, dict]:
  """The evaluations in a search's store (a ``store.ResultsStore``, read-only ones
  included), in the order they were made, and the first trained row of each block (by
  canonical key). With ``iteration``: only what iteration's confirmation began with (first
  results of iterations up to it, re-evaluations asked by earlier ones)."""
  evidence, first = Evidence(), {}
  for row in store.candidates():
    if iteration is not None and row.iteration > iteration:
      continue
    if not row.cached and row.result.reusable:
      evidence.add(row.canonical_key, row.reward if row.ok else None)
      first.setdefault(row.canonical_key, row)
  for e in store.evaluations(before_iteration=iteration):
    evidence.add(e.canonical_key, e.result.reward if e.result.ok else None)
  return evidence, first


def kept_block(store) -> Kept | None:
  """The block a search (or study) hands its user, with its evidence: the rule's incumbent
  when the search ran it, else the block with the best single reward (the paper's choice);
  None before any block has a reward."""
  evidence, first = store_evidence(store)
  saved = store.load_agent()
  incumbent = saved[1].get(INCUMBENT_KEY) if saved is not None else None
  if incumbent is not None and str(incumbent) in evidence:
    key, rule = str(incumbent), 'confirmed'
  else:
    best = store.best()
    if best is None:
      return None
    key, rule = best.canonical_key, 'best single reward'
  return Kept(canonical_key=key, block=first[key].nsc, reward=evidence.mean(key),
              evaluations=evidence.count(key), standard_error=evidence.standard_error(key),
              rule=rule)
