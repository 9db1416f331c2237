r"""One prepared device check: what only a GPU shows, measured in one run of at most 8 minutes.

A GPU is lent for 15 minutes in all, machine start included, so everything worth knowing is
measured by one command, ready before the machine is:

  # on the GPU machine, in the repository root ($OUT is where files come back):
  python -m benchmarks.device_check --out=$OUT/device_check.json
  # here, at toy size on the CPU (< 5 minutes; digits when the npz is absent):
  python -m benchmarks.device_check --tiny --out=/tmp/dc.json
  # the test suite's form (tests/test_device_check.py): every section once, under a minute:
  python -m benchmarks.device_check --smallest --data=digits --out=/tmp/dc.json

The data is the lossless CIFAR-10 subset (5,085 train images), carried as a git-ignored file:
``mkdir -p data && cp ../shared/data/cifar10-exact-subset.npz data/``, then the device tool's
``carry`` of ``data``. ``--data=npz:PATH`` (default ``npz:data/cifar10-exact-subset.npz``;
``../shared/data/`` is tried too when the default is absent) or ``--data=digits``.

Settings: the candidates of ``configs/cifar.py:gpu`` (read from it): the search network
(N = 2 blocks per stage, F = 32), the paper's candidate training (12 epochs of Adam, batch
256), so ``candidates_per_hour`` is that preset's; 10% of the subset held out for the reward
(4,577 train / 508 validation images). ``benchmarks.evaluate``'s shape flags
(``--epochs --batch_size --features --num_blocks --validation_size --max_train
--scan_blocks``) override them when given; every value used is written to the JSON.

Sections (printed as a table, and every key written to the JSON with the device kind, the
jax version, each section's time and budget, and the exact settings):

* ``loops``: training images/s of ``train.loop='scan'`` (all epochs one XLA program)
  against ``'steps'`` (one compiled step per batch) for a few blocks, and which one
  ``train.loop='auto'`` should pick on this platform (``recommendation``): the loop that
  trains more images/s, because training is the device's own time and grows tenfold at the
  paper's split while compilation can overlap it (compile-ahead, several workers, 16 cores).
  The loop that minimises the serial candidate time at 45k is recorded beside it.
* ``dtypes``: bfloat16 against float32 with the recommended loop: images/s and validation
  accuracy (one seed on about 500 images: differences under 2-3 points are noise).
* ``candidates_per_hour`` and ``compile_share``: distinct blocks one after the other, cold
  (no program compiled before; JAX's persistent compilation cache on, in a fresh
  directory, as a fresh search with it would run) and then warm (a fresh trainer whose
  programs come from that cache, as a resumed search's do). ``compile_share`` is compile
  time over candidate time, ``outside_train_share`` is everything that is not training
  steps (compile, validation, set-up) over candidate time.
* ``compile_ahead``: the executor with one worker, compile-ahead on against off, in
  candidates/hour and their ratio, with the host's cores recorded.
* ``memory``: peak device memory (``device.memory_stats()`` where the backend has it, else
  'unavailable'; the compiled programs' own ``memory_analysis`` per block always), and
  candidates/hour with 1, 2 and 4 workers sharing the one GPU: a ``LocalExecutor`` given the
  same device several times places one copy of the data per worker and runs one worker
  thread per copy, so several candidates compile (on host threads) and train (on the one
  device) at once. Candidates are never lost or mixed up by this: each result is checked.

How the figures scale to the paper's 45k / 5k split: compile time does not depend on the
number of images (the data's shapes are part of the program, its size is not part of the
work) and neither do training images/s (the scanned body is the same step; only its trip
count changes), so training time scales by the number of steps,
``(45000 // batch) / (n_train // batch)`` (10.3x here), validation time by
``5000 / n_val``, and the rest stays. Every candidate time is given as measured on the
subset and ``projected_45k`` that way; ``device_bound_45k`` is the rate if compilation and
set-up were hidden completely behind training (the most one GPU can give). Rates with
several workers or compile-ahead are measured on the subset only (their overlap does not
project linearly). The validation accuracies are not comparable to 45k-trained ones.

Project targets (recorded under ``targets`` with whether they are met): at least 300
candidates per GPU-hour at the 12-epoch fidelity on the 45k split, and at most 25% of a
candidate's time outside training steps.

Time budget on one GPU (an H200 with 16 host cores): the sections run in order of what
matters most, each in its own time box (seconds: loops 80, candidates_per_hour and
compile_share 80, memory 130, compile_ahead 65, dtypes 45: 400 s), after about 20 s of
start-up (imports, the backend, the data to the device). Inside a section a unit of work
(a candidate, an executor run) starts only if it fits in what is left, reckoned from the
mean time of a cold candidate so far: an executor run of n blocks over w workers counts
n candidates over min(w, cores / 4), with no credit for compile-ahead; executor runs
shrink to two blocks per worker, then the middle worker count goes, before the box is
overrun. Nothing new starts past 445 s, so the run ends by about 445 s plus one unit; a
watchdog writes the JSON and exits at 465 s whatever is running, so the whole run stays
under 8 minutes. A skipped unit or section says why; a section that raises records its
error and the next one runs. Expected use of the boxes: a cold candidate costs 10-25 s on
a GPU (compilation dominates; 12 epochs of the subset train in a few seconds), so loops
runs 4 candidates (2 blocks x 2 loops), compile_share 3 cold and 3 warm, memory executor
runs of 4, 8 and 4 blocks with 1, 4 and 2 workers (two blocks per worker at least: a
worker takes a second one to compile ahead), compile_ahead one run of 4 without
compile-ahead (its run with it is memory's 1-worker run), dtypes 2 float32 candidates (the
bfloat16 ones are loops'): about 360 s at 15 s a candidate. The first compiles also pay
XLA's GPU autotuning, which later sections (like a long search) reuse. ``--time_limit_s``
scales every box and deadline, for a rerun with less device time left.
The JSON is rewritten after every section, so even a killed run leaves what it measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
import platform
import shutil
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Sequence

# The clock of the whole run starts before the heavy imports: they count against 8 minutes.
_STARTED = time.perf_counter()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax
import numpy as np

from benchmarks import evaluate as evaluate_bench  # noqa: F401 (its flags: --data, ...)
from benchmarks.fixtures import BLOCKS, data_source
from blockqnn_jax import data as data_lib
from blockqnn_jax import local_executor
from blockqnn_jax import nsc
from blockqnn_jax.results import EvalResult
from blockqnn_jax.settings import SearchSettings
from blockqnn_jax.training import candidate as candidate_lib
from blockqnn_jax.training import engine
from configs import cifar

DEFAULT_DATA = 'npz:data/cifar10-exact-subset.npz'
# Also tried when the default is absent: the shared data beside the repository.
FALLBACK_NPZ = ('../shared/data/cifar10-exact-subset.npz',
                'shared/data/cifar10-exact-subset.npz')
PAPER_TRAIN, PAPER_VAL = 45_000, 5_000
TARGET_CANDIDATES_PER_HOUR = 300
TARGET_OUTSIDE_TRAIN_SHARE = 0.25
SECTION_KEYS = {  # section -> the report keys it fills
    'loops': ('loops',),
    'compile_share': ('candidates_per_hour', 'compile_share'),
    'memory': ('memory',),
    'compile_ahead': ('compile_ahead',),
    'dtypes': ('dtypes',),
}
REPORT_KEYS = ('loops', 'dtypes', 'candidates_per_hour', 'compile_share', 'compile_ahead',
               'memory')


def _residual(a: int, b: int) -> str:
  return f'1,4,0,0,0 2,1,{a},1,0 3,1,{b},2,0 4,5,0,1,3 5,7,0,0,0'


# Distinct blocks of one size (the paper's residual block with other kernel pairs): every
# one is a new program, as every candidate of a search is, and of comparable cost, so the
# executor runs compare like with like.
POOL = tuple(_residual(a, b) for a, b in
             ((3, 3), (3, 5), (5, 3), (1, 3), (3, 1), (5, 5), (1, 5), (5, 1)))


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one run measures and how long each section may take.

  Attributes:
    size: 'full' (the GPU run), 'tiny' (CPU, < 5 minutes) or 'smallest' (the test).
    epochs, batch_size, features, num_blocks, scan_blocks: the candidates' training and
      network (``TrainConfig`` / ``NetworkSettings``).
    validation_size: held out for the reward (a count >= 1 or a fraction).
    max_train: cap on the training images read (None: all).
    loop_blocks: the blocks of the loops and dtypes sections (NSC text).
    pool: distinct blocks the compile_share and executor sections draw from.
    share_count: candidates of each compile_share pass.
    executor_count: candidates of an executor run (at least two per worker; fewer when
      the time box is short).
    workers: worker counts sharing the one device.
    budgets: seconds per section (the sections run in ``SECTIONS`` order).
    deadline_s: no unit of work starts later than this (seconds from process start).
    hard_deadline_s: a watchdog writes the report and exits then (only from ``main``).
    cache_everywhere: JAX's persistent compilation cache on for the whole run, so repeated
      programs load instead of compiling (the test's smallest form: it checks the code,
      not the figures).
  """

  size: str
  epochs: int
  batch_size: int
  features: int
  num_blocks: int
  validation_size: float
  max_train: int | None
  loop_blocks: tuple[str, ...]
  pool: tuple[str, ...]
  share_count: int
  executor_count: int
  workers: tuple[int, ...]
  budgets: tuple[tuple[str, float], ...]
  deadline_s: float | None
  hard_deadline_s: float | None
  scan_blocks: bool = False
  cache_everywhere: bool = False


def plan_for(size: str, time_limit_s: float | None = None) -> Plan:
  """The plan of ``size``; ``time_limit_s`` stretches or shrinks its time boxes."""
  blocks = BLOCKS
  if size == 'full':  # the candidates of configs/cifar.py:gpu
    gpu = cifar.get_config('gpu')
    plan = Plan(size, epochs=gpu.train.epochs, batch_size=gpu.train.batch_size,
                features=gpu.network.features, num_blocks=gpu.network.num_blocks,
                validation_size=0.1, max_train=None, loop_blocks=(blocks[0], blocks[2]),
                pool=POOL, share_count=3, executor_count=4, workers=(1, 2, 4),
                budgets=(('loops', 80), ('compile_share', 80), ('memory', 130),
                         ('compile_ahead', 65), ('dtypes', 45)),
                deadline_s=445, hard_deadline_s=465)
    default_limit = 480
  elif size == 'tiny':
    plan = Plan(size, epochs=1, batch_size=32, features=8, num_blocks=1,
                validation_size=0.1, max_train=400, loop_blocks=(blocks[0], blocks[1]),
                pool=POOL[:2], share_count=2, executor_count=2, workers=(1, 2),
                budgets=(('loops', 70), ('compile_share', 50), ('memory', 80),
                         ('compile_ahead', 45), ('dtypes', 35)),
                deadline_s=255, hard_deadline_s=280)
    default_limit = 300
  elif size == 'smallest':
    plan = Plan(size, epochs=1, batch_size=16, features=4, num_blocks=1,
                validation_size=0.1, max_train=160, loop_blocks=(blocks[0],),
                pool=(blocks[0],), share_count=1, executor_count=2, workers=(1, 2),
                budgets=tuple((name, 600) for name in SECTION_KEYS),
                deadline_s=None, hard_deadline_s=None, cache_everywhere=True)
    default_limit = None
  else:
    raise ValueError(f"size must be 'full', 'tiny' or 'smallest', got {size!r}")
  if time_limit_s and default_limit:
    factor = time_limit_s / default_limit
    plan = dataclasses.replace(
        plan, budgets=tuple((n, b * factor) for n, b in plan.budgets),
        deadline_s=plan.deadline_s * factor, hard_deadline_s=plan.hard_deadline_s * factor)
  return plan


def _since_start() -> float:
  return time.perf_counter() - _STARTED


class TimeBox:
  """A section's time: its own budget, cut short by the run's deadline."""

  def __init__(self, seconds: float, deadline_s: float | None):
    self.budget_s = seconds
    end = _since_start() + seconds
    self.end = end if deadline_s is None else min(end, deadline_s)

  def left(self) -> float:
    return self.end - _since_start()

  def allows(self, estimate_s: float | None) -> bool:
    """Whether a unit expected to take ``estimate_s`` (None: unknown) fits."""
    return self.left() > (estimate_s or 0.0)


class Skipped(Exception):
  """A section did not fit its time box."""


def _spent(box: TimeBox, estimate_s: float | None) -> str:
  return (f'time box spent: {max(box.left(), 0):.0f} s left, a unit takes about '
          f'{estimate_s or 0:.0f} s')


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


def _device_memory(device) -> dict[str, int] | str:
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

  def __init__(self, plan: Plan, splits: data_lib.ImageSplits, data_info: dict[str, Any],
               out: Path | None):
    self.plan = plan
    self.splits = splits
    self.out = out
    self.device = jax.local_devices()[0]
    self.platform = self.device.platform
    self.group = candidate_lib.DeviceGroup.place(splits, [self.device])
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
            pool=list(plan.pool), share_count=plan.share_count,
            executor_count=plan.executor_count, workers=list(plan.workers),
            budgets_s=dict(plan.budgets), deadline_s=plan.deadline_s,
            hard_deadline_s=plan.hard_deadline_s, cache_everywhere=plan.cache_everywhere,
            auto_compute_dtype=self.auto_dtype, auto_loop=self.auto_loop,
            scale_to_paper=dict(self.scale, paper_train=PAPER_TRAIN, paper_val=PAPER_VAL),
            env={k: os.environ[k] for k in ('XLA_FLAGS', 'XLA_PYTHON_CLIENT_PREALLOCATE',
                                            'XLA_PYTHON_CLIENT_MEM_FRACTION',
                                            'JAX_PLATFORMS') if k in os.environ}),
        'targets': {},
        'timings': {'startup_s': round(_since_start(), 2)},
        # The data is on the device, nothing has trained: what later peaks are measured from.
        'memory_timeline': [dict(after='data placed', at_s=round(_since_start(), 1),
                                 device=_device_memory(self.device))],
    }
    for key in REPORT_KEYS:
      self.report[key] = {'status': 'not run'}

  # -- shared units of work --------------------------------------------------------------

  def settings(self, loop: str, dtype: str) -> SearchSettings:
    p = self.plan
    return SearchSettings.from_config(dict(
        train=dict(epochs=p.epochs, batch_size=p.batch_size, loop=loop, compute_dtype=dtype),
        network=dict(num_blocks=p.num_blocks, features=p.features,
                     num_classes=self.splits.num_classes,
                     image_size=self.splits.image_shape[0], scan_blocks=p.scan_blocks)))

  def trainer(self, loop: str, dtype: str) -> candidate_lib.CandidateTrainer:
    """A trainer with a compile cache of its own (nothing compiled yet)."""
    s = self.settings(loop, dtype)
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
               device_memory_after=_device_memory(self.device), reused=False)
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
    self.report['aborted'] = dict(section=self.current, at_s=round(_since_start(), 1),
                                  reason='hard deadline reached')
    for key in SECTION_KEYS.get(self.current, ()):
      self.report[key] = {'status': 'aborted', 'reason': 'hard deadline reached mid-section'}
    # What the interrupted section had finished is not lost with it.
    self.report['finished_units'] = dict(
        evaluations=list(self.evaluations.values()),
        executor_runs=[dict(run, blocks=list(key[0])) for key, run in self.executor_runs.items()])
    self.report['timings']['total_s'] = round(_since_start(), 2)
    self.write()
    try:
      print(format_table(self.report), flush=True)
    except Exception as e:  # the JSON is written; a table of a half-run is a nicety
      print(f'(no table: {e!r})')
    print(f'\nhard deadline at {_since_start():.0f} s during {self.current!r}: report '
          f'written to {self.out}', flush=True)
    os._exit(0)  # pylint: disable=protected-access


def _version(module: str) -> str:
  try:
    return __import__(module).__version__
  except Exception:  # a version is a nicety, never a failure
    return 'unknown'


# -- the sections --------------------------------------------------------------------------


def _mean(rows: Sequence[dict[str, Any]], field: str) -> float:
  values = [r[field] for r in rows if r.get('ok')]
  return float(np.mean(values)) if values else float('nan')


def section_loops(check: Check, box: TimeBox) -> dict[str, Any]:
  """Scanned against per-step training for each loop block, in the 'auto' dtype."""
  rows, skipped = [], []
  for block in check.plan.loop_blocks:
    for loop in ('scan', 'steps'):
      if not box.allows(check.estimate()):
        skipped.append(dict(block=block, loop=loop, reason=_spent(box, check.estimate())))
        continue
      rows.append(check.evaluate(block, loop, check.auto_dtype))
  if not rows:
    raise Skipped(skipped[0]['reason'])
  per_loop = {}
  for loop in ('scan', 'steps'):
    mine = [r for r in rows if r['loop'] == loop]
    per_loop[loop] = dict(candidates=len(mine), ok=sum(r['ok'] for r in mine),
                          images_per_s=_mean(mine, 'images_per_s'),
                          compile_s=_mean(mine, 'compile_s'), train_s=_mean(mine, 'train_s'),
                          projected_45k_s=_mean(mine, 'projected_45k_s'))
  # Compared only on blocks both loops trained, so a skipped block cannot tip the choice.
  both = [b for b in check.plan.loop_blocks
          if all(check.evaluations.get((b, l, check.auto_dtype), {}).get('ok')
                 for l in ('scan', 'steps'))]
  result = dict(status='ok' if both else 'partial', dtype=check.auto_dtype, rows=rows,
                skipped=skipped, per_loop=per_loop, compared_on=both,
                auto_resolves_to=check.auto_loop)
  if both:
    def total(loop, field):
      return sum(check.evaluations[(b, loop, check.auto_dtype)][field] for b in both)
    # Training time over the same images and blocks: a ratio of sums, so the larger blocks
    # (where the time goes) weigh more than a mean of per-block ratios would let them.
    result['train_s_ratio_steps_over_scan'] = total('steps', 'train_s') / total('scan', 'train_s')
    result['recommendation'] = min(('scan', 'steps'), key=lambda l: total(l, 'train_s'))
    result['recommendation_serial_45k'] = min(('scan', 'steps'),
                                              key=lambda l: total(l, 'projected_45k_s'))
    result['criterion'] = ('recommendation: less training time (more images/s) on the same '
                           'blocks; recommendation_serial_45k: less projected candidate time '
                           'one after the other at 45k, compile included')
    result['auto_agrees'] = result['recommendation'] == check.auto_loop
    check.loop = result['recommendation']
  if skipped:
    result['status'] = 'partial'
  return {'loops': result}


def section_dtypes(check: Check, box: TimeBox) -> dict[str, Any]:
  """bfloat16 against float32 with the loop later sections use (loops' pick)."""
  rows, skipped = [], []
  for block in check.plan.loop_blocks:
    for dtype in ('bfloat16', 'float32'):
      known = (block, check.loop, dtype) in check.evaluations
      if not known and not box.allows(check.estimate()):
        skipped.append(dict(block=block, dtype=dtype, reason=_spent(box, check.estimate())))
        continue
      rows.append(check.evaluate(block, check.loop, dtype))
  if not rows:
    raise Skipped(skipped[0]['reason'])
  per_dtype = {}
  for dtype in ('bfloat16', 'float32'):
    mine = [r for r in rows if r['dtype'] == dtype]
    per_dtype[dtype] = dict(candidates=len(mine), ok=sum(r['ok'] for r in mine),
                            images_per_s=_mean(mine, 'images_per_s'),
                            val_accuracy=_mean(mine, 'val_accuracy'),
                            compile_s=_mean(mine, 'compile_s'))
  both = [b for b in check.plan.loop_blocks
          if all(check.evaluations.get((b, check.loop, d), {}).get('ok')
                 for d in ('bfloat16', 'float32'))]
  result = dict(status='ok' if both and not skipped else 'partial', loop=check.loop,
                rows=rows, skipped=skipped, per_dtype=per_dtype, compared_on=both,
                auto_resolves_to=check.auto_dtype)
  if both:
    get = lambda b, d, f: check.evaluations[(b, check.loop, d)][f]
    result['speedup_bf16_over_fp32'] = (sum(get(b, 'float32', 'train_s') for b in both)
                                        / sum(get(b, 'bfloat16', 'train_s') for b in both))
    result['accuracy_bf16_minus_fp32'] = float(np.mean(
        [get(b, 'bfloat16', 'val_accuracy') - get(b, 'float32', 'val_accuracy')
         for b in both]))
  return {'dtypes': result}


def _pass_stats(check: Check, rows: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
  """Candidates/hour and time shares of one serial pass, measured and projected to 45k."""
  ok = [r for r in rows if r['ok']]
  if not ok:
    return dict(candidates=len(rows), ok=0)
  total = sum(r['total_s'] for r in ok)
  compile_s = sum(r['compile_s'] for r in ok)
  train = sum(r['train_s'] for r in ok)
  evals = sum(r['eval_s'] for r in ok)
  projected = sum(r['projected_45k_s'] for r in ok)
  train_45k = train * check.scale['train']
  device_45k = train_45k + evals * check.scale['val']
  return dict(
      candidates=len(rows), ok=len(ok), elapsed_s=elapsed,
      mean_compile_s=compile_s / len(ok), mean_train_s=train / len(ok),
      mean_eval_s=evals / len(ok), mean_total_s=total / len(ok),
      candidates_per_hour=len(rows) / elapsed * 3600,
      compile_share=compile_s / total, outside_train_share=1 - train / total,
      projected_45k=dict(candidate_s=projected / len(ok),
                         candidates_per_hour=3600 * len(ok) / projected,
                         compile_share=compile_s / projected,
                         outside_train_share=1 - train_45k / projected,
                         device_bound_candidates_per_hour=3600 * len(ok) / device_45k))


# What a candidate whose programs come from the persistent cache costs, as a fraction of a
# cold one, for planning only (tracing and lowering still run, then training): about 0.1 on
# a CPU, more on a GPU whose training is a larger part of a candidate.
WARM_FRACTION = 0.3


def section_compile_share(check: Check, box: TimeBox) -> dict[str, Any]:
  """Distinct blocks one after the other, cold then from JAX's persistent cache."""
  blocks = list(check.plan.pool[:check.plan.share_count])
  previous = jax.config.jax_compilation_cache_dir
  directory = tempfile.mkdtemp(prefix='device_check_cache_')
  passes, skipped = {}, []
  try:
    candidate_lib.enable_persistent_compilation_cache(directory)
    done = []
    for name in ('cold', 'warm'):
      trainer = check.trainer(check.loop, 'auto')  # a fresh in-memory cache each pass
      rows, start = [], time.perf_counter()
      for seed, block in enumerate(blocks if name == 'cold' else done):
        one = check.estimate() or 0.0
        # A cold candidate starts only if the warm passes of it and of those before it fit
        # too: without a warm pass the section measures nothing with the cache.
        estimate = (one * (1 + WARM_FRACTION * (len(done) + 1)) if name == 'cold'
                    else one * WARM_FRACTION)
        if not box.allows(estimate):
          skipped.append(dict(block=block, passed=name, reason=_spent(box, estimate)))
          continue
        rows.append(check.record(trainer.evaluate(nsc.parse(block, check.grammar), seed=seed),
                                 serial_cold=name == 'cold'))
        if name == 'cold':
          done.append(block)
      if name == 'cold' and not rows:
        raise Skipped(skipped[0]['reason'])
      passes[name] = dict(_pass_stats(check, rows, time.perf_counter() - start), rows=rows)
      passes[name]['files_in_cache'] = len(os.listdir(directory))
  finally:
    candidate_lib.enable_persistent_compilation_cache(previous)
    shutil.rmtree(directory, ignore_errors=True)
  cold, warm = passes.get('cold', {}), passes.get('warm', {})
  status = 'ok' if cold.get('ok') and warm.get('ok') and not skipped else 'partial'
  common = dict(loop=check.loop, dtype=check.auto_dtype, blocks=blocks, skipped=skipped)
  per_hour = dict(status=status, **common,
                  measured_subset=cold.get('candidates_per_hour'),
                  projected_45k=cold.get('projected_45k', {}).get('candidates_per_hour'),
                  device_bound_45k=cold.get('projected_45k', {}).get(
                      'device_bound_candidates_per_hour'),
                  with_persistent_cache_measured_subset=warm.get('candidates_per_hour'),
                  with_persistent_cache_projected_45k=warm.get('projected_45k', {}).get(
                      'candidates_per_hour'),
                  note='one candidate after the other on one device; cold = every program '
                       'compiled (a fresh search), warm = programs from the persistent '
                       'cache (a resumed search)')
  share = dict(status=status, **common,
               without_cache=dict(cold, note='cold: every program compiled (the '
                                  'cache was on, in a fresh directory, so this includes '
                                  'writing the entries, as a fresh search with it pays)'),
               with_cache=dict(warm, note='warm: every program read back from '
                               'the persistent cache by a fresh trainer'))
  return {'candidates_per_hour': per_hour, 'compile_share': share}


def section_compile_ahead(check: Check, box: TimeBox) -> dict[str, Any]:
  """The executor with one worker: compile-ahead on against off, on the same blocks."""
  ahead = check.existing_run(1, True)  # memory's baseline run, when it ran
  count = ahead['candidates'] if ahead else 0
  if not count or check.fit_count(box, 1, count) < count:
    count = check.fit_count(box, 1, check.plan.executor_count, runs=2)
    if not count:
      raise Skipped(_spent(box, 2 * 2 * (check.estimate() or 0)))
  runs = {'with_compile_ahead': check.executor_run(1, True, count),
          'without_compile_ahead': check.executor_run(1, False, count)}
  on, off = runs['with_compile_ahead'], runs['without_compile_ahead']
  # What one candidate of look-ahead gives in a long search, from the serial run's parts:
  # compile (c) on a host thread overlaps the rest (r), so a candidate takes max(c, r).
  c = off['mean_compile_s']
  r = off['mean_total_s'] - c
  return {'compile_ahead': dict(
      status='ok', host_cores=os.cpu_count(), loop=check.loop, **runs,
      candidates_per_hour_ratio=on['candidates_per_hour'] / off['candidates_per_hour'],
      steady_state_ratio_model=(c + r) / max(c, r, 1e-9),
      note=f'{count} blocks: the first two compile at once, which a long search does only '
           'once, so the measured ratio runs above the steady state (c + r) / max(c, r) '
           'when there are few blocks. One worker compiles at most one candidate ahead; '
           'several workers sharing the device (memory section) put more of the host '
           'cores to compiling')}


def _plan_worker_runs(check: Check, box: TimeBox) -> dict[int, int]:
  """Blocks per worker count, so that the runs together fit the box: first every run
  shrinks to two blocks per worker, then worker counts go, the middle ones first, so that
  one worker against the most workers is the last comparison standing."""
  counts = {w: max(check.plan.executor_count, check.least_count(w)) for w in check.plan.workers}
  total = lambda: sum(check.run_cost(w, n) for w, n in counts.items())
  for w in sorted(counts, key=lambda w: -counts[w] / w):  # the dearest per worker first
    if total() >= box.left():
      counts[w] = check.least_count(w)
  for w in sorted(counts, key=lambda w: (w == 1, w == max(counts), w)):
    if total() >= box.left() and len(counts) > 1:
      del counts[w]
  return counts


def section_memory(check: Check, box: TimeBox) -> dict[str, Any]:
  """Peak device memory of a candidate, and workers sharing the one device."""
  # Every candidate so far ran alone, so the allocator's high-water mark now is that of
  # one candidate at a time (plus the resident data and any autotuning scratch).
  single = _device_memory(check.device)
  start = check.report['memory_timeline'][0]['device']
  peak = above_data = 'unavailable'
  if isinstance(single, dict) and 'peak_bytes_in_use' in single:
    peak = single['peak_bytes_in_use']
    if isinstance(start, dict) and 'bytes_in_use' in start:
      above_data = peak - start['bytes_in_use']
  programs = {f'{b} [{l}, {d}]': r.get('program_memory')
              for (b, l, d), r in check.evaluations.items() if r.get('program_memory')}
  runs, skipped = {}, []
  counts = _plan_worker_runs(check, box)
  # One worker first (the baseline, and compile_ahead's run), then the most workers.
  for workers in sorted(check.plan.workers, key=lambda w: (w != 1, -w)):
    count = check.fit_count(box, workers, counts.get(workers, 0))
    if workers not in counts or not count:
      cost = check.run_cost(workers, check.least_count(workers))
      skipped.append(dict(workers=workers, reason=_spent(box, cost)))
      continue
    runs[str(workers)] = check.executor_run(workers, True, count)
  runs = dict(sorted(runs.items(), key=lambda kv: int(kv[0])))
  result = dict(status='ok' if runs and not skipped else 'partial',
                device_memory_single_candidate=single,
                peak_bytes_single_candidate=peak,
                peak_bytes_single_candidate_above_data=above_data,
                program_memory=programs, skipped=skipped, workers_sharing_device=runs,
                loop=check.loop,
                candidates_per_hour={w: r['candidates_per_hour'] for w, r in runs.items()})
  if '1' in runs:
    base = runs['1']['candidates_per_hour']
    result['speedup_over_1_worker'] = {w: r['candidates_per_hour'] / base
                                       for w, r in runs.items()}
  # None: not measured (no run fitted); False: a shared-device run lost or mixed results.
  result['sharing_works'] = None if not runs else all(
      r['ok'] == r['candidates'] and r['results_match_blocks'] for r in runs.values())
  return {'memory': result}


SECTIONS: tuple[tuple[str, Callable[[Check, TimeBox], dict[str, Any]]], ...] = (
    ('loops', section_loops), ('compile_share', section_compile_share),
    ('memory', section_memory), ('compile_ahead', section_compile_ahead),
    ('dtypes', section_dtypes))


def _targets(check: Check) -> dict[str, Any]:
  """The project targets against what was measured."""
  per_hour, share = check.report['candidates_per_hour'], check.report['compile_share']
  serial = per_hour.get('projected_45k')
  bound = per_hour.get('device_bound_45k')
  outside = share.get('without_cache', {}).get('projected_45k', {}).get('outside_train_share')
  return dict(
      min_candidates_per_gpu_hour=TARGET_CANDIDATES_PER_HOUR,
      max_outside_train_share=TARGET_OUTSIDE_TRAIN_SHARE,
      serial_projected_45k=serial, device_bound_45k=bound,
      outside_train_share_projected_45k=outside,
      met_serial=None if serial is None else serial >= TARGET_CANDIDATES_PER_HOUR,
      reachable_with_overlap=None if bound is None else bound >= TARGET_CANDIDATES_PER_HOUR,
      met_outside_train_share=None if outside is None else
      outside <= TARGET_OUTSIDE_TRAIN_SHARE,
      note='serial: one candidate after the other, compile included; with overlap: the '
           'device-bound rate, if compile and set-up were hidden behind training')


def run(plan: Plan, data: str, out: str | os.PathLike | None,
        sections: Sequence[str] | None = None, watchdog: bool = False) -> dict[str, Any]:
  """Runs the check and returns the report (also written to ``out`` after every section)."""
  out = Path(out) if out else None
  previous_cache = jax.config.jax_compilation_cache_dir
  scratch = tempfile.mkdtemp(prefix='device_check_all_') if plan.cache_everywhere else None
  try:
    if scratch:
      candidate_lib.enable_persistent_compilation_cache(scratch)
    splits, data_info = load_data(data, plan)
    check = Check(plan, splits, data_info, out)
    if watchdog and plan.hard_deadline_s is not None:
      timer = threading.Timer(max(plan.hard_deadline_s - _since_start(), 0), check.abort)
      timer.daemon = True
      timer.start()
    print(_header(check), flush=True)
    check.write()
    wanted = set(sections or SECTION_KEYS)
    for name, fn in ((n, f) for n, f in SECTIONS if n in wanted):
      _run_section(check, name, fn, dict(plan.budgets)[name])
    check.report['targets'] = _targets(check)
    check.report['timings']['total_s'] = round(_since_start(), 2)
    check.report['complete'] = True
    check.write()
    print(format_table(check.report), flush=True)
    return check.report
  finally:
    if scratch:
      candidate_lib.enable_persistent_compilation_cache(previous_cache)
      shutil.rmtree(scratch, ignore_errors=True)


def _run_section(check: Check, name: str, fn, budget: float) -> None:
  check.current = name
  start = _since_start()
  box = TimeBox(budget, check.plan.deadline_s)
  timing = dict(budget_s=budget, started_at_s=round(start, 2))
  try:
    if box.left() <= 0:
      raise Skipped(f'no time left before the run deadline ({check.plan.deadline_s} s)')
    produced = fn(check, box)
    check.report.update(produced)
    timing['status'] = produced[SECTION_KEYS[name][0]].get('status', 'ok')
  except Skipped as e:
    for key in SECTION_KEYS[name]:
      check.report[key] = {'status': 'skipped', 'reason': str(e)}
    timing['status'] = 'skipped'
  except Exception as e:  # a failing section is a finding; the next one still runs
    for key in SECTION_KEYS[name]:
      check.report[key] = {'status': 'error', 'error': f'{type(e).__name__}: {e}',
                           'traceback': traceback.format_exc(limit=8)[-3000:]}
    timing['status'] = 'error'
  timing['elapsed_s'] = round(_since_start() - start, 2)
  check.report['timings'][name] = timing
  check.report['memory_timeline'].append(dict(after=name, at_s=round(_since_start(), 1),
                                              device=_device_memory(check.device)))
  check.write()
  print(f'[{_since_start():6.1f} s] {name}: {timing["status"]} in {timing["elapsed_s"]:.1f} s '
        f'(budget {budget:.0f} s)', flush=True)


def load_data(spec: str, plan: Plan) -> tuple[data_lib.ImageSplits, dict[str, Any]]:
  """The splits ``spec`` names ('digits' or 'SOURCE:PATH'), and how they were found.

  A missing npz falls back to the shared data beside the repository; failing that, the
  toy sizes fall back to digits, the full size stops (its figures would mean nothing).
  """
  source, path = data_source(spec)
  info = dict(spec=spec, source=source, path=path)
  if source == 'npz' and not Path(path).exists():
    found = next((p for p in FALLBACK_NPZ if Path(p).exists()), None)
    if found and spec == DEFAULT_DATA:
      info.update(path=found, note=f'{path} absent; used {found}')
      path = found
    elif plan.size != 'full':
      info.update(source='digits', path=None, note=f'{path} absent; used digits')
      source, path = 'digits', ''
    else:
      raise FileNotFoundError(
          f'{path} not found. Carry the data: mkdir -p data && cp '
          f'../shared/data/cifar10-exact-subset.npz data/ (and the device tool\'s carry of '
          f'"data"), or pass --data=npz:PATH')
  splits = data_lib.load_splits(source, path=path or None, validation_size=plan.validation_size,
                                max_train=plan.max_train)
  info['name'] = splits.name
  return splits, info


# -- the table -------------------------------------------------------------------------------


def _f(x: Any, spec: str = '.1f') -> str:
  if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
    return format(x, spec)
  return '-' if x is None or isinstance(x, float) else str(x)


def _header(check: Check) -> str:
  s = check.report['settings']
  d = check.report['device']
  warning = ('' if d['platform'] != 'cpu' or check.plan.size != 'full' else
             'WARNING: no accelerator: these are CPU figures (is the CUDA jaxlib installed?)\n')
  return warning + (f'device check: {d["kind"]} ({d["platform"]}), jax {jax.__version__}, '
          f'{d["host_cores"]} host cores\ndata {s["data"]["name"]}: train {s["n_train"]}, '
          f'val {s["n_val"]}, image {tuple(s["image_shape"])}; {s["epochs"]} epochs, batch '
          f'{s["batch_size"]}, F={s["features"]}, N={s["num_blocks"]}; 45k scale: train '
          f'x{check.scale["train"]:.2f}, val x{check.scale["val"]:.2f}')


def _pct(x: Any) -> str:
  return _f(None if x is None else 100 * x)


def _mib(x: Any) -> str:
  return f'{x / 2**20:.1f} MiB' if isinstance(x, int) else str(x)


def _no_figures(value: dict[str, Any]) -> str | None:
  """Why a section has no figures to show (None when it has)."""
  if value.get('status') in ('skipped', 'error', 'aborted', 'not run'):
    return f'  {value.get("reason") or value.get("error") or value["status"]}'
  return None


def _table_loops(loops: dict[str, Any]) -> list[str]:
  lines = [f'  {"loop":<6} {"blocks":>6} {"img/s":>9} {"compile s":>9} {"train s":>8} '
           f'{"45k cand s":>10}']
  for loop, v in loops['per_loop'].items():
    lines.append(f'  {loop:<6} {v["ok"]:>6} {_f(v["images_per_s"], ".0f"):>9} '
                 f'{_f(v["compile_s"]):>9} {_f(v["train_s"], ".2f"):>8} '
                 f'{_f(v["projected_45k_s"]):>10}')
  lines.append(f'  recommendation for auto: {loops.get("recommendation", "-")} (serial at 45k: '
               f'{loops.get("recommendation_serial_45k", "-")}; auto resolves to '
               f'{loops["auto_resolves_to"]} now)')
  return lines


def _table_dtypes(dtypes: dict[str, Any]) -> list[str]:
  lines = [f'  {"dtype":<9} {"blocks":>6} {"img/s":>9} {"val acc":>8} {"compile s":>9}']
  for dtype, v in dtypes['per_dtype'].items():
    lines.append(f'  {dtype:<9} {v["ok"]:>6} {_f(v["images_per_s"], ".0f"):>9} '
                 f'{_f(v["val_accuracy"], ".3f"):>8} {_f(v["compile_s"]):>9}')
  lines.append(f'  bf16 speed-up {_f(dtypes.get("speedup_bf16_over_fp32"), ".2f")}x, '
               f'accuracy bf16 - fp32 {_f(dtypes.get("accuracy_bf16_minus_fp32"), "+.3f")}')
  return lines


def _table_share(report: dict[str, Any]) -> list[str]:
  per_hour, share = report['candidates_per_hour'], report['compile_share']
  lines = [f'  {"pass":<14} {"cands":>5} {"cand/h":>7} {"45k cand/h":>10} {"compile %":>9} '
           f'{"outside %":>9} {"45k compile %":>13} {"45k outside %":>13}']
  for name in ('without_cache', 'with_cache'):
    v = share[name]
    p = v.get('projected_45k', {})
    lines.append(f'  {name:<14} {v.get("ok", 0):>5} '
                 f'{_f(v.get("candidates_per_hour"), ".0f"):>7} '
                 f'{_f(p.get("candidates_per_hour"), ".0f"):>10} '
                 f'{_pct(v.get("compile_share")):>9} {_pct(v.get("outside_train_share")):>9} '
                 f'{_pct(p.get("compile_share")):>13} {_pct(p.get("outside_train_share")):>13}')
  lines.append(f'  device-bound at 45k: {_f(per_hour.get("device_bound_45k"), ".0f")} '
               'candidates/hour (compile and set-up hidden behind training)')
  return lines


def _table_ahead(ahead: dict[str, Any]) -> list[str]:
  lines = []
  for name in ('with_compile_ahead', 'without_compile_ahead'):
    if name in ahead:
      v = ahead[name]
      lines.append(f'  {name:<22} {v["ok"]}/{v["candidates"]} in {_f(v["elapsed_s"])} s: '
                   f'{_f(v["candidates_per_hour"], ".0f")} candidates/h')
  lines.append(f'  ratio {_f(ahead.get("candidates_per_hour_ratio"), ".2f")}x with '
               f'{ahead["host_cores"]} host cores (steady state, modelled from the serial '
               f'run: {_f(ahead.get("steady_state_ratio_model"), ".2f")}x)')
  return lines


def _table_memory(memory: dict[str, Any]) -> list[str]:
  lines = [f'  peak device memory, one candidate at a time: '
           f'{_mib(memory["peak_bytes_single_candidate"])} ('
           f'{_mib(memory["peak_bytes_single_candidate_above_data"])} above the resident data)']
  for name, v in memory['program_memory'].items():
    if v.get('total_bytes') is not None:
      lines.append(f'  planned by XLA for {name}: {_mib(v["total_bytes"])} ({v["program"]})')
  for w, v in memory['workers_sharing_device'].items():
    dev = v['device_memory_after']
    peak = _mib(dev.get('peak_bytes_in_use')) if isinstance(dev, dict) else dev
    lines.append(f'  {w} worker(s): {v["ok"]}/{v["candidates"]} in {_f(v["elapsed_s"])} s: '
                 f'{_f(v["candidates_per_hour"], ".0f")} candidates/h, utilisation '
                 f'{_f(v["utilisation"], ".2f")}, peak so far {peak}')
  verdict = {True: 'work', False: 'FAIL (see failures)', None: 'not measured'}
  lines.append(f'  workers sharing one device: {verdict[memory["sharing_works"]]}')
  return lines


def format_table(report: dict[str, Any]) -> str:
  """The report as a readable table (every figure is also in the JSON)."""
  lines = ['']
  parts = (('loops', 'loops', lambda: _table_loops(report['loops'])),
           ('dtypes', 'dtypes', lambda: _table_dtypes(report['dtypes'])),
           ('candidates_per_hour / compile_share', 'compile_share',
            lambda: _table_share(report)),
           ('compile_ahead', 'compile_ahead', lambda: _table_ahead(report['compile_ahead'])),
           ('memory', 'memory', lambda: _table_memory(report['memory'])))
  for title, key, body in parts:
    value = report[key]
    where = ', '.join(f'{k} {value[k]}' for k in ('loop', 'dtype') if k in value)
    lines.append(f'== {title} ({value.get("status")}{"; " + where if where else ""})')
    try:
      lines.extend([_no_figures(value)] if _no_figures(value) else body())
    except Exception as e:  # the JSON holds the figures; a table must never end the run
      lines.append(f'  (no table for this section: {type(e).__name__}: {e})')
  t = report.get('targets', {})
  if t:
    lines.append(f'== targets: >= {t["min_candidates_per_gpu_hour"]} candidates/GPU-hour at '
                 f'45k: serial {_f(t["serial_projected_45k"], ".0f")} (met: {t["met_serial"]}),'
                 f' device-bound {_f(t["device_bound_45k"], ".0f")} (reachable: '
                 f'{t["reachable_with_overlap"]}); outside train <= '
                 f'{100 * t["max_outside_train_share"]:.0f}%: '
                 f'{_pct(t["outside_train_share_projected_45k"])}% '
                 f'(met: {t["met_outside_train_share"]})')
  timings = report['timings']
  lines.append('== timings: ' + ', '.join(
      f'{k} {v["elapsed_s"]:.0f}/{v["budget_s"]:.0f} s {v["status"]}' if isinstance(v, dict)
      else f'{k} {v:.0f} s' for k, v in timings.items()))
  return '\n'.join(lines)


# -- the command line ------------------------------------------------------------------------

_OUT = flags.DEFINE_string('out', 'device_check.json', 'Where the JSON report goes.')
_TINY = flags.DEFINE_bool('tiny', False, 'Toy size on the CPU (under 5 minutes).')
_SMALLEST = flags.DEFINE_bool('smallest', False, "The test suite's form: every section once, "
                              'on the smallest network and data (seconds, no time boxes).')
_TIME_LIMIT = flags.DEFINE_float('time_limit_s', None, 'Stretch or shrink every time box to '
                                 'this wall time (default: 480 for the GPU, 300 for --tiny).')
# benchmarks.evaluate's flags (its BLOCKS come from there) that mean the same here.
_OVERRIDES = ('epochs', 'batch_size', 'features', 'num_blocks', 'validation_size', 'max_train',
              'scan_blocks')
_NOT_HERE = ('loops', 'compute_dtype', 'compare_compile_ahead', 'stream', 'decode_threads')


def main(argv):
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  unused = [f'--{n}' for n in _NOT_HERE if FLAGS[n].present]
  if unused:
    raise app.UsageError(f'{", ".join(unused)}: benchmarks.evaluate only; this check '
                         'compares loops and dtypes itself')
  size = 'smallest' if _SMALLEST.value else 'tiny' if _TINY.value else 'full'
  plan = plan_for(size, _TIME_LIMIT.value)
  plan = dataclasses.replace(plan, **{n: FLAGS[n].value for n in _OVERRIDES
                                      if FLAGS[n].present})
  try:
    run(plan, FLAGS.data, _OUT.value, watchdog=True)
  except FileNotFoundError as e:  # the data was not carried: say so in the report too
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps({'complete': False, 'error': str(e)}, indent=2))
    raise SystemExit(str(e)) from None
  print(f'\nreport: {_OUT.value}')


if __name__ == '__main__':
  flags.FLAGS.set_default('data', DEFAULT_DATA)
  app.run(main)
