"""The early-stopping rule (strategies/rungs.py): lines, stops and the steady-state shares."""

import math

from hypothesis import given, strategies as st
import pytest

from blockqnn_jax.settings.search import EarlyStop
from blockqnn_jax.strategies import rungs

INF = math.inf


def test_the_line_is_the_least_score_of_the_best_promoted_share():
  scores = [0.1, 0.5, 0.3, 0.9, 0.7, 0.2]
  assert rungs.line(scores, 0.5, 1) == 0.5  # the best 3 of 6: 0.9, 0.7, 0.5
  assert rungs.line(scores, 1 / 3, 1) == 0.7  # the best 2
  assert rungs.line(scores, 0.1, 1) == 0.9  # ceil(0.6) = 1: the best alone
  assert rungs.line(scores, 1.0, 1) == -INF  # scored, nothing stopped
  assert rungs.line(scores, 0.5, 7) == -INF  # too little history
  # A score that is not a number counts as the worst.
  assert rungs.line([float('nan'), 0.4, 0.6, 0.8], 0.75, 1) == 0.4


@given(st.lists(st.floats(0, 1), min_size=1, max_size=50, unique=True),
       st.floats(0.01, 0.99))
def test_exactly_the_promoted_share_of_distinct_scores_reaches_the_line(scores, promote):
  at = rungs.line(scores, promote, 1)
  assert sum(s >= at for s in scores) == math.ceil(promote * len(scores))


def test_a_trial_goes_on_at_the_line_and_stops_below_it_or_without_a_number():
  lines = rungs.StopLines(rungs=(1, 3), lines=(0.2, 0.5))
  assert not lines.stops(1, 0.2) and lines.stops(1, 0.19)
  assert not lines.stops(2, -1.0)  # never off a rung
  assert lines.stops(3, float('nan'))
  assert lines.first_stop({1: 0.3, 2: 0.0, 3: 0.4}) == 3
  assert lines.first_stop({1: 0.1, 3: 0.9}) == 1
  assert lines.first_stop({1: 0.3}) is None  # not yet at rung 3


def test_each_rung_takes_its_line_from_the_histories_that_reached_it():
  history = [{1: 0.1, 2: 0.2}, {1: 0.4, 2: 0.5}, {1: 0.3}, {1: 0.6, 2: 0.7}]
  got = rungs.stop_lines(history, EarlyStop(rungs=(1, 2), promote=0.5, min_history=3))
  assert got == rungs.StopLines((1, 2), (0.4, 0.5))  # best 2 of 4; best 2 of 3
  got = rungs.stop_lines(history, EarlyStop(rungs=(1, 2), promote=0.5, min_history=4))
  assert got.lines == (0.4, -INF)  # rung 2 has 3 scores only


def test_a_window_takes_each_line_from_the_last_candidates_to_reach_the_rung():
  # Proposed in this order (getting better); rung 2 reached by the 1st, 3rd and 4th only.
  history = [{1: 0.1, 2: 0.15}, {1: 0.2}, {1: 0.6, 2: 0.65}, {1: 0.7, 2: 0.75}, {1: 0.5}]
  every = rungs.stop_lines(history, EarlyStop(rungs=(1, 2), promote=0.5, min_history=2))
  assert every.lines == (0.5, 0.65)  # best 3 of 5 at rung 1; best 2 of 3 at rung 2
  last = rungs.stop_lines(history, EarlyStop(rungs=(1, 2), promote=0.5, min_history=2,
                                             window=2))
  # Rung 1: the last two to reach it (0.7, 0.5), the best one; rung 2: (0.65, 0.75).
  assert last.lines == (0.7, 0.75)
  with pytest.raises(ValueError, match='window'):
    EarlyStop(rungs=(1,), min_history=8, window=4)  # a window that could never stop


def test_steady_state_shares_halve_at_each_rung_and_sum_to_one():
  assert rungs.outcome_shares(2, 0.5) == (0.5, 0.25, 0.25)
  assert rungs.outcome_shares(0, 0.5) == (1.0,)
  third = rungs.outcome_shares(2, 1 / 3)
  assert third == pytest.approx((2 / 3, 2 / 9, 1 / 9)) and sum(third) == pytest.approx(1)
  # Rungs at 3 and 6 of 12: with half going on, 6 epochs a candidate; with the gpu preset's
  # quarter, 3 + 3/4 + 6/16 = 4.125.
  shares = rungs.outcome_shares(2, 0.5)
  assert sum(s * e for s, e in zip(shares, (3, 6, 12))) == 6
  shares = rungs.outcome_shares(2, 0.25)
  assert sum(s * e for s, e in zip(shares, (3, 6, 12))) == pytest.approx(4.125)
  with pytest.raises(ValueError):
    rungs.outcome_shares(1, 0.0)
