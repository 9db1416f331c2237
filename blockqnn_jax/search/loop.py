"""The BlockQNN search loop: sample, evaluate, record, learn, save — resumable at any point.

Each iteration the agent samples ``search.blocks_per_iteration`` blocks at the schedule's ε
from a key derived from (seed, iteration); blocks whose canonical form was already trained
take the stored result; the rest go to the executor, each recorded in the store as soon as
it finishes; then the Q-update and replay run and the agent state is saved in one atomic
write. Because sampling depends only on the saved Q and the iteration number, a search
killed at any moment and started again on the same workdir samples exactly the blocks the
uninterrupted run would have, reuses every candidate already recorded, and retrains only
those that were in flight.

The loop is a ``study.Study`` (the ask/tell object users with a trainer of their own get)
with an executor doing the training: every proposal, repeat, record and update goes through
that one core. With ``search.max_staleness = S > 0`` the loop is asynchronous: iteration ``j`` is sampled
(and stored before anything of it trains) once iteration ``j - S - 1`` is learned, so the
executor's workers are fed the next iterations' blocks while the slowest candidates of the
current one finish. A block already training for an earlier iteration is waited for, never
trained twice.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from pathlib import Path
import time
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from blockqnn_jax.search import study as study_lib
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.storage import eval_cache as eval_cache_lib
from blockqnn_jax.storage import results as results_lib
from blockqnn_jax.storage.results import EvalResult

__all__ = ['SearchSummary', 'open_eval_cache', 'run_search']


@dataclasses.dataclass(frozen=True)
class SearchSummary:
  """The whole search so far: ``candidates`` rows, of which ``trained`` are distinct blocks
  evaluated (``trained_failed`` of them failed; ``shared`` of them read from the evaluation
  cache shared with other searches instead of trained here) and ``cached`` reused an
  identical block's result; ``failed`` counts every failed row, reused ones included.
  ``reevaluations`` are the further evaluations of the confirm rule (``search.confirm``),
  and ``kept`` the block the search hands over, with its evidence; ``stopped`` of the
  trained ones stopped at a rung (``search.early_stop``)."""

  iterations_done: int
  candidates: int
  trained: int
  cached: int
  failed: int
  best: results_lib.Candidate | None
  wall_s: float
  worker_idle_fraction: float | None = None  # when the executor reports its utilisation
  trained_failed: int = 0
  shared: int = 0
  reevaluations: int = 0
  kept: Any = None  # confirm.Kept
  stopped: int = 0

  @property
  def cache_hit_rate(self) -> float:
    return self.cached / self.candidates if self.candidates else 0.0


class _Progress:
  """A tqdm bar over what ends the search, with the figures a researcher watches: its
  trainings (re-evaluations included) when it has a budget, else its candidates."""

  def __init__(self, total: int, done: int, enabled: bool, unit: str):
    self.bar = None
    if enabled:
      import tqdm
      self.bar = tqdm.tqdm(total=total, initial=done, unit=unit, dynamic_ncols=True)

  def move_to(self, done: int) -> None:
    if self.bar is not None and done != self.bar.n:
      self.bar.total = max(self.bar.total, done)  # the last iteration may overshoot a budget
      self.bar.update(done - self.bar.n)

  def update(self, n: int, **postfix) -> None:
    if self.bar is not None:
      self.bar.update(n)
      self.bar.set_postfix(postfix, refresh=False)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def run_search(settings: SearchSettings, workdir: str | Path, executor, *,
               allow_config_change: bool = False,
               max_iterations: int | None = None, progress: bool = True,
               on_recorded: Callable[[int, int, EvalResult], None] | None = None,
               eval_cache: eval_cache_lib.EvalCache | None = None) -> SearchSummary:
  """Runs (or resumes) the search of ``settings`` in ``workdir`` on ``executor``.

  With ``search.max_staleness = S`` the agent may sample iteration ``j`` as soon as iteration
  ``j - S - 1`` has been learned from, so up to S + 1 iterations are in flight and workers
  need not wait for an iteration's slowest candidate. Iteration ``j`` is always sampled from
  the Q after exactly ``j - S`` updates, and updates are applied in iteration order, so the
  sampled sequence does not depend on timing; S = 0 is the paper's strict iterations.

  Args:
    settings: the search's settings (``SearchSettings.from_config`` of configs/cifar.py).
    workdir: where the store, TensorBoard events and compiled programs live.
    executor: anything with ``submit(block, seed) -> Future[EvalResult]`` (and a ``lines``
      argument under ``search.early_stop``, ``executors.interface``); an optional
      ``prepare(block)`` (a ``PreparedBlock``, handed to ``submit`` in place of the block:
      each block is prepared once) and ``utilisation()`` (fraction of worker time spent
      evaluating, logged).
    allow_config_change: continue a workdir whose stored config differs.
    max_iterations: stop after this many iterations in this call (the search stays
      resumable); None runs the schedule to its end.
    progress: show a progress bar.
    on_recorded: called with (iteration, position, result) after each record (tests use
      it to interrupt a search at a chosen moment).
    eval_cache: the evaluation cache shared with other searches, required when
      ``search.eval_cache`` names one (``open_eval_cache``): a block found there is recorded
      with its stored result (``shared``), one trained here is stored there.

  Returns:
    A summary of the whole search so far.

  Raises:
    workdir_lock.WorkdirBusy: another search holds the workdir.
    ConfigMismatch: the workdir holds a search with a different config.
    SearchFailed: candidates keep failing for a reason that is not about the blocks.
  """
  start = time.perf_counter()
  budget = settings.search.budget
  total = budget or settings.search.schedule.num_iterations * settings.search.blocks_per_iteration
  monitor = _Monitor(Path(workdir), getattr(executor, 'utilisation', None), start)
  try:
    with study_lib.Study(settings, workdir, allow_config_change=allow_config_change,
                         max_iterations=max_iterations, eval_cache=eval_cache,
                         prepare=getattr(executor, 'prepare', None), on_recorded=on_recorded,
                         on_learned=monitor.learned) as study:
      done = study.store.trainings if budget else study.store.count
      monitor.bar = _Progress(total, done(), progress, 'training' if budget else 'cand')
      _drive(study, executor, monitor.bar, done)
      counts = study.summary()
  finally:
    monitor.close()
  return SearchSummary(
      iterations_done=counts['iterations_done'], candidates=counts['candidates'],
      trained=counts['trained'], cached=counts['cached'], failed=counts['failed'],
      best=counts['best'], wall_s=time.perf_counter() - start,
      worker_idle_fraction=monitor.idle_fraction(), trained_failed=counts['trained_failed'],
      shared=counts['shared'], reevaluations=counts['reevaluations'], kept=counts['kept'],
      stopped=counts['stopped'])


def _drive(study: study_lib.Study, executor, bar: '_Progress', done: Callable[[], int]) -> None:
  """Asks the study for trials, trains each new one on the executor and tells its result,
  until the study is done (or this call's iterations are)."""
  out: dict[concurrent.futures.Future, study_lib.Trial] = {}
  while not study.done:
    while (trial := study.ask()) is not None:
      if not trial.known:
        block = trial.prepared if trial.prepared is not None else trial.block
        # Early stopping's lines only where there are some: any executor with
        # ``submit(block, seed)`` drives a search without it.
        lines = {'lines': trial.stop_lines} if trial.stop_lines is not None else {}
        out[executor.submit(block, seed=trial.seed, **lines)] = trial
    bar.move_to(done())  # candidates known at once (repeats, the shared cache)
    if study.done or not out:
      break
    finished, _ = concurrent.futures.wait(out, return_when=concurrent.futures.FIRST_COMPLETED)
    for future in finished:
      study.tell(out.pop(future), result=future.result())
    bar.move_to(done())


class _Monitor:
  """What a search shows as it learns: TensorBoard scalars and a log line per iteration, the
  progress bar's figures, and the executor's utilisation."""

  def __init__(self, workdir: Path, utilisation: Callable[[], float] | None, start: float):
    self.writer = _tensorboard(workdir)
    self.utilisation = utilisation
    self.start = self.last = start
    self.bar: _Progress | None = None

  def learned(self, it: study_lib.Learned) -> None:
    now = time.perf_counter()
    elapsed_h = (now - self.start) / 3600
    per_hour = it.finished_here / elapsed_h if elapsed_h else 0.0
    busy = self.utilisation() if self.utilisation is not None else None
    _log_iteration(self.writer, it.iteration, it.epsilon, [r.reward for r in it.results if r.ok],
                   it.cached, it.results, per_hour, now - self.last, busy)
    self.last = now
    best = it.best
    postfix = dict(it=it.iteration, eps=f'{it.epsilon:.1f}',
                   best=f'{best.reward:.3f}' if best else '-', per_h=f'{per_hour:.0f}')
    if busy is not None:
      postfix['idle'] = f'{1 - busy:.0%}'
    if self.bar is not None:
      self.bar.update(0, **postfix)

  def idle_fraction(self) -> float | None:
    return None if self.utilisation is None else 1 - self.utilisation()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.close()


def open_eval_cache(settings: SearchSettings, data, platform: str
                    ) -> eval_cache_lib.EvalCache | None:
  """The shared evaluation cache ``search.eval_cache`` names (None when it names none), at
  the fidelity of ``settings`` on ``data`` (in-memory splits or a stream) and with
  ``train.compute_dtype='auto'`` read as it runs on ``platform``."""
  if not settings.search.eval_cache:
    return None
  from blockqnn_jax.training import engine  # pylint: disable=import-outside-toplevel
  dtype = engine.resolve_dtype(settings.train.compute_dtype, platform)
  train = dataclasses.replace(settings.train, compute_dtype=jnp.dtype(dtype).name)
  fidelity, description = eval_cache_lib.fidelity_of(train, settings.network, settings.reward,
                                                     data)
  return eval_cache_lib.EvalCache(settings.search.eval_cache, fidelity, description)


def _tensorboard(workdir: Path):
  try:
    import tensorboardX
  except ImportError:  # TensorBoard logging is optional
    return None
  return tensorboardX.SummaryWriter(str(workdir / 'tensorboard'))


def _log_iteration(writer, iteration, epsilon, rewards, cached, results, per_hour, seconds,
                   utilisation):
  if writer is None:
    return
  scalars = {
      'epsilon': epsilon,
      'cache_hit_rate': sum(cached) / len(cached),
      'failed': sum(1 for r in results if not r.ok),
      'candidates_per_hour': per_hour,
      'iteration_seconds': seconds,
  }
  if utilisation is not None:
    scalars['worker_idle_fraction'] = 1 - utilisation
  if rewards:
    scalars.update({'reward/mean': float(np.mean(rewards)), 'reward/max': float(np.max(rewards))})
  for name, value in scalars.items():
    writer.add_scalar(name, value, iteration)
  writer.flush()
