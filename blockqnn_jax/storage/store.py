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
* ``evaluations`` — every further evaluation of a block a search made (``search.confirm``:
  the same block trained again from another seed): its canonical key, replicate (1, 2, ...;
  replicate 0 is the block's ``candidates`` row), the iteration that asked for it, the
  seed, whether the shared evaluation cache held it, and the result (JSON). A block's
  evidence is its first result and these.
* ``reports`` — the scores a study's trainer reported for a trial as it trained
  (``Study.report``: trial id, step, value), what early stopping (``search.early_stop``)
  decides from while the trial is out; the told result keeps those at the rungs.
* ``meta`` — the run's config (JSON) and schema version.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
import sqlite3
import threading
import time
from typing import Any

import numpy as np

from blockqnn_jax.storage import results
from blockqnn_jax.storage.results import Candidate, EvalResult

SCHEMA_VERSION = 1
DB_NAME = 'search.sqlite'


def _schema() -> str:
  columns = ',\n  '.join(
      f'{c.name} {c.sql_type}' + (' NOT NULL' if c.name in results.REQUIRED else '')
      for c in results.COLUMNS)
  return f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS candidates (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  {columns},
  UNIQUE(iteration, position)
);
CREATE INDEX IF NOT EXISTS candidates_by_key ON candidates(canonical_key);
CREATE TABLE IF NOT EXISTS sampled (
  iteration INTEGER PRIMARY KEY,
  arrays BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
  canonical_key TEXT NOT NULL,
  replicate INTEGER NOT NULL,
  iteration INTEGER NOT NULL,
  seed INTEGER NOT NULL,
  shared INTEGER NOT NULL,
  status TEXT NOT NULL,
  reward REAL,
  result TEXT NOT NULL,
  created_at REAL NOT NULL,
  PRIMARY KEY (canonical_key, replicate)
);
CREATE TABLE IF NOT EXISTS reports (
  trial INTEGER NOT NULL,
  step INTEGER NOT NULL,
  value REAL,
  PRIMARY KEY (trial, step)
);
CREATE TABLE IF NOT EXISTS agent_state (
  id INTEGER PRIMARY KEY CHECK (id = 0),
  next_iteration INTEGER NOT NULL,
  arrays BLOB NOT NULL,
  saved_at REAL NOT NULL
);
"""


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One row of the ``evaluations`` table: a block trained again (replicate >= 1)."""

  canonical_key: str
  replicate: int
  iteration: int
  seed: int
  shared: bool
  result: EvalResult


class StoreError(ValueError):
  """The workdir's database is missing, corrupt, or not a search store."""


def database_path(path: str | Path) -> Path:
  """The database of a workdir, or ``path`` itself if it is the database file.

  Raises:
    FileNotFoundError: if the workdir or its database does not exist.
  """
  path = Path(path)
  if path.is_dir():
    path = path / DB_NAME
    if not path.is_file():
      raise FileNotFoundError(f'no search database {path} (is this a search workdir?)')
    return path
  if not path.is_file():
    raise FileNotFoundError(f'no search workdir or database at {path}')
  return path


def _connect_read_only(path: Path) -> sqlite3.Connection:
  """Opens read-only, so a reader can never create, lock or change the search's database."""
  try:
    db = sqlite3.connect(f'{path.resolve().as_uri()}?mode=ro', uri=True,
                         check_same_thread=False)
    db.execute('SELECT 1 FROM sqlite_master LIMIT 1')
    return db
  except sqlite3.OperationalError:
    # A WAL database in a read-only directory cannot make its -shm file: read it as a file.
    db = sqlite3.connect(f'{path.resolve().as_uri()}?immutable=1', uri=True,
                         check_same_thread=False)
  except sqlite3.DatabaseError as e:  # not an SQLite file at all
    raise StoreError(f'{path} is not a search database ({e})') from None
  try:
    db.execute('SELECT 1 FROM sqlite_master LIMIT 1')
  except sqlite3.DatabaseError as e:
    db.close()
    raise StoreError(f'{path} is not a search database ({e})') from None
  return db


class LockedDatabase:
  """A SQLite connection (``_db``) shared by threads under one lock (``_lock``), closed by
  ``close`` or by leaving a ``with`` block: what the store and the evaluation cache share."""

  _db: sqlite3.Connection
  _lock: threading.Lock

  def close(self) -> None:
    with self._lock:
      self._db.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class ResultsStore(LockedDatabase):
  """The SQLite store of one search (thread-safe; one connection, serialised).

  ``ResultsStore(workdir)`` creates or opens the store for the search;
  ``ResultsStore.open_read_only(path)`` opens an existing one (a workdir or the file) for
  the report and for retraining, without ever writing to it.
  """

  def __init__(self, workdir: str | Path, *, _read_only_path: Path | None = None):
    self._lock = threading.Lock()
    self.read_only = _read_only_path is not None
    if self.read_only:
      self.path = _read_only_path
      self.workdir = self.path.parent
      self._db = _connect_read_only(self.path)
    else:
      self.workdir = Path(workdir)
      self.workdir.mkdir(parents=True, exist_ok=True)
      self.path = self.workdir / DB_NAME
      self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
      try:
        self._check_not_foreign()  # before anything is written: a bad file stays as it was
        self._db.execute('PRAGMA journal_mode=WAL')  # readers (the report) never block
        self._db.execute('PRAGMA synchronous=FULL')
        with self._lock:  # one transaction: a reader sees no tables or all of them
          self._db.executescript(
              f'BEGIN IMMEDIATE;{_schema()}INSERT OR IGNORE INTO meta VALUES '
              f"('schema_version', '{SCHEMA_VERSION}');\nCOMMIT;")
          self._add_missing_columns()
      except sqlite3.DatabaseError as e:
        self._db.close()
        raise StoreError(f'{self.path} is not a usable search database ({e}); move it '
                         'away or use a new --workdir') from None
      except StoreError:
        self._db.close()
        raise
    self._columns = self._table_columns()

  def _check_not_foreign(self) -> None:
    """Refuses an SQLite file that holds tables but not a search's (someone else's data)."""
    tables = {r[0] for r in self._db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
    tables.discard('sqlite_sequence')
    if tables and not {'candidates', 'meta'} <= tables:
      raise StoreError(f'{self.path} is an SQLite database of something else (tables: '
                       f'{", ".join(sorted(tables))}); move it away or use a new --workdir')
    if 'candidates' in tables:
      have = {r[1] for r in self._db.execute('PRAGMA table_info(candidates)').fetchall()}
      missing = [c for c in results.REQUIRED if c not in have]
      if missing:
        raise StoreError(f'{self.path}: table candidates lacks columns {missing}; not a '
                         'search database this version can continue')

  @classmethod
  def open_read_only(cls, path: str | Path) -> 'ResultsStore':
    """An existing store (a workdir or its database file), read-only.

    Raises:
      FileNotFoundError: no database there.
      StoreError: the file is not a search store.
    """
    store = cls(None, _read_only_path=database_path(path))
    if 'canonical_key' not in store._columns:
      store.close()
      raise StoreError(f'{store.path} is not a search database (no candidates table)')
    missing = [c for c in results.REQUIRED if c not in store._columns]
    if missing:
      store.close()
      raise StoreError(f'{store.path}: table candidates lacks columns {missing}')
    return store

  def _table_columns(self) -> set[str]:
    try:
      with self._lock:
        rows = self._db.execute('PRAGMA table_info(candidates)').fetchall()
    except sqlite3.DatabaseError as e:
      raise StoreError(f'{self.path} is not a search database: {e}') from None
    return {r[1] for r in rows}

  def _add_missing_columns(self) -> None:
    """A store made by an older version gains the columns added since (left NULL)."""
    have = {r[1] for r in self._db.execute('PRAGMA table_info(candidates)').fetchall()}
    for c in results.COLUMNS:
      if c.name not in have:
        self._db.execute(f'ALTER TABLE candidates ADD COLUMN {c.name} {c.sql_type}')

  # -- meta ---------------------------------------------------------------------------------

  def get_meta(self, key: str) -> str | None:
    with self._lock:
      try:
        row = self._db.execute('SELECT value FROM meta WHERE key = ?', (key,)).fetchone()
      except sqlite3.OperationalError:  # a read-only store without a meta table
        return None
    return row[0] if row else None

  def meta(self) -> dict[str, str]:
    """The ``meta`` table as a dict (empty if the database has none)."""
    with self._lock:
      try:
        return dict(self._db.execute('SELECT key, value FROM meta').fetchall())
      except sqlite3.DatabaseError:
        return {}

  def set_meta(self, key: str, value: str) -> None:
    with self._lock:
      self._db.execute('INSERT OR REPLACE INTO meta VALUES (?, ?)', (key, value))

  # -- candidates ---------------------------------------------------------------------------

  def record(self, iteration: int, position: int, epsilon: float, result: EvalResult,
             cached: bool, shared: bool = False) -> None:
    """Records one candidate; a second record of the same (iteration, position) is ignored.
    ``shared``: the result came from the evaluation cache shared with other searches."""
    row = results.to_row(Candidate.of(result, iteration=iteration, position=position,
                                      epsilon=epsilon, cached=cached, shared=shared,
                                      created_at=time.time()))
    with self._lock:
      self._db.execute(
          f'INSERT OR IGNORE INTO candidates ({", ".join(row)}) VALUES '
          f'({", ".join("?" * len(row))})', tuple(row.values()))

  def iteration_rows(self, iteration: int) -> dict[int, Candidate]:
    """The recorded candidates of an iteration, by position."""
    return {c.position: c for c in self._select('WHERE iteration = ?', (iteration,))}

  def trained(self, canonical_key: str) -> Candidate | None:
    """The first candidate with this canonical key that was trained with a reusable
    result (a success, or a failure that is a fact about the block), if any."""
    rows = self._select('WHERE canonical_key = ? AND cached = 0 ORDER BY id', (canonical_key,))
    return next((row for row in rows if row.result.reusable), None)

  def forget(self, iteration: int, position: int) -> None:
    """Removes a recorded candidate (a transient failure, to be trained again)."""
    with self._lock:
      self._db.execute('DELETE FROM candidates WHERE iteration = ? AND position = ?',
                       (iteration, position))

  def candidates(self) -> list[Candidate]:
    """Every candidate, ordered by (iteration, position)."""
    return self._select('ORDER BY iteration, position, id', ())

  def count(self, where: str = '', args: tuple = ()) -> int:
    with self._lock:
      return self._db.execute(f'SELECT COUNT(*) FROM candidates {where}', args).fetchone()[0]

  def best(self) -> Candidate | None:
    """The candidate with the best reward, of those trained to the end (not stopped)."""
    trained_through = ' AND (stopped_at IS NULL OR stopped_at = 0)' \
        if 'stopped_at' in self._columns else ''
    rows = self._select(f"WHERE status = 'ok' AND reward IS NOT NULL{trained_through} "
                        'ORDER BY reward DESC, id LIMIT 1', ())
    return rows[0] if rows else None

  def _select(self, clause: str, args: tuple) -> list[Candidate]:
    names = ['id'] + [c.name for c in results.COLUMNS if c.name in self._columns]
    with self._lock:
      try:
        rows = self._db.execute(f'SELECT {", ".join(names)} FROM candidates {clause}',
                                args).fetchall()
      except sqlite3.DatabaseError as e:
        raise StoreError(f'{self.path}: cannot read the candidates table ({e})') from None
    return [results.from_row(dict(zip(names, r))) for r in rows]

  # -- further evaluations ------------------------------------------------------------------

  def record_evaluation(self, evaluation: Evaluation) -> None:
    """Records a further evaluation; a second record of the same (block, replicate) is
    ignored."""
    r = evaluation.result
    with self._lock:
      self._db.execute(
          'INSERT OR IGNORE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)',
          (evaluation.canonical_key, evaluation.replicate, evaluation.iteration,
           evaluation.seed, int(evaluation.shared), r.status,
           r.reward if r.ok else None, results.encode_result(r), time.time()))

  def evaluations(self, before_iteration: int | None = None) -> list[Evaluation]:
    """The further evaluations (those asked for by iterations before ``before_iteration``,
    when given), in the order they were made."""
    clause, args = ('WHERE iteration < ?', (before_iteration,)) \
        if before_iteration is not None else ('', ())
    with self._lock:
      try:
        rows = self._db.execute(
            'SELECT canonical_key, replicate, iteration, seed, shared, result FROM evaluations '
            f'{clause} ORDER BY rowid', args).fetchall()
      except sqlite3.OperationalError:  # a read-only store from before the table existed
        return []
    return [Evaluation(k, r, i, seed, bool(shared), results.decode_result(text))
            for k, r, i, seed, shared, text in rows]

  def forget_evaluation(self, canonical_key: str, replicate: int) -> None:
    """Removes a further evaluation (a transient failure, to be trained again)."""
    with self._lock:
      self._db.execute('DELETE FROM evaluations WHERE canonical_key = ? AND replicate = ?',
                       (canonical_key, replicate))

  # -- a study's reported scores --------------------------------------------------------------

  def record_report(self, trial: int, step: int, value: float) -> None:
    """Records ``value`` at ``step`` of ``trial`` (a second report of the step replaces it)."""
    with self._lock:
      self._db.execute('INSERT OR REPLACE INTO reports VALUES (?, ?, ?)',
                       (int(trial), int(step), float(value) if np.isfinite(value) else None))

  def reports(self, trial: int) -> dict[int, float]:
    """The values reported for ``trial``, step -> value."""
    with self._lock:
      try:
        rows = self._db.execute('SELECT step, value FROM reports WHERE trial = ? ORDER BY step',
                                (int(trial),)).fetchall()
      except sqlite3.OperationalError:  # a read-only store from before the table existed
        return {}
    return {s: (float('nan') if v is None else v) for s, v in rows}

  def forget_reports(self, trial: int) -> None:
    """Removes ``trial``'s reports (it is handed out again and trains anew)."""
    with self._lock:
      self._db.execute('DELETE FROM reports WHERE trial = ?', (int(trial),))

  def trainings(self) -> int:
    """What the budget counts: candidates evaluated (not repeats) plus further evaluations."""
    with self._lock:
      try:
        further = self._db.execute('SELECT COUNT(*) FROM evaluations').fetchone()[0]
      except sqlite3.OperationalError:
        further = 0
    return self.count('WHERE cached = 0') + further

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
      try:
        row = self._db.execute(
            'SELECT next_iteration, arrays FROM agent_state WHERE id = 0').fetchone()
      except sqlite3.OperationalError:  # a read-only store without the table: no agent yet
        return None
    if row is None:
      return None
    return row[0], _npz_arrays(row[1])

  def compact(self) -> int:
    """Re-encodes the saved agent states compressed (stores written before they were) and
    gives the freed pages back to the file system; returns the bytes saved. Run it where no
    search writes (hold the workdir's lock); what the store holds is unchanged. A store
    that is already compact is left byte for byte as it was (a committed store stays clean).
    """
    before = self.path.stat().st_size
    with self._lock:
      repacked = 0
      with self._db:
        for table, key in (('sampled', 'iteration'), ('agent_state', 'id')):
          rows = self._db.execute(f'SELECT {key}, arrays FROM {table}').fetchall()
          for k, blob in rows:
            packed = _npz_bytes(_npz_arrays(blob))
            if len(packed) < len(blob):
              self._db.execute(f'UPDATE {table} SET arrays = ? WHERE {key} = ?', (packed, k))
              repacked += 1
      self._db.execute('PRAGMA wal_checkpoint(TRUNCATE)')
      free_pages = self._db.execute('PRAGMA freelist_count').fetchone()[0]
      if repacked or free_pages:
        self._db.execute('VACUUM')
        self._db.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    return before - self.path.stat().st_size


def _npz_bytes(arrays: dict[str, Any]) -> bytes:
  # Compressed: an agent's replay memory and tried set are sized to their capacity and mostly
  # empty (a fast agent's iteration at the cpu preset: 675 KB stored, 5 KB compressed).
  # np.load reads both, so stores written before compression still resume.
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
  return buffer.getvalue()


def _npz_arrays(blob: bytes) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(blob)) as arrays:
    return {k: arrays[k] for k in arrays.files}
