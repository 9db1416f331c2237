"""Streaming: host-side batches of data too large for memory (ImageNet-sized).

Nothing is loaded up front: ``stream_batches`` reads a split by index through the random-access
readers of ``readers`` (TFDS or an image folder / tar), decodes, resizes and centre-crops each
image to one square side, and batches them on a background thread a few batches ahead of the
consumer. ``stream_info`` gives a split's size and class count without reading any image.
Batches are numpy uint8 ``(B, S, S, C)`` with int32 labels ``(B,)``, like ``ImageSplits``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from pathlib import Path
import queue
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from blockqnn_jax.data import folders, readers
from blockqnn_jax.data.splits import DataError, holdout_count

STREAM_SOURCES = ('tfds', 'image_folder')


def _stream_reader(source: str, name: str, split: str, path: str | None,
                   download: bool) -> tuple[int, int, Callable[[], Any]]:
  """Opens a streaming source.

  Returns:
    ``(num_examples, num_classes, open_reader)``: ``open_reader()`` is a context manager whose
    value maps an index to ``(image (H, W, C) uint8, label int)``; it is entered on the
    worker thread and may be called from several decoding threads at once.
  """
  if source == 'tfds':
    return readers.tfds_random_access(name, split, path, download)
  if path is None:
    raise DataError("stream_batches: source 'image_folder' needs path= "
                    f"({readers.PATH_HELP['image_folder']})")
  return folders.folder_random_access(Path(path), split)


def stream_info(source: str = 'tfds', *, name: str = '', split: str = 'train',
                path: str | None = None, download: bool = False) -> tuple[int, int]:
  """``(num_examples, num_classes)`` of a streaming source's split, without reading images."""
  if source not in STREAM_SOURCES:
    raise DataError(f'unknown stream source {source!r}; valid: {", ".join(STREAM_SOURCES)}')
  num_examples, num_classes, _ = _stream_reader(source, name, split, path, download)
  return num_examples, num_classes


def stream_batches(source: str = 'tfds', *, name: str = '', split: str = 'train',
                   batch_size: int, image_size: int, seed: int = 0,
                   path: str | None = None, shuffle: bool = True, num_epochs: int | None = 1,
                   drop_remainder: bool = False, prefetch: int = 2,
                   download: bool = False, indices: Sequence[int] | np.ndarray | None = None,
                   decode_threads: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Host-side batches of resized images, decoded ahead by a background thread.

  The path for data too large for memory (ImageNet): nothing but the ``prefetch`` batches in
  the queue is held. The source is opened and checked here, before the first batch, so a
  missing dataset fails at once.

  Args:
    source: ``'tfds'`` (random-access ``tfds.data_source``) or ``'image_folder'``.
    name: the TFDS dataset name (``'tfds'``), e.g. ``'imagenet2012'``.
    split: the split to read (``'train'``, ``'validation'``, ``'test'``...).
    batch_size: images per batch.
    image_size: output side S: shorter side resized to S, centre S x S crop.
    seed: seeds the per-epoch shuffle (epoch e uses a permutation drawn from ``(seed, e)``).
    path: TFDS ``data_dir`` or the image folder / tar.
    shuffle: False reads in source order.
    num_epochs: passes over the split; None repeats forever.
    drop_remainder: drop each epoch's last partial batch (static shapes for ``jit``).
    prefetch: batches decoded ahead of the consumer.
    download: ``'tfds'`` only: allow TFDS to download and prepare.
    indices: read only these examples of the split (e.g. a held-out validation part); the
      shuffle permutes them.
    decode_threads: threads decoding and resizing images of a batch in parallel (PIL
      releases the GIL while it decodes).

  Returns:
    An iterator of ``(images, labels)``: ``(B, S, S, C)`` uint8 and ``(B,)`` int32. Closing it
    (or dropping it) stops the thread.

  Raises:
    DataError: unknown source or a source that cannot be opened (at call time); a file that
      cannot be decoded (when its batch is reached).
  """
  if source not in STREAM_SOURCES:
    raise DataError(f'unknown stream source {source!r}; valid: {", ".join(STREAM_SOURCES)}')
  if batch_size < 1 or image_size < 1 or prefetch < 1:
    raise DataError(f'batch_size, image_size and prefetch must be >= 1, got {batch_size}, '
                    f'{image_size}, {prefetch}')
  total, _, opener = _stream_reader(source, name, split, path, download)
  if indices is None:
    subset = np.arange(total)
  else:
    subset = np.asarray(indices, np.int64).reshape(-1)
    if subset.size and (subset.min() < 0 or subset.max() >= total):
      raise DataError(f'stream_batches: indices must lie in [0, {total}) for {source} '
                      f'{name or path} {split}')
  if len(subset) == 0 or (drop_remainder and len(subset) < batch_size):
    raise DataError(f'stream_batches: {source} {name or path} {split} has {len(subset)} '
                    f'examples, fewer than one batch of {batch_size}')
  ids = _batch_indices(subset, batch_size, seed, shuffle, drop_remainder, num_epochs)

  def produce(put: Callable[[Any], bool]) -> None:
    with opener() as read, concurrent.futures.ThreadPoolExecutor(
        decode_threads, thread_name_prefix='decode') as pool:
      def one(i):
        image, label = read(int(i))
        return folders.resize_center_crop(image, image_size), label
      for batch in ids:
        pairs = list(pool.map(one, batch))
        if not put((np.stack([im for im, _ in pairs]),
                    np.asarray([lab for _, lab in pairs], np.int32))):
          return

  return _in_background(produce, prefetch, name='stream_batches')


def _batch_indices(subset: np.ndarray, batch_size: int, seed: int, shuffle: bool,
                   drop_remainder: bool, num_epochs: int | None) -> Iterator[np.ndarray]:
  """The example indices of each batch, epoch after epoch; epoch ``e`` is shuffled by the
  permutation drawn from ``(seed, e)``."""
  num_examples = len(subset)
  epoch = 0
  while num_epochs is None or epoch < num_epochs:
    order = (subset[np.random.default_rng([seed, epoch]).permutation(num_examples)]
             if shuffle else subset)
    stop_at = num_examples - num_examples % batch_size if drop_remainder else num_examples
    for start in range(0, stop_at, batch_size):
      yield order[start:start + batch_size]
    epoch += 1


def _in_background(produce: Callable[[Callable[[Any], bool]], None], prefetch: int,
                   name: str) -> Iterator[Any]:
  """Runs ``produce(put)`` on a thread and yields what it puts, at most ``prefetch`` ahead.

  ``put`` returns False once the consumer has gone (the iterator closed or dropped), and
  ``produce`` should then return; an exception ``produce`` raises is raised to the consumer.
  """
  items: queue.Queue = queue.Queue(maxsize=prefetch)
  stop = threading.Event()
  done = object()

  def put(item) -> bool:
    while not stop.is_set():  # time out now and then to notice a closed consumer
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work() -> None:
    try:
      produce(put)
      put(done)
    except BaseException as e:  # hand any failure to the consumer instead of dying silently
      put(e)

  def consume() -> Iterator[Any]:
    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
      while True:
        item = items.get()
        if item is done:
          return
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:
      stop.set()
      thread.join(timeout=5.0)

  return consume()


# Per-channel pixel mean and standard deviation of ImageNet's training set (0-255 scale).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass(frozen=True)
class StreamData:
  """Where a large dataset streams from (see ``data.stream_batches``).

  Attributes:
    source: 'tfds' (e.g. ``name='imagenet2012'``) or 'image_folder' (``path`` to a folder or
      tar laid out ``train/<class>/<image>``).
    name: the TFDS name.
    path: TFDS ``data_dir``, or the folder / tar.
    image_size: images are resized (shorter side) and centre-cropped to this side.
    validation_size: held out of the training split for the reward; a count (>= 1) or a
      fraction.
    seed: decides the held-out part and the shuffles.
    max_train: train on at most this many of the remaining images (0 = all), e.g. the
      common 10% ImageNet proxy.
    mean, std: per-channel normalisation (0-255 scale).
    decode_threads: host threads decoding images.
  """

  source: str
  name: str = ''
  path: str | None = None
  image_size: int = 224
  validation_size: float = 10000
  seed: int = 0
  max_train: int = 0
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  decode_threads: int = 8

  def open(self) -> 'OpenStream':
    """Checks the source and fixes the held-out validation part (reads no images)."""
    total, num_classes = stream_info(self.source, name=self.name, split='train',
                                              path=self.path)
    holdout = holdout_count(self.validation_size, total)
    if not 0 < holdout < total:
      raise DataError(f'validation_size {self.validation_size} must leave both '
                               f'parts of the {total} training images non-empty')
    order = np.random.default_rng([self.seed, 7]).permutation(total)
    train = np.sort(order[holdout:])
    if self.max_train:
      train = np.sort(np.random.default_rng([self.seed, 11]).choice(
          train, min(self.max_train, len(train)), replace=False))
    if len(self.mean) != len(self.std):
      raise ValueError('mean and std need one value per channel')
    return OpenStream(self, num_classes, train, np.sort(order[:holdout]))


@dataclasses.dataclass(frozen=True)
class OpenStream:
  """A ``StreamData`` with its class count and its train / validation example indices."""

  data: StreamData
  num_classes: int
  train_indices: np.ndarray
  val_indices: np.ndarray

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.data.image_size, self.data.image_size, len(self.data.mean))

  @property
  def name(self) -> str:
    return self.data.name or str(self.data.path)

  def batches(self, part: str, batch_size: int, *, seed: int = 0, num_epochs: int = 1):
    """Host batches of the 'train' part (shuffled, full batches only) or the 'val' part
    (in order, last batch partial)."""
    train = part == 'train'
    return stream_batches(
        self.data.source, name=self.data.name, split='train', path=self.data.path,
        batch_size=batch_size, image_size=self.data.image_size, seed=seed, shuffle=train,
        num_epochs=num_epochs, drop_remainder=train,
        indices=self.train_indices if train else self.val_indices,
        decode_threads=self.data.decode_threads)
