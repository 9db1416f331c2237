"""Image datasets for evaluating candidate networks: in-memory splits plus on-device augmentation.

For CIFAR-sized data the whole training split fits on the accelerator, so the product of this
package is plain numpy arrays (``ImageSplits``, uint8 pixels, int32 labels) and a jittable
``augment`` that the train step applies to each batch: no host input pipeline at all.
ImageNet-sized data is not loaded into memory: ``stream_batches`` decodes, resizes and batches
it on the host in a background thread.

One job per module:

* ``splits``: ``ImageSplits`` and its checks, per-channel ``pixel_stats``, the seeded,
  class-stratified validation hold-out (``stratified_holdout``) and class-balanced caps
  (``balanced_head``).
* ``readers``: ``load_splits`` over the ``SOURCES`` (TFDS, CIFAR python batches, ``.npz``,
  image folders or tars, scikit-learn's digits).
* ``folders``: image folders and tars: decoding, random access and ``resize_center_crop``.
* ``stream``: ``stream_batches`` / ``stream_info`` for data too large for memory, and what a
  streamed candidate reads (``StreamData``, opened to an ``OpenStream``).
* ``search_data``: ``load_search_data``, the data a search's settings name.
* ``augmentation``: ``normalize``, ``random_crop``, ``random_flip``, ``crop_and_flip`` and
  ``augment``, in JAX.

Pixels stay uint8 (N, H, W, C) until ``normalize``/``augment`` turn a batch into float32; mean
and std are per channel in pixel units (0..255).

The names below are the package's interface (``from blockqnn_jax import data as data_lib``);
callers need not know which module holds what.
"""

from blockqnn_jax.data.augmentation import augment
from blockqnn_jax.data.augmentation import crop_and_flip
from blockqnn_jax.data.augmentation import normalize
from blockqnn_jax.data.augmentation import random_crop
from blockqnn_jax.data.augmentation import random_flip
from blockqnn_jax.data.folders import IMAGE_SUFFIXES
from blockqnn_jax.data.folders import resize_center_crop
from blockqnn_jax.data.readers import CIFAR10_CLASSES
from blockqnn_jax.data.readers import SOURCES
from blockqnn_jax.data.readers import load_splits
from blockqnn_jax.data.splits import holdout_count
from blockqnn_jax.data.splits import DataError
from blockqnn_jax.data.splits import ImageSplits
from blockqnn_jax.data.splits import balanced_head
from blockqnn_jax.data.splits import pixel_stats
from blockqnn_jax.data.splits import stratified_holdout
from blockqnn_jax.data.search_data import load_search_data
from blockqnn_jax.data.search_data import suggest_source
from blockqnn_jax.data.stream import IMAGENET_MEAN
from blockqnn_jax.data.stream import IMAGENET_STD
from blockqnn_jax.data.stream import OpenStream
from blockqnn_jax.data.stream import STREAM_SOURCES
from blockqnn_jax.data.stream import StreamData
from blockqnn_jax.data.stream import stream_batches
from blockqnn_jax.data.stream import stream_info

__all__ = [
    'CIFAR10_CLASSES', 'DataError', 'IMAGENET_MEAN', 'IMAGENET_STD', 'IMAGE_SUFFIXES',
    'ImageSplits', 'OpenStream', 'SOURCES', 'STREAM_SOURCES', 'StreamData', 'augment',
    'balanced_head', 'crop_and_flip', 'holdout_count', 'load_search_data', 'load_splits',
    'normalize', 'pixel_stats', 'random_crop', 'random_flip', 'resize_center_crop',
    'stratified_holdout', 'stream_batches', 'stream_info', 'suggest_source',
]
