"""Trained variables of a ``BlockNet`` as flat named arrays, the forms the exported files load.

Names are the variable paths joined by '/': ``params/stem/conv/kernel``,
``batch_stats/stage0_block0/layer1/bn/mean``, ``params/head/bias``. A network trained with
``scan_blocks`` keeps blocks 1..N-1 of a stage stacked under ``stage{s}_scan/block``; they
are unstacked here into ``stage{s}_block{b}``, the layout of the exported network.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

COLLECTIONS = ('params', 'batch_stats')
_SCAN = re.compile(r'stage(\d+)_scan')


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (str(key),))
    else:
      yield prefix + (str(key),), np.asarray(value)


def flat_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{'params': ..., 'batch_stats': ...}`` (nested, as Flax or a checkpoint holds them) as
  ``{'collection/module/.../name': float32 array}``, scanned stages unstacked."""
  flat = {}
  for collection in COLLECTIONS:
    for path, value in _flatten(variables.get(collection, {}), (collection,)):
      scanned = _SCAN.fullmatch(path[1])
      if scanned is None:
        flat['/'.join(path)] = value.astype(np.float32)
        continue
      stage, rest = scanned.group(1), path[3:]  # path[2] is the scan cell's 'block'
      for b, one in enumerate(value, start=1):
        flat['/'.join((collection, f'stage{stage}_block{b}', *rest))] = one.astype(np.float32)
  return flat


_BATCH_NORM = {('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
               ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}


def torch_state_dict(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """``flat_variables`` under the names and layouts of the exported PyTorch network's
  ``state_dict``: a conv kernel ``(k, k, in, out)`` becomes ``(out, in, k, k)``, the
  classifier's ``(in, out)`` becomes ``(out, in)``, BatchNorm's scale, bias, mean and var
  its weight, bias, running_mean and running_var (with a zero num_batches_tracked)."""
  out = {}
  for name, value in flat.items():
    collection, *path, leaf = name.split('/')
    module = '.'.join(path)
    if leaf == 'kernel':
      layout = (3, 2, 0, 1) if value.ndim == 4 else (1, 0)
      out[f'{module}.weight'] = np.ascontiguousarray(value.transpose(layout))
    elif path[-1] == 'head':  # the classifier's bias
      out[f'{module}.{leaf}'] = value
    else:
      out[f'{module}.{_BATCH_NORM[(collection, leaf)]}'] = value
      if leaf == 'mean':
        out[f'{module}.num_batches_tracked'] = np.zeros((), np.int64)
  return out
