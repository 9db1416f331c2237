"""The executor interface the search drives, and the factory that picks one by name.

An executor evaluates candidates: ``submit(block, seed)`` returns a
``concurrent.futures.Future`` of a ``results.EvalResult`` that never raises (a failing
candidate is a failed result). ``local_executor.LocalExecutor`` runs them on this machine's
devices, ``ray_executor.RayExecutor`` on worker actors of a Ray cluster;
``make_executor`` builds the one ``settings.executor.kind`` names.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
from typing import Iterable

from blockqnn_jax import canonical
from blockqnn_jax import nsc
from blockqnn_jax.results import EvalResult
from blockqnn_jax.settings import SearchSettings


@dataclasses.dataclass
class Job:
  """One submitted candidate and the future its result goes to."""

  block: nsc.Block
  seed: int
  future: concurrent.futures.Future = dataclasses.field(
      default_factory=concurrent.futures.Future)
  attempts: int = 0

  def failed(self, reason: str, device: str = '') -> EvalResult:
    """A failed result for this job, for failures outside the candidate's own training."""
    block = self.block
    try:
      key = canonical.canonical_key(block)
    except Exception:  # the block itself may be what is broken
      key = ''
    text = block.to_text() if isinstance(block, nsc.Block) else str(block)
    return EvalResult.failed(text, reason, canonical_key=key, device=device)


class Executor(abc.ABC):
  """Evaluates candidates asynchronously; a context manager that closes itself."""

  @abc.abstractmethod
  def submit(self, block: nsc.Block, seed: int = 0) -> concurrent.futures.Future:
    """Queues ``block``; the future's result is its ``EvalResult``."""

  @abc.abstractmethod
  def utilisation(self) -> float:
    """Fraction of the workers' time spent evaluating candidates."""

  @abc.abstractmethod
  def close(self) -> None:
    """Stops the workers after the queued candidates are done."""

  def map(self, blocks: Iterable[nsc.Block], seeds: Iterable[int] | None = None
          ) -> list[EvalResult]:
    """Submits a batch and waits for all of it."""
    blocks = list(blocks)
    seeds = list(seeds) if seeds is not None else [0] * len(blocks)
    futures = [self.submit(b, s) for b, s in zip(blocks, seeds)]
    return [f.result() for f in futures]

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def make_executor(splits, settings: SearchSettings, *, compile_cache_dir: str | None = None
                  ) -> Executor:
  """The executor ``settings.executor.kind`` names: 'local' or 'ray'.

  Args:
    splits: in-memory ``data.ImageSplits`` or a ``streamed.OpenStream``.
    settings: the search's settings.
    compile_cache_dir: JAX's persistent compilation cache for Ray workers.
  """
  section = settings.executor
  if section.kind == 'local':
    import jax

    from blockqnn_jax import local_executor
    return local_executor.LocalExecutor(
        splits, settings, devices=jax.local_devices() * section.workers_per_device,
        devices_per_candidate=section.devices_per_candidate,
        compile_ahead=section.compile_ahead, grammar=settings.space)
  if section.kind == 'ray':
    import jax

    from blockqnn_jax import ray_executor
    ray = section.ray
    env = {}
    if jax.default_backend() == 'cpu' and ray.gpus_per_worker <= 0:
      # CPU workers: each sees its own fake devices, not the master's XLA_FLAGS.
      env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={ray.cpu_devices_per_worker}'
    return ray_executor.RayExecutor(
        splits, settings, address=ray.address, num_workers=ray.num_workers,
        cpus_per_worker=ray.cpus_per_worker,
        gpus_per_worker=None if ray.gpus_per_worker < 0 else ray.gpus_per_worker,
        max_attempts=ray.max_attempts, jobs_per_worker=ray.jobs_per_worker,
        grammar=settings.space, compile_cache_dir=compile_cache_dir, worker_env=env)
  raise ValueError(f'unknown executor.kind {section.kind!r}: use "local" or "ray"')
