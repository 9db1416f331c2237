"""One run's shared state: the data on the device, trainers, evaluations, the report."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
import platform
import threading
import time
from typing import Any

import jax
import numpy as np

from benchmarks.device_check.plan import (
  PAPER_TRAIN,
  PAPER_VAL,
  REPORT_KEYS,
  SECTION_KEYS,
  Plan,
  TimeBox,
  since_start,
)
from benchmarks.device_check.tables import format_table
from blockqnn_jax.data import splits as splits_lib
from blockqnn_jax.executors import local as local_executor
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.storage.results import EvalResult
from blockqnn_jax.training import candidate as candidate_lib
from blockqnn_jax.training import devices, engine


def _finite(x: Any) -> Any:
  """The report as strict JSON: NaN and infinities become null, numpy scalars Python ones."""
  if isinstance(x, dict):
    return {str(k): _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def device_memory(device) -> dict[str, int] | str:
  """The allocator's counters of ``device``, or 'unavailable' (the CPU backend has none)."""
  try:
    stats = device.memory_stats()
  except Exception:  # some backends raise instead of returning None
    stats = None
  if not stats:
    return 'unavailable'
  keys = ('bytes_in_use', 'peak_bytes_in_use', 'bytes_limit', 'largest_alloc_size')
  return {k: int(stats[k]) for k in keys if k in stats}


def _program_memory(programs) -> dict[str, Any]:
  """What XLA planned for a candidate's training program (a step, or a scanned epoch)."""
  analysis = programs.fit.memory_analysis()
  if analysis is None:
    return {'available': False}
  fields = dict(argument_bytes=analysis.argument_size_in_bytes,
                output_bytes=analysis.output_size_in_bytes,
                alias_bytes=analysis.alias_size_in_bytes,
                temp_bytes=analysis.temp_size_in_bytes)
  fields['total_bytes'] = (fields['argument_bytes'] + fields['output_bytes']
                           - fields['alias_bytes'] + fields['temp_bytes'])
  fields['program'] = 'step' if programs.loop == 'steps' else 'epoch'
  return fields


class Check:
  """One run: the data on the device, what sections share, and the report."""

  def __init__(self, plan: Plan, splits: splits_lib.ImageSplits, data_info: dict[str, Any],
               out: Path | None):
    self.plan = plan
    self.splits = splits
    self.out = out
    self.device = jax.local_devices()[0]
    self.platform = self.device.platform
    self.group = devices.DeviceGroup.place(splits, [self.device])
    self.grammar = nsc.Grammar(max_index=23)
    self.auto_dtype = np.dtype(engine.resolve_dtype('auto', self.platform)).name
    self.auto_loop = engine.resolve_loop('auto', self.platform)
    self.loop = self.auto_loop  # the loop later sections train with, once loops has spoken
    self.evaluations: dict[tuple[str, str, str], dict[str, Any]] = {}
    self.executor_runs: dict[tuple, dict[str, Any]] = {}
    self.cold_candidate_s: list[float] = []  # total time of every cold candidate so far
    self.lock = threading.Lock()
    self.current = ''
    n_train, n_val = len(splits.train_labels), len(splits.val_labels)
    steps = engine.steps_per_epoch(plan.batch_size, n_train)
    self.scale = dict(train=(PAPER_TRAIN // plan.batch_size) / steps,
                      val=PAPER_VAL / max(n_val, 1))
    self.report: dict[str, Any] = {
        'complete': False,
        'device': dict(kind=self.device.device_kind, platform=self.platform,
                       local_devices=jax.local_device_count(), host_cores=os.cpu_count()),
        'jax_version': jax.__version__,
        'versions': dict(jax=jax.__version__, jaxlib=_version('jaxlib'),
                         flax=_version('flax'), optax=_version('optax'),
                         python=platform.python_version()),
        'settings': dict(
            size=plan.size, data=data_info, n_train=n_train, n_val=n_val,
            image_shape=list(splits.image_shape), num_classes=splits.num_classes,
            epochs=plan.epochs, batch_size=plan.batch_size, steps_per_epoch=steps,
            features=plan.features, num_blocks=plan.num_blocks,
            scan_blocks=plan.scan_blocks, validation_size=plan.validation_size,
            max_train=plan.max_train, loop_blocks=list(plan.loop_blocks),
            pool=list(plan.pool), share_count=plan.share_count, early_stop=dict(
                zip(('epochs', 'rungs', 'promote'), plan.early_stop)),
            executor_count=plan.executor_count, workers=list(plan.workers),
            budgets_s=dict(plan.budgets), deadline_s=plan.deadline_s,
            hard_deadline_s=plan.hard_deadline_s, cache_everywhere=plan.cache_everywhere,
            auto_compute_dtype=self.auto_dtype, auto_loop=self.auto_loop,
            scale_to_paper=dict(self.scale, paper_train=PAPER_TRAIN, paper_val=PAPER_VAL),
            env={k: os.environ[k] for k in ('XLA_FLAGS', 'XLA_PYTHON_CLIENT_PREALLOCATE',
                                            'XLA_PYTHON_CLIENT_MEM_FRACTION',
                                            'JAX_PLATFORMS') if k in os.environ}),
        'targets': {},
        'timings': {'startup_s': round(since_start(), 2)},
        # The data is on the device, nothing has trained: what later peaks are measured from.
        'memory_timeline': [dict(after='data placed', at_s=round(since_start(), 1),
                                 device=device_memory(self.device))],
    }
    for key in REPORT_KEYS:
      self.report[key] = {'status': 'not run'}

  # -- shared units of work --------------------------------------------------------------

  def settings(self, loop: str, dtype: str, epochs: int | None = None) -> SearchSettings:
    """The candidates' settings (``epochs``: another number of epochs than the plan's)."""
    p = self.plan
    return SearchSettings.from_config(dict(
        train=dict(epochs=epochs or p.epochs, batch_size=p.batch_size, loop=loop,
                   compute_dtype=dtype),
        network=dict(num_blocks=p.num_blocks, features=p.features,
                     num_classes=self.splits.num_classes,
                     image_size=self.splits.image_shape[0], scan_blocks=p.scan_blocks)))

  def trainer(self, loop: str, dtype: str,
              epochs: int | None = None) -> candidate_lib.CandidateTrainer:
    """A trainer with a compile cache of its own (nothing compiled yet)."""
    s = self.settings(loop, dtype, epochs)
    return candidate_lib.CandidateTrainer(self.group, s.train, s.reward, s.network,
                                          grammar=self.grammar)

  def estimate(self) -> float | None:
    """Seconds a cold candidate takes, on the evidence so far (None before any)."""
    if not self.cold_candidate_s:
      return None
    return float(np.mean(self.cold_candidate_s))

  def record(self, result: EvalResult, serial_cold: bool) -> dict[str, Any]:
    """A result as the report holds it, with its time projected to the 45k split.

    ``serial_cold``: it compiled everything and ran alone, so its time is evidence for
    planning (a candidate sharing the device, or read from a cache, is not).
    """
    if serial_cold and result.ok and not result.compile_cached:
      self.cold_candidate_s.append(result.total_s)
    other = max(result.total_s - result.compile_s - result.train_s - result.eval_s, 0.0)
    row = dict(block=result.block, ok=result.ok, failure_reason=result.failure_reason,
               params=result.params, compile_s=result.compile_s, train_s=result.train_s,
               eval_s=result.eval_s, other_s=other, total_s=result.total_s,
               images_per_s=result.images_per_s, val_accuracy=result.val_accuracy,
               compile_cached=result.compile_cached)
    row['projected_45k_s'] = (result.total_s + result.train_s * (self.scale['train'] - 1)
                              + result.eval_s * (self.scale['val'] - 1))
    return row

  def evaluate(self, block: str, loop: str, dtype: str) -> dict[str, Any]:
    """One cold candidate on a fresh trainer, remembered so later sections reuse it."""
    key = (block, loop, dtype)
    if key not in self.evaluations:
      trainer = self.trainer(loop, dtype)
      parsed = nsc.parse(block, self.grammar)
      row = self.record(trainer.evaluate(parsed, seed=0), serial_cold=True)
      row.update(loop=loop, dtype=dtype)
      if row['ok']:
        try:  # the programs are in the trainer's cache: fetching them compiles nothing
          row['program_memory'] = _program_memory(trainer.compile(parsed)[0])
        except Exception as e:  # a backend without the analysis loses only this figure
          row['program_memory'] = {'available': False, 'error': repr(e)}
      self.evaluations[key] = row
    return self.evaluations[key]

  def executor_run(self, workers: int, compile_ahead: bool, count: int) -> dict[str, Any]:
    """``count`` distinct pool blocks through a LocalExecutor whose ``workers`` worker
    threads share the one device; remembered so later sections reuse it."""
    blocks = [self.plan.pool[i % len(self.plan.pool)] for i in range(count)]
    key = (tuple(blocks), workers, compile_ahead)
    if key in self.executor_runs:
      return dict(self.executor_runs[key], reused=True)
    parsed = [nsc.parse(b, self.grammar) for b in blocks]
    settings = self.settings(self.loop, 'auto')
    with local_executor.LocalExecutor(self.splits, settings, devices=[self.device] * workers,
                                      compile_ahead=compile_ahead,
                                      grammar=self.grammar) as executor:
      start = time.perf_counter()
      results = executor.map(parsed, seeds=range(len(parsed)))
      elapsed = time.perf_counter() - start
      utilisation = executor.utilisation()
    rows = [self.record(r, serial_cold=False) for r in results]
    failed = [r['failure_reason'] for r in rows if not r['ok']]
    run = dict(workers=workers, compile_ahead=compile_ahead, loop=self.loop,
               candidates=len(rows), ok=len(rows) - len(failed), failures=failed,
               elapsed_s=elapsed, candidates_per_hour=len(rows) / elapsed * 3600,
               utilisation=utilisation,
               mean_compile_s=float(np.mean([r['compile_s'] for r in rows])),
               mean_train_s=float(np.mean([r['train_s'] for r in rows])),
               mean_total_s=float(np.mean([r['total_s'] for r in rows])),
               # Same blocks, same seeds, in order: a worker mixing up results shows here.
               results_match_blocks=[r['block'] for r in rows] == [b.to_text() for b in parsed],
               device_memory_after=device_memory(self.device), reused=False)
    self.executor_runs[key] = run
    return run

  def existing_run(self, workers: int, compile_ahead: bool) -> dict[str, Any] | None:
    for (_, w, ahead), run in self.executor_runs.items():
      if (w, ahead) == (workers, compile_ahead):
        return run
    return None

  def run_cost(self, workers: int, count: int) -> float:
    """Expected seconds of an executor run of ``count`` blocks over ``workers`` workers.

    No credit for compile-ahead (a box that only fits its payoff would overrun without
    it), and workers are credited as compiling at once only up to a quarter of the host's
    cores: one XLA compile keeps a few cores busy, and on a small host the training itself
    takes them all.
    """
    parallel = max(1, min(workers, (os.cpu_count() or 1) // 4))
    return count * (self.estimate() or 0.0) / parallel

  @staticmethod
  def least_count(workers: int) -> int:
    """Two blocks per worker at least: a worker takes a second queued candidate to compile
    ahead as soon as it takes one, so with fewer some workers would find the queue empty
    and the run would measure fewer workers than it names (a search queues 64 at once)."""
    return 2 * workers

  def fit_count(self, box: TimeBox, workers: int, wanted: int, runs: int = 1) -> int:
    """The most blocks, from ``least_count`` up to ``wanted``, that ``runs`` executor runs
    of ``workers`` workers can take in what is left of ``box``; 0 when the least does not
    fit."""
    least = self.least_count(workers)
    count = max(wanted, least)
    while count >= least and runs * self.run_cost(workers, count) >= box.left():
      count -= 1
    return count if count >= least else 0

  # -- the report --------------------------------------------------------------------------

  def write(self) -> None:
    """Writes the report as it stands (atomically: a killed run leaves a whole file)."""
    if self.out is None:
      return
    with self.lock:
      self.out.parent.mkdir(parents=True, exist_ok=True)
      tmp = self.out.with_name(self.out.name + '.tmp')
      tmp.write_text(json.dumps(_finite(self.report), indent=2, sort_keys=False))
      os.replace(tmp, self.out)

  def abort(self) -> None:
    """The watchdog's last act: the report so far, marked incomplete, then exit."""
    self.report['aborted'] = dict(section=self.current, at_s=round(since_start(), 1),
                                  reason='hard deadline reached')
    for key in SECTION_KEYS.get(self.current, ()):
      self.report[key] = {'status': 'aborted', 'reason': 'hard deadline reached mid-section'}
    # What the interrupted section had finished is not lost with it.
    self.report['finished_units'] = dict(
        evaluations=list(self.evaluations.values()),
        executor_runs=[dict(run, blocks=list(key[0])) for key, run in self.executor_runs.items()])
    self.report['timings']['total_s'] = round(since_start(), 2)
    self.write()
    try:
      print(format_table(self.report), flush=True)
    except Exception as e:  # the JSON is written; a table of a half-run is a nicety
      print(f'(no table: {e!r})')
    print(f'\nhard deadline at {since_start():.0f} s during {self.current!r}: report '
          f'written to {self.out}', flush=True)
    os._exit(0)  # pylint: disable=protected-access


def _version(module: str) -> str:
  try:
    return __import__(module).__version__
  except Exception:  # a version is a nicety, never a failure
    return 'unknown'
