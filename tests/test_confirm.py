"""The incumbent/challenger rule: its decisions by hand, its evidence, and its benchmark."""

from __future__ import annotations

import math

import numpy as np
import pytest

from blockqnn_jax.settings import agent
from blockqnn_jax.strategies import confirm as cf

RULE = agent.Confirm(max_evaluations=3, slack=0.0, decisive=3.0, min_repeats=2)


@pytest.mark.parametrize('mean_c, n_c, mean_i, n_i, ss, df, expected', [
    # Noise unknown (fewer than 2 repeats): a challenger ahead on one evaluation each sends
    # the incumbent to a second one; once matched, the challenger must catch up.
    (0.60, 1, 0.50, 1, 0.0, 0, cf.AGAIN_INCUMBENT),
    (0.60, 1, 0.55, 2, 0.0, 1, cf.AGAIN),
    (0.49, 1, 0.50, 1, 0.0, 0, cf.DROP),  # behind: dropped at once
    # Both at the most evaluations: the higher mean wins.
    (0.56, 3, 0.55, 3, 0.0, 1, cf.ACCEPT),
    # Noise known: sigma^2 = 0.02 / 2 = 0.01, se of the gap with 1 and 2 evaluations =
    # sqrt(0.01 * 1.5) = 0.1225; a gap of 0.40 > 3 se decides at once, 0.30 does not.
    (0.90, 1, 0.50, 2, 0.02, 2, cf.ACCEPT),
    (0.80, 1, 0.50, 2, 0.02, 2, cf.AGAIN),
    # Zero noise (every repeat equal): any gap decides, a tie waits.
    (0.51, 1, 0.50, 1, 0.0, 2, cf.ACCEPT),
    (0.49, 1, 0.50, 1, 0.0, 2, cf.DROP),
])
def test_next_action_by_hand(mean_c, n_c, mean_i, n_i, ss, df, expected):
  action = int(cf.next_action(RULE, mean_c, n_c, mean_i, n_i, ss, df))
  assert cf.ACTION_NAMES[action] == cf.ACTION_NAMES[expected]


def test_slack_keeps_a_close_challenger_in():
  # se of the gap = sqrt(0.01 * (1 + 1/2)) = 0.1225: 0.05 behind is within one se.
  loose = agent.Confirm(max_evaluations=3, slack=1.0, decisive=3.0, min_repeats=2)
  assert int(cf.next_action(loose, 0.45, 1, 0.50, 2, 0.02, 2)) == cf.AGAIN
  assert int(cf.next_action(RULE, 0.45, 1, 0.50, 2, 0.02, 2)) == cf.DROP


def test_jax_and_numpy_decide_alike():
  jnp = pytest.importorskip('jax.numpy')
  rng = np.random.default_rng(0)
  for _ in range(200):
    args = (rng.uniform(0.4, 0.6), int(rng.integers(1, 4)), rng.uniform(0.4, 0.6),
            int(rng.integers(1, 4)), rng.uniform(0, 0.01), int(rng.integers(0, 4)))
    assert int(cf.next_action(RULE, *args)) == int(cf.next_action(
        RULE, *(jnp.asarray(a) for a in args), xp=jnp))


def test_evidence_matches_numpy():
  rewards = {'a': [0.5, 0.6, 0.55], 'b': [0.4], 'c': [0.7, 0.66]}
  evidence = cf.Evidence()
  for key, values in rewards.items():
    for value in values:
      evidence.add(key, value)
  evidence.add('b', None)  # a failed evaluation: counted as made, not in the mean
  for key, values in rewards.items():
    assert evidence.mean(key) == pytest.approx(np.mean(values))
    assert evidence.count(key) == len(values)
  assert evidence.made('b') == 2 and evidence.made('zzz') == 0 and evidence.total == 7
  within = sum(((np.asarray(v) - np.mean(v))**2).sum() for v in rewards.values())
  assert evidence.noise_df == 3  # (3 - 1) + (2 - 1)
  assert evidence.noise_ss == pytest.approx(within)
  assert evidence.standard_error('a') == pytest.approx(math.sqrt(within / 3 / 3))


def test_settings_validate():
  with pytest.raises(ValueError, match='max_evaluations'):
    agent.Confirm(max_evaluations=0)
  assert not agent.OFF.active and RULE.active


def test_kept_describes_its_evidence():
  kept = cf.Kept('k', '1,1,3,0,0 2,7,0,0,0', 0.51234, 3, 0.01, 'confirmed')
  assert kept.describe() == ('1,1,3,0,0 2,7,0,0,0  reward 0.5123 ± 0.0100 over 3 '
                             'evaluations (confirmed)')
  single = cf.Kept('k', 'b', 0.5, 1, float('nan'), 'best single reward')
  assert '±' not in single.describe() and 'over 1 evaluation ' in single.describe()


def test_a_search_with_the_rule_is_compared_under_its_own_name():
  from blockqnn_jax.report import compare  # pylint: disable=import-outside-toplevel
  fast = {'agent': {'exploration': 'mutation'}, 'search': {'strategy': 'qlearning'}}
  assert compare.strategy_name(fast) == 'qlearning_fast'
  fast['search']['confirm'] = 3
  assert compare.strategy_name(fast) == 'qlearning_fast+confirm'
  assert compare.strategy_name({'search': {'strategy': 'evolution', 'confirm': 1}}) == 'evolution'
