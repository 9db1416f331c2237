"""The BlockQNN search loop: sample, evaluate, record, learn, save — resumable at any point.

Each iteration the agent samples ``search.blocks_per_iteration`` blocks at the schedule's ε
from a key derived from (seed, iteration); blocks whose canonical form was already trained
take the stored result; the rest go to the executor, each recorded in the store as soon as
it finishes; then the Q-update and replay run and the agent state is saved in one atomic
write. Because sampling depends only on the saved Q and the iteration number, a search
killed at any moment and started again on the same workdir samples exactly the blocks the
uninterrupted run would have, reuses every candidate already recorded, and retrains only
those that were in flight.
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
from blockqnn_jax.train import EvalResult

# Sections that may change between a run and its resumption: they decide how, not what.
RESUMABLE_CHANGES = ('executor.',)


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
  changed = store_lib.config_differences(old, new, ignore=())
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


def run_search(config, workdir: str | Path, executor, *, allow_config_change: bool = False,
               max_iterations: int | None = None, progress: bool = True,
               on_recorded: Callable[[int, int, EvalResult], None] | None = None
               ) -> SearchSummary:
  """Runs (or resumes) the search of ``config`` in ``workdir`` on ``executor``.

  Args:
    config: the search config (see configs/cifar.py).
    workdir: where the store, TensorBoard events and compiled programs live.
    executor: anything with ``submit(block, seed) -> Future[EvalResult]``.
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
  best = store.best()
  finished_here = 0
  try:
    for iteration in range(first_iteration, last):
      epsilon = float(ql.epsilon_at(schedule, iteration))
      sample_key, replay_key = jax.random.split(jax.random.fold_in(base_key, iteration))
      trajectories = ql.sample_blocks(sample_key, q, space, epsilon, batch)
      blocks = space.decode_batch(np.asarray(trajectories.states))
      t0 = time.perf_counter()
      results, cached = _evaluate_iteration(store, executor, config.seed, iteration, epsilon,
                                            blocks, bar, on_recorded)
      finished_here += sum(1 for c in cached if not c)
      rewards = np.asarray([r.reward if r.ok else failed_reward for r in results], np.float32)
      q, memory = ql.learn(replay_key, q, memory, space, trajectories, jnp.asarray(rewards),
                           agent)
      store.save_agent(iteration + 1, {
          'q': q, **{f'memory_{f.name}': getattr(memory, f.name)
                     for f in dataclasses.fields(ql.ReplayMemory)}})
      best = store.best()
      elapsed_h = (time.perf_counter() - start) / 3600
      per_hour = finished_here / elapsed_h if elapsed_h else 0.0
      ok = [r.reward for r in results if r.ok]
      _log_iteration(writer, iteration, epsilon, ok, cached, results, per_hour,
                     time.perf_counter() - t0)
      bar.update(0, it=iteration, eps=f'{epsilon:.1f}',
                 best=f'{best.reward:.3f}' if best else '-', per_h=f'{per_hour:.0f}')
  finally:
    bar.close()
    if writer is not None:
      writer.close()
  saved = store.load_agent()
  summary = SearchSummary(
      iterations_done=saved[0] if saved else 0, candidates=store.count(), trained=store.count('WHERE cached = 0'),
      cached=store.count('WHERE cached = 1'), failed=store.count("WHERE status = 'failed'"),
      best=store.best(), wall_s=time.perf_counter() - start)
  store.close()
  return summary


def _evaluate_iteration(store, executor, seed, iteration, epsilon, blocks, bar, on_recorded):
  """Results of every block of the iteration, training only what no earlier candidate did."""
  results: list[EvalResult | None] = [None] * len(blocks)
  cached = [False] * len(blocks)
  recorded = store.iteration_rows(iteration)
  owner: dict[str, int] = {}  # canonical key -> position that trains it this iteration
  waiting: dict[int, list[int]] = {}  # that position -> duplicates waiting for its result
  futures: dict[concurrent.futures.Future, int] = {}

  def record(position, result, was_cached):
    results[position], cached[position] = result, was_cached
    store.record(iteration, position, epsilon, result, was_cached)
    bar.update(1)
    if on_recorded is not None:
      on_recorded(iteration, position, result)

  for position, block in enumerate(blocks):
    if position in recorded:  # recorded before an interruption
      row = recorded[position]
      results[position] = store_lib.result_from_candidate(row)
      cached[position] = row.cached
      continue
    key = canonical.canonical_key(block)
    earlier = store.trained(key)
    if earlier is not None:
      record(position, dataclasses.replace(store_lib.result_from_candidate(earlier),
                                           block=block.to_text()), True)
    elif key in owner:
      waiting[owner[key]].append(position)
    else:
      owner[key] = position
      waiting[position] = []
      futures[executor.submit(block, seed=candidate_seed(seed, key))] = position

  for future in concurrent.futures.as_completed(futures):
    position = futures[future]
    result = future.result()
    record(position, result, False)
    for duplicate in waiting[position]:
      record(duplicate, dataclasses.replace(result, block=blocks[duplicate].to_text()), True)
  return results, cached


def _tensorboard(workdir: Path):
  try:
    import tensorboardX
  except ImportError:  # TensorBoard logging is optional
    return None
  return tensorboardX.SummaryWriter(str(workdir / 'tensorboard'))


def _log_iteration(writer, iteration, epsilon, rewards, cached, results, per_hour, seconds):
  if writer is None:
    return
  scalars = {
      'epsilon': epsilon,
      'cache_hit_rate': sum(cached) / len(cached),
      'failed': sum(1 for r in results if not r.ok),
      'candidates_per_hour': per_hour,
      'iteration_seconds': seconds,
  }
  if rewards:
    scalars.update({'reward/mean': float(np.mean(rewards)), 'reward/max': float(np.max(rewards))})
  for name, value in scalars.items():
    writer.add_scalar(name, value, iteration)
  writer.flush()
