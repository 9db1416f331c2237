"""Image folders: a ``{train,test}/<class>/<image>`` directory or ``.tar`` read as images.

``load_image_folder`` decodes the (capped) train and test splits into arrays for
``readers.load_splits``; ``folder_random_access`` opens one split for reading single images by
index, which ``stream`` batches for data too large for memory; ``resize_center_crop`` brings
images of any size to one square side. Pillow is imported only when an image is decoded, and
a missing Pillow is a ``DataError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path
import tarfile
import threading
from typing import Any, Callable, Sequence

import numpy as np

from blockqnn_jax.data.splits import DataError, balanced_head

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp')


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


def load_image_folder(path: Path, max_train: int | None, max_test: int | None):
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


def folder_random_access(path: Path, split: str) -> tuple[int, int, Callable[[], Any]]:
  """Opens one split of an image folder or tar for reading single images by index.

  Classes come from the ``train`` split (as in ``load_splits``), so labels agree across splits.

  Args:
    path: the directory or ``.tar`` laid out ``{train,test}/<class>/<image>``.
    split: the split folder to read, e.g. ``'train'`` or ``'val'``.

  Returns:
    ``(num_examples, num_classes, open_reader)``: ``open_reader()`` is a context manager whose
    value maps an index to ``(image (H, W, C) uint8, label int)``; it may be called from several
    threads at once (reads of a tar take turns, decoding does not).

  Raises:
    DataError: the path is missing or holds no images (at call time); a file cannot be
      decoded (when it is read).
  """
  splits = ('train',) if split == 'train' else ('train', split)
  index = _index_folder(path, splits=splits)
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
