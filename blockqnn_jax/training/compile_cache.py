"""Compiled programs kept for reuse: in memory (``CompileCache``) and on disk (JAX's
persistent compilation cache, ``enable_persistent_compilation_cache``)."""

from __future__ import annotations

import collections
import concurrent.futures
from pathlib import Path
import threading
from typing import Any

import jax


class CompileCache:
  """Compiled programs keyed by (canonical block, network, training, shapes, devices).

  Equivalent blocks are built from their canonical form, so they lower to the same
  program and share an entry. Thread-safe; bounded (least recently used entries go). A
  program being compiled by one thread is waited for by another that asks for it, never
  compiled twice (``get_or_compile``).
  """

  def __init__(self, max_entries: int = 64):
    self._entries: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()
    self._max = max_entries
    self._compiling: dict[Any, concurrent.futures.Future] = {}
    self.hits = 0
    self.misses = 0

  def get_or_compile(self, key, compile_fn) -> tuple[Any, bool]:
    """``(value, cached)``: the entry, else ``compile_fn()``'s value, stored. ``cached`` is
    True when another call compiled it (before, or while this one waited)."""
    with self._lock:
      if key in self._entries:
        self._entries.move_to_end(key)
        self.hits += 1
        return self._entries[key], True
      future = self._compiling.get(key)
      owner = future is None
      if owner:
        future = self._compiling[key] = concurrent.futures.Future()
        self.misses += 1
      else:
        self.hits += 1
    if not owner:
      return future.result(), True  # raises what the compiling thread raised
    try:
      value = compile_fn()
    except BaseException as e:
      with self._lock:
        del self._compiling[key]
      future.set_exception(e)
      raise
    self.put(key, value)
    with self._lock:
      del self._compiling[key]
    future.set_result(value)
    return value, False

  def get(self, key):
    with self._lock:
      if key in self._entries:
        self._entries.move_to_end(key)
        self.hits += 1
        return self._entries[key]
      self.misses += 1
      return None

  def put(self, key, value):
    with self._lock:
      self._entries[key] = value
      self._entries.move_to_end(key)
      while len(self._entries) > self._max:
        self._entries.popitem(last=False)


def enable_persistent_compilation_cache(directory: str | None) -> None:
  """Keeps every compiled program in ``directory`` (JAX's persistent cache); None disables.

  A resumed search then reloads the programs of the candidates it had in flight instead
  of compiling them again. Call it at the program's edge (it is process-wide state).
  """
  from jax.experimental.compilation_cache import compilation_cache
  compilation_cache.reset_cache()  # so the setting holds even after earlier compiles
  jax.config.update('jax_compilation_cache_dir', None if directory is None else str(directory))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def search_directory(workdir: str | Path) -> Path:
  """Where a search keeps its compiled programs (so that those of the candidates in flight
  at a kill are reloaded, not recompiled, on resume): JAX's own cache when the user keeps
  one (``JAX_COMPILATION_CACHE_DIR``), which searches then share for the blocks they have
  in common; else ``WORKDIR/compile_cache``."""
  return Path(jax.config.jax_compilation_cache_dir or Path(workdir).resolve() / 'compile_cache')
