"""Runs candidate evaluations concurrently over the local devices.

The local devices are cut into groups (``devices_per_candidate``, default 1: an 8-core TPU
trains 8 candidates at once); a group of several devices trains one candidate
data-parallel. Each group has a worker thread that takes the next candidate from a shared
queue, so a slow candidate never holds up the others, and keeps one candidate of look-ahead
whose programs compile on a host thread while the group's devices train the current one:
compilation, the first wall of a fast search, overlaps with training.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from typing import Sequence

import jax

from blockqnn_jax.data import splits as splits_lib
from blockqnn_jax.data import stream
from blockqnn_jax.executors import interface as executor_lib
from blockqnn_jax.models.prepare import PreparedBlock
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.storage import results
from blockqnn_jax.strategies.rungs import StopLines
from blockqnn_jax.training import candidate as candidate_lib
from blockqnn_jax.training import compile_cache, streamed
from blockqnn_jax.training import devices as devices_lib


class LocalExecutor(executor_lib.Executor):
  """Evaluates candidates on groups of local devices, one worker thread per group.

  Args:
    splits: the data: in-memory ``ImageSplits`` (every group gets its own device-resident
      copy) or a ``data.OpenStream`` (every group streams its own batches).
    settings: the search's settings (``train``, ``reward`` and ``network`` are read).
    devices: the devices to use (default: all local devices).
    devices_per_candidate: devices per group; must divide the number of devices.
    compile_ahead: compile a group's next candidate while it trains the current one.
    grammar: when given, blocks are validated against it.
  """

  def __init__(self, splits: splits_lib.ImageSplits | stream.OpenStream,
               settings: SearchSettings, devices: Sequence[jax.Device] | None = None,
               devices_per_candidate: int = 1, compile_ahead: bool = True,
               grammar: nsc.Grammar | None = None):
    devices = list(devices or jax.local_devices())
    if devices_per_candidate < 1 or len(devices) % devices_per_candidate:
      raise ValueError(f'devices_per_candidate={devices_per_candidate} must divide the '
                       f'{len(devices)} devices')
    self.cache = compile_cache.CompileCache()
    self.trainers = []
    scoring = (settings.train, settings.reward, settings.network)
    for i in range(0, len(devices), devices_per_candidate):
      group = devices[i:i + devices_per_candidate]
      if isinstance(splits, stream.OpenStream):  # too large for the device: streamed
        self.trainers.append(streamed.StreamingTrainer(
            splits, group, *scoring, cache=self.cache, grammar=grammar))
      else:
        self.trainers.append(candidate_lib.CandidateTrainer(
            devices_lib.DeviceGroup.place(splits, group), *scoring, cache=self.cache,
            grammar=grammar))
    self.compile_ahead = compile_ahead
    self._queue: queue.Queue[executor_lib.Job | None] = queue.Queue()
    self._idle = 0  # workers waiting for a job
    self._idle_lock = threading.Lock()
    self._compile_pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=len(self.trainers), thread_name_prefix='compile')
    self._busy_s = [0.0] * len(self.trainers)
    self._started = time.perf_counter()
    self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True,
                                      name=f'group-{i}') for i in range(len(self.trainers))]
    for t in self._threads:
      t.start()

  @property
  def num_workers(self) -> int:
    return len(self.trainers)

  def prepare(self, block: nsc.Block) -> PreparedBlock:
    """``block`` validated and worked out for this data (every group's is the same): what
    ``submit`` takes in its place, so a search prepares each block once."""
    return self.trainers[0].prepare(block)

  def submit(self, block: nsc.Block | PreparedBlock, seed: int = 0,
             lines: StopLines | None = None) -> concurrent.futures.Future:
    job = executor_lib.Job(block, seed, lines)
    self._queue.put(job)
    return job.future

  def utilisation(self) -> float:
    """Fraction of the executor's lifetime its workers spent evaluating candidates."""
    elapsed = (time.perf_counter() - self._started) * len(self.trainers)
    return sum(self._busy_s) / elapsed if elapsed else 0.0

  def _compile(self, trainer, job):
    """Prepares and compiles ``job``'s block ahead: ``(prepared, (programs, cached))``."""
    try:
      prepared = (job.block if isinstance(job.block, PreparedBlock)
                  else trainer.prepare(job.block))
      return prepared, trainer.compile(prepared)
    except Exception:  # evaluate() tries again and turns the error into a failed result
      return None

  def _work(self, index: int) -> None:
    trainer = self.trainers[index]
    pending = None  # (job, future of its compiled programs, or None)
    stopping = False
    while True:
      if pending is None:
        with self._idle_lock:
          self._idle += 1
        job = self._queue.get()
        with self._idle_lock:
          self._idle -= 1
        if job is None:
          return
        pending = (job, None)
      job, compiling = pending
      pending = None
      # Look ahead only at a job no idle worker is about to take: on a short queue (the end
      # of an iteration) every worker gets a candidate before any compiles a second one.
      if self.compile_ahead and not stopping and self._queue.qsize() > self._idle:
        try:
          nxt = self._queue.get_nowait()
        except queue.Empty:
          nxt = None
        else:
          if nxt is None:
            stopping = True
          else:
            pending = (nxt, self._compile_pool.submit(self._compile, trainer, nxt))
      start = time.perf_counter()
      try:
        ahead = compiling.result() if compiling is not None else None
        block, compiled = ahead if ahead is not None else (job.block, None)
        evaluation = trainer.evaluate(block, seed=job.seed, compiled=compiled,
                                      lines=job.lines)
      except Exception as e:  # never let the thread die and leave futures pending
        evaluation = job.failed(results.describe_failure(e), device=trainer.group.name)
      self._busy_s[index] += time.perf_counter() - start
      job.future.set_result(evaluation)
      if stopping and pending is None:
        return

  def close(self) -> None:
    """Stops the workers after the queued candidates are done."""
    for _ in self._threads:
      self._queue.put(None)
    for t in self._threads:
      t.join()
    self._compile_pool.shutdown()
