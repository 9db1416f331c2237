"""Writes a found network as a standalone file (``write``) with its weights in the form it loads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from blockqnn_jax.export.common import Dialect, module_source
from blockqnn_jax.export.flax_file import FLAX
from blockqnn_jax.export.torch_file import TORCH
from blockqnn_jax.export.weights import flat_variables, torch_state_dict
from blockqnn_jax.models.architecture import NetworkSpec

MODULE_FILE = 'network.py'


class ExportError(ValueError):
  """What to export cannot be found or does not fit (a user's mistake, not a bug)."""


def _torch_weights(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return torch_state_dict(flat_variables(variables))


# format -> (its dialect, its weights file, the weights in that file)
FORMATS: dict[str, tuple[Dialect, str, Callable[..., dict[str, np.ndarray]]]] = {
    'flax': (FLAX, 'variables.npz', flat_variables),
    'pytorch': (TORCH, 'state_dict.npz', _torch_weights),
}


def write(spec: NetworkSpec, out_dir: str | Path, fmt: str,
          variables: Mapping[str, Any] | None = None, *, bn_momentum: float = 0.9,
          bn_epsilon: float = 1e-5, source: str = '',
          normalisation: tuple[Any, Any] | None = None) -> list[Path]:
  """Writes ``spec``'s network (and ``variables``, when given) to ``out_dir`` as ``fmt``.

  ``normalisation``: the training split's per-channel pixel mean and std, which the file
  keeps as ``MEAN``/``STD`` with a ``normalise`` function. Everything is computed before the
  first file is written, and each file is written whole
  (a temporary file renamed), so a failure leaves ``out_dir`` as it was.

  Returns:
    The paths written: ``network.py``, then the weights file if any.
  """
  if fmt not in FORMATS:
    raise ValueError(f'format must be one of {sorted(FORMATS)}, got {fmt!r}')
  dialect, weights_file, make_weights = FORMATS[fmt]
  arrays = None if variables is None else make_weights(variables)
  text = module_source(spec, dialect, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
                       weights=None if arrays is None else weights_file, source=source,
                       normalisation=normalisation)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  written = []
  if arrays is not None:
    tmp = out / f'.{weights_file}.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, out / weights_file)
    written.append(out / weights_file)
  tmp = out / f'.{MODULE_FILE}.tmp'
  tmp.write_text(text)
  os.replace(tmp, out / MODULE_FILE)
  return [out / MODULE_FILE, *written]


__all__ = ['ExportError', 'FORMATS', 'MODULE_FILE', 'write']
