"""The search's results store: one SQLite database in the workdir.

Researchers query it directly (``sqlite3 WORKDIR/search.sqlite``); the report reads it; the
search resumes from it. Tables:

* ``candidates`` — one row per sampled block of every iteration: its NSC, canonical key,
  iteration, position in the iteration, ε, whether its reward was reused from an earlier
  identical block (``cached``), status and failure reason, reward, accuracy, FLOPs, density,
  parameters, loss, timings, device. ``UNIQUE(iteration, position)`` makes recording
  idempotent, so a resumed iteration never records a candidate twice.
* ``agent_state`` — the agent after the last completed iteration: Q, the replay memory and
  the next iteration number, as one ``.npz`` blob, written in the same kind of transaction
  as the results (SQLite commits are atomic: a kill at any moment leaves the previous state).
* ``sampled`` — the blocks each started iteration sampled (the agent's state paths), written
  before any of them is trained. With bounded staleness an iteration is sampled from a Q
  several updates old; keeping what was sampled makes a resumed search train exactly what
  the uninterrupted one would have.
* ``meta`` — the run's config (JSON) and schema version.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from blockqnn_jax.train import EvalResult

SCHEMA_VERSION = 1
DB_NAME = 'search.sqlite'

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS candidates (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  iteration INTEGER NOT NULL,
  position INTEGER NOT NULL,
  epsilon REAL NOT NULL,
  nsc TEXT NOT NULL,
  canonical_key TEXT NOT NULL,
  cached INTEGER NOT NULL,
  status TEXT NOT NULL,
  failure_reason TEXT NOT NULL,
  reward REAL,
  val_accuracy REAL,
  flops INTEGER,
  density REAL,
  params INTEGER,
  final_loss REAL,
  compile_s REAL,
  train_s REAL,
  eval_s REAL,
  total_s REAL,
  device TEXT,
  created_at REAL NOT NULL,
  UNIQUE(iteration, position)
);
CREATE INDEX IF NOT EXISTS candidates_by_key ON candidates(canonical_key);
CREATE TABLE IF NOT EXISTS sampled (
  iteration INTEGER PRIMARY KEY,
  arrays BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_state (
  id INTEGER PRIMARY KEY CHECK (id = 0),
  next_iteration INTEGER NOT NULL,
  arrays BLOB NOT NULL,
  saved_at REAL NOT NULL
);
"""

_RESULT_FIELDS = ('status', 'failure_reason', 'reward', 'val_accuracy', 'flops', 'density',
                  'params', 'final_loss', 'compile_s', 'train_s', 'eval_s', 'total_s', 'device')


def _finite_or_none(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A row of ``candidates``."""

  iteration: int
  position: int
  epsilon: float
  nsc: str
  canonical_key: str
  cached: bool
  status: str
  failure_reason: str
  reward: float | None
  val_accuracy: float | None
  flops: int | None
  density: float | None
  params: int | None
  final_loss: float | None
  compile_s: float | None
  train_s: float | None
  eval_s: float | None
  total_s: float | None
  device: str | None


class ResultsStore:
  """The SQLite store of one search (thread-safe; one connection, serialised)."""

  def __init__(self, workdir: str | Path):
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.path = self.workdir / DB_NAME
    self._lock = threading.Lock()
    self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
    self._db.execute('PRAGMA journal_mode=WAL')  # readers (the report) never block the search
    self._db.execute('PRAGMA synchronous=FULL')
    with self._lock:
      self._db.executescript(_SCHEMA)
      self._db.execute('INSERT OR IGNORE INTO meta VALUES (?, ?)',
                       ('schema_version', str(SCHEMA_VERSION)))

  def close(self) -> None:
    with self._lock:
      self._db.close()

  # -- meta ---------------------------------------------------------------------------------

  def get_meta(self, key: str) -> str | None:
    with self._lock:
      row = self._db.execute('SELECT value FROM meta WHERE key = ?', (key,)).fetchone()
    return row[0] if row else None

  def set_meta(self, key: str, value: str) -> None:
    with self._lock:
      self._db.execute('INSERT OR REPLACE INTO meta VALUES (?, ?)', (key, value))

  # -- candidates ---------------------------------------------------------------------------

  def record(self, iteration: int, position: int, epsilon: float, result: EvalResult,
             cached: bool) -> None:
    """Records one candidate; a second record of the same (iteration, position) is ignored."""
    values = {f: _finite_or_none(getattr(result, f)) for f in _RESULT_FIELDS}
    with self._lock:
      self._db.execute(
          'INSERT OR IGNORE INTO candidates (iteration, position, epsilon, nsc, canonical_key, '
          f'cached, {", ".join(_RESULT_FIELDS)}, created_at) VALUES '
          f'(?, ?, ?, ?, ?, ?, {", ".join("?" * len(_RESULT_FIELDS))}, ?)',
          (iteration, position, float(epsilon), result.block, result.canonical_key,
           int(cached), *values.values(), time.time()))

  def iteration_rows(self, iteration: int) -> dict[int, Candidate]:
    """The recorded candidates of an iteration, by position."""
    return {c.position: c for c in self._select('WHERE iteration = ?', (iteration,))}

  def trained(self, canonical_key: str) -> Candidate | None:
    """The first candidate with this canonical key that was actually trained, if any."""
    rows = self._select('WHERE canonical_key = ? AND cached = 0 ORDER BY id LIMIT 1',
                        (canonical_key,))
    return rows[0] if rows else None

  def candidates(self) -> list[Candidate]:
    return self._select('ORDER BY iteration, position', ())

  def count(self, where: str = '', args: tuple = ()) -> int:
    with self._lock:
      return self._db.execute(f'SELECT COUNT(*) FROM candidates {where}', args).fetchone()[0]

  def best(self) -> Candidate | None:
    rows = self._select("WHERE status = 'ok' ORDER BY reward DESC LIMIT 1", ())
    return rows[0] if rows else None

  def _select(self, clause: str, args: tuple) -> list[Candidate]:
    names = [f.name for f in dataclasses.fields(Candidate)]
    with self._lock:
      rows = self._db.execute(f'SELECT {", ".join(names)} FROM candidates {clause}',
                              args).fetchall()
    return [Candidate(**{**dict(zip(names, r)), 'cached': bool(r[names.index('cached')])})
            for r in rows]

  # -- agent state --------------------------------------------------------------------------

  def save_agent(self, next_iteration: int, arrays: dict[str, Any]) -> None:
    """Atomically replaces the saved agent state."""
    with self._lock:
      self._db.execute('INSERT OR REPLACE INTO agent_state VALUES (0, ?, ?, ?)',
                       (next_iteration, _npz_bytes(arrays), time.time()))

  def save_sampled(self, iteration: int, arrays: dict[str, Any]) -> None:
    """Keeps what ``iteration`` sampled; a second save of the same iteration is ignored."""
    with self._lock:
      self._db.execute('INSERT OR IGNORE INTO sampled VALUES (?, ?)',
                       (iteration, _npz_bytes(arrays)))

  def load_sampled(self, iteration: int) -> dict[str, np.ndarray] | None:
    with self._lock:
      row = self._db.execute('SELECT arrays FROM sampled WHERE iteration = ?',
                             (iteration,)).fetchone()
    return None if row is None else _npz_arrays(row[0])

  def load_agent(self) -> tuple[int, dict[str, np.ndarray]] | None:
    with self._lock:
      row = self._db.execute(
          'SELECT next_iteration, arrays FROM agent_state WHERE id = 0').fetchone()
    if row is None:
      return None
    return row[0], _npz_arrays(row[1])


def _npz_bytes(arrays: dict[str, Any]) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
  return buffer.getvalue()


def _npz_arrays(blob: bytes) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(blob)) as arrays:
    return {k: arrays[k] for k in arrays.files}


def result_from_candidate(row: Candidate) -> EvalResult:
  """An earlier candidate's result, to reuse for an identical block."""
  nan = float('nan')
  return EvalResult(
      block=row.nsc, canonical_key=row.canonical_key, status=row.status,
      failure_reason=row.failure_reason,
      val_accuracy=nan if row.val_accuracy is None else row.val_accuracy,
      reward=nan if row.reward is None else row.reward,
      final_loss=nan if row.final_loss is None else row.final_loss,
      flops=row.flops or 0, density=nan if row.density is None else row.density,
      params=row.params or 0, device=row.device or '')


def config_json(config) -> str:
  """A stable JSON form of a ConfigDict (or dict), for comparing runs."""
  as_dict = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  return json.dumps(as_dict, sort_keys=True, default=str)


def config_differences(old: str, new: str, ignore: Iterable[str] = (),
                       defaults: dict[str, Any] | None = None) -> list[str]:
  """Dotted keys whose values differ between two ``config_json`` strings.

  A key in ``defaults`` that one side lacks compares as its default value there.
  """
  def flatten(d, prefix=''):
    out = {}
    for k, v in d.items():
      key = f'{prefix}{k}'
      if isinstance(v, dict):
        out.update(flatten(v, key + '.'))
      else:
        out[key] = v
    return out
  defaults = json.loads(json.dumps(defaults or {}))  # as it would read back from JSON
  a = {**defaults, **flatten(json.loads(old))}
  b = {**defaults, **flatten(json.loads(new))}
  ignored = set(ignore)
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ignored)
