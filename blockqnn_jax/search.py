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
from blockqnn_jax import nsc
from blockqnn_jax import qlearning as ql
from blockqnn_jax import space as space_lib
from blockqnn_jax import store as store_lib
from blockqnn_jax.results import EvalResult

# Sections that may change between a run and its resumption: they decide how, not what.
RESUMABLE_CHANGES = ('executor.',)
# Fields added to the config after a workdir may have been created: a stored config that
# lacks one ran with this value (so a workdir from an older version resumes as it was).
ADDED_FIELDS = {
    'search.max_staleness': 0,
    'search.failed_reward': 0.0,
    'train.loop': 'auto',  # scan and steps train the same network (tests/test_train.py)
    'data.stream': False,
}


class ConfigMismatch(RuntimeError):
  """The workdir holds a search with a different config."""


@dataclasses.dataclass(frozen=True)
class SearchSummary:
  iterations_done: int
  candidates: int
  trained: int
  cached: int
  failed: int
  best: store_lib.Candidate | None
  wall_s: float
  worker_idle_fraction: float | None = None  # when the executor reports its utilisation

  @property
  def cache_hit_rate(self) -> float:
    return self.cached / self.candidates if self.candidates else 0.0


def candidate_seed(seed: int, canonical_key: str) -> int:
  """The training seed of a block: fixed by its canonical form, so a retrained block (after a
  resume) trains exactly as it would have."""
  digest = hashlib.sha256(f'{seed}:{canonical_key}'.encode()).digest()
  return int.from_bytes(digest[:4], 'little') >> 1


def check_config(store: store_lib.ResultsStore, config, allow_change: bool) -> None:
  new = store_lib.config_json(config)
  old = store.get_meta('config')
  if old is None:
    store.set_meta('config', new)
    return
  changed = store_lib.config_differences(old, new, ignore=(), defaults=ADDED_FIELDS)
  changed = [k for k in changed if not k.startswith(RESUMABLE_CHANGES)]
  if changed and not allow_change:
    raise ConfigMismatch(
        f'{store.path} holds a search with a different config ({", ".join(changed)}); use a '
        f'new --workdir, or pass --allow_config_change to continue it with this config')
  store.set_meta('config', new)


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


def run_search(config, workdir: str | Path, executor, *, allow_config_change: bool = False,
               max_iterations: int | None = None, progress: bool = True,
               on_recorded: Callable[[int, int, EvalResult], None] | None = None
               ) -> SearchSummary:
  """Runs (or resumes) the search of ``config`` in ``workdir`` on ``executor``.

  With ``search.max_staleness = S`` the agent may sample iteration ``j`` as soon as iteration
  ``j - S - 1`` has been learned from, so up to S + 1 iterations are in flight and workers
  need not wait for an iteration's slowest candidate. Iteration ``j`` is always sampled from
  the Q after exactly ``j - S`` updates, and updates are applied in iteration order, so the
  sampled sequence does not depend on timing; S = 0 is the paper's strict iterations.

  Args:
    config: the search config (see configs/cifar.py).
    workdir: where the store, TensorBoard events and compiled programs live.
    executor: anything with ``submit(block, seed) -> Future[EvalResult]``; an optional
      ``utilisation()`` (fraction of worker time spent evaluating) is logged.
    allow_config_change: continue a workdir whose stored config differs.
    max_iterations: stop after this many iterations in this call (the search stays
      resumable); None runs the schedule to its end.
    progress: show a progress bar.
    on_recorded: called with (iteration, position, result) after each record (tests use
      it to interrupt a search at a chosen moment).

  Returns:
    A summary of the whole search so far.
  """
  start = time.perf_counter()
  store = store_lib.ResultsStore(workdir)
  check_config(store, config, allow_config_change)
  grammar = nsc.Grammar(**config.space)
  space = space_lib.build_space(grammar)
  agent = ql.QLearningConfig(**config.agent)
  schedule = ql.EpsilonSchedule(tuple(tuple(p) for p in config.search.epsilon_schedule))
  batch = config.search.blocks_per_iteration
  staleness = int(config.search.get('max_staleness', 0))
  if staleness < 0:
    raise ValueError(f'search.max_staleness must be >= 0, got {staleness}')
  failed_reward = float(config.search.get('failed_reward', 0.0))
  base_key = jax.random.PRNGKey(config.seed)

  saved = store.load_agent()
  if saved is None:
    first_iteration = 0
    q = ql.init_q(space, agent.q_init)
    memory = ql.init_memory(space, agent.memory_capacity)
  else:
    first_iteration, arrays = saved
    q = jnp.asarray(arrays['q'])
    memory = ql.ReplayMemory(*(jnp.asarray(arrays[f'memory_{f.name}'])
                               for f in dataclasses.fields(ql.ReplayMemory)))
    logging.info('resuming %s at iteration %d', store.path, first_iteration)

  last = schedule.num_iterations
  if max_iterations is not None:
    last = min(last, first_iteration + max_iterations)
  writer = _tensorboard(Path(workdir))
  bar = _Progress(schedule.num_iterations * batch, first_iteration * batch, progress)
  utilisation = getattr(executor, 'utilisation', None)
  pending: dict[int, _Iteration] = {}
  training: dict[str, concurrent.futures.Future] = {}  # canonical key -> its training
  # A training's canonical key and the (iteration, position)s waiting for it, owner first.
  waiters: dict[concurrent.futures.Future, tuple[str, list[tuple[int, int]]]] = {}
  finished_here = 0

  def record(it: _Iteration, position: int, result: EvalResult, was_cached: bool):
    it.results[position], it.cached[position] = result, was_cached
    store.record(it.index, position, it.epsilon, result, was_cached)
    bar.update(1)
    if on_recorded is not None:
      on_recorded(it.index, position, result)

  def begin(index: int, submit: bool) -> None:
    """Samples iteration ``index`` (or reloads what it sampled) and sends out its blocks."""
    epsilon = float(ql.epsilon_at(schedule, index))
    sample_key, replay_key = jax.random.split(jax.random.fold_in(base_key, index))
    stored = store.load_sampled(index)
    if stored is None:
      trajectories = ql.sample_blocks(sample_key, q, space, epsilon, batch)
      store.save_sampled(index, {'states': trajectories.states,
                                 'lengths': trajectories.lengths})
    else:
      trajectories = ql.Trajectories(jnp.asarray(stored['states']),
                                     jnp.asarray(stored['lengths']))
    if not submit:  # beyond this call's last iteration: sampled for the resumption only
      return
    blocks = space.decode_batch(np.asarray(trajectories.states))
    it = pending[index] = _Iteration(index, epsilon, replay_key, trajectories, blocks,
                                     [None] * len(blocks), [False] * len(blocks),
                                     time.perf_counter())
    recorded = store.iteration_rows(index)
    for position, block in enumerate(blocks):
      if position in recorded:  # recorded before an interruption
        row = recorded[position]
        it.results[position] = row.result
        it.cached[position] = row.cached
        continue
      key = canonical.canonical_key(block)
      earlier = store.trained(key)
      if earlier is not None:
        record(it, position, dataclasses.replace(earlier.result,
                                                 block=block.to_text()), True)
      elif key in training:  # the same block is training for this or an earlier iteration
        waiters[training[key]][1].append((index, position))
      else:
        future = executor.submit(block, seed=candidate_seed(config.seed, key))
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
          for n, (index, position) in enumerate(positions):  # the trained block, then copies
            owner = pending[index]
            record(owner, position, result if n == 0 else dataclasses.replace(
                result, block=owner.blocks[position].to_text()), n > 0)
      del pending[learned]
      rewards = np.asarray([r.reward if r.ok else failed_reward for r in it.results],
                           np.float32)
      q, memory = ql.learn(it.replay_key, q, memory, space, it.trajectories,
                           jnp.asarray(rewards), agent)
      store.save_agent(learned + 1, {
          'q': q, **{f'memory_{f.name}': getattr(memory, f.name)
                     for f in dataclasses.fields(ql.ReplayMemory)}})
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
      worker_idle_fraction=None if utilisation is None else 1 - utilisation())
  store.close()
  return summary


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
