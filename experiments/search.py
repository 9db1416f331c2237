r"""Runs (or resumes) a BlockQNN search.

  python -m experiments.search --config=configs/cifar.py:smoke --workdir=workdirs/smoke
  python -m experiments.search --config=configs/cifar.py --workdir=workdirs/cifar100 \
      --config.data.source=npz --config.data.path=PATH/cifar10-exact-subset.npz
  python -m experiments.search --config=configs/cifar.py --workdir=workdirs/cifar100 \
      --config.executor.kind=ray --config.executor.ray.address=auto   # on a Ray cluster

Running the same command on the same workdir continues where it stopped. Before anything is
written, the settings, the workdir, the data and one small reference block are checked
(``blockqnn_jax.search.preflight``); a mistake ends in one line on stderr and exit status 2
(``--verbose`` adds the traceback), and a workdir that did not exist is not made.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from absl import flags, logging
import jax
from ml_collections import config_flags

from blockqnn_jax.data import search_data, stream
from blockqnn_jax.executors import factory as executors
from blockqnn_jax.search import loop as search_lib
from blockqnn_jax.search import preflight
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.storage import store as store_lib
from blockqnn_jax.storage import workdir_lock
from blockqnn_jax.training import compile_cache as compile_cache_lib
from experiments import user_errors

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar.py:smoke',
                                          'Search config (file[:preset]).')
_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/smoke', 'Where results and state live.')
_ALLOW = flags.DEFINE_bool('allow_config_change', False,
                           'Continue a workdir whose stored config differs.')
_MAX_ITERATIONS = flags.DEFINE_integer('max_iterations', None,
                                       'Stop after this many iterations (resumable).')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show a progress bar.')


def _check_store(workdir: Path) -> None:
  """Refuses (``StoreError``) a workdir whose database is corrupt or someone else's, before
  any data is loaded. Opening it checks it without writing to a bad file."""
  if (workdir / store_lib.DB_NAME).exists():
    store_lib.ResultsStore(workdir).close()


def _summary_lines(summary: search_lib.SearchSummary, workdir: Path) -> list[str]:
  """The closing lines: trained candidates apart from failed ones, then the best block."""
  reused_failed = summary.failed - summary.trained_failed
  lines = [
      f'iterations {summary.iterations_done}, candidates {summary.candidates} (trained '
      f'{summary.trained - summary.trained_failed}, failed in training '
      f'{summary.trained_failed}, reused {summary.cached}'
      f'{f" of which {reused_failed} failed" if reused_failed else ""}'
      f'{f", read from the shared cache {summary.shared}" if summary.shared else ""}), '
      f'cache hit rate {summary.cache_hit_rate:.1%}, {summary.wall_s:.0f} s']
  if summary.reevaluations:
    lines.append(f're-evaluations (the confirm rule): {summary.reevaluations}')
  if summary.stopped:
    lines.append(f'stopped at a rung (search.early_stop): {summary.stopped} of the '
                 f'{summary.trained - summary.trained_failed} trained')
  if summary.worker_idle_fraction is not None:
    lines.append(f'workers idle {summary.worker_idle_fraction:.1%} of the time')
  best = summary.best
  if best is not None:
    lines.append(f'best reward {best.reward:.4f} (accuracy {best.val_accuracy:.4f}): '
                 f'{best.nsc}')
  if summary.kept is not None:
    lines.append(f'kept block: {summary.kept.describe()}')
  lines.append(f'results: {workdir / store_lib.DB_NAME}')
  return lines


def main(argv):
  del argv
  # Every check runs before anything is written: the settings (a rejected config is never
  # stored), then the workdir, the data and one reference block (the preflight).
  settings = SearchSettings.from_config(_CONFIG.value)
  workdir = Path(_WORKDIR.value)
  with contextlib.ExitStack() as holding:
    locked = workdir.exists()
    if locked:
      # Taken first, so a busy workdir is refused at once and a bad database before the
      # data loads. run_search takes it again on this thread (the lock is re-entrant).
      holding.enter_context(workdir_lock.WorkdirLock(workdir, purpose='search'))
      _check_store(workdir)
    splits = search_data.load_search_data(settings.data, settings.network,
                                          settings.data.holdout(settings.seed))
    if isinstance(splits, stream.OpenStream):
      logging.info('data %s (streamed): %d train / %d validation images at %s', splits.name,
                   len(splits.train_indices), len(splits.val_indices), splits.image_shape)
    else:
      logging.info('data %s: %d train / %d validation images of %s', splits.name,
                   len(splits.train_labels), len(splits.val_labels), splits.image_shape)
    checked = preflight.run(settings, splits)
    logging.info('preflight passed in %.1f s: reference block %s trained on %s (loss %.3f)',
                 checked.seconds, checked.reference.block, checked.devices,
                 checked.reference.final_loss)
    if not locked:  # only now is the workdir made (with its lock held): no half-made one
      holding.enter_context(workdir_lock.WorkdirLock(workdir, purpose='search'))
    compile_cache = compile_cache_lib.search_directory(workdir)
    compile_cache_lib.enable_persistent_compilation_cache(compile_cache)
    shared = search_lib.open_eval_cache(settings, splits, jax.default_backend())
    if shared is not None:
      holding.callback(shared.close)
      logging.info('evaluation cache %s: %d results at this fidelity', shared.path,
                   shared.count())
    with executors.make_executor(splits, settings,
                                    compile_cache_dir=str(compile_cache)) as executor:
      summary = search_lib.run_search(settings, workdir, executor,
                                      allow_config_change=_ALLOW.value,
                                      max_iterations=_MAX_ITERATIONS.value,
                                      progress=_PROGRESS.value, eval_cache=shared)
  print('\n'.join(_summary_lines(summary, workdir)))


if __name__ == '__main__':
  user_errors.run(main)
