"""benchmarks.smoke: the preset it measures, the blocks it draws, and the figures it reads from
a search's store (a search with synthetic rewards: no training)."""

import numpy as np
import pytest

from benchmarks import smoke
from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.search import loop as search_lib
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.storage import store as store_lib
from tests.test_search import ScoringExecutor


def test_changes_to_the_preset_are_typed_and_unknown_fields_refused():
  config = smoke.smoke_config(['train.augment=True', 'train.epochs=3', 'data.name=x'])
  assert config.train.augment is True and config.train.epochs == 3 and config.data.name == 'x'
  with pytest.raises(ValueError, match='no config field train.epoch'):
    smoke.smoke_config(['train.epoch=3'])


def test_the_drawn_blocks_are_distinct_and_legal():
  settings = SearchSettings.from_config(smoke.smoke_config([]))
  blocks = smoke.drawn_blocks(settings, 12, seed=0)
  assert len({canonical.canonical_key(b) for b in blocks}) == 12
  for block in blocks:
    nsc.validate(block, settings.space)


@pytest.mark.slow
def test_search_figures_are_read_from_the_store(tmp_path):
  config = smoke.smoke_config([])
  config.space.max_index = 4
  search_lib.run_search(SearchSettings.from_config(config), tmp_path, ScoringExecutor(),
                        progress=False)
  figures = smoke.search_figures(tmp_path)
  with store_lib.ResultsStore.open_read_only(tmp_path) as store:
    rows = store.candidates()
    trainings = store.trainings()
  ok = [c for c in rows if c.ok]
  assert figures['trainings'] == trainings >= config.search.budget
  assert figures['random_mean'] == pytest.approx(np.mean([c.reward for c in ok
                                                          if c.epsilon == 1.0]))
  assert figures['lowest_epsilon'] == 0.0  # the preset's greedy phase
  assert figures['lowest_epsilon_mean'] == pytest.approx(
      np.mean([c.reward for c in ok if c.epsilon == 0.0]))
  best = max(ok, key=lambda c: c.reward)
  assert (figures['best_reward'], figures['best_iteration']) == (best.reward, best.iteration)
  assert figures['best_after_random'] == (best.epsilon < 1.0)
  assert figures['kept']['evaluations'] >= 1
  assert len(figures['rows']) == len(rows)
