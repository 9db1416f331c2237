"""Evaluates candidates on a Ray cluster: BlockQNN's master / compute-worker framework.

The process that runs the search is the master. Each worker is a Ray actor that owns one GPU
(or a CPU slot, or a group of devices) anywhere in the cluster; it holds its own compiled-
program cache and, for CIFAR-sized data, its own device-resident copy of the data (the
splits travel once through Ray's object store), and evaluates candidates with the same
``LocalExecutor`` the single-machine search uses, so it compiles its next candidate while it
trains the current one.

A dispatcher thread in the master keeps every live worker fed with up to
``jobs_per_worker`` candidates, so workers never wait for each other. When a worker dies
mid-candidate (process killed, node lost) its candidates go back to the front of the queue
and are retried on any live worker, up to ``max_attempts`` attempts in all; after that the
candidate comes back as a failed result naming the reason, and the search goes on. Dead
workers are replaced, and with ``num_workers=0`` the pool grows onto nodes that join later.
Nothing else is retried: a candidate that fails on its own (diverges, runs out of memory)
is a failed result from the worker, as in the local executor.

``submit(block, seed)`` returns a ``concurrent.futures.Future`` of an ``EvalResult``, the
interface ``search.run_search`` drives.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from typing import Any

from blockqnn_jax.data import splits as splits_lib
from blockqnn_jax.executors import interface as executor_lib
from blockqnn_jax.models.prepare import PreparedBlock
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.search import SearchSettings

try:
  import ray
except ImportError:  # the distributed extra is optional
  ray = None


def _require_ray():
  if ray is None:
    raise ImportError('the ray executor needs Ray: pip install -e ".[distributed]"')
  return ray


class _Worker:
  """A Ray actor's body: one LocalExecutor over the devices the actor was given."""

  def __init__(self, splits: splits_lib.ImageSplits, settings: dict, grammar: dict | None,
               compile_cache_dir: str | None):
    import jax

    from blockqnn_jax.executors import local as local_executor
    from blockqnn_jax.settings.search import SearchSettings
    from blockqnn_jax.training import compile_cache

    if compile_cache_dir:
      os.makedirs(compile_cache_dir, exist_ok=True)
      compile_cache.enable_persistent_compilation_cache(compile_cache_dir)
    settings = SearchSettings.from_config(settings)
    self.devices = jax.local_devices()
    self.executor = local_executor.LocalExecutor(
        splits, settings, devices=self.devices,
        devices_per_candidate=settings.executor.devices_per_candidate,
        compile_ahead=settings.executor.compile_ahead,
        grammar=nsc.Grammar(**grammar) if grammar is not None else None)

  def info(self) -> dict[str, Any]:
    import socket
    return {'pid': os.getpid(), 'host': socket.gethostname(),
            'node_id': ray.get_runtime_context().get_node_id(),
            'devices': [str(d) for d in self.devices]}

  def evaluate(self, block: nsc.Block, seed: int, lines: StopLines | None = None):
    return self.executor.submit(block, seed, lines).result()


@dataclasses.dataclass
class _Handle:
  """The master's view of one worker actor."""

  name: str
  actor: Any
  ready_ref: Any
  ready: bool = False
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  jobs: dict[Any, executor_lib.Job] = dataclasses.field(default_factory=dict)  # ObjectRef -> job
  ready_at: float = 0.0
  busy_s: float = 0.0


class RayExecutor(executor_lib.Executor):
  """Evaluates candidates on Ray worker actors (see the module docstring).

  Args:
    splits: the data, put once into Ray's object store; each worker places its own copy on
      its devices.
    settings: the search's settings (each worker scores with ``train``, ``reward``,
      ``network`` and ``executor``).
    address: the cluster to join (``ray.init(address=...)``, e.g. ``'auto'`` or
      ``'ray://host:10001'``); '' starts a local Ray instance. Ignored when Ray is already
      initialised in this process.
    num_workers: workers to keep alive; 0 = as many as the cluster's resources allow, grown
      as nodes join.
    cpus_per_worker, gpus_per_worker: Ray resources of one worker; ``gpus_per_worker=None``
      takes one GPU per worker when the cluster has GPUs, else none. A fraction (0.5) puts
      two workers on one GPU.
    max_attempts: attempts per candidate when workers die under it; then it fails.
    jobs_per_worker: candidates handed to a worker at once (2: it compiles one while it
      trains the other).
    grammar: when given, workers validate blocks against it.
    compile_cache_dir: JAX's persistent compilation cache for the workers (a path every
      node can write; on one machine, the workdir's).
    worker_env: environment variables of the worker processes (e.g. ``XLA_FLAGS``).
    init_kwargs: more arguments for ``ray.init`` (e.g. ``num_cpus`` for a local instance).
  """

  def __init__(self, splits: splits_lib.ImageSplits, settings: SearchSettings, *, address: str = '',
               num_workers: int = 0, cpus_per_worker: float = 1.0,
               gpus_per_worker: float | None = None, max_attempts: int = 3,
               jobs_per_worker: int = 2, grammar: nsc.Grammar | None = None,
               compile_cache_dir: str | None = None, worker_env: dict[str, str] | None = None,
               init_kwargs: dict[str, Any] | None = None):
    ray_ = _require_ray()
    # What ``prepare`` needs, so the master prepares each block once for all workers.
    self._prepare_args = (settings.network, tuple(splits.image_shape), splits.num_classes,
                          grammar)
    if max_attempts < 1 or jobs_per_worker < 1 or num_workers < 0:
      raise ValueError('max_attempts and jobs_per_worker must be >= 1, num_workers >= 0')
    self._started_ray = False
    if not ray_.is_initialized():
      ray_.init(address=address or None, **(init_kwargs or {}))
      self._started_ray = True
    resources = ray_.cluster_resources()
    if gpus_per_worker is None:
      gpus_per_worker = 1.0 if resources.get('GPU', 0) >= 1 else 0.0
    self.cpus_per_worker = float(cpus_per_worker)
    self.gpus_per_worker = float(gpus_per_worker)
    self.max_attempts = max_attempts
    self.jobs_per_worker = jobs_per_worker
    self.fixed_workers = num_workers
    self._actor_class = ray_.remote(_Worker).options(
        num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
        max_concurrency=jobs_per_worker, max_restarts=0,
        runtime_env={'env_vars': dict(worker_env)} if worker_env else None)
    self._actor_args = (ray_.put(splits), settings.to_dict(),
                        dataclasses.asdict(grammar) if grammar is not None else None,
                        compile_cache_dir)
    self._lock = threading.Condition()
    self._queue: collections.deque[executor_lib.Job] = collections.deque()
    self._workers: list[_Handle] = []
    self._spawned = 0
    self._start_failures: list[str] = []
    self._closing = False
    self._retired_busy_s = 0.0
    self._retired_alive_s = 0.0
    self.workers_lost = 0
    self.requeued = 0
    self._dispatcher = threading.Thread(target=self._dispatch, daemon=True, name='ray-master')
    self._dispatcher.start()

  # -- the executor interface ---------------------------------------------------------------

  @property
  def num_workers(self) -> int:
    """Workers started and ready now."""
    with self._lock:
      return sum(1 for w in self._workers if w.ready)

  def prepare(self, block: nsc.Block) -> PreparedBlock:
    """``block`` validated and worked out for this data: what ``submit`` takes in its place
    (the workers' trainers use it as it is)."""
    network, image_shape, num_classes, grammar = self._prepare_args
    return PreparedBlock.prepare(block, network, image_shape, num_classes,
                                 grammar or nsc.Grammar(max_index=max(2, len(block.layers))))

  def submit(self, block: nsc.Block | PreparedBlock, seed: int = 0,
             lines: StopLines | None = None) -> concurrent.futures.Future:
    job = executor_lib.Job(block, seed, lines)
    with self._lock:
      if self._closing:
        raise RuntimeError('the executor is closed')
      self._queue.append(job)
      self._lock.notify_all()
    return job.future

  def utilisation(self) -> float:
    """Fraction of the workers' lifetime (since each was ready) spent evaluating."""
    now = time.perf_counter()
    with self._lock:
      busy = self._retired_busy_s + sum(w.busy_s for w in self._workers if w.ready)
      alive = self._retired_alive_s + sum(now - w.ready_at for w in self._workers if w.ready)
    return busy / alive if alive else 0.0

  def workers(self) -> list[dict[str, Any]]:
    """The ready workers: their actor handle, pid, host, devices and candidates in hand."""
    with self._lock:
      return [{'actor': w.actor, 'name': w.name, 'in_flight': len(w.jobs), **w.info}
              for w in self._workers if w.ready]

  def close(self, wait: bool = True) -> None:
    """Stops the workers; with ``wait``, after the submitted candidates are done."""
    with self._lock:
      if wait:
        while self._queue or any(w.jobs for w in self._workers):
          self._lock.wait(0.1)
      self._closing = True
      self._lock.notify_all()
    self._dispatcher.join()
    for w in self._workers:
      ray.kill(w.actor)
    for job in self._drain():
      job.future.cancel()
    if self._started_ray:
      ray.shutdown()

  def __exit__(self, exc_type, *exc):
    self.close(wait=exc_type is None)

  # -- the dispatcher -------------------------------------------------------------------------

  def _target_workers(self) -> int:
    if self.fixed_workers:
      return self.fixed_workers
    total = ray.cluster_resources()
    fits = [total.get('CPU', 0) / self.cpus_per_worker if self.cpus_per_worker else None,
            total.get('GPU', 0) / self.gpus_per_worker if self.gpus_per_worker else None]
    return max(1, int(min(f for f in fits if f is not None))) if any(
        f is not None for f in fits) else 1

  def _spawn(self) -> None:
    name = f'worker-{self._spawned}'
    self._spawned += 1
    actor = self._actor_class.remote(*self._actor_args)
    self._workers.append(_Handle(name, actor, actor.info.remote()))

  def _drain(self) -> list[executor_lib.Job]:
    jobs = list(self._queue)
    self._queue.clear()
    for w in self._workers:
      jobs.extend(w.jobs.values())
      w.jobs.clear()
    return jobs

  def _dispatch(self) -> None:
    last_scan = 0.0
    while True:
      with self._lock:
        if self._closing:
          return
        if time.perf_counter() - last_scan > 2.0 or not self._workers:
          last_scan = time.perf_counter()
          while (len(self._workers) < self._target_workers() and
                 len(self._start_failures) < self.max_attempts):
            self._spawn()
        self._fail_queue_if_no_worker_can_start()
        for w in self._workers:
          while w.ready and self._queue and len(w.jobs) < self.jobs_per_worker:
            job = self._queue.popleft()
            job.attempts += 1
            w.jobs[w.actor.evaluate.remote(job.block, job.seed, job.lines)] = job
        refs = [w.ready_ref for w in self._workers if not w.ready]
        refs += [ref for w in self._workers for ref in w.jobs]
      if not refs:
        with self._lock:
          self._lock.wait(0.5)
        continue
      done, _ = ray.wait(refs, num_returns=1, timeout=0.5)
      if done:
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)  # everything finished
      for ref in done:
        self._handle(ref)

  def _handle(self, ref) -> None:
    with self._lock:
      worker = next((w for w in self._workers if ref == w.ready_ref or ref in w.jobs), None)
      if worker is None:
        return
      if ref == worker.ready_ref and not worker.ready:
        try:
          worker.info = ray.get(ref)
        except Exception as e:  # the worker could not start (import, data placement, ...)
          reason = f'{worker.name} failed to start: {_describe(e)}'
          logging.warning('%s', reason)
          self._start_failures.append(reason)
          self._workers.remove(worker)
          return
        worker.ready, worker.ready_at = True, time.perf_counter()
        self._start_failures.clear()
        logging.info('%s ready: %s', worker.name, worker.info)
        return
      job = worker.jobs.pop(ref)
      try:
        result = ray.get(ref)
      except ray.exceptions.RayActorError as e:  # the worker died: requeue its candidates
        self._lose(worker, job, _describe(e))
        return
      except Exception as e:  # the call itself broke (not the candidate): not retried
        result = job.failed(f'error: worker call failed: {_describe(e)}')
      worker.busy_s += result.total_s
      job.future.set_result(result)
      self._lock.notify_all()

  def _lose(self, worker: _Handle, job: executor_lib.Job, reason: str) -> None:
    """Retires a dead worker; its candidates go back to the queue or fail for good."""
    self.workers_lost += 1
    self._retired_busy_s += worker.busy_s
    self._retired_alive_s += time.perf_counter() - worker.ready_at if worker.ready else 0.0
    self._workers.remove(worker)
    host = worker.info.get('host', '?')
    reason = f'worker lost ({worker.name} on {host}): {reason.splitlines()[0][:200]}'
    logging.warning('%s', reason)
    for lost in [job, *worker.jobs.values()]:
      if lost.attempts >= self.max_attempts:
        lost.future.set_result(lost.failed(
            f'{reason}; gave up after {lost.attempts} attempt(s)'))
      else:
        self.requeued += 1
        self._queue.appendleft(lost)
    worker.jobs.clear()
    self._lock.notify_all()

  def _fail_queue_if_no_worker_can_start(self) -> None:
    if self._workers or len(self._start_failures) < self.max_attempts:
      return
    reason = f'no worker could start: {self._start_failures[-1]}'
    while self._queue:
      job = self._queue.popleft()
      job.future.set_result(job.failed(reason))
    self._lock.notify_all()


def _describe(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'
