"""The settings a workdir's search (or study) was started with, and whether a new run may
continue it: a resumed search must be the same search. Free of JAX.
"""

from __future__ import annotations

from blockqnn_jax.settings import base
from blockqnn_jax.settings.base import ConfigMismatch
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.storage import store as store_lib

# Fields that may change between a run and its resumption: they decide how, not what.
SEARCH_RESUMABLE_CHANGES = ('executor.', 'search.stop_after_failures')

__all__ = ['SEARCH_RESUMABLE_CHANGES', 'check_config', 'stored_settings']


def stored_settings(store: store_lib.ResultsStore) -> SearchSettings | None:
  """The settings a workdir's search was started with (None for a new workdir). A field
  added since then reads as its default, so an older workdir resumes as it ran."""
  old = store.get_meta('config')
  return None if old is None else SearchSettings.from_config(old)


def check_config(store: store_lib.ResultsStore, settings: SearchSettings,
                 allow_change: bool) -> None:
  """Stores ``settings`` in a new workdir; refuses a different search on an existing one
  (``ConfigMismatch`` naming the fields) unless ``allow_change``."""
  old = stored_settings(store)
  if old is not None:
    changed = base.differences(old, settings, ignore=SEARCH_RESUMABLE_CHANGES)
    space_changed = [k for k in changed if k.startswith('space.')]
    if space_changed and store.load_agent() is not None:
      raise ConfigMismatch(
          f'{store.path} holds an agent over another search space ({", ".join(space_changed)}'
          '): its Q values and sampled blocks cannot follow a changed space, even with '
          '--allow_config_change; use a new --workdir')
    base.refuse_changes(store.path, old.to_dict(), settings.to_dict(),
                        ignore=SEARCH_RESUMABLE_CHANGES, allow_change=allow_change)
  store.set_meta('config', settings.to_json())
