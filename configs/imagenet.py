"""BlockQNN search directly on ImageNet, with the data streamed from the host.

  --config=configs/imagenet.py        ImageNet-1k through TFDS (prepared in array_record)
  --config=configs/imagenet.py:smoke  the same program on a folder or tar of images, sized for
                                      a CPU: --config.data.path=PATH/cifar10-jpeg-full.tar

The paper searched on CIFAR and *transferred* the block to ImageNet; searching on ImageNet
itself is this package's extension, so every value below that differs from configs/cifar.py
is [reconstructed]: a 10% class-balanced-in-expectation subset of the training images, 128
pixel crops and 6 epochs per candidate keep a candidate in minutes on one GPU. The
validation part that rewards candidates is held out of ImageNet's *training* split; the
official validation split (ImageNet's de-facto test set) is never read by the search.
"""

from __future__ import annotations

from configs import cifar


def get_config(preset: str | None = None):
  """Returns the config of ``preset``: '' or 'paper' (default) or 'smoke'."""
  preset = preset or 'paper'
  config = cifar.get_config('smoke' if preset == 'smoke' else 'paper')
  config.preset = preset

  # The ImageNet network: stride-2 stem and 3x3 max pooling, then stages at F, 2F, 4F, 8F.
  config.network.kind = 'imagenet'
  config.network.num_blocks = 1
  config.network.features = 32
  config.network.num_classes = 1000
  config.network.image_size = 128

  # Streamed from the host (data.stream_batches): decoded and resized on background threads
  # while the device trains; nothing but a few batches is held in memory.
  config.data.stream = True
  config.data.source = 'tfds'
  config.data.name = 'imagenet2012'
  config.data.path = ''  # TFDS data_dir ('' = TFDS's default)
  config.data.validation_size = 10000
  config.data.max_train = 128000  # ~10% of the 1.28M training images; 0 = all
  config.data.decode_threads = 16

  config.train.epochs = 6
  config.train.lr_decay_epochs = 3
  config.train.batch_size = 256
  config.train.eval_batch_size = 500

  if preset == 'smoke':
    config.network.features = 8
    config.network.num_classes = 10
    config.network.image_size = 32
    config.data.source = 'image_folder'
    config.data.name = ''
    config.data.path = ''  # required: a folder or tar laid out train/<class>/<image>
    config.data.validation_size = 200
    config.data.max_train = 1000
    config.data.decode_threads = 2
    config.train.epochs = 2
    config.train.augment = True  # real images (the cifar smoke preset's digits go without)
    config.train.lr_decay_epochs = 5
    config.train.batch_size = 50
    config.train.eval_batch_size = 100
  elif preset != 'paper':
    raise ValueError(f'unknown preset {preset!r}: use "paper" or "smoke"')
  return config
