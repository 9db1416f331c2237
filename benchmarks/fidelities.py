"""Fidelities of the cpu preset's reward, and training blocks at them through a cache.

Shared by ``benchmarks.fidelity`` (does the preset's reward rank blocks as a longer training
does?) and ``benchmarks.cpu_comparison`` (retraining each strategy's best block at the high
fidelity). No flags here: both pass their own.

A fidelity is ``MAX_TRAIN:EPOCHS:FEATURES[:VALIDATION]`` over ``configs/cifar.py:cpu``:
images read (0 = all), epochs, F, and the validation images held out of them (default: the
preset's).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Sequence

import jax

from benchmarks import fixtures
from blockqnn_jax.data import readers
from blockqnn_jax.data import splits as splits_lib
from blockqnn_jax.executors import local as local_executor
from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.storage import eval_cache as eval_cache_lib
from blockqnn_jax.storage.results import EvalResult
from configs import cifar

# The full JPEG CIFAR-10 in ../shared/data: 50,000 training and 10,000 test images.
JPEG_FULL = 'image_folder:../shared/data/cifar10-jpeg-full.tar'
HIGH = '0:2:8'  # all 50,000 images, two epochs, F = 8: 100x the old preset's 1,000 x 1


@dataclasses.dataclass
class Fidelity:
  """A named fidelity with the settings and data it trains with."""

  name: str
  spec: str
  settings: SearchSettings
  splits: splits_lib.ImageSplits


def parse(spec: str) -> tuple[int, ...]:
  """``(max_train, epochs, features)`` or ``(max_train, epochs, features, validation)``."""
  values = tuple(int(x) for x in spec.split(':'))
  if len(values) not in (3, 4):
    raise ValueError(f'a fidelity is MAX_TRAIN:EPOCHS:FEATURES[:VALIDATION], got {spec!r}')
  return values


def settings_at(spec: str) -> SearchSettings:
  """The cpu preset's settings at fidelity ``spec``."""
  values = parse(spec)
  config = cifar.get_config('cpu')
  config.data.max_train, config.train.epochs, config.network.features = values[:3]
  if len(values) == 4:
    config.data.validation_size = values[3]
  return SearchSettings.from_config(config)


def preset_spec() -> str:
  """The fidelity ``configs/cifar.py:cpu`` trains its candidates at."""
  c = cifar.get_config('cpu')
  spec = f'{c.data.max_train}:{c.train.epochs}:{c.network.features}'
  # The validation size only when it is not the 1,000 every judged fidelity holds out.
  return spec if c.data.validation_size == 1000 else f'{spec}:{int(c.data.validation_size)}'


def judged(name: str, spec: str, npz: str) -> Fidelity:
  """A fidelity of the search itself: the exact subset, the preset's hold-out."""
  settings = settings_at(spec)
  d = settings.data
  splits = readers.load_splits('npz', name='cifar10', path=npz,
                               validation_size=d.validation_size,
                               seed=d.holdout(settings.seed), max_train=d.max_train or None)
  return Fidelity(name, spec, settings, splits)


def high(spec: str = HIGH, data: str = JPEG_FULL) -> Fidelity:
  """The high fidelity: the whole training split of ``data`` ('SOURCE:PATH'), scored on its
  test split, which no search and no judged fidelity ever sees."""
  settings = settings_at(spec)
  source, path = fixtures.data_source(data)
  loaded = readers.load_splits(source, name='cifar10', path=path, validation_size=0,
                               max_train=settings.data.max_train or None)
  splits = dataclasses.replace(loaded, val_images=loaded.test_images,
                               val_labels=loaded.test_labels)
  return Fidelity('high', spec, settings, splits)


def cache_of(f: Fidelity, path: str) -> eval_cache_lib.EvalCache:
  """The evaluation cache at ``path``, at the fidelity of ``f`` (float32 compute, CPU)."""
  train = dataclasses.replace(f.settings.train, compute_dtype='float32')
  digest, description = eval_cache_lib.fidelity_of(train, f.settings.network,
                                                   f.settings.reward, f.splits)
  description['name'] = f.name
  return eval_cache_lib.EvalCache(path, digest, description)


def evaluate(f: Fidelity, blocks: Sequence[nsc.Block], replicates: Iterable[int],
             cache_path: str, train: bool = True) -> dict[tuple[str, int], EvalResult | None]:
  """``{(canonical key, replicate): result}`` of every block, read from the cache or (with
  ``train``) trained from the block's seed of that replicate (``eval_cache.block_seed``) and
  stored, so that a stopped run continues where it was."""
  cache = cache_of(f, cache_path)
  keys = [canonical.canonical_key(b) for b in blocks]
  wanted = [(b, k, r) for b, k in zip(blocks, keys) for r in replicates]
  have = {(k, r): cache.get(k, eval_cache_lib.block_seed(k, r)) for _, k, r in wanted}
  missing = [(b, k, r) for b, k, r in wanted if have[(k, r)] is None]
  print(f'{f.name} ({f.spec}): {len(wanted) - len(missing)} of {len(wanted)} in the cache, '
        f'{len(missing) if train else 0} to train', flush=True)
  if train and missing:
    start = time.perf_counter()
    with local_executor.LocalExecutor(f.splits, f.settings,
                                      devices=jax.local_devices()[:1]) as executor:
      futures = [(k, r, executor.submit(b, seed=eval_cache_lib.block_seed(k, r)))
                 for b, k, r in missing]
      for n, (k, r, future) in enumerate(futures, 1):
        result = future.result()
        have[(k, r)], _ = cache.put(k, eval_cache_lib.block_seed(k, r), result)
        if not result.ok:
          print(f'  failed {result.block}: {result.failure_reason}', flush=True)
        if n % 10 == 0 or n == len(futures):
          print(f'  {n}/{len(futures)} trained, {time.perf_counter() - start:.0f} s',
                flush=True)
  cache.close()
  return have
