"""Image datasets for evaluating candidate networks: in-memory splits plus on-device augmentation.

For CIFAR-sized data the whole training split fits on the accelerator, so the product of this
module is plain numpy arrays (``ImageSplits``, uint8 pixels, int32 labels) and a jittable
``augment`` that the train step applies to each batch: no host input pipeline at all.

Sources for ``load_splits`` (every one returns train / validation / test, the validation split
always held out of the *training* data, class-stratified and seeded):

* ``'tfds'``: a prepared TFDS dataset read through ``tfds.data_source`` (no TensorFlow needed),
  e.g. ``cifar10``, ``cifar100`` or any dataset with ``image`` and ``label`` features.
* ``'cifar_batches'``: the official python pickles, ``cifar-10-batches-py`` or
  ``cifar-100-python`` (a directory, or the downloaded ``.tar.gz`` itself).
* ``'npz'``: a ``.npz`` with ``x_train, y_train[, x_test, y_test]`` (or the ``_subset`` keys of
  ``cifar10-exact-subset.npz``).
* ``'image_folder'``: a directory or ``.tar`` laid out ``{train,test}/<class>/<image>``.
* ``'digits'``: scikit-learn's bundled 8x8 handwritten digits: no download, no files; what the
  smoke search uses on a fresh machine.

ImageNet-sized data is not loaded into memory: ``stream_batches`` decodes, resizes and batches
it on the host in a background thread.

Pixels stay uint8 (N, H, W, C) until ``normalize``/``augment`` turn a batch into float32; mean
and std are per channel in pixel units (0..255).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import pickle
import queue
import tarfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SOURCES = ('tfds', 'cifar_batches', 'npz', 'image_folder', 'digits')
STREAM_SOURCES = ('tfds', 'image_folder')
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                   'ship', 'truck')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp')
# TFDS datasets too large for host memory: ``load_splits`` refuses them up front.
_STREAM_ONLY_TFDS = ('imagenet2012', 'imagenet2012_subset', 'imagenet2012_real',
                     'imagenet2012_corrupted', 'imagenet2012_multilabel', 'imagenet2012_fewshot')
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_TEST_SEED = 0  # fixed: the digits test split must not move with the validation seed


class DataError(ValueError):
  """A dataset is missing, malformed or unusable; raised before any training starts."""


# ----------------------------------------------------------------------------------------------
# Splits.


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class ImageSplits:
  """Train / validation / test splits of an image-classification dataset, in host memory.

  Construction validates every field (``DataError`` on a problem). ``eq`` and ``hash`` are off:
  the fields are arrays.

  Attributes:
    train_images: ``(N_train, H, W, C)`` uint8, C in {1, 3}.
    train_labels: ``(N_train,)`` int32 in ``[0, num_classes)``.
    val_images: ``(N_val, H, W, C)`` uint8, held out of the source's training data.
    val_labels: ``(N_val,)`` int32.
    test_images: ``(N_test, H, W, C)`` uint8; ``N_test`` may be 0 (no test split).
    test_labels: ``(N_test,)`` int32.
    num_classes: K.
    class_names: K names, label order.
    name: dataset name, for logs.
  """

  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  name: str = ''

  def __post_init__(self):
    if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1:
      raise DataError(f'num_classes must be a positive int, got {self.num_classes!r}')
    if len(self.class_names) != self.num_classes:
      raise DataError(f'{len(self.class_names)} class names for {self.num_classes} classes')
    shape = None
    for split in ('train', 'val', 'test'):
      images = getattr(self, f'{split}_images')
      labels = getattr(self, f'{split}_labels')
      if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise DataError(f'{split}_images must be a uint8 numpy array, got '
                        f'{getattr(images, "dtype", type(images))}')
      if not isinstance(labels, np.ndarray) or labels.dtype != np.int32:
        raise DataError(f'{split}_labels must be an int32 numpy array, got '
                        f'{getattr(labels, "dtype", type(labels))}')
      _check_split(images, labels, self.num_classes, what=f'{split} split')
      if shape is None:
        shape = images.shape[1:]
      elif images.shape[1:] != shape and len(images):
        raise DataError(f'{split} images are {images.shape[1:]}, train images {shape}')
    if len(self.train_labels) == 0:
      raise DataError('the train split is empty')

  def __repr__(self) -> str:
    return (f'ImageSplits(name={self.name!r}, train={self.train_images.shape}, '
            f'val={self.val_images.shape}, test={self.test_images.shape}, '
            f'num_classes={self.num_classes})')

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of every image."""
    return tuple(self.train_images.shape[1:])

  @functools.cached_property
  def _stats(self) -> tuple[np.ndarray, np.ndarray]:
    return pixel_stats(self.train_images)

  def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the train split: two ``(C,)`` float32, pixel units 0..255.

    Computed once, then cached. The std is floored at 1 grey level so that a constant channel
    cannot divide by zero.
    """
    return self._stats

  @property
  def mean(self) -> np.ndarray:
    """``(C,)`` float32 per-channel mean of the train pixels (0..255 units)."""
    return self._stats[0]

  @property
  def std(self) -> np.ndarray:
    """``(C,)`` float32 per-channel std of the train pixels (0..255 units, >= 1)."""
    return self._stats[1]


def pixel_stats(images: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of ``(N, H, W, C)`` integer pixels, summed exactly in int64.

  Args:
    images: ``(N, H, W, C)`` uint8 (any integer dtype with values below 2**15), N >= 1.
    chunk: images per chunk (bounds the int32 temporary at ``chunk * H * W * C * 4`` bytes).

  Returns:
    ``(mean, std)``, each ``(C,)`` float32 in pixel units; std floored at 1.
  """
  c = images.shape[-1]
  total = np.zeros(c, np.int64)
  total_sq = np.zeros(c, np.int64)
  for start in range(0, len(images), chunk):
    block = images[start:start + chunk].reshape(-1, c).astype(np.int32)
    total += block.sum(0, dtype=np.int64)
    total_sq += np.square(block).sum(0, dtype=np.int64)
  count = max(1, images.size // c)
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
  return mean.astype(np.float32), np.maximum(std, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Validation of arrays and the stratified hold-out.


def _check_split(images: Any, labels: Any, num_classes: int | None, *,
                 what: str) -> tuple[np.ndarray, np.ndarray]:
  """Checks one split and returns it as (uint8 images, int32 labels).

  Args:
    images: ``(N, H, W, C)`` with C in {1, 3}, integer values in 0..255.
    labels: ``(N,)`` (or ``(N, 1)``) integers in ``[0, num_classes)``.
    num_classes: K, or None to check only that labels are >= 0.
    what: names the split and its origin in error messages.

  Raises:
    DataError: naming the shape, dtype or value that is wrong.
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    hint = ' (grayscale images need a trailing channel axis of 1)' if images.ndim == 3 else ''
    raise DataError(f'{what}: images have shape {images.shape}, expected (N, H, W, C) with '
                    f'C in {{1, 3}}{hint}')
  if images.dtype != np.uint8:
    if not np.issubdtype(images.dtype, np.integer):
      raise DataError(f'{what}: images have dtype {images.dtype}, expected uint8 pixels 0..255')
    if images.size and (images.min() < 0 or images.max() > 255):
      raise DataError(f'{what}: pixel values span {images.min()}..{images.max()}, expected '
                      '0..255')
    images = images.astype(np.uint8)
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]  # Keras-style (N, 1) labels
  if labels.ndim != 1:
    raise DataError(f'{what}: labels have shape {labels.shape}, expected (N,)')
  if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{what}: labels have dtype {labels.dtype}, expected integers')
  if len(labels) != len(images):
    raise DataError(f'{what}: {len(images)} images but {len(labels)} labels')
  if labels.size:
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
      bound = f'[0, {num_classes})' if num_classes is not None else '>= 0'
      raise DataError(f'{what}: labels span {low}..{high}, expected {bound}')
  return images, labels.astype(np.int32)


def _holdout_count(size: int | float, n: int, *, what: str) -> int:
  """How many of ``n`` examples ``size`` (a count, or a fraction in [0, 1)) asks for."""
  if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, float, np.integer,
                                                                   np.floating)):
    raise DataError(f'{what} must be an int count or a float fraction, got {size!r}')
  if isinstance(size, (float, np.floating)):
    if not 0.0 <= size < 1.0:
      raise DataError(f'{what} as a fraction must be in [0, 1), got {size}; pass an int for a '
                      'count')
    count = int(round(size * n))
  else:
    count = int(size)
  if count < 0:
    raise DataError(f'{what} must be >= 0, got {size}')
  if count >= n:
    raise DataError(f'{what} = {count} but only {n} training examples: fewer examples than '
                    'the held-out split needs (at least one must stay for training)')
  return count


def stratified_holdout(labels: np.ndarray, size: int | float, *,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits example indices into kept and held out, class-stratified and seeded.

  Each class gives up a share of the held-out examples proportional to its frequency (largest
  remainder rounding), chosen uniformly at random within the class.

  Args:
    labels: ``(N,)`` integer labels >= 0.
    size: held-out count (int) or fraction of N (float in [0, 1)).
    seed: the same seed gives the same split.

  Returns:
    ``(keep, holdout)``: sorted int64 index arrays, disjoint, together ``0..N-1``.

  Raises:
    DataError: ``size`` is malformed or leaves no example to keep.
  """
  labels = np.asarray(labels)
  n = len(labels)
  count = _holdout_count(size, n, what='validation_size')
  rng = np.random.default_rng(seed)
  classes, counts = np.unique(labels, return_counts=True)
  exact = counts * (count / n)
  take = np.floor(exact).astype(np.int64)
  # Largest remainder: the classes rounded down the most get the leftover slots (ties: lower id).
  leftover = count - int(take.sum())
  order = np.lexsort((classes, -(exact - take)))
  take[order[:leftover]] += 1
  holdout = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
  holdout = np.sort(np.concatenate(holdout + [np.zeros(0, np.int64)]).astype(np.int64))
  keep = np.setdiff1d(np.arange(n, dtype=np.int64), holdout, assume_unique=True)
  return keep, holdout


def balanced_head(labels: Sequence[int] | np.ndarray, cap: int | None) -> np.ndarray:
  """Indices of the first ``cap`` examples taken round-robin over classes, in source order.

  The k-th example of every class comes before the (k+1)-th of any class, so a cap keeps the
  classes balanced without reading what it drops (what lets a capped tar read stay lazy).

  Args:
    labels: ``(N,)`` integer labels.
    cap: how many to keep; None keeps all.

  Returns:
    ``(min(cap, N),)`` int64 indices, sorted.
  """
  labels = np.asarray(labels, np.int64)
  if cap is None or cap >= len(labels):
    return np.arange(len(labels), dtype=np.int64)
  if cap < 0:
    raise DataError(f'a per-split cap must be >= 0, got {cap}')
  rank = np.zeros(len(labels), np.int64)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    rank[members] = np.arange(len(members))
  chosen = np.lexsort((labels, rank))[:cap]
  return np.sort(chosen)


def _assemble(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray] | None,
              *, num_classes: int | None, class_names: Sequence[str] | None, name: str,
              validation_size: int | float, seed: int, max_train: int | None,
              max_test: int | None, source: str) -> ImageSplits:
  """Validates the source's arrays, applies the caps, holds out validation, builds splits."""
  train_images, train_labels = _check_split(*train, num_classes, what=f'{source} train split')
  if test is None:
    shape = train_images.shape[1:]
    test_images, test_labels = np.zeros((0,) + shape, np.uint8), np.zeros((0,), np.int32)
  else:
    test_images, test_labels = _check_split(*test, num_classes, what=f'{source} test split')
    if test_images.shape[1:] != train_images.shape[1:]:
      raise DataError(f'{source}: test images are {test_images.shape[1:]} but train images '
                      f'{train_images.shape[1:]}')
  if num_classes is None:
    num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
  if class_names is None:
    class_names = tuple(str(k) for k in range(num_classes))
  if max_train is not None:  # (no copy of a full split when uncapped)
    keep = balanced_head(train_labels, max_train)
    train_images, train_labels = train_images[keep], train_labels[keep]
  if max_test is not None:
    keep = balanced_head(test_labels, max_test)
    test_images, test_labels = test_images[keep], test_labels[keep]
  keep, held = stratified_holdout(train_labels, validation_size, seed=seed)
  return ImageSplits(
      train_images=train_images[keep], train_labels=train_labels[keep],
      val_images=train_images[held], val_labels=train_labels[held],
      test_images=test_images, test_labels=test_labels,
      num_classes=int(num_classes), class_names=tuple(str(c) for c in class_names), name=name)


# ----------------------------------------------------------------------------------------------
# Sources.


# What ``path`` must point at, per source (for error messages).
_PATH_HELP = {
    'cifar_batches': 'the cifar-10-batches-py or cifar-100-python directory',
    'npz': 'the .npz file',
    'image_folder': 'a directory or .tar laid out {train,test}/<class>/<image>',
}


def load_splits(source: str, *, name: str = '', path: str | None = None,
                validation_size: int | float = 5000, seed: int = 0,
                max_train: int | None = None, max_test: int | None = None,
                download: bool = False) -> ImageSplits:
  """Loads a dataset into host memory as train / validation / test splits.

  Args:
    source: one of ``SOURCES`` (see the module docstring).
    name: the TFDS dataset name for ``'tfds'`` (e.g. ``'cifar10'``); for the other sources
      only a label (default: derived from the file or directory name), except that an ``npz``
      without class names gets CIFAR-10's when the name (or file name) says cifar10.
    path: ``'tfds'``: the TFDS ``data_dir`` (None: TFDS's default); ``'cifar_batches'``: the
      ``cifar-10-batches-py`` / ``cifar-100-python`` directory, its parent, or the official
      ``.tar.gz``; ``'npz'``: the file; ``'image_folder'``: the directory or ``.tar``; unused
      for ``'digits'``.
    validation_size: examples held out of the training data for validation: an int count or
      a float fraction in [0, 1); 0 gives an empty validation split.
    seed: seeds the validation hold-out (the same seed, the same split).
    max_train: at most this many examples of the source's training data are read (taken
      round-robin over classes in source order; for ``'tfds'``, the first records); the
      validation split is then held out of them.
    max_test: the same cap for the test split.
    download: ``'tfds'`` only: let TFDS download and prepare a missing dataset (off: fail fast
      on machines without internet).

  The ``'cifar_batches'`` files are pickles: load only copies you trust.

  Returns:
    The splits; the test split is empty where the source has none.

  Raises:
    DataError: unknown source, missing or malformed files, bad shapes or labels, or fewer
      training examples than ``validation_size`` needs.
  """
  if source not in SOURCES:
    raise DataError(f'unknown data source {source!r}; valid sources: {", ".join(SOURCES)}')
  common = dict(validation_size=validation_size, seed=seed, max_train=max_train,
                max_test=max_test, source=source)
  if source == 'tfds':
    train, test, names, label = _load_tfds(name, path, max_train, max_test, download)
    return _assemble(train, test, num_classes=len(names), class_names=names, name=label,
                     **common)
  if source == 'digits':
    train, test = _load_digits()
    return _assemble(train, test, num_classes=10, class_names=[str(k) for k in range(10)],
                     name=name or 'digits', **common)
  if path is None:
    raise DataError(f'source {source!r} needs path= ({_PATH_HELP[source]})')
  if source == 'cifar_batches':
    train, test, names, label = _load_cifar_batches(Path(path))
  elif source == 'npz':
    train, test, names, label = _load_npz(Path(path), name)
  else:
    train, test, names, label = _load_image_folder(Path(path), max_train, max_test)
  return _assemble(train, test, num_classes=None if names is None else len(names),
                   class_names=names, name=name or label, **common)


# -- TFDS ------------------------------------------------------------------------------------


def _tfds_base_name(name: str) -> str:
  """``'imagenet2012/5.1.0'`` -> ``'imagenet2012'``."""
  return name.split('/')[0].split(':')[0].strip().lower()


def _open_tfds(name: str, split: str, path: str | None, download: bool) -> Any:
  """``tfds.data_source(name, split=split)``, with failures turned into ``DataError``."""
  if not name:
    raise DataError("source 'tfds' needs name= (a TFDS dataset such as 'cifar10')")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError("source 'tfds' needs the tensorflow-datasets package "
                    '(pip install tensorflow-datasets)') from e
  try:
    return tfds.data_source(name, split=split, data_dir=path, download=download)
  # TFDS reports a missing / unprepared / TFRecord-only dataset with any of these.
  except (ValueError, RuntimeError, AssertionError, OSError, KeyError) as e:
    where = path or 'the default TFDS data_dir'
    reason = str(e).splitlines()[0]
    try:
      if not tfds.builder(name, data_dir=path).is_prepared():
        reason = 'the dataset is not prepared there'  # TFDS's own message blames the format
    except (ValueError, RuntimeError, OSError):  # unknown name: keep TFDS's message
      pass
    raise DataError(
        f'tfds: cannot open {name!r} split {split!r} in {where}: {reason} (prepare it in the '
        f'array_record format, e.g. `tfds build {name} --file_format=array_record`, or pass '
        'download=True)') from e


def _tfds_features(ds: Any, name: str) -> tuple[Any, tuple[str, ...]]:
  """The ``image`` feature and the class names of a data source; checks both exist."""
  features = ds.dataset_info.features
  keys = list(features.keys())
  if 'image' not in keys or 'label' not in keys:
    raise DataError(f'tfds: {name!r} has features {keys}, expected "image" and "label"')
  label = features['label']
  num_classes = getattr(label, 'num_classes', None)
  if not num_classes:
    raise DataError(f'tfds: the "label" feature of {name!r} is not a ClassLabel ({label})')
  names = tuple(getattr(label, 'names', None) or (str(k) for k in range(num_classes)))
  return features['image'], names


def _read_tfds(ds: Any, limit: int | None, image_shape: tuple[int, ...],
               what: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads the first ``limit`` records of a data source into preallocated arrays."""
  n = len(ds) if limit is None else min(limit, len(ds))
  images = np.empty((n,) + tuple(image_shape), np.uint8)
  labels = np.empty((n,), np.int64)
  for i in range(n):
    record = ds[i]
    image = np.asarray(record['image'])
    if image.shape != images.shape[1:]:
      raise DataError(f'{what}: record {i} image is {image.shape}, expected {images.shape[1:]}')
    images[i] = image
    labels[i] = record['label']
  return images, labels


def _load_tfds(name: str, path: str | None, max_train: int | None, max_test: int | None,
               download: bool):
  """Reads a TFDS dataset's train (and test, if any) split into arrays."""
  if _tfds_base_name(name) in _STREAM_ONLY_TFDS:
    raise DataError(f'tfds: {name!r} is too large to load into memory; read it with '
                    "stream_batches(source='tfds', name=...) instead")
  train_ds = _open_tfds(name, 'train', path, download)
  image_feature, names = _tfds_features(train_ds, name)
  shape = tuple(image_feature.shape)
  if None in shape or len(shape) != 3:
    raise DataError(f'tfds: {name!r} images have shape {shape} (variable size); load_splits '
                    "needs equal-sized images, use stream_batches(source='tfds', ...) instead")
  train = _read_tfds(train_ds, max_train, shape, f'tfds {name} train')
  splits = train_ds.dataset_info.splits
  test = None
  if not splits or 'test' in splits:  # an unknown split list (a mock) still tries 'test'
    test = _read_tfds(_open_tfds(name, 'test', path, download), max_test, shape,
                      f'tfds {name} test')
  return train, test, names, _tfds_base_name(name)


# -- CIFAR python pickles ----------------------------------------------------------------------


def _cifar_files(path: Path) -> tuple[Callable[[str], bytes | None], list[str], str]:
  """A reader of the official files by base name, from a directory or the ``.tar.gz``.

  Returns:
    ``(read, names, where)``: ``read(base)`` gives the bytes or None when absent, ``names`` the
    base names found, ``where`` describes the location for messages.
  """
  if not path.exists():
    raise DataError(f"cifar_batches: path {str(path)!r} does not exist (expected the "
                    'cifar-10-batches-py or cifar-100-python directory)')
  if path.is_dir():
    for sub in ('cifar-10-batches-py', 'cifar-100-python'):
      if (path / sub).is_dir():
        path = path / sub  # the parent of the official directory works too
        break
    files = {p.name: p for p in path.iterdir() if p.is_file()}

    def read(base: str) -> bytes | None:
      return files[base].read_bytes() if base in files else None

    return read, sorted(files), str(path)
  try:
    with tarfile.open(path) as archive:
      members = {Path(m.name).name: archive.extractfile(m).read()
                 for m in archive.getmembers() if m.isfile()}
  except (tarfile.TarError, OSError) as e:
    raise DataError(f'cifar_batches: {str(path)!r} is neither a directory nor a readable tar '
                    f'archive ({e})') from e
  return members.get, sorted(members), str(path)


def _unpickle(blob: bytes, what: str) -> dict[str, Any]:
  """A CIFAR pickle as a dict with str keys (the files have bytes keys)."""
  try:
    obj = pickle.loads(blob, encoding='bytes')
  except Exception as e:  # any unpickling failure means a corrupt file
    raise DataError(f'cifar_batches: {what} is not a readable pickle ({e})') from e
  if not isinstance(obj, dict):
    raise DataError(f'cifar_batches: {what} holds a {type(obj).__name__}, expected a dict')
  return {k.decode('latin1') if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_batch(blob: bytes, label_key: str, what: str) -> tuple[np.ndarray, np.ndarray]:
  """One batch file -> ``(N, 32, 32, 3)`` uint8 HWC images and ``(N,)`` labels."""
  batch = _unpickle(blob, what)
  if 'data' not in batch or label_key not in batch:
    raise DataError(f'cifar_batches: {what} has keys {sorted(batch)}, expected "data" and '
                    f'{label_key!r}')
  data = np.asarray(batch['data'])
  if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise DataError(f'cifar_batches: {what} data has shape {data.shape}, expected (N, 3072)')
  # Rows are the 1024 red, then green, then blue values, each plane row-major: CHW -> HWC.
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, np.asarray(batch[label_key])


def _label_names(blob: bytes | None, key: str, what: str) -> tuple[str, ...] | None:
  """Class names from a meta pickle (None when the file is absent)."""
  if blob is None:
    return None
  meta = _unpickle(blob, what)
  if key not in meta:
    raise DataError(f'cifar_batches: {what} has keys {sorted(meta)}, expected {key!r}')
  return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[key])


def _load_cifar_batches(path: Path):
  """Reads ``cifar-10-batches-py`` or ``cifar-100-python`` (fine labels)."""
  read, found, where = _cifar_files(path)
  if 'data_batch_1' in found:
    parts = []
    k = 1
    while (blob := read(f'data_batch_{k}')) is not None:
      parts.append(_cifar_batch(blob, 'labels', f'data_batch_{k}'))
      k += 1
    blob = read('test_batch')
    if blob is None:
      raise DataError(f'cifar_batches: {where} has no test_batch (found {found})')
    test = _cifar_batch(blob, 'labels', 'test_batch')
    names = _label_names(read('batches.meta'), 'label_names', 'batches.meta') or CIFAR10_CLASSES
    train = tuple(np.concatenate(p) for p in zip(*parts))
    return train, test, names, 'cifar10'
  if 'train' in found:
    train = _cifar_batch(read('train'), 'fine_labels', 'train')
    blob = read('test')
    if blob is None:
      raise DataError(f'cifar_batches: {where} has no test file (found {found})')
    test = _cifar_batch(blob, 'fine_labels', 'test')
    names = _label_names(read('meta'), 'fine_label_names', 'meta')
    return train, test, names or tuple(str(k) for k in range(100)), 'cifar100'
  raise DataError(f'cifar_batches: {where} holds {found}; expected data_batch_1..5 + test_batch '
                  '(cifar-10-batches-py) or train + test (cifar-100-python)')


# -- npz ---------------------------------------------------------------------------------------


def _looks_like_cifar10(label: str) -> bool:
  """Whether a dataset or file name says CIFAR-10 (and not CIFAR-100)."""
  flat = label.lower().replace('-', '').replace('_', '')
  return 'cifar10' in flat and 'cifar100' not in flat


def _load_npz(path: Path, name: str):
  """Reads ``x_train, y_train[, x_test, y_test]`` or their ``_subset`` variants."""
  if not path.is_file():
    raise DataError(f'npz: file {str(path)!r} does not exist (expected an .npz with x_train, '
                    'y_train[, x_test, y_test])')
  try:
    archive = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise DataError(f'npz: cannot read {str(path)!r} as an .npz ({e})') from e
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise DataError(f'npz: {str(path)!r} is a single .npy array, expected an .npz archive')
  with archive:
    keys = set(archive.files)
    for suffix in ('', '_subset'):
      if {f'x_train{suffix}', f'y_train{suffix}'} <= keys:
        break
    else:
      raise DataError(f'npz: {str(path)!r} has keys {sorted(keys)}; expected x_train and '
                      'y_train (or x_train_subset and y_train_subset)')
    train = archive[f'x_train{suffix}'], archive[f'y_train{suffix}']
    test_keys = {f'x_test{suffix}', f'y_test{suffix}'} & keys
    if len(test_keys) == 1:
      raise DataError(f'npz: {str(path)!r} has {test_keys.pop()} without its pair (keys '
                      f'{sorted(keys)})')
    test = (archive[f'x_test{suffix}'], archive[f'y_test{suffix}']) if test_keys else None
    names = None
    if 'class_names' in keys:
      names = tuple(str(n) for n in archive['class_names'].tolist())
  label = name or path.stem
  if names is None:
    ys = [np.asarray(train[1])] + ([np.asarray(test[1])] if test else [])
    top = max((int(y.max()) for y in ys if y.size and np.issubdtype(y.dtype, np.integer)),
              default=-1)
    if top == 9 and _looks_like_cifar10(label):
      names = CIFAR10_CLASSES
  return train, test, names, label


# -- image folders -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _FolderIndex:
  """The images of a ``{split}/<class>/<file>`` layout, without their pixels.

  Attributes:
    classes: class names, sorted (label k is ``classes[k]``).
    entries: per split, ``(refs, labels)``: refs are member names (tar) or paths (directory),
      sorted by class then file name.
    tar_path: the tar file, or None for a directory.
    tar_members: member name -> header, so that reading needs no second scan of the tar.
  """

  classes: tuple[str, ...]
  entries: dict[str, tuple[list[str], np.ndarray]]
  tar_path: Path | None
  tar_members: dict[str, tarfile.TarInfo] | None


def _index_folder(path: Path, splits: Sequence[str] = ('train', 'test')) -> _FolderIndex:
  """Lists the images of a folder or tar (reads tar headers only)."""
  if not path.exists():
    raise DataError(f'image_folder: path {str(path)!r} does not exist (expected a directory '
                    'or .tar laid out {train,test}/<class>/<image>)')
  if path.is_dir():
    rels = [p.relative_to(path).as_posix() for p in path.rglob('*') if p.is_file()]
    tar_path, members = None, None
  else:
    try:
      with tarfile.open(path) as archive:
        members = {m.name: m for m in archive.getmembers() if m.isfile()}
      rels = list(members)
    except (tarfile.TarError, OSError) as e:
      raise DataError(f'image_folder: {str(path)!r} is neither a directory nor a readable tar '
                      f'({e})') from e
    tar_path = path
  by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in splits}
  for rel in rels:
    parts = rel.split('/')
    # Any leading folders are allowed (a tar of the top directory): split/class/file at the end.
    if len(parts) >= 3 and parts[-3] in by_split and rel.lower().endswith(IMAGE_SUFFIXES):
      by_split[parts[-3]].append((parts[-2], rel))
  if not by_split[splits[0]]:
    raise DataError(f'image_folder: no images under {splits[0]}/<class>/ in {str(path)!r} '
                    f'({len(rels)} files seen; image suffixes {IMAGE_SUFFIXES})')
  classes = tuple(sorted({c for c, _ in by_split[splits[0]]}))
  lookup = {c: k for k, c in enumerate(classes)}
  entries = {}
  for split, items in by_split.items():
    stray = sorted({c for c, _ in items} - set(classes))
    if stray:
      raise DataError(f'image_folder: {split} has classes {stray} that {splits[0]} lacks')
    items.sort(key=lambda item: (lookup[item[0]], item[1]))
    refs = [rel if tar_path else str(path / rel) for _, rel in items]
    entries[split] = (refs, np.asarray([lookup[c] for c, _ in items], np.int64))
  return _FolderIndex(classes=classes, entries=entries, tar_path=tar_path, tar_members=members)


def _pil():
  """The PIL.Image module, or a DataError saying to install Pillow."""
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError('image decoding needs Pillow (pip install Pillow)') from e
  return Image


def _decode(blob: bytes, what: str) -> np.ndarray:
  """Encoded image bytes -> ``(H, W, 1)`` (grayscale sources) or ``(H, W, 3)`` uint8."""
  image_lib = _pil()
  try:
    with image_lib.open(io.BytesIO(blob)) as image:
      gray = image.mode in ('1', 'L', 'LA', 'I', 'I;16', 'F')
      array = np.asarray(image.convert('L' if gray else 'RGB'))
  except (OSError, ValueError, image_lib.DecompressionBombError) as e:
    raise DataError(f'image_folder: cannot decode {what} ({e})') from e
  return array[..., None] if array.ndim == 2 else array


class _FolderReader:
  """Reads images of a ``_FolderIndex`` by reference; one thread at a time (tarfile is not
  thread-safe). Use as a context manager."""

  def __init__(self, index: _FolderIndex):
    self._index = index
    self._tar = None

  def __enter__(self) -> _FolderReader:
    if self._index.tar_path is not None:
      self._tar = tarfile.open(self._index.tar_path)
    return self

  def __exit__(self, *exc) -> None:
    if self._tar is not None:
      self._tar.close()

  def read_bytes(self, ref: str) -> bytes:
    """The encoded file ``ref``."""
    if self._tar is None:
      return Path(ref).read_bytes()
    return self._tar.extractfile(self._index.tar_members[ref]).read()

  def read(self, ref: str) -> np.ndarray:
    """The decoded image ``ref`` as ``(H, W, C)`` uint8."""
    return _decode(self.read_bytes(ref), ref)


def _read_folder_split(reader: _FolderReader, refs: Sequence[str],
                       what: str) -> np.ndarray:
  """Decodes equal-sized images into ``(N, H, W, C)`` uint8 (grayscale widened if mixed)."""
  arrays = [reader.read(ref) for ref in refs]
  sizes = {a.shape[:2] for a in arrays}
  if len(sizes) > 1:
    raise DataError(f'image_folder: {what} images have sizes {sorted(sizes)[:4]}; load_splits '
                    "needs equal sizes (use stream_batches(source='image_folder', ...))")
  if len({a.shape[2] for a in arrays}) > 1:  # a few grayscale files among colour ones
    arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
  if not arrays:
    return np.zeros((0, 1, 1, 1), np.uint8)
  return np.stack(arrays)


def _load_image_folder(path: Path, max_train: int | None, max_test: int | None):
  """Decodes the (capped) train and test images of a folder or tar."""
  index = _index_folder(path)
  out = {}
  with _FolderReader(index) as reader:
    for split, cap in (('train', max_train), ('test', max_test)):
      refs, labels = index.entries[split]
      keep = balanced_head(labels, cap)
      images = _read_folder_split(reader, [refs[i] for i in keep], split)
      out[split] = (images, labels[keep])
  if out['train'][0].shape[-1] != out['test'][0].shape[-1] and len(out['test'][1]):
    # One split decoded as grayscale only: widen it to the other's three channels.
    out = {k: (np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im, lab)
           for k, (im, lab) in out.items()}
  test = out['test'] if len(out['test'][1]) else None
  label = path.name[:-len('.tar')] if path.name.endswith('.tar') else path.name
  return out['train'], test, index.classes, label


# -- digits ------------------------------------------------------------------------------------


def _load_digits():
  """scikit-learn's 8x8 digits as ``(1797, 8, 8, 1)`` uint8, split 80/20 train/test (fixed)."""
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError("source 'digits' needs scikit-learn (pip install scikit-learn)") from e
  digits = load_digits()
  # Pixels are 0..16 counts of a 4x4 sub-grid: scale to the uint8 range.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  train, test = stratified_holdout(labels, _DIGITS_TEST_FRACTION, seed=_DIGITS_TEST_SEED)
  return (images[train], labels[train]), (images[test], labels[test])


# ----------------------------------------------------------------------------------------------
# Streaming (ImageNet-sized data).


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes the shorter side to ``size`` (bilinear) and crops the centre square.

  Args:
    image: ``(H, W, C)`` uint8, C in {1, 3}.
    size: output side in pixels.

  Returns:
    ``(size, size, C)`` uint8.
  """
  image_lib = _pil()
  h, w, c = image.shape
  scale = size / min(h, w)
  new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
  pil = image_lib.fromarray(image[..., 0] if c == 1 else image)
  if (new_h, new_w) != (h, w):
    pil = pil.resize((new_w, new_h), image_lib.Resampling.BILINEAR)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  out = np.asarray(pil.crop((left, top, left + size, top + size)))
  return out[..., None] if out.ndim == 2 else out


def _stream_reader(source: str, name: str, split: str, path: str | None,
                   download: bool) -> tuple[int, int, Callable[[], Any]]:
  """Opens a streaming source.

  Returns:
    ``(num_examples, num_classes, open_reader)``: ``open_reader()`` is a context manager whose
    value maps an index to ``(image (H, W, C) uint8, label int)``; it is entered on the
    worker thread and may be called from several decoding threads at once.
  """
  if source == 'tfds':
    ds = _open_tfds(name, split, path, download)
    num_classes = len(_tfds_features(ds, name)[1])

    @contextlib.contextmanager
    def open_tfds():
      def read(i):
        record = ds[i]
        return np.asarray(record['image']), int(record['label'])
      yield read

    return len(ds), num_classes, open_tfds
  if path is None:
    raise DataError("stream_batches: source 'image_folder' needs path= "
                    f"({_PATH_HELP['image_folder']})")
  splits = ('train',) if split == 'train' else ('train', split)
  index = _index_folder(Path(path), splits=splits)
  refs, labels = index.entries[split]

  @contextlib.contextmanager
  def open_folder():
    with _FolderReader(index) as reader:
      lock = threading.Lock()  # one tar file handle: reads take turns, decoding does not

      def read(i):
        with lock:
          blob = reader.read_bytes(refs[i])
        return _decode(blob, refs[i]), int(labels[i])
      yield read

  return len(refs), len(index.classes), open_folder


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
  num_examples = len(subset)
  if num_examples == 0 or (drop_remainder and num_examples < batch_size):
    raise DataError(f'stream_batches: {source} {name or path} {split} has {num_examples} '
                    f'examples, fewer than one batch of {batch_size}')
  batches: queue.Queue = queue.Queue(maxsize=prefetch)
  stop = threading.Event()
  done = object()

  def epochs() -> Iterator[np.ndarray]:
    epoch = 0
    while num_epochs is None or epoch < num_epochs:
      order = (subset[np.random.default_rng([seed, epoch]).permutation(num_examples)]
               if shuffle else subset)
      stop_at = num_examples - num_examples % batch_size if drop_remainder else num_examples
      for start in range(0, stop_at, batch_size):
        yield order[start:start + batch_size]
      epoch += 1

  def put(item) -> bool:
    while not stop.is_set():  # time out now and then to notice a closed consumer
      try:
        batches.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work() -> None:
    try:
      with opener() as read, concurrent.futures.ThreadPoolExecutor(
          decode_threads, thread_name_prefix='decode') as pool:
        def one(i):
          image, label = read(int(i))
          return resize_center_crop(image, image_size), label
        for ids in epochs():
          pairs = list(pool.map(one, ids))
          images = np.stack([im for im, _ in pairs])
          labels = np.asarray([lab for _, lab in pairs], np.int32)
          if not put((images, labels)):
            return
      put(done)
    except BaseException as e:  # hand any failure to the consumer instead of dying silently
      put(e)

  def consume() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    thread = threading.Thread(target=work, name='stream_batches', daemon=True)
    thread.start()
    try:
      while True:
        item = batches.get()
        if item is done:
          return
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:
      stop.set()
      thread.join(timeout=5.0)

  return consume()


# ----------------------------------------------------------------------------------------------
# Device side.


def normalize(images: jnp.ndarray, mean: Any, std: Any) -> jnp.ndarray:
  """``(images - mean) / std`` in float32.

  Args:
    images: ``(..., C)`` pixels, any dtype (uint8 0..255 normally).
    mean: ``(C,)`` per-channel mean in pixel units.
    std: ``(C,)`` per-channel std in pixel units.

  Returns:
    float32, the shape of ``images``.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def random_crop(key: jax.Array, images: jnp.ndarray, pad: int,
                mode: str = 'reflect') -> jnp.ndarray:
  """Pads each image by ``pad`` pixels on every side and crops a random ``H x W`` window.

  Args:
    key: PRNG key.
    images: ``(B, H, W, C)``, any dtype.
    pad: padding in pixels (static); 0 returns ``images``.
    mode: ``'reflect'`` (mirror, edge not repeated) or ``'constant'`` (pixel value 0).

  Returns:
    ``(B, H, W, C)``, the dtype of ``images``; image b is the window of its padded copy at
    offset ``(dy_b, dx_b)``, each uniform in ``0 .. 2 * pad``.
  """
  if pad == 0:
    return images
  b, h, w, c = images.shape
  if mode not in ('reflect', 'constant'):
    raise ValueError(f"padding mode must be 'reflect' or 'constant', got {mode!r}")
  if mode == 'reflect' and pad >= min(h, w):
    raise ValueError(f'reflect padding of {pad} needs images larger than {pad} pixels, '
                     f'got {h}x{w}')
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
  offsets = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)
  crop = lambda image, off: jax.lax.dynamic_slice(image, (off[0], off[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jnp.ndarray) -> jnp.ndarray:
  """Mirrors each image left-right with probability 1/2.

  Args:
    key: PRNG key.
    images: ``(B, H, W, C)``.

  Returns:
    ``(B, H, W, C)``, same dtype.
  """
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def augment(key: jax.Array, images: jnp.ndarray, mean: Any, std: Any, *, pad: int = 4,
            flip: bool = True, mode: str = 'reflect') -> jnp.ndarray:
  """The standard CIFAR augmentation of a batch, then normalisation; pure and jittable.

  ``pad``, ``flip`` and ``mode`` are static (Python values), so under ``jit`` mark them
  static or close over them. With ``pad=0, flip=False`` this is ``normalize``.

  Args:
    key: PRNG key; the same key gives the same crops and flips.
    images: ``(B, H, W, C)`` uint8 (cropping and flipping run on uint8, 4x less traffic).
    mean: ``(C,)`` per-channel mean in pixel units (e.g. ``ImageSplits.mean``).
    std: ``(C,)`` per-channel std in pixel units.
    pad: random-crop padding in pixels (0: no crop).
    flip: random horizontal flip.
    mode: crop padding, ``'reflect'`` or ``'constant'`` (zero pixels).

  Returns:
    ``(B, H, W, C)`` float32, normalised.
  """
  crop_key, flip_key = jax.random.split(key)
  images = random_crop(crop_key, images, pad, mode)
  if flip:
    images = random_flip(flip_key, images)
  return normalize(images, mean, std)


@flax.struct.dataclass
class DeviceSplits:
  """Train and validation arrays on the accelerator; a pytree (pass it to jitted steps).

  Attributes:
    train_images: ``(N_train, H, W, C)`` uint8 jax array.
    train_labels: ``(N_train,)`` int32.
    val_images: ``(N_val, H, W, C)`` uint8.
    val_labels: ``(N_val,)`` int32.
    mean: per-channel train mean, pixel units (static: it becomes a compile-time constant).
    std: per-channel train std, pixel units (static).
    num_classes: K (static).
  """

  train_images: jax.Array
  train_labels: jax.Array
  val_images: jax.Array
  val_labels: jax.Array
  mean: tuple[float, ...] = flax.struct.field(pytree_node=False)
  std: tuple[float, ...] = flax.struct.field(pytree_node=False)
  num_classes: int = flax.struct.field(pytree_node=False)


def to_device(splits: ImageSplits, sharding: jax.sharding.Sharding | None = None) -> DeviceSplits:
  """Copies the train and validation splits to the accelerator (images stay uint8).

  Args:
    splits: host splits.
    sharding: placement for every array (e.g. replicated over a mesh); None: the default
      device. A batch-axis sharding needs N divisible by the number of shards.

  Returns:
    The ``DeviceSplits``.
  """
  put = lambda x: jax.device_put(x, sharding)
  return DeviceSplits(
      train_images=put(splits.train_images), train_labels=put(splits.train_labels),
      val_images=put(splits.val_images), val_labels=put(splits.val_labels),
      mean=tuple(float(m) for m in splits.mean), std=tuple(float(s) for s in splits.std),
      num_classes=splits.num_classes)
