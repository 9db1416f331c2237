"""Behaviour pinned: the blocks a short search of the paper's and the smoke preset samples,
the rewards it learns from and the sequence a resumed search continues with. A refactor
that changes any of them fails here (the digests were taken at the commit that added this
file, the smoke preset's again when it became the fast agent with its confirm rule; with
synthetic rewards, so they do not depend on floating point)."""

import hashlib
import json

import pytest

from blockqnn_jax.search import loop as search_lib
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.storage import store as store_lib
from configs import cifar
from tests.test_search import ScoringExecutor

PINNED = {
    'paper': '9fd01e93785b89b8',
    'smoke': '08681cc50c002cdc',
    'cpu': 'f0ebb5507593a7e4',
}


def _short(preset):
  config = cifar.get_config(preset)
  config.search.blocks_per_iteration = 6
  config.search.epsilon_schedule = ((1.0, 2), (0.5, 2), (0.1, 2))
  if preset == 'paper':
    config.space.max_index = 11
  return config


def _digest(workdir) -> str:
  with store_lib.ResultsStore.open_read_only(workdir) as store:
    rows = [(c.iteration, c.position, c.nsc, round(c.reward, 6), c.cached)
            for c in store.candidates()]
  return hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()[:16]


@pytest.mark.slow
@pytest.mark.parametrize('preset', sorted(PINNED))
def test_a_short_search_samples_what_it_always_sampled(preset, tmp_path):
  settings = SearchSettings.from_config(_short(preset))
  search_lib.run_search(settings, tmp_path / 'a', ScoringExecutor(), progress=False)
  digest = _digest(tmp_path / 'a')
  # Interrupted after 3 iterations and resumed: the same rows.
  search_lib.run_search(settings, tmp_path / 'b', ScoringExecutor(), progress=False,
                        max_iterations=3)
  search_lib.run_search(settings, tmp_path / 'b', ScoringExecutor(), progress=False)
  assert _digest(tmp_path / 'b') == digest
  assert digest == PINNED[preset]
