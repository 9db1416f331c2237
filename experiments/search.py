r"""Runs (or resumes) a BlockQNN search.

  python -m experiments.search --config=configs/cifar.py:smoke --workdir=workdirs/smoke
  python -m experiments.search --config=configs/cifar.py --workdir=workdirs/cifar100 \
      --config.data.source=npz --config.data.path=PATH/cifar10-exact-subset.npz
  python -m experiments.search --config=configs/cifar.py --workdir=workdirs/cifar100 \
      --config.executor.kind=ray --config.executor.ray.address=auto   # on a Ray cluster

Running the same command on the same workdir continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from blockqnn_jax import executor as executor_lib
from blockqnn_jax import search as search_lib
from blockqnn_jax import store as store_lib
from blockqnn_jax.settings import SearchSettings
from blockqnn_jax.training import candidate as candidate_lib
from blockqnn_jax.training import streamed

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar.py:smoke',
                                          'Search config (file[:preset]).')
_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/smoke', 'Where results and state live.')
_ALLOW = flags.DEFINE_bool('allow_config_change', False,
                           'Continue a workdir whose stored config differs.')
_MAX_ITERATIONS = flags.DEFINE_integer('max_iterations', None,
                                       'Stop after this many iterations (resumable).')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show a progress bar.')


def main(argv):
  del argv
  settings = SearchSettings.from_config(_CONFIG.value)
  workdir = Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  # Programs of candidates in flight at a kill are reloaded, not recompiled, on resume.
  candidate_lib.enable_persistent_compilation_cache(workdir / 'compile_cache')
  splits = streamed.load_search_data(settings.data, settings.network, settings.seed)
  if isinstance(splits, streamed.OpenStream):
    logging.info('data %s (streamed): %d train / %d validation images at %s', splits.name,
                 len(splits.train_indices), len(splits.val_indices), splits.image_shape)
  else:
    logging.info('data %s: %d train / %d validation images of %s', splits.name,
                 len(splits.train_labels), len(splits.val_labels), splits.image_shape)
  with executor_lib.make_executor(splits, settings,
                                  compile_cache_dir=str(workdir.resolve() / 'compile_cache')
                                  ) as executor:
    summary = search_lib.run_search(settings, workdir, executor,
                                    allow_config_change=_ALLOW.value,
                                    max_iterations=_MAX_ITERATIONS.value,
                                    progress=_PROGRESS.value)
  best = summary.best
  print(f'iterations {summary.iterations_done}, candidates {summary.candidates} '
        f'(trained {summary.trained}, reused {summary.cached}, failed {summary.failed}), '
        f'cache hit rate {summary.cache_hit_rate:.1%}, {summary.wall_s:.0f} s')
  if summary.worker_idle_fraction is not None:
    print(f'workers idle {summary.worker_idle_fraction:.1%} of the time')
  if best is not None:
    print(f'best reward {best.reward:.4f} (accuracy {best.val_accuracy:.4f}): {best.nsc}')
  print(f"results: {workdir / store_lib.DB_NAME}")


if __name__ == '__main__':
  app.run(main)
