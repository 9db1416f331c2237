"""The in-memory dataset type and the hold-out that makes its validation split.

``ImageSplits`` is what every reader in ``readers`` produces: train / validation / test as
numpy arrays (uint8 pixels ``(N, H, W, C)``, int32 labels ``(N,)``), checked on construction.
This module also owns the checks one split must pass, the per-channel pixel statistics used
to normalise, and the seeded, class-stratified hold-out of validation from the training data.
No JAX here: the splits live on the host until a train step takes a batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np


class DataError(ValueError):
  """A dataset is missing, malformed or unusable; raised before any training starts."""


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


def holdout_count(size: int | float, n: int, *, what: str = 'validation_size') -> int:
  """How many of ``n`` examples ``size`` asks for: a fraction when in [0, 1), a count when
  a whole number >= 1 (``1000`` and ``1000.0`` alike: a config read back from JSON, or
  typed on a command line, may hold either). The one reading of every data path."""
  if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, float, np.integer,
                                                                   np.floating)):
    raise DataError(f'{what} must be a count or a fraction, got {size!r}')
  if isinstance(size, (float, np.floating)) and size < 1.0:
    if size < 0.0:
      raise DataError(f'{what} must be >= 0, got {size}')
    count = int(round(size * n))
  elif float(size) != int(size):
    raise DataError(f'{what} = {size} is neither a fraction in [0, 1) nor a whole count')
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
    size: held-out count (a whole number >= 1) or fraction of N (in [0, 1)).
    seed: the same seed gives the same split.

  Returns:
    ``(keep, holdout)``: sorted int64 index arrays, disjoint, together ``0..N-1``.

  Raises:
    DataError: ``size`` is malformed or leaves no example to keep.
  """
  labels = np.asarray(labels)
  n = len(labels)
  count = holdout_count(size, n, what='validation_size')
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


def assemble(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray] | None,
             *, num_classes: int | None, class_names: Sequence[str] | None, name: str,
             validation_size: int | float, seed: int, max_train: int | None,
             max_test: int | None, source: str) -> ImageSplits:
  """Validates a reader's arrays, applies the caps, holds out validation, builds the splits.

  Args:
    train: the source's training ``(images, labels)``: ``(N, H, W, C)`` integer pixels in
      0..255 and ``(N,)`` (or ``(N, 1)``) integer labels; checked and converted here.
    test: the test pair likewise, or None when the source has none (the test split is then
      empty, ``(0, H, W, C)``).
    num_classes: K, or None to take ``max label + 1`` over both splits.
    class_names: K names in label order, or None for ``'0'..'K-1'``.
    name: dataset name, for logs.
    validation_size: held-out count (int) or fraction (float in [0, 1)) of the capped train.
    seed: seeds the hold-out.
    max_train: cap on the training examples kept (round-robin over classes, source order).
    max_test: the same cap for the test split.
    source: the reader's name, for error messages.

  Returns:
    The validated ``ImageSplits``.

  Raises:
    DataError: bad shapes, dtypes or labels, or too few examples for the hold-out.
  """
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

