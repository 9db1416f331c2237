"""Datasets: every source on generated files (and the shared real files when present), the
errors raised before training, the stratified hold-out, streaming, and the jitted augmentation.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
import pickle
import tarfile
import threading
import time

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockqnn_jax.data import augmentation, readers
from blockqnn_jax.data import splits as splits_lib
from blockqnn_jax.data import stream as stream_lib
from blockqnn_jax.data.splits import DataError


def _shared_data() -> Path:
  """The project's shared real-data folder (``BLOCKQNN_SHARED_DATA`` overrides)."""
  default = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
  return Path(os.environ.get('BLOCKQNN_SHARED_DATA', default))


def _shared_file(name: str) -> Path:
  path = _shared_data() / name
  if not path.is_file():
    pytest.skip(f'shared data file {name} not found under {path.parent}')
  return path


def _assert_disjoint_partition(splits: splits_lib.ImageSplits, pool_images: np.ndarray):
  """Train and val are disjoint and together are exactly the (unique) training pool."""
  pool = {im.tobytes() for im in pool_images}
  train = [im.tobytes() for im in splits.train_images]
  val = [im.tobytes() for im in splits.val_images]
  assert not set(train) & set(val)
  assert set(train) | set(val) == pool
  assert len(train) + len(val) == len(pool_images)


def _unique_images(n: int, shape=(32, 32, 3), seed: int = 0) -> np.ndarray:
  """``(n, *shape)`` uint8 random images, distinct with overwhelming probability."""
  return np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# Stratified hold-out and caps.


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    labels=st.lists(st.integers(0, 4), min_size=2, max_size=60),
    fraction=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**31 - 1))
def test_stratified_holdout_partitions_and_stratifies(labels, fraction, seed):
  labels = np.asarray(labels)
  size = int(round(fraction * len(labels)))
  hypothesis.assume(size < len(labels))
  keep, held = splits_lib.stratified_holdout(labels, size, seed=seed)
  assert len(held) == size
  assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(len(labels)))
  for c in np.unique(labels):  # each class gives up its proportional share, rounded
    share = (labels == c).sum() * size / len(labels)
    assert abs((labels[held] == c).sum() - share) < 1.0 + 1e-9
  again = splits_lib.stratified_holdout(labels, size, seed=seed)
  assert np.array_equal(again[1], held)


def test_holdout_fraction_and_count_agree():
  labels = np.arange(100) % 4
  _, by_fraction = splits_lib.stratified_holdout(labels, 0.2, seed=1)
  _, by_count = splits_lib.stratified_holdout(labels, 20, seed=1)
  assert np.array_equal(by_fraction, by_count)
  assert np.bincount(labels[by_count]).tolist() == [5, 5, 5, 5]


def test_balanced_head_round_robin():
  labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
  assert splits_lib.balanced_head(labels, 5).tolist() == [0, 1, 4, 5, 6]
  assert splits_lib.balanced_head(labels, None).tolist() == list(range(9))
  assert splits_lib.balanced_head(labels, 50).tolist() == list(range(9))


# ----------------------------------------------------------------------------------------------
# npz.


def _write_npz(path: Path, **arrays) -> Path:
  np.savez(path, **arrays)
  return path


def test_npz_generated(tmp_path):
  x_train, x_test = _unique_images(60, seed=1), _unique_images(12, seed=2)
  y_train, y_test = np.arange(60) % 3, np.arange(12) % 3
  path = _write_npz(tmp_path / 'toy.npz', x_train=x_train, y_train=y_train, x_test=x_test,
                    y_test=y_test, class_names=np.array(['cat', 'dog', 'emu']))
  splits = readers.load_splits('npz', path=str(path), validation_size=0.25, seed=3)
  assert splits.train_images.shape == (45, 32, 32, 3)
  assert splits.val_images.shape == (15, 32, 32, 3)
  assert splits.train_labels.dtype == np.int32 and splits.val_labels.dtype == np.int32
  assert np.bincount(splits.val_labels).tolist() == [5, 5, 5]  # stratified
  assert splits.class_names == ('cat', 'dog', 'emu') and splits.num_classes == 3
  assert splits.name == 'toy'
  np.testing.assert_array_equal(splits.test_images, x_test)
  np.testing.assert_array_equal(splits.test_labels, y_test)
  _assert_disjoint_partition(splits, x_train)
  # Labels travel with their images.
  lookup = {im.tobytes(): y for im, y in zip(x_train, y_train)}
  assert all(lookup[im.tobytes()] == y for im, y in zip(splits.val_images, splits.val_labels))
  mean, std = splits.channel_stats()
  assert mean is splits.mean and std is splits.std  # computed once
  assert mean.shape == (3,) and mean.dtype == np.float32 and std.dtype == np.float32
  pixels = splits.train_images.reshape(-1, 3).astype(np.float64)
  np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-5)
  np.testing.assert_allclose(std, pixels.std(0), rtol=1e-5)


def test_npz_keras_style_labels_and_no_test(tmp_path):
  path = _write_npz(tmp_path / 'mycifar10.npz', x_train=_unique_images(20),
                    y_train=(np.arange(20) % 10)[:, None].astype(np.uint8))
  splits = readers.load_splits('npz', path=str(path), validation_size=5)
  assert splits.train_labels.shape == (15,)
  assert splits.test_images.shape == (0, 32, 32, 3) and splits.test_labels.shape == (0,)
  assert splits.class_names == readers.CIFAR10_CLASSES  # the file name says cifar10
  unnamed = readers.load_splits('npz', path=str(path), name='toy', validation_size=5)
  assert unnamed.class_names == tuple(str(k) for k in range(10))


def test_npz_shared_exact_subset():
  path = _shared_file('cifar10-exact-subset.npz')
  start = time.perf_counter()
  splits = readers.load_splits('npz', path=str(path), validation_size=1000, seed=0)
  elapsed = time.perf_counter() - start
  assert elapsed < 10.0
  assert splits.train_images.shape == (4085, 32, 32, 3)
  assert splits.val_images.shape == (1000, 32, 32, 3)
  assert splits.test_images.shape == (1017, 32, 32, 3)
  assert splits.num_classes == 10 and splits.class_names[0] == 'airplane'
  with np.load(path) as raw:
    x_train, x_test, y_test = raw['x_train_subset'], raw['x_test_subset'], raw['y_test_subset']
  np.testing.assert_array_equal(splits.test_images, x_test)  # test untouched
  np.testing.assert_array_equal(splits.test_labels, y_test)
  _assert_disjoint_partition(splits, x_train)
  assert np.bincount(splits.val_labels, minlength=10).min() >= 90  # stratified: ~100 each
  same = readers.load_splits('npz', path=str(path), validation_size=1000, seed=0)
  other = readers.load_splits('npz', path=str(path), validation_size=1000, seed=1)
  np.testing.assert_array_equal(same.val_images, splits.val_images)
  assert not np.array_equal(other.val_images, splits.val_images)
  assert 100 < splits.mean.mean() < 140 and 50 < splits.std.mean() < 75  # CIFAR-10 stats


# ----------------------------------------------------------------------------------------------
# CIFAR python pickles.


def _pickle(path: Path, obj) -> None:
  with open(path, 'wb') as f:
    pickle.dump(obj, f)


def _cifar_rows(n: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def test_cifar10_batches_orientation_and_meta(tmp_path):
  root = tmp_path / 'cifar-10-batches-py'
  root.mkdir()
  rows = [_cifar_rows(4, seed=k) for k in range(5)]
  # Planted pixels: red at (row 1, col 2), green at (row 3, col 4) of the very first image.
  rows[0][0, 0 * 1024 + 1 * 32 + 2] = 200
  rows[0][0, 1 * 1024 + 3 * 32 + 4] = 7
  for k in range(5):
    labels = [(4 * k + i) % 10 for i in range(4)]
    _pickle(root / f'data_batch_{k + 1}', {b'batch_label': b'x', b'data': rows[k],
                                           b'labels': labels, b'filenames': [b'f'] * 4})
  _pickle(root / 'test_batch', {b'data': _cifar_rows(6, seed=9), b'labels': list(range(6))})
  names = [f'name{k}'.encode() for k in range(10)]
  _pickle(root / 'batches.meta', {b'label_names': names, b'num_vis': 3072})
  splits = readers.load_splits('cifar_batches', path=str(root), validation_size=0)
  assert splits.train_images.shape == (20, 32, 32, 3) and splits.test_images.shape == (6, 32, 32, 3)
  assert splits.train_images[0, 1, 2, 0] == 200 and splits.train_images[0, 3, 4, 1] == 7
  np.testing.assert_array_equal(splits.train_images[5],
                                rows[1][1].reshape(3, 32, 32).transpose(1, 2, 0))
  assert splits.train_labels.tolist() == [k % 10 for k in range(20)]
  assert splits.class_names == tuple(f'name{k}' for k in range(10))
  assert splits.name == 'cifar10'
  # The parent folder and the official .tar.gz work too.
  parent = readers.load_splits('cifar_batches', path=str(tmp_path), validation_size=0)
  np.testing.assert_array_equal(parent.train_images, splits.train_images)
  archive = tmp_path / 'cifar-10-python.tar.gz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(root, arcname='cifar-10-batches-py')
  packed = readers.load_splits('cifar_batches', path=str(archive), validation_size=4, seed=2)
  held = readers.load_splits('cifar_batches', path=str(root), validation_size=4, seed=2)
  np.testing.assert_array_equal(packed.val_images, held.val_images)


def test_cifar100_python_fine_labels(tmp_path):
  root = tmp_path / 'cifar-100-python'
  root.mkdir()
  train_rows = _cifar_rows(30, seed=1)
  train_rows[3, 2 * 1024 + 31 * 32 + 0] = 99  # blue at (row 31, col 0) of image 3
  fine = [(7 * i) % 100 for i in range(30)]
  _pickle(root / 'train', {b'data': train_rows, b'fine_labels': fine,
                           b'coarse_labels': [i % 20 for i in range(30)]})
  _pickle(root / 'test', {b'data': _cifar_rows(5, seed=2), b'fine_labels': [0, 1, 2, 3, 99],
                          b'coarse_labels': [0] * 5})
  shared_meta = _shared_data() / 'cifar100-meta.pkl'
  if shared_meta.is_file():  # the real meta file, when the shared data is there
    (root / 'meta').write_bytes(shared_meta.read_bytes())
  else:
    _pickle(root / 'meta', {b'fine_label_names': [f'f{k}'.encode() for k in range(100)],
                            b'coarse_label_names': [b'c'] * 20})
  splits = readers.load_splits('cifar_batches', path=str(root), validation_size=0)
  assert splits.num_classes == 100 and len(splits.class_names) == 100
  if shared_meta.is_file():
    assert splits.class_names[0] == 'apple'
  assert splits.train_labels.tolist() == fine
  assert splits.train_images[3, 31, 0, 2] == 99
  assert splits.test_labels.tolist() == [0, 1, 2, 3, 99]
  assert splits.name == 'cifar100'


# ----------------------------------------------------------------------------------------------
# Image folders.


def _write_folder(root: Path, *, sizes=((5, 6),), mode='RGB', per_class=(4, 3, 5),
                  classes=('b_cls', 'a_cls', 'c_cls'), test_per_class=2) -> dict:
  """Writes ``{train,test}/<class>/NN.png``; pixel (0, 0) encodes ``10 * sorted_class + i``."""
  from PIL import Image
  expect = {}
  order = sorted(classes)
  for split, counts in (('train', per_class), ('test', (test_per_class,) * len(classes))):
    for cls, count in zip(classes, counts):
      folder = root / split / cls
      folder.mkdir(parents=True)
      for i in range(count):
        h, w = sizes[i % len(sizes)]
        channels = 1 if mode == 'L' else 3
        pixels = np.full((h, w, channels), 128, np.uint8)
        pixels[0, 0] = 10 * order.index(cls) + i
        pixels[h - 1, 0] = 250  # bottom-left marker: catches transposed decoding
        image = Image.fromarray(pixels[..., 0] if mode == 'L' else pixels, mode)
        image.save(folder / f'{i:02d}.png')
        expect[(split, order.index(cls), i)] = pixels
  (root / 'README.md').write_text('not an image')
  return expect


def test_image_folder_directory_and_tar(tmp_path):
  root = tmp_path / 'toyfolder'
  _write_folder(root)
  splits = readers.load_splits('image_folder', path=str(root), validation_size=0)
  assert splits.class_names == ('a_cls', 'b_cls', 'c_cls')  # sorted by name
  assert splits.train_images.shape == (12, 5, 6, 3) and splits.test_images.shape == (6, 5, 6, 3)
  assert splits.name == 'toyfolder'
  codes = splits.train_images[:, 0, 0, 0].astype(int)
  assert np.array_equal(codes // 10, splits.train_labels)  # each image has its class's label
  assert (splits.train_images[:, 4, 0] == 250).all()
  assert np.bincount(splits.train_labels).tolist() == [3, 4, 5]
  archive = tmp_path / 'toy.tar'
  with tarfile.open(archive, 'w') as tar:
    tar.add(root, arcname='toplevel')  # a leading folder is allowed
  from_tar = readers.load_splits('image_folder', path=str(archive), validation_size=0)
  np.testing.assert_array_equal(from_tar.train_images, splits.train_images)
  np.testing.assert_array_equal(from_tar.test_labels, splits.test_labels)
  assert from_tar.name == 'toy'
  capped = readers.load_splits('image_folder', path=str(archive), max_train=7, max_test=3,
                               validation_size=1)
  assert len(capped.train_labels) + len(capped.val_labels) == 7
  pool = np.concatenate([capped.train_labels, capped.val_labels])
  assert sorted(np.bincount(pool).tolist()) == [2, 2, 3]  # round-robin over classes
  assert len(capped.test_labels) == 3


def test_image_folder_grayscale(tmp_path):
  _write_folder(tmp_path / 'gray', mode='L')
  splits = readers.load_splits('image_folder', path=str(tmp_path / 'gray'), validation_size=0.25)
  assert splits.train_images.shape[1:] == (5, 6, 1)
  assert splits.mean.shape == (1,)


@pytest.mark.slow
def test_image_folder_shared_cifar10_tar():
  path = _shared_file('cifar10-jpeg-full.tar')
  start = time.perf_counter()
  splits = readers.load_splits('image_folder', path=str(path), max_train=200, max_test=50,
                               validation_size=50, seed=0)
  elapsed = time.perf_counter() - start
  assert elapsed < 15.0
  assert splits.class_names == readers.CIFAR10_CLASSES
  assert splits.train_images.shape == (150, 32, 32, 3)
  assert splits.val_images.shape == (50, 32, 32, 3)
  assert splits.test_images.shape == (50, 32, 32, 3)
  pool = np.concatenate([splits.train_labels, splits.val_labels])
  assert np.bincount(pool).tolist() == [20] * 10
  assert np.bincount(splits.val_labels).tolist() == [5] * 10
  assert np.bincount(splits.test_labels).tolist() == [5] * 10
  exact = _shared_data() / 'cifar10-exact-subset.npz'
  if exact.is_file():
    # test/airplane/0000.jpg is the first airplane of the standard test order (lossy JPEG).
    with np.load(exact) as raw:
      first_airplane = raw['x_test_subset'][np.flatnonzero(raw['y_test_subset'] == 0)[0]]
    error = np.abs(splits.test_images[0].astype(float) - first_airplane).mean()
    assert error < 15.0


# ----------------------------------------------------------------------------------------------
# digits and TFDS.


def test_digits():
  splits = readers.load_splits('digits', validation_size=0.1, seed=0)
  assert splits.train_images.shape[1:] == (8, 8, 1) and splits.train_images.dtype == np.uint8
  assert splits.num_classes == 10
  total = len(splits.train_labels) + len(splits.val_labels) + len(splits.test_labels)
  assert total == 1797
  assert abs(len(splits.test_labels) - 359) <= 1
  assert splits.train_images.max() == 255 and splits.train_images.min() == 0
  everything = np.concatenate([splits.train_images, splits.val_images, splits.test_images])
  keys = [im.tobytes() for im in everything]
  test_keys = {im.tobytes() for im in splits.test_images}
  val_keys = {im.tobytes() for im in splits.val_images}
  train_keys = {im.tobytes() for im in splits.train_images}
  # Digits has a few exact duplicate images, so compare counts of distinct ones loosely.
  assert len(train_keys & val_keys) <= 5 and len(train_keys & test_keys) <= 5
  assert len(set(keys)) > 1700
  with pytest.raises(DataError, match='fewer examples'):
    readers.load_splits('digits')  # the default 5000 exceeds the 1438 digits training images
  other = readers.load_splits('digits', validation_size=0.1, seed=1)
  np.testing.assert_array_equal(other.test_images, splits.test_images)  # test split fixed
  assert not np.array_equal(other.val_images, splits.val_images)


@pytest.mark.parametrize('name, num_classes', [('cifar10', 10), ('cifar100', 100)])
def test_tfds_mock(name, num_classes):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=20):
    splits = readers.load_splits('tfds', name=name, validation_size=5, seed=0)
    capped = readers.load_splits('tfds', name=name, validation_size=0.5, max_train=8, max_test=4)
  assert splits.train_images.shape == (15, 32, 32, 3)
  assert splits.val_images.shape == (5, 32, 32, 3)
  assert splits.test_images.shape == (20, 32, 32, 3)
  assert splits.num_classes == num_classes and len(splits.class_names) == num_classes
  assert splits.name == name
  assert capped.train_images.shape[0] == 4 and capped.test_images.shape[0] == 4


def test_tfds_stream_imagenet_mock():
  tfds = pytest.importorskip('tensorflow_datasets')
  pytest.importorskip('PIL')
  with tfds.testing.mock_data(num_examples=10):
    with pytest.raises(DataError, match='stream_batches'):
      readers.load_splits('tfds', name='imagenet2012')
    batches = list(stream_lib.stream_batches('tfds', name='imagenet2012', split='validation',
                                             batch_size=4, image_size=16, seed=0))
  assert [b[0].shape for b in batches] == [(4, 16, 16, 3), (4, 16, 16, 3), (2, 16, 16, 3)]
  assert all(b[0].dtype == np.uint8 and b[1].dtype == np.int32 for b in batches)
  assert all(((b[1] >= 0) & (b[1] < 1000)).all() for b in batches)


# ----------------------------------------------------------------------------------------------
# Streaming from a folder.


def test_stream_folder_variable_sizes(tmp_path):
  root = tmp_path / 'mixed'
  _write_folder(root, sizes=((5, 6), (9, 4), (7, 7)))
  with pytest.raises(DataError, match='equal sizes'):
    readers.load_splits('image_folder', path=str(root), validation_size=0)
  stream = functools.partial(stream_lib.stream_batches, 'image_folder', path=str(root),
                             split='train', batch_size=5, image_size=4)
  first = list(stream(seed=3))
  assert [b[0].shape for b in first] == [(5, 4, 4, 3), (5, 4, 4, 3), (2, 4, 4, 3)]
  labels = np.concatenate([b[1] for b in first])
  assert np.bincount(labels).tolist() == [3, 4, 5]  # one full epoch
  again = list(stream(seed=3))
  assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again))
  other = np.concatenate([b[0] for b in stream(seed=4)])
  assert not np.array_equal(np.concatenate([b[0] for b in first]), other)
  ordered = np.concatenate([b[1] for b in stream(shuffle=False)])
  assert ordered.tolist() == sorted(ordered.tolist())
  two = list(stream(seed=0, num_epochs=2, drop_remainder=True))
  assert len(two) == 4 and all(b[0].shape[0] == 5 for b in two)
  test = list(stream(split='test', batch_size=100))
  assert test[0][0].shape == (6, 4, 4, 3)


def test_stream_close_stops_thread_and_errors_surface(tmp_path):
  root = tmp_path / 'folder'
  _write_folder(root)
  forever = stream_lib.stream_batches('image_folder', path=str(root), batch_size=2, image_size=3,
                                      num_epochs=None)
  for _, _ in zip(range(20), forever):
    pass
  forever.close()
  deadline = time.time() + 5
  while time.time() < deadline and any(t.name == 'stream_batches' and t.is_alive()
                                       for t in threading.enumerate()):
    time.sleep(0.05)
  assert not any(t.name == 'stream_batches' and t.is_alive() for t in threading.enumerate())
  (root / 'train' / 'a_cls' / 'zz.png').write_bytes(b'not a png')
  broken = stream_lib.stream_batches('image_folder', path=str(root), batch_size=50, image_size=3)
  with pytest.raises(DataError, match='zz.png'):
    list(broken)
  with pytest.raises(DataError, match='valid'):
    stream_lib.stream_batches('npz', path=str(root), batch_size=2, image_size=3)


# ----------------------------------------------------------------------------------------------
# Errors.


def test_error_unknown_source_lists_valid_ones():
  with pytest.raises(DataError, match='cifar_batches.*npz.*image_folder.*digits'):
    readers.load_splits('mnist_csv')


@pytest.mark.parametrize('source', ['npz', 'cifar_batches', 'image_folder'])
def test_error_missing_path_names_it(tmp_path, source):
  missing = tmp_path / 'nowhere'
  with pytest.raises(DataError, match=f"{source}.*nowhere.*does not exist.*expected"):
    readers.load_splits(source, path=str(missing))
  with pytest.raises(DataError, match='needs path='):
    readers.load_splits(source)


def test_error_npz_missing_keys_lists_keys(tmp_path):
  path = _write_npz(tmp_path / 'bad.npz', images=_unique_images(3), labels=np.arange(3))
  with pytest.raises(DataError, match=r"keys \['images', 'labels'\].*x_train"):
    readers.load_splits('npz', path=str(path))
  path.with_name('junk.npz').write_bytes(b'not a zip')
  with pytest.raises(DataError, match='cannot read'):
    readers.load_splits('npz', path=str(path.with_name('junk.npz')))


@pytest.mark.parametrize('x, y, message', [
    (np.zeros((10, 32, 32), np.uint8), np.zeros(10, int), r'\(N, H, W, C\).*trailing channel'),
    (np.zeros((10, 8, 8, 4), np.uint8), np.zeros(10, int), r'shape \(10, 8, 8, 4\)'),
    (np.zeros((10, 8, 8, 3), np.float32), np.zeros(10, int), 'dtype float32'),
    (np.full((10, 8, 8, 3), 300, np.int32), np.zeros(10, int), r'0\.\.255'),
    (np.zeros((10, 8, 8, 3), np.uint8), np.zeros(10, np.float32), 'expected integers'),
    (np.zeros((10, 8, 8, 3), np.uint8), np.zeros(9, int), '10 images but 9 labels'),
    (np.zeros((10, 8, 8, 3), np.uint8), np.full(10, -1), r'labels span -1\.\.-1'),
    (np.zeros((10, 8, 8, 3), np.uint8), np.zeros((10, 2), int), r'labels have shape \(10, 2\)'),
])
def test_error_bad_arrays(tmp_path, x, y, message):
  path = _write_npz(tmp_path / 'arrays.npz', x_train=x, y_train=y)
  with pytest.raises(DataError, match=message):
    readers.load_splits('npz', path=str(path), validation_size=2)


def test_error_labels_beyond_class_names(tmp_path):
  path = _write_npz(tmp_path / 'named.npz', x_train=_unique_images(6), y_train=np.arange(6),
                    class_names=np.array(['a', 'b', 'c']))
  with pytest.raises(DataError, match=r'train split: labels span 0\.\.5, expected \[0, 3\)'):
    readers.load_splits('npz', path=str(path), validation_size=1)


def test_error_test_shape_differs(tmp_path):
  path = _write_npz(tmp_path / 'mismatch.npz', x_train=_unique_images(6), y_train=np.zeros(6, int),
                    x_test=_unique_images(2, shape=(28, 28, 3)), y_test=np.zeros(2, int))
  with pytest.raises(DataError, match='test images'):
    readers.load_splits('npz', path=str(path), validation_size=1)


@pytest.mark.parametrize('size, message', [
    (20, 'fewer examples'), (10, 'fewer examples'), (1.5, r'fraction in \[0, 1\) nor a whole'),
    (-1, '>= 0'), (-0.5, '>= 0'), (True, 'a count or a fraction'),
    ('10%', 'a count or a fraction'),
])
def test_error_validation_size(tmp_path, size, message):
  path = _write_npz(tmp_path / 'small.npz', x_train=_unique_images(10), y_train=np.arange(10))
  with pytest.raises(DataError, match=message):
    readers.load_splits('npz', path=str(path), validation_size=size)


def test_a_whole_float_is_a_count_on_both_data_paths(tmp_path):
  """validation_size=4.0 (a config read back from JSON) holds out 4 images, in memory and
  streamed alike, as 4 does."""
  path = _write_npz(tmp_path / 'small.npz', x_train=_unique_images(10), y_train=np.arange(10))
  assert len(readers.load_splits('npz', path=str(path), validation_size=4.0).val_labels) == 4
  assert len(readers.load_splits('npz', path=str(path), validation_size=4).val_labels) == 4
  assert splits_lib.holdout_count(4.0, 10) == splits_lib.holdout_count(4, 10) == 4
  assert splits_lib.holdout_count(0.25, 10) == 2 or splits_lib.holdout_count(0.25, 10) == 3
  folder = tmp_path / 'images'
  for split in ('train',):
    for c in range(2):
      (folder / split / str(c)).mkdir(parents=True)
      for i in range(5):
        from PIL import Image
        Image.fromarray(np.full((8, 8, 3), 10 * i + c, np.uint8)).save(
            folder / split / str(c) / f'{i}.png')
  opened = stream_lib.StreamData('image_folder', path=str(folder), image_size=8,
                                 validation_size=4.0).open()
  assert len(opened.val_indices) == 4


def test_error_cifar_batches_malformed(tmp_path):
  root = tmp_path / 'cifar-10-batches-py'
  root.mkdir()
  (root / 'readme.html').write_text('')
  with pytest.raises(DataError, match=r"holds \['readme.html'\].*data_batch_1"):
    readers.load_splits('cifar_batches', path=str(root))
  _pickle(root / 'data_batch_1', {b'data': _cifar_rows(2, 0), b'fine': [0, 1]})
  with pytest.raises(DataError, match=r"data_batch_1 has keys \['data', 'fine'\]"):
    readers.load_splits('cifar_batches', path=str(root))
  _pickle(root / 'data_batch_1', {b'data': np.zeros((2, 100), np.uint8), b'labels': [0, 1]})
  with pytest.raises(DataError, match=r'shape \(2, 100\), expected \(N, 3072\)'):
    readers.load_splits('cifar_batches', path=str(root))
  _pickle(root / 'data_batch_1', {b'data': _cifar_rows(2, 0), b'labels': [0, 1]})
  with pytest.raises(DataError, match='no test_batch'):
    readers.load_splits('cifar_batches', path=str(root))
  (root / 'data_batch_1').write_bytes(b'garbage')
  with pytest.raises(DataError, match='not a readable pickle'):
    readers.load_splits('cifar_batches', path=str(root))


def test_error_image_folder_problems(tmp_path):
  empty = tmp_path / 'empty'
  (empty / 'test' / 'cls').mkdir(parents=True)
  with pytest.raises(DataError, match='no images under train'):
    readers.load_splits('image_folder', path=str(empty))
  root = tmp_path / 'folder'
  _write_folder(root)
  (root / 'train' / 'b_cls' / 'broken.png').write_bytes(b'\x89PNG nope')
  with pytest.raises(DataError, match='cannot decode.*broken.png'):
    readers.load_splits('image_folder', path=str(root), validation_size=0)
  not_tar = tmp_path / 'fake.tar'
  not_tar.write_bytes(b'hello')
  with pytest.raises(DataError, match='neither a directory nor a readable tar'):
    readers.load_splits('image_folder', path=str(not_tar))


def test_error_tfds_missing_dataset(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(DataError, match=r"tfds: cannot open 'cifar10'.*not prepared"):
    readers.load_splits('tfds', name='cifar10', path=str(tmp_path / 'tfds'))
  with pytest.raises(DataError, match='needs name='):
    readers.load_splits('tfds')


def test_error_hand_built_splits_validated():
  images, labels = np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.int32)
  with pytest.raises(DataError, match='val_labels must be an int32'):
    splits_lib.ImageSplits(images, labels, images, labels.astype(np.int64), images, labels,
                           num_classes=1, class_names=('a',))
  with pytest.raises(DataError, match='2 class names for 1 classes'):
    splits_lib.ImageSplits(images, labels, images, labels, images, labels, num_classes=1,
                           class_names=('a', 'b'))


# ----------------------------------------------------------------------------------------------
# Augmentation and device placement.


def _pattern(batch: int, h: int = 8, w: int = 8) -> np.ndarray:
  """``(batch, h, w, 1)`` uint8 images whose pixels are all distinct and left-right asymmetric."""
  base = (np.arange(h * w) * 3 + 1).reshape(h, w, 1).astype(np.uint8)
  return np.repeat(base[None], batch, axis=0)


@pytest.mark.parametrize('mode', ['reflect', 'constant'])
def test_augment_crops_are_windows_of_padded_image(mode):
  images = _pattern(64)
  pad = 2
  out = augmentation.augment(jax.random.PRNGKey(0), jnp.asarray(images), 0.0, 1.0, pad=pad,
                             flip=False, mode=mode)
  assert out.shape == (64, 8, 8, 1) and out.dtype == jnp.float32
  padded = np.pad(images[0], ((pad, pad), (pad, pad), (0, 0)), mode=mode)
  windows = {(dy, dx): padded[dy:dy + 8, dx:dx + 8] for dy in range(2 * pad + 1)
             for dx in range(2 * pad + 1)}
  seen = set()
  for image in np.asarray(out).astype(np.uint8):
    match = [offset for offset, window in windows.items() if np.array_equal(image, window)]
    assert len(match) == 1
    seen.add(match[0])
  assert len(seen) > 12  # offsets vary per image (25 possible)


def test_augment_flips_about_half_and_is_deterministic():
  images = jnp.asarray(_pattern(1000))
  key = jax.random.PRNGKey(1)
  out = np.asarray(augmentation.augment(key, images, 0.0, 1.0, pad=0, flip=True))
  flipped = np.all(out == np.asarray(images)[:, :, ::-1], axis=(1, 2, 3))
  unflipped = np.all(out == np.asarray(images), axis=(1, 2, 3))
  assert np.all(flipped ^ unflipped)
  assert 430 < flipped.sum() < 570  # Binomial(1000, 1/2): ±4.4 sigma
  np.testing.assert_array_equal(out, augmentation.augment(key, images, 0.0, 1.0, pad=0, flip=True))
  other = augmentation.augment(jax.random.PRNGKey(2), images, 0.0, 1.0, pad=0, flip=True)
  assert not np.array_equal(out, other)


def test_augment_identity_settings_equal_normalize_and_jit():
  images = jnp.asarray(_unique_images(6, shape=(8, 8, 3)))
  mean, std = np.array([120.0, 110.0, 100.0], np.float32), np.array([60.0, 61.0, 62.0], np.float32)
  plain = augmentation.normalize(images, mean, std)
  np.testing.assert_array_equal(
      augmentation.augment(jax.random.PRNGKey(0), images, mean, std, pad=0, flip=False), plain)
  np.testing.assert_allclose(
      plain, (np.asarray(images, np.float32) - mean) / std, rtol=1e-6, atol=1e-6)
  step = jax.jit(functools.partial(augmentation.augment, pad=4, flip=True))
  key = jax.random.PRNGKey(5)
  np.testing.assert_array_equal(step(key, images, mean, std),
                                augmentation.augment(key, images, mean, std, pad=4, flip=True))
  with pytest.raises(ValueError, match='reflect padding'):
    augmentation.augment(key, images, mean, std, pad=8)
