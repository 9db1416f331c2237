"""The data a search's settings name: in-memory splits, or an opened stream."""

from __future__ import annotations

from blockqnn_jax.data.readers import load_splits
from blockqnn_jax.data.splits import DataError, ImageSplits  # noqa: F401 (annotations)
from blockqnn_jax.data.stream import OpenStream, StreamData
from blockqnn_jax.settings.search import DataSettings, NetworkSettings


def suggest_source(path: str) -> str:
  """The source that reads a file or folder like ``path``."""
  name = path.rstrip('/').lower()
  if name.endswith('.npz'):
    return 'npz'
  if 'batches' in name or 'cifar-100-python' in name:
    return 'cifar_batches'
  return 'image_folder'


def load_search_data(data: DataSettings, network: NetworkSettings, seed: int
                     ) -> ImageSplits | OpenStream:
  """The data a search's settings name: in-memory splits, or an opened stream when
  ``data.stream`` (ImageNet-sized data). Either way the validation part is held out of the
  training split, deterministically from ``seed``.

  Raises:
    data.DataError: the data cannot be read, or ``data.path`` is set for a source that
      reads no path (it would be silently ignored).
  """
  if data.path and data.source == 'digits':
    raise DataError(
        f'data.path={data.path!r} is not read by data.source=digits (the bundled 8x8 '
        f'digits); pass --config.data.source={suggest_source(data.path)} to train on it')
  if data.stream:
    if not data.path and data.source == 'image_folder':
      raise DataError('data.source=image_folder needs --config.data.path= (a folder '
                               'or tar laid out train/<class>/<image>)')
    return StreamData(data.source, name=data.name, path=data.path or None,
                      image_size=network.image_size, validation_size=data.validation_size,
                      seed=seed, max_train=data.max_train,
                      decode_threads=data.decode_threads).open()
  return load_splits(data.source, name=data.name, path=data.path or None,
                              validation_size=data.validation_size, seed=seed,
                              max_train=data.max_train or None, download=data.download)
