"""Builds the executor a search's settings name: ``make_executor``.

Beside the interface (``executor``) and the backends (``local_executor``, ``ray_executor``),
so that no two of them import each other: the backends import the interface, this module
imports the backends (Ray only when asked for).
"""

from __future__ import annotations

import jax

from blockqnn_jax.executors import interface as executor_lib
from blockqnn_jax.executors import local as local_executor
from blockqnn_jax.settings.search import SearchSettings


def make_executor(splits, settings: SearchSettings, *, compile_cache_dir: str | None = None
                  ) -> executor_lib.Executor:
  """The executor ``settings.executor.kind`` names: 'local' or 'ray'.

  Args:
    splits: in-memory ``data.ImageSplits`` or a ``data.OpenStream``.
    settings: the search's settings.
    compile_cache_dir: JAX's persistent compilation cache for Ray workers.
  """
  section = settings.executor
  if section.kind == 'local':
    return local_executor.LocalExecutor(
        splits, settings, devices=jax.local_devices() * section.workers_per_device,
        devices_per_candidate=section.devices_per_candidate,
        compile_ahead=section.compile_ahead, grammar=settings.space)
  if section.kind == 'ray':
    # Ray is imported only when asked for. pylint: disable-next=import-outside-toplevel
    from blockqnn_jax.executors import ray_cluster as ray_executor
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
