"""A cache of evaluations shared by searches: each block is trained once per fidelity and data.

Searches that compare strategies (or seeds) on one dataset at one fidelity would otherwise
train the same blocks again and again. Searches that name the same cache file
(``search.eval_cache``) share every result under its key

  (canonical block, fidelity, seed)

where the *fidelity* is a digest of everything that decides the trained network and its
reward: the training, network and reward settings, and a fingerprint of the data itself
(its pixels and labels, so two copies of one file at different paths agree, and a different
hold-out does not). The training seed is derived from the block alone (``block_seed``), not
from the search, so whichever search trains a block first, the result is the one every
other search would have got.

The file is SQLite in WAL mode: several processes may read and write it at once. A result
is stored with ``INSERT OR IGNORE`` and read back, so when two searches happen to train the
same block at the same time, the first stored wins and both record that one. Only results
that stand for the block are stored (successes and failures that are facts about it, not a
lost worker or an out-of-memory). No JAX here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
import socket
import sqlite3
import threading
import time
from typing import Any

import numpy as np

from blockqnn_jax.storage import results
from blockqnn_jax.storage import store as store_lib
from blockqnn_jax.storage.results import EvalResult

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
  canonical_key TEXT NOT NULL,
  fidelity TEXT NOT NULL,
  seed INTEGER NOT NULL,
  result TEXT NOT NULL,
  created_at REAL NOT NULL,
  origin TEXT NOT NULL,
  PRIMARY KEY (canonical_key, fidelity, seed)
);
CREATE TABLE IF NOT EXISTS fidelities (
  fidelity TEXT PRIMARY KEY,
  description TEXT NOT NULL
);
"""


def block_seed(canonical_key: str, replicate: int = 0) -> int:
  """The training seed of a block in a shared cache: fixed by its canonical form (and the
  replicate, for repeated trainings of one block), the same in every search."""
  digest = hashlib.sha256(f'eval-cache:{canonical_key}:{replicate}'.encode()).digest()
  return int.from_bytes(digest[:4], 'little') >> 1


def data_fingerprint(data: Any) -> str:
  """A digest of what a candidate trains and is validated on.

  In-memory splits (``data.ImageSplits``): their train and validation pixels and labels.
  A stream (``data.OpenStream``): its source, name, file name, image size and
  the example indices of both parts.
  """
  h = hashlib.sha256()
  if hasattr(data, 'train_images'):
    for array in (data.train_images, data.train_labels, data.val_images, data.val_labels):
      array = np.ascontiguousarray(array)
      h.update(f'{array.dtype}{array.shape}'.encode())
      h.update(array.tobytes())
  else:
    d = data.data
    h.update(json.dumps([d.source, d.name, Path(str(d.path or '')).name,
                         d.image_size]).encode())
    for array in (data.train_indices, data.val_indices):
      h.update(np.ascontiguousarray(array, np.int64).tobytes())
  return h.hexdigest()[:20]


def fidelity_of(train: Any, network: Any, reward: Any, data: str | Any
                ) -> tuple[str, dict[str, Any]]:
  """``(digest, description)`` of a fidelity: frozen settings dataclasses and the data
  (a ``data_fingerprint`` or the data itself). ``train.compute_dtype`` must be resolved
  ('float32' or 'bfloat16', not 'auto'). Fields that only change how a candidate is compiled
  or scheduled (the training loop, the flat optimiser, XLA's emitters) are left out: they
  train the same network, up to rounding."""
  if train.compute_dtype == 'auto':
    raise ValueError("resolve train.compute_dtype='auto' to the dtype it runs in first")
  train_fields = dataclasses.asdict(train)
  for name in ('loop', 'flat_optimizer', 'xla_cpu_fusion_emitters'):
    train_fields.pop(name, None)
  description = dict(train=train_fields, network=dataclasses.asdict(network),
                     reward=dataclasses.asdict(reward),
                     data=data if isinstance(data, str) else data_fingerprint(data))
  text = json.dumps(description, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:20], description


class EvalCache(store_lib.LockedDatabase):
  """One shared cache file (see the module docstring); thread-safe within a process.

  Args:
    path: the SQLite file (created with its folder if missing).
    fidelity: the digest results are read and written under (``fidelity_of``).
    description: what the digest stands for (stored once, for people reading the file).
  """

  def __init__(self, path: str | Path, fidelity: str, description: dict | None = None):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.fidelity = fidelity
    self._lock = threading.Lock()
    self._db = sqlite3.connect(str(self.path), timeout=120, isolation_level=None,
                               check_same_thread=False)
    self._db.execute('PRAGMA busy_timeout = 120000')
    self._db.execute('PRAGMA journal_mode = WAL')
    self._db.executescript(_SCHEMA)
    self._db.execute('INSERT OR IGNORE INTO fidelities VALUES (?, ?)',
                     (fidelity, json.dumps(description or {}, sort_keys=True, default=str)))
    self._origin = f'{socket.gethostname()}:{os.getpid()}'

  def get(self, canonical_key: str, seed: int) -> EvalResult | None:
    """The stored result of a block trained from ``seed`` at this fidelity, if any."""
    with self._lock:
      row = self._db.execute(
          'SELECT result FROM results WHERE canonical_key = ? AND fidelity = ? AND seed = ?',
          (canonical_key, self.fidelity, seed)).fetchone()
    return None if row is None else results.decode_result(row[0])

  def put(self, canonical_key: str, seed: int, result: EvalResult
          ) -> tuple[EvalResult, bool]:
    """Stores ``result`` unless one is stored already; ``(the stored result, whether it is
    another's)``. A result that does not stand for the block (``EvalResult.reusable``) is
    not stored and comes back as it is."""
    if not result.reusable:
      return result, False
    with self._lock:
      cursor = self._db.execute(
          'INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?)',
          (canonical_key, self.fidelity, seed, results.encode_result(result), time.time(), self._origin))
      if cursor.rowcount == 1:
        return result, False
      row = self._db.execute(
          'SELECT result FROM results WHERE canonical_key = ? AND fidelity = ? AND seed = ?',
          (canonical_key, self.fidelity, seed)).fetchone()
    return results.decode_result(row[0]), True

  def count(self, all_fidelities: bool = False) -> int:
    with self._lock:
      if all_fidelities:
        return self._db.execute('SELECT COUNT(*) FROM results').fetchone()[0]
      return self._db.execute('SELECT COUNT(*) FROM results WHERE fidelity = ?',
                              (self.fidelity,)).fetchone()[0]
