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

Import each name from its module (``from blockqnn_jax.data import splits``).
"""
