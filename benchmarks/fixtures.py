"""What the benchmarks share, in one place (no flags: any benchmark may import this): the
blocks they time, how a data flag reads, and a preset with changes applied."""

from __future__ import annotations

import ast

import ml_collections

from configs import cifar

# Small to large: one conv, the residual block, the Inception-like block, a deep mixed block.
BLOCKS = (
    '1,1,3,0,0 2,7,0,0,0',
    '1,4,0,0,0 2,1,3,1,0 3,1,3,2,0 4,5,0,1,3 5,7,0,0,0',
    '1,1,1,0,0 2,1,3,0,0 3,1,5,0,0 4,2,3,0,0 5,1,1,4,0 6,7,0,0,0',
    '1,1,3,0,0 2,1,1,1,0 3,3,3,0,0 4,1,5,3,0 5,6,0,2,4 6,1,3,5,0 7,5,0,1,6 8,2,3,7,0 '
    '9,1,3,8,0 10,7,0,0,0',
)


def data_source(spec: str) -> tuple[str, str | None]:
  """A benchmark's ``--data`` value, ``'SOURCE'`` or ``'SOURCE:PATH'`` (e.g.
  ``'npz:data/cifar10-exact-subset.npz'``), as ``(source, path or None)``."""
  source, _, path = spec.partition(':')
  return source, path or None


def preset_config(preset: str, changes) -> ml_collections.ConfigDict:
  """``configs/cifar.py``'s ``preset`` with ``changes`` (``FIELD=VALUE``, the value a Python
  literal or else a string) applied; an unknown field is a ValueError."""
  config = cifar.get_config(preset)
  for change in changes:
    field, _, text = change.partition('=')
    *parents, name = field.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    if name not in node:
      raise ValueError(f'{change}: no config field {field}')
    try:
      node[name] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      node[name] = text  # a string field
  return config
