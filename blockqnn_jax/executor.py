"""Runs candidate evaluations concurrently over the local devices.

The local devices are cut into groups (``devices_per_candidate``, default 1: an 8-core TPU
trains 8 candidates at once); a group of several devices trains one candidate
data-parallel. Each group has a worker thread that takes the next candidate from a shared
queue, so a slow candidate never holds up the others, and keeps one candidate of look-ahead
whose programs compile on a host thread while the group's devices train the current one:
compilation, the first wall of a fast search, overlaps with training.

``submit`` returns a ``concurrent.futures.Future`` of an ``EvalResult``; results never raise
(a failing candidate is a failed result). ``map`` submits a batch and waits for all of it.
This is the interface the search loop drives; the Ray executor provides the same one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
import time
from typing import Iterable, Sequence

import jax

from blockqnn_jax import data as data_lib
from blockqnn_jax import nsc
from blockqnn_jax import results
from blockqnn_jax import streaming
from blockqnn_jax import train as train_lib


@dataclasses.dataclass
class _Job:
  block: nsc.Block
  seed: int
  future: concurrent.futures.Future


class LocalExecutor:
  """Evaluates candidates on groups of local devices, one worker thread per group.

  Args:
    splits: the data: in-memory ``ImageSplits`` (every group gets its own device-resident
      copy) or a ``streaming.OpenStream`` (every group streams its own batches).
    config: a config with ``train``, ``reward`` and ``network`` sections.
    devices: the devices to use (default: all local devices).
    devices_per_candidate: devices per group; must divide the number of devices.
    compile_ahead: compile a group's next candidate while it trains the current one.
    grammar: when given, blocks are validated against it.
  """

  def __init__(self, splits: data_lib.ImageSplits | streaming.OpenStream, config,
               devices: Sequence[jax.Device] | None = None, devices_per_candidate: int = 1,
               compile_ahead: bool = True, grammar: nsc.Grammar | None = None):
    devices = list(devices or jax.local_devices())
    if devices_per_candidate < 1 or len(devices) % devices_per_candidate:
      raise ValueError(f'devices_per_candidate={devices_per_candidate} must divide the '
                       f'{len(devices)} devices')
    self.cache = train_lib.CompileCache()
    self.trainers = []
    train_config = train_lib.TrainConfig(**config.train)
    reward_config = results.RewardConfig(**config.reward)
    for i in range(0, len(devices), devices_per_candidate):
      group = devices[i:i + devices_per_candidate]
      if isinstance(splits, streaming.OpenStream):  # too large for the device: streamed
        self.trainers.append(streaming.StreamingTrainer(
            splits, group, train_config, reward_config, config.network, cache=self.cache,
            grammar=grammar))
      else:
        self.trainers.append(train_lib.CandidateTrainer(
            train_lib.DeviceGroup.place(splits, group), train_config, reward_config,
            config.network, cache=self.cache, grammar=grammar))
    self.compile_ahead = compile_ahead
    self._queue: queue.Queue[_Job | None] = queue.Queue()
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

  def submit(self, block: nsc.Block, seed: int = 0) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put(_Job(block, seed, future))
    return future

  def map(self, blocks: Iterable[nsc.Block], seeds: Iterable[int] | None = None
          ) -> list[results.EvalResult]:
    blocks = list(blocks)
    seeds = list(seeds) if seeds is not None else [0] * len(blocks)
    futures = [self.submit(b, s) for b, s in zip(blocks, seeds)]
    return [f.result() for f in futures]

  def utilisation(self) -> float:
    """Fraction of the executor's lifetime its workers spent evaluating candidates."""
    elapsed = (time.perf_counter() - self._started) * len(self.trainers)
    return sum(self._busy_s) / elapsed if elapsed else 0.0

  def _compile(self, trainer, job):
    try:
      return trainer.compile(job.block)
    except Exception:  # evaluate() compiles again and turns the error into a failed result
      return None

  def _work(self, index: int) -> None:
    trainer = self.trainers[index]
    pending = None  # (job, future of its compiled programs, or None)
    stopping = False
    while True:
      if pending is None:
        job = self._queue.get()
        if job is None:
          return
        pending = (job, None)
      job, compiling = pending
      pending = None
      if self.compile_ahead and not stopping:
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
        compiled = compiling.result() if compiling is not None else None
        evaluation = trainer.evaluate(job.block, seed=job.seed, compiled=compiled)
      except Exception as e:  # never let the thread die and leave futures pending
        evaluation = results.EvalResult(
            block=job.block.to_text() if isinstance(job.block, nsc.Block) else str(job.block),
            canonical_key='', status='failed',
            failure_reason=results.describe_failure(e), device=trainer.group.name)
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

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def make_executor(splits: data_lib.ImageSplits | streaming.OpenStream, config, *,
                  compile_cache_dir: str | None = None):
  """The executor ``config.executor.kind`` names: 'local' (default) or 'ray'.

  Both give ``submit(block, seed) -> Future[EvalResult]``, ``map``, ``utilisation`` and
  ``close``, and work as context managers.
  """
  section = config.executor
  kind = section.get('kind', 'local')
  grammar = nsc.Grammar(**config.space)
  if kind == 'local':
    return LocalExecutor(splits, config, devices=jax.local_devices(),
                         devices_per_candidate=section.get('devices_per_candidate', 1),
                         compile_ahead=section.get('compile_ahead', True), grammar=grammar)
  if kind == 'ray':
    from blockqnn_jax import ray_executor
    options = dict(section.get('ray', {}))
    gpus = options.pop('gpus_per_worker', -1)
    env = dict(options.pop('worker_env', {}) or {})
    cpu_devices = options.pop('cpu_devices_per_worker', 1)
    if jax.default_backend() == 'cpu' and gpus <= 0:
      # CPU workers: each sees its own fake devices, not the master's XLA_FLAGS.
      env.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count={cpu_devices}')
    return ray_executor.RayExecutor(
        splits, config, gpus_per_worker=None if gpus < 0 else gpus, grammar=grammar,
        compile_cache_dir=compile_cache_dir, worker_env=env, **options)
  raise ValueError(f'unknown executor.kind {kind!r}: use "local" or "ray"')
