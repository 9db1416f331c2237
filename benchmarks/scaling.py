r"""How the Ray executor scales: candidates per hour with 1, 2, 4 workers, side by side.

Each worker count gets a fresh set of Ray worker actors (nothing compiled carried over) and
the same fixed list of distinct blocks (sampled at ε = 1 from a fixed key); the clock starts
once every worker is up, so actor start-up (printed separately) does not count. Printed per
count: wall time, candidates per hour, workers' idle fraction, and the scaling efficiency
``rate(n) / (n * rate(1))``. Then a short search through 2 workers with strict iterations
(``max_staleness = 0``) next to one with staleness 1: the idle fraction an asynchronous
master saves.

  # CPU workers on this machine (one CPU slot each; a 2-core machine saturates at 2):
  python -m benchmarks.scaling
  # on a GPU machine, workers sharing one GPU (1/n of it each):
  python -m benchmarks.scaling --share_gpu --epochs=12 --features=32 --num_blocks=2 \
      --data=npz:data/cifar10-exact-subset.npz
"""

from __future__ import annotations

import tempfile
import time

from absl import app, flags
import jax
import numpy as np

from benchmarks.fixtures import data_source
from blockqnn_jax.data import readers
from blockqnn_jax.executors import factory as executors
from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.nsc import space as space_lib
from blockqnn_jax.search import loop as search_lib
from blockqnn_jax.strategies import qlearning as ql
from configs import cifar

_WORKERS = flags.DEFINE_list('workers', ['1', '2', '4'], 'Worker counts to compare.')
_CANDIDATES = flags.DEFINE_integer('candidates', 8, 'Distinct blocks per worker count.')
_DATA = flags.DEFINE_string('data', 'digits', "'digits', or 'SOURCE:PATH'.")
_MAX_TRAIN = flags.DEFINE_integer('max_train', 1000, 'Cap on training images.')
_EPOCHS = flags.DEFINE_integer('epochs', 2, 'Epochs per candidate.')
_FEATURES = flags.DEFINE_integer('features', 8, 'F, the first stage width.')
_NUM_BLOCKS = flags.DEFINE_integer('num_blocks', 1, 'N, blocks per stage.')
_SHARE_GPU = flags.DEFINE_bool('share_gpu', False, 'n workers share one GPU (1/n each).')
_STALENESS = flags.DEFINE_bool('compare_staleness', True,
                               'Also run a short search with max_staleness 0 and 1.')


def _config(num_classes: int, workers: int):
  config = cifar.get_config('smoke')
  config.network.features = _FEATURES.value
  config.network.num_blocks = _NUM_BLOCKS.value
  config.network.num_classes = num_classes
  config.train.epochs = _EPOCHS.value
  config.executor.kind = 'ray'
  config.executor.ray.num_workers = workers
  if _SHARE_GPU.value:
    config.executor.ray.gpus_per_worker = 1.0 / workers
  return config


def _blocks(config, count: int) -> list[nsc.Block]:
  space = space_lib.build_space(nsc.Grammar(**config.space))
  q = ql.init_q(space)
  found: dict[str, nsc.Block] = {}
  key = jax.random.PRNGKey(0)
  while len(found) < count:
    key, sub = jax.random.split(key)
    for block in space.decode_batch(np.asarray(ql.sample_blocks(sub, q, space, 1.0,
                                                                 64).states)):
      found.setdefault(canonical.canonical_key(block), block)
  return list(found.values())[:count]


def _wait_for_workers(executor, count: int) -> float:
  start = time.perf_counter()
  while executor.num_workers < count:
    time.sleep(0.1)
  return time.perf_counter() - start


def main(argv):
  del argv
  import ray
  counts = [int(n) for n in _WORKERS.value]
  source, path = data_source(_DATA.value)
  splits = readers.load_splits(source, path=path, validation_size=200, seed=0,
                               max_train=_MAX_TRAIN.value)
  if _SHARE_GPU.value:
    ray.init(include_dashboard=False, log_to_driver=False)
  else:  # one CPU slot per worker, even past the cores (then they contend, as measured)
    ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False)
  print(f'ray cluster: {ray.cluster_resources()}')
  blocks = _blocks(_config(splits.num_classes, 1), _CANDIDATES.value)
  seeds = list(range(len(blocks)))
  print(f'{len(blocks)} distinct blocks, {_EPOCHS.value} epochs on '
        f'{len(splits.train_labels)} {splits.image_shape} images each\n')
  print(f'{"workers":>7} {"startup s":>9} {"wall s":>8} {"cand/h":>8} {"idle":>6} '
        f'{"efficiency":>10}')
  base = None
  for n in counts:
    with executors.make_executor(splits, _config(splits.num_classes, n)) as executor:
      startup = _wait_for_workers(executor, n)
      start = time.perf_counter()
      results = executor.map(blocks, seeds)
      wall = time.perf_counter() - start
      idle = 1 - executor.utilisation()
    failed = sum(not r.ok for r in results)
    rate = len(blocks) / wall * 3600
    base = base or rate
    print(f'{n:>7} {startup:>9.1f} {wall:>8.1f} {rate:>8.0f} {idle:>6.1%} '
          f'{rate / (n * base):>10.2f}' + (f'  ({failed} failed)' if failed else ''))

  if _STALENESS.value:
    print('\nsearch through 2 workers, 3 iterations of 4 blocks:')
    print(f'{"staleness":>9} {"wall s":>8} {"cand/h":>8} {"idle":>6}')
    for staleness in (0, 1):
      config = _config(splits.num_classes, 2)
      config.search.epsilon_schedule = ((1.0, 3),)
      config.search.max_staleness = staleness
      with tempfile.TemporaryDirectory() as workdir, \
          executors.make_executor(splits, config) as executor:
        _wait_for_workers(executor, 2)
        summary = search_lib.run_search(config, workdir, executor, progress=False)
      print(f'{staleness:>9} {summary.wall_s:>8.1f} '
            f'{summary.trained / summary.wall_s * 3600:>8.0f} '
            f'{summary.worker_idle_fraction:>6.1%}')
  ray.shutdown()


if __name__ == '__main__':
  app.run(main)
