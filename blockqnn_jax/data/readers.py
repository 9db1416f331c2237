"""Readers: a dataset on disk (or bundled) into ``ImageSplits`` in host memory.

``load_splits`` picks a reader by source name; every reader returns train / validation / test,
the validation split always held out of the *training* data, class-stratified and seeded:

* ``'tfds'``: a prepared TFDS dataset read through ``tfds.data_source`` (no TensorFlow needed),
  e.g. ``cifar10``, ``cifar100`` or any dataset with ``image`` and ``label`` features.
* ``'cifar_batches'``: the official python pickles, ``cifar-10-batches-py`` or
  ``cifar-100-python`` (a directory, or the downloaded ``.tar.gz`` itself).
* ``'npz'``: a ``.npz`` with ``x_train, y_train[, x_test, y_test]`` (or the ``_subset`` keys of
  ``cifar10-exact-subset.npz``).
* ``'image_folder'``: a directory or ``.tar`` laid out ``{train,test}/<class>/<image>``.
* ``'digits'``: scikit-learn's bundled 8x8 handwritten digits: no download, no files; what the
  smoke search uses on a fresh machine.

The TFDS reader also opens a split for random access (``tfds_random_access``), which
``stream`` batches for data too large for memory; image folders have a module of their own
(``folders``: decoding, random access, ``resize_center_crop``).

The optional packages (tensorflow-datasets, Pillow, scikit-learn) are imported only when a
source needs them, so importing this module stays cheap and a missing one is a ``DataError``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
import pickle
import tarfile
from typing import Any, Callable

import numpy as np

from blockqnn_jax.data import folders
from blockqnn_jax.data.splits import DataError, ImageSplits, assemble, stratified_holdout
from blockqnn_jax.settings import base as base_lib

SOURCES = base_lib.DATA_SOURCES
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                   'ship', 'truck')
# TFDS datasets too large for host memory: ``load_splits`` refuses them up front.
_STREAM_ONLY_TFDS = ('imagenet2012', 'imagenet2012_subset', 'imagenet2012_real',
                     'imagenet2012_corrupted', 'imagenet2012_multilabel', 'imagenet2012_fewshot')
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_TEST_SEED = 0  # fixed: the digits test split must not move with the validation seed

# What ``path`` must point at, per source (for error messages).
PATH_HELP = {
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
    return assemble(train, test, num_classes=len(names), class_names=names, name=label,
                    **common)
  if source == 'digits':
    train, test = _load_digits()
    return assemble(train, test, num_classes=10, class_names=[str(k) for k in range(10)],
                    name=name or 'digits', **common)
  if path is None:
    raise DataError(f'source {source!r} needs path= ({PATH_HELP[source]})')
  if source == 'cifar_batches':
    train, test, names, label = _load_cifar_batches(Path(path))
  elif source == 'npz':
    train, test, names, label = _load_npz(Path(path), name)
  else:
    train, test, names, label = folders.load_image_folder(Path(path), max_train, max_test)
  return assemble(train, test, num_classes=None if names is None else len(names),
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
        f'array_record format, e.g. `tfds build {name} --file_format=array_record`, or let '
        'TFDS download it: --config.data.download=true)') from e


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


# -- random access, for streaming --------------------------------------------------------------


def tfds_random_access(name: str, split: str, path: str | None,
                       download: bool) -> tuple[int, int, Callable[[], Any]]:
  """Opens one split of a TFDS dataset for reading single records by index.

  Args:
    name: the TFDS dataset name, e.g. ``'imagenet2012'``.
    split: the split, e.g. ``'train'`` or ``'validation'``.
    path: the TFDS ``data_dir`` (None: TFDS's default).
    download: let TFDS download and prepare a missing dataset.

  Returns:
    ``(num_examples, num_classes, open_reader)``: ``open_reader()`` is a context manager whose
    value maps an index to ``(image (H, W, C) uint8, label int)``; safe to call from several
    threads at once.

  Raises:
    DataError: the dataset cannot be opened or lacks ``image`` / ``label`` features.
  """
  ds = _open_tfds(name, split, path, download)
  num_classes = len(_tfds_features(ds, name)[1])

  @contextlib.contextmanager
  def open_tfds():
    def read(i):
      record = ds[i]
      return np.asarray(record['image']), int(record['label'])
    yield read

  return len(ds), num_classes, open_tfds
