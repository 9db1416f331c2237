r"""Where a candidate's time goes: compile, train, eval, other — and compile-ahead's payoff.

For a fixed list of blocks (small to large) this prints, per candidate, the wall time split
into compile / train / eval / other, training images per second, and the fraction of the
candidate's time the device spent training. Then it runs the same list through the
executor twice in this one process — compiling each next candidate while the current one
trains, and strictly one after the other — and prints candidates per hour for both and
their ratio. Every block is a new XLA program, so compile time is the number to watch.

  # CPU, smoke scale (digits ship with scikit-learn):
  python -m benchmarks.evaluate
  # the whole training as one scanned program against one program per step:
  python -m benchmarks.evaluate --loops=scan,steps --nocompare_compile_ahead
  # in memory against streamed (the ImageNet path), on real JPEGs:
  python -m benchmarks.evaluate --data=image_folder:../shared/data/cifar10-jpeg-full.tar \
      --max_train=2000 --stream --nocompare_compile_ahead
  # real CIFAR-10 pixels from a path, GPU at paper fidelity (12 epochs, batch 256):
  python -m benchmarks.evaluate --data=npz:../shared/data/cifar10-exact-subset.npz \
      --epochs=12 --batch_size=256 --features=32 --num_blocks=2 --validation_size=500
"""

from __future__ import annotations

import time

from absl import app, flags
import jax
import ml_collections
import numpy as np

from benchmarks.fixtures import BLOCKS, data_source
from blockqnn_jax.data import readers
from blockqnn_jax.data import splits as splits_lib
from blockqnn_jax.data import stream as stream_lib
from blockqnn_jax.executors import local as local_executor
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.training import candidate as candidate_lib
from blockqnn_jax.training import devices, engine, streamed

_DATA = flags.DEFINE_string('data', 'digits', "'digits', or 'SOURCE:PATH' such as "
                            "'npz:../shared/data/cifar10-exact-subset.npz'.")
_VALIDATION = flags.DEFINE_float('validation_size', 0.1, 'Count (>= 1) or fraction.')
_MAX_TRAIN = flags.DEFINE_integer('max_train', None, 'Cap on training images read.')
_EPOCHS = flags.DEFINE_integer('epochs', 2, 'Epochs per candidate (the paper: 12).')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Batch size (the paper: 256).')
_FEATURES = flags.DEFINE_integer('features', 8, 'F, the first stage width (search: 32).')
_NUM_BLOCKS = flags.DEFINE_integer('num_blocks', 1, 'N, blocks per stage.')
_DTYPE = flags.DEFINE_string('compute_dtype', 'auto', "'auto', 'float32' or 'bfloat16'.")
_LOOPS = flags.DEFINE_list('loops', ['auto'], "train.loop values to compare: 'scan' (one "
                           "program), 'steps' (a program per step), 'auto'.")
_DECODE_THREADS = flags.DEFINE_integer('decode_threads', 2, 'Host decoding threads (--stream).')
_SCAN = flags.DEFINE_bool('scan_blocks', False, 'Blocks 2..N of a stage under nn.scan.')
_COMPARE = flags.DEFINE_bool('compare_compile_ahead', True,
                             'Also time the executor with and without compile-ahead.')
_REPEATS = flags.DEFINE_integer('compile_ahead_pairs', 1, 'Pairs of executor runs (with and '
                                 'without compile-ahead, in alternating order) to time.')
_STREAM = flags.DEFINE_bool('stream', False,
                            'Also train the blocks on batches streamed from the host (the '
                            'ImageNet path; --data=image_folder:PATH or tfds:NAME).')


def _settings(num_classes: int, loop: str = 'auto') -> SearchSettings:
  config = ml_collections.ConfigDict()
  config.train = dict(epochs=_EPOCHS.value, batch_size=_BATCH.value, loop=loop,
                      compute_dtype=_DTYPE.value)
  config.reward = dict(mu=0.01, rho=0.02)
  config.network = dict(num_blocks=_NUM_BLOCKS.value, features=_FEATURES.value,
                        num_classes=num_classes, image_size=32, scan_blocks=_SCAN.value)
  return SearchSettings.from_config(config)


def _load() -> splits_lib.ImageSplits:
  source, path = data_source(_DATA.value)
  return readers.load_splits(source, path=path, validation_size=_VALIDATION.value,
                             max_train=_MAX_TRAIN.value)


def _throughput(splits, settings, blocks, compile_ahead: bool) -> float:
  """Candidates per hour through the executor (its own compile cache, started cold)."""
  with local_executor.LocalExecutor(splits, settings, devices=jax.local_devices()[:1],
                                    compile_ahead=compile_ahead) as executor:
    start = time.perf_counter()
    results = executor.map(blocks, seeds=range(len(blocks)))
    elapsed = time.perf_counter() - start
  failed = [r.failure_reason for r in results if not r.ok]
  if failed:
    raise RuntimeError(f'candidates failed: {failed}')
  return len(blocks) / elapsed * 3600


def main(argv):
  del argv
  splits = _load()
  settings = _settings(splits.num_classes)
  device = jax.local_devices()[0]
  print(f'device={device.device_kind} ({device.platform}) data={splits.name} '
        f'train={len(splits.train_labels)} val={len(splits.val_labels)} '
        f'image={splits.image_shape} epochs={_EPOCHS.value} batch={_BATCH.value} '
        f'F={_FEATURES.value} N={_NUM_BLOCKS.value}')
  blocks = [nsc.parse(b, nsc.Grammar(max_index=23)) for b in BLOCKS]

  group = devices.DeviceGroup.place(splits, [device])
  for loop in _LOOPS.value:
    looped = _settings(splits.num_classes, loop)
    trainer = candidate_lib.CandidateTrainer(group, looped.train, looped.reward,
                                             looped.network)
    print(f'\ndata on the device, train.loop={loop} '
          f'({engine.resolve_loop(loop, device.platform)}):')
    _table(trainer, blocks)
  if _STREAM.value:
    source, path = data_source(_DATA.value)
    size = _VALIDATION.value
    stream = stream_lib.StreamData(
        source, name=path if source == 'tfds' else '', path=None if source == 'tfds' else path,
        image_size=splits.image_shape[0], validation_size=size, seed=0,
        max_train=len(splits.train_labels), mean=tuple(splits.mean.tolist()),
        std=tuple(splits.std.tolist()), decode_threads=_DECODE_THREADS.value).open()
    print(f'\nstreamed from the host ({_DECODE_THREADS.value} decoding threads), one '
          'program per step:')
    _table(streamed.StreamingTrainer(stream, [device], settings.train, settings.reward,
                                     settings.network), blocks)

  if _COMPARE.value:
    # Pairs in alternating order, so that whatever the process caches by the second run of
    # a pair favours neither side.
    ratios = []
    for r in range(_REPEATS.value):
      first = r % 2 == 0
      runs = {ahead: _throughput(splits, settings, blocks, compile_ahead=ahead)
              for ahead in (first, not first)}
      ratios.append(runs[True] / runs[False])
      print(f'\ncandidates/hour on one device: compile-ahead {runs[True]:.0f}, one after the '
            f'other {runs[False]:.0f}, ratio {ratios[-1]:.2f}x')
    if len(ratios) > 1:
      print(f'compile-ahead over one after the other, geometric mean of {len(ratios)} pairs: '
            f'{np.exp(np.mean(np.log(ratios))):.2f}x '
            f'(pairs {", ".join(f"{x:.2f}" for x in ratios)})')


def _table(trainer, blocks) -> None:
  print(f'{"layers":>6} {"params":>9} {"compile s":>9} {"train s":>8} {"eval s":>7} '
        f'{"other s":>8} {"total s":>8} {"img/s":>8} {"train %":>8} {"val acc":>8}')
  for block in blocks:
    r = trainer.evaluate(block)
    if not r.ok:
      print(f'{len(block.body):>6} failed: {r.failure_reason}')
      continue
    other = r.total_s - r.compile_s - r.train_s - r.eval_s
    print(f'{len(block.body):>6} {r.params:>9,} {r.compile_s:>9.2f} {r.train_s:>8.2f} '
          f'{r.eval_s:>7.2f} {other:>8.2f} {r.total_s:>8.2f} {r.images_per_s:>8.0f} '
          f'{100 * r.train_s / r.total_s:>7.1f}% {r.val_accuracy:>8.3f}')


if __name__ == '__main__':
  app.run(main)
