"""The BlockQNN search loop: sample, evaluate, record, learn, save — resumable at any point.

Each iteration the agent samples ``search.blocks_per_iteration`` blocks at the schedule's ε
from a key derived from (seed, iteration); blocks whose canonical form was already trained
take the stored result; the rest go to the executor, each recorded in the store as soon as
it finishes; then the Q-update and replay run and the agent state is saved in one atomic
write. Because sampling depends only on the saved Q and the iteration number, a search
killed at any moment and started again on the same workdir samples exactly the blocks the
uninterrupted run would have, reuses every candidate already recorded, and retrains only
those that were in flight.

With ``search.max_staleness = S > 0`` the loop is asynchronous: iteration ``j`` is sampled
(and stored before anything of it trains) once iteration ``j - S - 1`` is learned, so the
executor's workers are fed the next iterations' blocks while the slowest candidates of the
current one finish. A block already training for an earlier iteration is waited for, never
trained twice.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from blockqnn_jax import canonical
from blockqnn_jax import eval_cache as eval_cache_lib
from blockqnn_jax import nsc
from blockqnn_jax import qlearning as ql
from blockqnn_jax import results
from blockqnn_jax import space as space_lib
from blockqnn_jax import strategies
from blockqnn_jax import settings as settings_lib
from blockqnn_jax import store as store_lib
from blockqnn_jax import workdir_lock
from blockqnn_jax.results import EvalResult
from blockqnn_jax.settings import SearchSettings

# Fields that may change between a run and its resumption: they decide how, not what.
RESUMABLE_CHANGES = ('executor.', 'search.stop_after_failures')


ConfigMismatch = settings_lib.ConfigMismatch  # the workdir holds a search of another config


class SearchFailed(RuntimeError):
  """Candidates keep failing for a reason that is not about the blocks (the data, the
  devices, the settings): stopping says so instead of teaching the agent reward 0."""


@dataclasses.dataclass(frozen=True)
class SearchSummary:
  """The whole search so far: ``candidates`` rows, of which ``trained`` are distinct blocks
  evaluated (``trained_failed`` of them failed; ``shared`` of them read from the evaluation
  cache shared with other searches instead of trained here) and ``cached`` reused an
  identical block's result; ``failed`` counts every failed row, reused ones included."""

  iterations_done: int
  candidates: int
  trained: int
  cached: int
  failed: int
  best: store_lib.Candidate | None
  wall_s: float
  worker_idle_fraction: float | None = None  # when the executor reports its utilisation
  trained_failed: int = 0
  shared: int = 0

  @property
  def cache_hit_rate(self) -> float:
    return self.cached / self.candidates if self.candidates else 0.0


def candidate_seed(seed: int, canonical_key: str) -> int:
  """The training seed of a block: fixed by its canonical form, so a retrained block (after a
  resume) trains exactly as it would have."""
  digest = hashlib.sha256(f'{seed}:{canonical_key}'.encode()).digest()
  return int.from_bytes(digest[:4], 'little') >> 1


def stored_settings(store: store_lib.ResultsStore) -> SearchSettings | None:
  """The settings a workdir's search was started with (None for a new workdir). A field
  added since then reads as its default, so an older workdir resumes as it ran."""
  old = store.get_meta('config')
  return None if old is None else SearchSettings.from_config(old)


def check_config(store: store_lib.ResultsStore, settings: SearchSettings,
                 allow_change: bool) -> None:
  """Stores ``settings`` in a new workdir; refuses a different search on an existing one
  (``ConfigMismatch`` naming the fields) unless ``allow_change``."""
  old = stored_settings(store)
  if old is not None:
    changed = settings_lib.differences(old, settings, ignore=RESUMABLE_CHANGES)
    space_changed = [k for k in changed if k.startswith('space.')]
    if space_changed and store.load_agent() is not None:
      raise ConfigMismatch(
          f'{store.path} holds an agent over another search space ({", ".join(space_changed)}'
          '): its Q values and sampled blocks cannot follow a changed space, even with '
          '--allow_config_change; use a new --workdir')
    settings_lib.refuse_changes(store.path, old.to_dict(), settings.to_dict(),
                                ignore=RESUMABLE_CHANGES, allow_change=allow_change)
  store.set_meta('config', settings.to_json())


class _Progress:
  """A tqdm bar over all candidates of the search, with the figures a researcher watches."""

  def __init__(self, total: int, done: int, enabled: bool):
    self.bar = None
    if enabled:
      import tqdm
      self.bar = tqdm.tqdm(total=total, initial=done, unit='cand', dynamic_ncols=True)

  def update(self, n: int, **postfix) -> None:
    if self.bar is not None:
      self.bar.update(n)
      self.bar.set_postfix(postfix, refresh=False)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


@dataclasses.dataclass
class _Iteration:
  """One sampled iteration on its way through the executor."""

  index: int
  epsilon: float
  replay_key: jax.Array
  trajectories: ql.Trajectories
  blocks: list[nsc.Block]
  results: list[EvalResult | None]
  cached: list[bool]
  started: float

  @property
  def complete(self) -> bool:
    return all(r is not None for r in self.results)


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
    executor: anything with ``submit(block, seed) -> Future[EvalResult]``; an optional
      ``utilisation()`` (fraction of worker time spent evaluating) is logged.
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
  if settings.search.eval_cache and eval_cache is None:
    raise ValueError('search.eval_cache names a shared cache: pass eval_cache= '
                     '(open_eval_cache(settings, data, platform))')
  if eval_cache is not None and not settings.search.eval_cache:
    raise ValueError('eval_cache= given but search.eval_cache is empty: the search would '
                     'train with seeds of its own, not the cache\'s')
  with workdir_lock.WorkdirLock(workdir, purpose='search'):  # WorkdirBusy: someone else's
    return _run_search(settings, workdir, executor, allow_config_change=allow_config_change,
                       max_iterations=max_iterations, progress=progress,
                       on_recorded=on_recorded, cache=eval_cache)


def _run_search(settings: SearchSettings, workdir: str | Path, executor, *,
                allow_config_change: bool, max_iterations: int | None, progress: bool,
                on_recorded: Callable[[int, int, EvalResult], None] | None,
                cache: eval_cache_lib.EvalCache | None) -> SearchSummary:
  start = time.perf_counter()
  store = store_lib.ResultsStore(workdir)
  check_config(store, settings, allow_config_change)
  space = space_lib.build_space(settings.space)
  strategy = make_strategy(settings)
  schedule = settings.search.schedule
  batch = settings.search.blocks_per_iteration
  staleness = settings.search.max_staleness
  failed_reward = settings.search.failed_reward
  base_key = jax.random.PRNGKey(settings.seed)
  budget = settings.search.distinct_budget

  saved = store.load_agent()
  if saved is None:
    first_iteration = 0
    state = strategy.init(space, jax.random.fold_in(base_key, _INIT_STREAM), budget)
  else:
    first_iteration, arrays = saved
    state = restore_strategy_state(strategy, space, arrays, budget)
    logging.info('resuming %s at iteration %d', store.path, first_iteration)
  # The one iteration that may have been asked after the last save (see ``begin``).
  asked_after_save = first_iteration + staleness

  last = schedule.num_iterations
  if max_iterations is not None:
    last = min(last, first_iteration + max_iterations)
  if settings.search.budget and store.count('WHERE cached = 0') >= settings.search.budget:
    last = first_iteration  # spent: a resumed search trains nothing more
  writer = _tensorboard(Path(workdir))
  bar = _Progress(schedule.num_iterations * batch, first_iteration * batch, progress)
  utilisation = getattr(executor, 'utilisation', None)
  pending: dict[int, _Iteration] = {}
  training: dict[str, concurrent.futures.Future] = {}  # canonical key -> its training
  # A training's canonical key and the (iteration, position)s waiting for it, owner first.
  waiters: dict[concurrent.futures.Future, tuple[str, list[tuple[int, int]]]] = {}
  finished_here = 0
  failures = _FailureWatch(settings.search.stop_after_failures)

  def training_seed(key: str) -> int:
    if cache is not None:  # the same for every search sharing the cache
      return eval_cache_lib.block_seed(key)
    return candidate_seed(settings.seed, key)

  def record(it: _Iteration, position: int, result: EvalResult, was_cached: bool,
             shared: bool = False):
    it.results[position], it.cached[position] = result, was_cached
    store.record(it.index, position, it.epsilon, result, was_cached, shared)
    bar.update(1)
    if on_recorded is not None:
      on_recorded(it.index, position, result)

  def begin(index: int, submit: bool) -> None:
    """Samples iteration ``index`` (or reloads what it sampled) and sends out its blocks."""
    nonlocal state
    epsilon = proposal_epsilon(strategy, state, index, batch)
    sample_key, replay_key = jax.random.split(jax.random.fold_in(base_key, index))
    stored = store.load_sampled(index)
    if stored is None:
      asked, trajectories = strategy.ask(space, state, sample_key, batch, index)
      arrays = {'states': trajectories.states, 'lengths': trajectories.lengths}
      if asked is not state:  # an ask that moves the strategy: keep where it moved to
        arrays.update({f'state.{k}': v for k, v in strategies.state_arrays(asked).items()})
      store.save_sampled(index, arrays)
      state = asked
    else:
      trajectories = ql.Trajectories(jnp.asarray(stored['states']),
                                     jnp.asarray(stored['lengths']))
      # Iterations up to first_iteration + S - 1 were asked before the saved state was
      # learned, so it holds their asks; the next one was asked after: restore its ask.
      if index == asked_after_save and any(k.startswith('state.') for k in stored):
        state = strategies.restore_state(strategy, space, {
            k[len('state.'):]: v for k, v in stored.items() if k.startswith('state.')})
    if not submit:  # beyond this call's last iteration: sampled for the resumption only
      return
    blocks = space.decode_batch(np.asarray(trajectories.states))
    it = pending[index] = _Iteration(index, epsilon, replay_key, trajectories, blocks,
                                     [None] * len(blocks), [False] * len(blocks),
                                     time.perf_counter())
    recorded = store.iteration_rows(index)
    for position, block in enumerate(blocks):
      row = recorded.get(position)
      if row is not None and row.result.reusable:  # recorded before an interruption
        it.results[position] = row.result
        it.cached[position] = row.cached
        continue
      if row is not None:  # a transient failure (a lost worker, out of memory): train again
        store.forget(index, position)
      key = canonical.canonical_key(block)
      earlier = store.trained(key)
      if earlier is not None:
        record(it, position, dataclasses.replace(earlier.result,
                                                 block=block.to_text()), True)
      elif key in training:  # the same block is training for this or an earlier iteration
        waiters[training[key]][1].append((index, position))
      elif cache is not None and (shared := cache.get(key, training_seed(key))) is not None:
        record(it, position, dataclasses.replace(shared, block=block.to_text()), False, True)
      else:
        future = executor.submit(block, seed=training_seed(key))
        training[key] = future
        waiters[future] = (key, [(index, position)])

  next_sample = first_iteration
  try:
    for learned in range(first_iteration, last):
      while next_sample <= min(learned + staleness, schedule.num_iterations - 1):
        begin(next_sample, submit=next_sample < last)
        next_sample += 1
      it = pending[learned]
      while not it.complete:
        done, _ = concurrent.futures.wait(waiters,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
          result = future.result()
          key, positions = waiters.pop(future)
          del training[key]
          finished_here += 1
          shared = False
          if cache is not None:  # another search may have stored it first: take that one
            result, shared = cache.put(key, training_seed(key), result)
          for n, (index, position) in enumerate(positions):  # the trained block, then copies
            owner = pending[index]
            record(owner, position, result if n == 0 and not shared else dataclasses.replace(
                result, block=owner.blocks[position].to_text()), n > 0, shared and n == 0)
      # In (iteration, position) order, so whether a search stops never depends on timing;
      # after recording (the failures are kept), before the agent learns reward 0 from them.
      for result, was_cached in zip(it.results, it.cached):
        if not was_cached:
          failures.see(result)
      failures.check()
      del pending[learned]
      rewards = np.asarray([r.reward if r.ok else failed_reward for r in it.results],
                           np.float32)
      state = strategy.tell(space, state, it.trajectories, jnp.asarray(rewards), it.replay_key)
      store.save_agent(learned + 1, strategies.state_arrays(state))
      best = store.best()
      elapsed_h = (time.perf_counter() - start) / 3600
      per_hour = finished_here / elapsed_h if elapsed_h else 0.0
      busy = utilisation() if utilisation is not None else None
      _log_iteration(writer, learned, it.epsilon, [r.reward for r in it.results if r.ok],
                     it.cached, it.results, per_hour, time.perf_counter() - it.started, busy)
      postfix = dict(it=learned, eps=f'{it.epsilon:.1f}',
                     best=f'{best.reward:.3f}' if best else '-', per_h=f'{per_hour:.0f}')
      if busy is not None:
        postfix['idle'] = f'{1 - busy:.0%}'
      bar.update(0, **postfix)
      if settings.search.budget and store.count('WHERE cached = 0') >= settings.search.budget:
        logging.info('budget of %d distinct candidates reached', settings.search.budget)
        break
  except BaseException:
    store.close()
    raise
  finally:
    bar.close()
    if writer is not None:
      writer.close()
  saved = store.load_agent()
  summary = SearchSummary(
      iterations_done=saved[0] if saved else 0, candidates=store.count(),
      trained=store.count('WHERE cached = 0'), cached=store.count('WHERE cached = 1'),
      failed=store.count("WHERE status = 'failed'"), best=store.best(),
      wall_s=time.perf_counter() - start,
      worker_idle_fraction=None if utilisation is None else 1 - utilisation(),
      trained_failed=store.count("WHERE cached = 0 AND status = 'failed'"),
      shared=store.count('WHERE cached = 0 AND shared = 1'))
  store.close()
  return summary


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


# fold_in stream of the strategy's initial key (iterations use streams 0, 1, 2, ...).
_INIT_STREAM = 2**31 - 1


def make_strategy(settings: SearchSettings) -> strategies.Strategy:
  """The strategy ``settings.search.strategy`` names, with its settings as they are."""
  loop = settings.search
  if loop.strategy == 'qlearning':
    return strategies.QLearner(agent=settings.agent, schedule=loop.schedule,
                               budget=loop.distinct_budget)
  if loop.strategy == 'evolution':
    return strategies.AgingEvolution(population=loop.population, sample=loop.tournament)
  return strategies.make_strategy(loop.strategy)


def proposal_epsilon(strategy, state, iteration: int, n: int) -> float:
  """What the ε column records: the Q-learner's ε; 1 for random search (all exploration)
  and 0 for evolution and local search (they exploit a population or an incumbent)."""
  if isinstance(strategy, strategies.QLearner):
    return float(strategy.epsilon(state, iteration, n))
  return 1.0 if isinstance(strategy, strategies.RandomSearch) else 0.0


def restore_strategy_state(strategy, space, arrays, budget: int):
  """The saved strategy state; a workdir from before strategies existed saved the
  Q-learner as ``q`` and ``memory_<field>``, and resumes as that agent."""
  if 'memory_states' in arrays and isinstance(strategy, strategies.QLearner):
    fresh = strategies.state_arrays(strategy.init(space, jax.random.PRNGKey(0), budget))
    fresh.update({'q': arrays['q'], **{
        f'memory.{k[len("memory_"):]}': v for k, v in arrays.items()
        if k.startswith('memory_')}})
    arrays = fresh
  return strategies.restore_state(strategy, space, arrays)


class _FailureWatch:
  """Counts trained candidates that failed in a row; ``check`` raises ``SearchFailed`` once
  the last ``limit`` failed for one kind of reason. A run of identical failures is the
  signature of the settings, the data or the devices, not of the blocks (invalid blocks,
  the one kind that is only about a block, do not count)."""

  def __init__(self, limit: int):
    self.limit = limit
    self.reasons: list[str] = []

  def see(self, result: EvalResult) -> None:
    if result.ok:
      self.reasons = []
    elif not result.failure_reason.startswith('invalid block'):
      self.reasons.append(result.failure_reason)

  def check(self) -> None:
    if not self.limit or len(self.reasons) < self.limit:
      return
    recent = self.reasons[-self.limit:]
    kinds = {results.failure_kind(r) for r in recent}
    if len(kinds) == 1:
      raise SearchFailed(
          f'the last {len(recent)} candidates trained all failed ({kinds.pop()}): that is the '
          f'settings, the data or the devices, not the blocks. The last said: {recent[-1]}')


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
