"""An ask/tell study: BlockQNN's agent (or any strategy) for any trainer, with the search's
store, resume and report — and the core the search loop itself runs on.

  study = Study.create('workdirs/mine', strategy='qlearning_fast', budget=100)
  while (trial := study.ask()) is not None:
    if not trial.known:  # a repeat of a block already told is told from the store at once
      study.tell(trial, reward=my_score(trial.block))

A study proposes blocks iteration by iteration (``search.blocks_per_iteration`` at a time)
from a key derived from (seed, iteration), stores every iteration's proposals before handing
any out, records each told result in the workdir's ``search.sqlite`` at once, and lets the
strategy learn from an iteration as soon as all of it is told, saving its state in one
atomic write. So a study killed at any moment and opened again asks exactly what it would
have asked: the told results are kept, and the trials handed out but never told are handed
out again. ``experiments.report`` draws a study like a search (it is one).

Several trials may be out at once, told in any order; with ``search.max_staleness = S`` the
next iterations (up to S beyond the one being learned) are proposed before the current one
is complete, so parallel workers need not wait for its slowest trial. ``ask`` returns None
when nothing can be handed out until some trial is told (or when the study is done:
``done``).

Blocks are identified by their canonical form: a block whose canonical key was told before
(or is in the evaluation cache shared with other searches, ``search.eval_cache``) is not
handed out for training: its trial comes back from ``ask`` with ``known=True`` and its
result; one equivalent to a block still out waits for that one's result.

With ``search.confirm`` > 1 (the fast agent's default) a block may be evaluated more than
once: when an iteration's blocks are all told, each newly trained one that looks at least as
good as the kept block (the incumbent) is a challenger, and ``ask`` hands out
*re-evaluations* (``trial.replicate`` >= 1: the same block, another seed) as the
incumbent/challenger rule of ``confirm`` asks for them, one at a time, before the strategy
learns the iteration from each block's mean reward. Every evaluation is stored (the store's
``evaluations`` table, and the shared cache under its own seed) and counts against the
budget; ``kept()`` is the block the evidence supports. The decisions are replayed from the
stored evaluations in a fixed order, so a resumed study decides as the first run did.

With ``search.early_stop`` a trial carries the lines of its rungs (``trial.stop_lines``,
``strategies.rungs``: decided from the rung scores of iterations already learned, so a
resumed study hands out the same lines). A trainer of its own reports as it trains and
stops a loser (Optuna's shape):

  for epoch in range(1, epochs + 1):
    score = train_one_epoch_and_validate(trial.block)
    study.report(trial, epoch, score)
    if study.should_stop(trial):
      study.tell(trial, stopped=True)  # its reward: the score at the rung it stopped at
      break
  else:
    study.tell(trial, reward=score)

A stopped trial is a result (the strategy learns its rung score), never the kept block.

``search.run_search`` is this loop with an executor doing the training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from blockqnn_jax.models.prepare import PreparedBlock
from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.nsc import space as space_lib
from blockqnn_jax.settings.search import EarlyStop, SearchSettings
from blockqnn_jax.storage import eval_cache as eval_cache_lib
from blockqnn_jax.storage import results as results_lib
from blockqnn_jax.storage import store as store_lib
from blockqnn_jax.storage import workdir_lock
from blockqnn_jax.storage.results import EvalResult, FailureWatch
from blockqnn_jax.storage.stored_config import check_config
from blockqnn_jax.strategies import confirm as confirm_lib
from blockqnn_jax.strategies import qlearning as ql
from blockqnn_jax.strategies import registry, state
from blockqnn_jax.strategies import rungs as rungs_lib

# fold_in stream of the strategy's initial key (iterations use streams 0, 1, 2, ...).
_INIT_STREAM = 2**31 - 1
_INCUMBENT = confirm_lib.INCUMBENT_KEY
# What ``Study.tell`` takes as metrics: the result's measured fields (not its identity).
METRICS = ('val_accuracy', 'final_loss', 'flops', 'density', 'params', 'compile_s',
           'train_s', 'eval_s', 'total_s', 'images_per_s', 'device')

class StudyError(ValueError):
  """A trial told wrongly: unknown, told twice, or with a reward that is not a number."""


def candidate_seed(seed: int, canonical_key: str, replicate: int = 0) -> int:
  """The training seed of a block: fixed by its canonical form, so a retrained block (after a
  resume) trains exactly as it would have; ``replicate`` >= 1 for its further evaluations."""
  text = f'{seed}:{canonical_key}' + (f':{replicate}' if replicate else '')
  digest = hashlib.sha256(text.encode()).digest()
  return int.from_bytes(digest[:4], 'little') >> 1


@dataclasses.dataclass(frozen=True)
class Trial:
  """One proposed block.

  Attributes:
    id: ``iteration * blocks_per_iteration + position``: unique in its study.
    iteration, position: where the strategy proposed it.
    block: the block as proposed (``nsc.Block``).
    canonical_key: its canonical form (``canonical.canonical_key``): equivalent blocks
      share it.
    seed: the seed to train it from (derived from the block, so a trial handed out again
      after a resume trains as it would have).
    known: its result is already known (an equivalent block was told, or the shared
      evaluation cache has it): it is recorded, and telling it is refused.
    result: the known result (None otherwise).
    prepared: the block prepared for training (``PreparedBlock``), when the study was given
      a ``prepare``; None otherwise.
    replicate: 0 for a block's first evaluation; 1, 2, ... for a re-evaluation asked by the
      confirm rule (the same block trained again from ``seed``, another seed). A
      re-evaluation's ``id`` is negative and ``position`` is -1.
    stop_lines: under early stopping (``search.early_stop``), its rungs and the line at
      each (``rungs.StopLines``: fixed when its iteration is proposed); None otherwise, and
      for re-evaluations, which train to the end.
  """

  id: int
  iteration: int
  position: int
  block: nsc.Block
  canonical_key: str
  seed: int
  known: bool = False
  result: EvalResult | None = None
  prepared: PreparedBlock | None = None
  replicate: int = 0
  stop_lines: rungs_lib.StopLines | None = None

  @property
  def reevaluation(self) -> bool:
    """Whether this is a further evaluation of a block already evaluated."""
    return self.replicate > 0

  @property
  def reward(self) -> float | None:
    """The known reward (None when unknown or failed)."""
    return self.result.reward if self.result is not None and self.result.ok else None


@dataclasses.dataclass
class _Iteration:
  """One proposed iteration on its way to being learned."""

  index: int
  epsilon: float
  replay_key: jax.Array
  trajectories: ql.Trajectories
  blocks: list[nsc.Block]
  results: list[EvalResult | None]
  cached: list[bool]
  confirmed: bool = False  # its failures were watched (once, however often it is replayed)

  @property
  def complete(self) -> bool:
    return all(r is not None for r in self.results)


@dataclasses.dataclass(frozen=True)
class Learned:
  """What ``Study`` reports after learning from an iteration (``on_learned``)."""

  iteration: int
  epsilon: float
  results: list[EvalResult]
  cached: list[bool]
  finished_here: int  # trials told in this session so far
  best: results_lib.Candidate | None  # the best candidate of the whole study so far


class Study:
  """An ask/tell study over a workdir (see the module docstring); a context manager.

  Args:
    settings: what the study searches and how (``SearchSettings``; ``Study.create`` builds
      them from a grammar and a strategy name).
    workdir: where ``search.sqlite`` lives (made if missing). Held (``WorkdirLock``) until
      ``close``: one study or search per workdir.
    allow_config_change: reopen a workdir whose stored settings differ.
    max_iterations: propose at most this many iterations in this session (the study stays
      resumable); None: to the schedule's end.
    eval_cache: the evaluation cache shared with other searches; required when
      ``search.eval_cache`` names one (``search.open_eval_cache``).
    prepare: ``block -> PreparedBlock`` (an executor's), so each block is prepared once,
      where the study first sees it, and its trial carries the prepared value.
    on_recorded: called with (iteration, position, result) after each record.
    on_learned: called with a ``Learned`` after each iteration is learned from.

  Raises:
    workdir_lock.WorkdirBusy: another study or search holds the workdir.
    ConfigMismatch: the workdir holds a study of other settings.
  """

  def __init__(self, settings: SearchSettings, workdir: str | Path, *,
               allow_config_change: bool = False, max_iterations: int | None = None,
               eval_cache: eval_cache_lib.EvalCache | None = None,
               prepare: Callable[[nsc.Block], PreparedBlock] | None = None,
               on_recorded: Callable[[int, int, EvalResult], None] | None = None,
               on_learned: Callable[[Learned], None] | None = None):
    if settings.search.eval_cache and eval_cache is None:
      raise ValueError('search.eval_cache names a shared cache: pass eval_cache= '
                       '(open_eval_cache(settings, data, platform))')
    if eval_cache is not None and not settings.search.eval_cache:
      raise ValueError("eval_cache= given but search.eval_cache is empty: the search would "
                       "train with seeds of its own, not the cache's")
    self.settings = settings
    self.workdir = Path(workdir)
    self._lock = workdir_lock.WorkdirLock(workdir, purpose='search')
    self._lock.__enter__()
    try:
      self.store = store_lib.ResultsStore(workdir)
      check_config(self.store, settings, allow_config_change)
    except BaseException:
      self._lock.__exit__(None, None, None)
      raise
    self.cache = eval_cache
    self._prepare = prepare
    self._on_recorded = on_recorded
    self._on_learned = on_learned
    self.space = space_lib.build_space(settings.space)
    self.strategy = registry.for_settings(settings)
    self._schedule = settings.search.schedule
    self._batch = settings.search.blocks_per_iteration
    self._staleness = settings.search.max_staleness
    self._base_key = jax.random.PRNGKey(settings.seed)
    budget = settings.search.distinct_budget
    self._confirm = settings.search.confirm_rule
    self._incumbent: str | None = None  # the kept block's key, under the confirm rule
    self._reevaluation: Trial | None = None  # the re-evaluation handed out, if any
    saved = self.store.load_agent()
    if saved is None:
      self._first = 0
      self._state = self.strategy.init(self.space,
                                       jax.random.fold_in(self._base_key, _INIT_STREAM), budget)
    else:
      self._first, arrays = saved
      incumbent = arrays.pop(_INCUMBENT, None)
      self._incumbent = str(incumbent) if incumbent is not None else None
      self._state = state.restore_saved_state(self.strategy, self.space, arrays, budget)
      logging.info('resuming %s at iteration %d', self.store.path, self._first)
    # The one iteration that may have been asked after the last save (see ``_begin``).
    self._asked_after_save = self._first + self._staleness
    self._last = self._schedule.num_iterations
    if max_iterations is not None:
      self._last = min(self._last, self._first + max_iterations)
    if self._budget_spent():
      self._last = self._first  # spent: a reopened study proposes nothing more
    self._learned = self._first  # the next iteration to learn from
    self._next_sample = self._first
    self._pending: dict[int, _Iteration] = {}
    self._queue: list[Trial] = []  # ready to hand out, in order
    self._out: dict[int, Trial] = {}  # handed out (or queued), not told: id -> trial
    self._training: dict[str, Trial] = {}  # canonical key -> the trial that trains it
    self._waiting: dict[str, list[tuple[int, int]]] = {}  # key -> copies waiting for it
    self.finished_here = 0
    self._stopped = False  # the budget was reached in this session
    self._failures = FailureWatch(settings.search.stop_after_failures)
    self._advance()
    self._learn_ready()

  # -- the user's side --------------------------------------------------------------------

  @classmethod
  def create(cls, workdir: str | Path, *, strategy: str = 'qlearning_fast', budget: int = 100,
             grammar: nsc.Grammar | None = None, seed: int = 0,
             blocks_per_iteration: int = 4, max_staleness: int = 0,
             confirm: int | None = None, early_stop: EarlyStop | None = None,
             settings: SearchSettings | None = None, **kwargs) -> 'Study':
    """Creates (or reopens) a study in ``workdir`` of ``strategy`` on ``grammar``.

    Args:
      workdir: where it lives.
      strategy: 'qlearning_fast' (the fast agent, beyond the paper), 'qlearning' or
        'qlearning_paper' (BlockQNN's agent, its ε schedule stretched over the budget),
        'random', 'evolution' or 'local_search'.
      budget: distinct blocks to evaluate; then ``done``.
      grammar: the NSC space (default ``nsc.Grammar()``, the paper's T = 23).
      seed: seeds the proposals.
      blocks_per_iteration: proposals per iteration (the strategy learns after each).
      max_staleness: iterations proposed ahead of the one being learned (for workers in
        parallel; 0: strict iterations).
      confirm: most evaluations of one block under the incumbent/challenger rule
        (``search.confirm``; 1: never re-evaluate); None: the strategy's default
        (``FAST_CONFIRM`` for 'qlearning_fast', 1 for the others).
      early_stop: rungs at which ``should_stop`` stops the losers (``EarlyStop``: steps as
        your trainer ``report``s them); None: off.
      settings: instead of the above, a whole ``SearchSettings`` (``strategy``... unused).
      **kwargs: passed to ``Study`` (``allow_config_change``, ``eval_cache``...).
    """
    if settings is None:
      settings = SearchSettings.for_study(strategy, budget, grammar or nsc.Grammar(), seed,
                                          blocks_per_iteration, max_staleness, confirm,
                                          early_stop)
    return cls(settings, workdir, **kwargs)

  @property
  def done(self) -> bool:
    """Nothing more will be proposed in this session: the budget is spent, or the schedule
    (or ``max_iterations``) has ended and every iteration is learned from."""
    return self._stopped or (self._learned >= self._last and not self._pending)

  @property
  def outstanding(self) -> list[Trial]:
    """The trials handed out and not told yet."""
    queued = {t.id for t in self._queue}
    return [t for i, t in self._out.items() if i not in queued]

  def ask(self) -> Trial | None:
    """The next proposed trial, or None while nothing can be handed out until a trial is
    told, and once the study is ``done``. A trial with ``known=True`` is a repeat already
    recorded: do not train it (``tell`` refuses it)."""
    if self._queue and not self._stopped:
      return self._queue.pop(0)
    return None

  def report(self, trial: Trial | int, step: int, value: float) -> None:
    """Stores ``value``, the score of ``trial`` after ``step`` (an epoch, say) of its
    training, for early stopping (``should_stop``); a second report of a step replaces the
    first. Reporting needs no early stopping: the values are kept in any case."""
    trial = self._trial(trial)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
      raise StudyError(f'the step of a report must be an integer >= 1, got {step!r}')
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)):
      raise StudyError(f'the value of a report must be a number, got {value!r}')
    self.store.record_report(trial.id, int(step), float(value))

  def should_stop(self, trial: Trial | int) -> bool:
    """Whether ``trial`` has scored below the line of a rung it reported (``report``): then
    stop training it and ``tell(trial, stopped=True)``. Always False without
    ``search.early_stop`` and for re-evaluations."""
    trial = self._trial(trial)
    lines = trial.stop_lines
    return lines is not None and lines.first_stop(self.store.reports(trial.id)) is not None

  def tell(self, trial: Trial | int, reward: float | None = None, *,
           failed: str | None = None, result: EvalResult | None = None,
           stopped: bool = False, **metrics: Any) -> EvalResult:
    """Records a trial's outcome; when it completes an iteration, the strategy learns.

    Args:
      trial: a trial from ``ask`` (or its id).
      reward: the reward, a finite number (higher is better).
      failed: instead of a reward, why the trial failed (the strategy learns
        ``search.failed_reward`` from it).
      result: instead of both, a whole ``EvalResult`` (what an executor returns).
      stopped: instead of a reward, the trial stopped where ``should_stop`` said: its reward
        is the score it reported at that rung.
      **metrics: measured fields of the record (``METRICS``: ``val_accuracy``,
        ``train_s``, ...).

    Returns:
      The result as recorded.

    Raises:
      StudyError: an unknown trial, one told already, a known one, a reward that is not a
        finite number, both or neither of ``reward`` and ``failed``, ``stopped`` for a trial
        not below a line, or an unknown metric; nothing is recorded then.
    """
    trial = self._trial(trial)
    if stopped:
      if reward is not None or failed is not None or result is not None:
        raise StudyError('tell stopped=True alone: its reward is the score at its rung')
      result = self._stopped_result(trial, metrics)
      metrics = {}
    result = self._result(trial, reward, failed, result, metrics)
    if result.ok and not result.rungs and trial.stop_lines is not None:
      result = self._with_rungs(trial, result)
    if trial.reevaluation:
      return self._tell_reevaluation(trial, result)
    del self._out[trial.id]
    del self._training[trial.canonical_key]
    self.finished_here += 1
    shared = False
    # Another search may have stored it first: take that one. A stopped result is not
    # shared: where it stops depends on this search's lines.
    if self.cache is not None and not result.stopped:
      result, shared = self.cache.put(trial.canonical_key, trial.seed, result)
    it = self._pending[trial.iteration]
    block_text = it.blocks[trial.position].to_text()
    self._record(it, trial.position, dataclasses.replace(result, block=block_text)
                 if shared else result, False, shared)
    for index, position in self._waiting.pop(trial.canonical_key, []):
      owner = self._pending[index]
      self._record(owner, position, dataclasses.replace(
          result, block=owner.blocks[position].to_text()), True)
    self._learn_ready()
    return result

  def summary(self) -> dict[str, Any]:
    """Counts of the whole study so far (all sessions)."""
    s = self.store
    saved = s.load_agent()
    return dict(iterations_done=saved[0] if saved else 0, candidates=s.count(),
                trained=s.count('WHERE cached = 0'), cached=s.count('WHERE cached = 1'),
                failed=s.count("WHERE status = 'failed'"), best=s.best(),
                trained_failed=s.count("WHERE cached = 0 AND status = 'failed'"),
                shared=s.count('WHERE cached = 0 AND shared = 1'),
                reevaluations=len(s.evaluations()), trainings=s.trainings(),
                stopped=s.count('WHERE cached = 0 AND stopped_at > 0'),
                kept=self.kept())

  def kept(self) -> confirm_lib.Kept | None:
    """The block this study hands its user, with its evidence (``confirm.kept_block``)."""
    return confirm_lib.kept_block(self.store)

  def close(self) -> None:
    """Closes the store and frees the workdir (told results are already saved)."""
    if self.store is not None:
      self.store.close()
      self.store = None
      self._lock.__exit__(None, None, None)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- the core ----------------------------------------------------------------------------

  def _budget_spent(self) -> bool:
    budget = self.settings.search.budget
    return bool(budget) and self.store.trainings() >= budget

  def _seed(self, key: str, replicate: int = 0) -> int:
    if self.cache is not None:  # the same for every search sharing the cache
      return eval_cache_lib.block_seed(key, replicate)
    return candidate_seed(self.settings.seed, key, replicate)

  def _advance(self) -> None:
    """Proposes every iteration the staleness allows; those past this session's last are
    proposed and stored for the resumption only. Nothing is learned here: an iteration is
    always proposed from the state after exactly (its index - S) iterations learned."""
    if self._stopped or self._learned >= self._last or self._budget_spent():
      return
    limit = min(self._learned + self._staleness, self._schedule.num_iterations - 1)
    while self._next_sample <= limit:
      self._begin(self._next_sample, hand_out=self._next_sample < self._last)
      self._next_sample += 1

  def _begin(self, index: int, hand_out: bool) -> None:
    """Proposes iteration ``index`` (or reloads what it proposed) and queues its trials."""
    epsilon = registry.proposal_epsilon(self.strategy, self._state, index, self._batch)
    sample_key, replay_key = jax.random.split(jax.random.fold_in(self._base_key, index))
    stored = self.store.load_sampled(index)
    if stored is None:
      asked, trajectories = self.strategy.ask(self.space, self._state, sample_key, self._batch,
                                              index)
      arrays = {'states': trajectories.states, 'lengths': trajectories.lengths}
      if asked is not self._state:  # an ask that moves the strategy: keep where it moved to
        arrays.update({f'state.{k}': v for k, v in state.state_arrays(asked).items()})
      self.store.save_sampled(index, arrays)
      self._state = asked
    else:
      trajectories = ql.Trajectories(jnp.asarray(stored['states']),
                                     jnp.asarray(stored['lengths']))
      # Iterations up to first + S - 1 were asked before the saved state was learned, so it
      # holds their asks; the next one was asked after: restore its ask.
      if index == self._asked_after_save and any(k.startswith('state.') for k in stored):
        self._state = state.restore_state(self.strategy, self.space, {
            k[len('state.'):]: v for k, v in stored.items() if k.startswith('state.')})
    if not hand_out:  # beyond this session's last iteration: proposed for the resumption
      return
    blocks = self.space.decode_batch(np.asarray(trajectories.states))
    it = self._pending[index] = _Iteration(index, epsilon, replay_key, trajectories, blocks,
                                           [None] * len(blocks), [False] * len(blocks))
    recorded = self.store.iteration_rows(index)
    lines = self._stop_lines(index)
    for position, block in enumerate(blocks):
      row = recorded.get(position)
      if row is not None and row.result.reusable:  # recorded before an interruption
        it.results[position] = row.result
        it.cached[position] = row.cached
        continue
      if row is not None:  # a transient failure (a lost worker, out of memory): train again
        self.store.forget(index, position)
      prepared = self._prepared(block)
      key = prepared.key if prepared is not None else canonical.canonical_key(block)
      trial = Trial(index * self._batch + position, index, position, block, key,
                    self._seed(key), prepared=prepared, stop_lines=lines)
      earlier = self.store.trained(key)
      if earlier is not None:
        result = dataclasses.replace(earlier.result, block=block.to_text())
        self._record(it, position, result, True)
        self._queue.append(dataclasses.replace(trial, known=True, result=result))
      elif key in self._training:  # an equivalent block is out: wait for its result
        self._waiting.setdefault(key, []).append((index, position))
      elif self.cache is not None and (shared := self.cache.get(key, trial.seed)) is not None:
        result = self._known_under_lines(dataclasses.replace(shared, block=block.to_text()),
                                         lines)
        self._record(it, position, result, False, True)
        self._queue.append(dataclasses.replace(trial, known=True, result=result))
      else:
        self.store.forget_reports(trial.id)  # handed out anew: it trains from the start
        self._training[key] = trial
        self._out[trial.id] = trial
        self._queue.append(trial)

  def _prepared(self, block: nsc.Block) -> PreparedBlock | None:
    if self._prepare is None:
      return None
    try:
      return self._prepare(block)
    except nsc.NSCError:  # trained as it is: the executor records why it is invalid
      return None

  def _record(self, it: _Iteration, position: int, result: EvalResult, was_cached: bool,
              shared: bool = False) -> None:
    it.results[position], it.cached[position] = result, was_cached
    self.store.record(it.index, position, it.epsilon, result, was_cached, shared)
    if self._on_recorded is not None:
      self._on_recorded(it.index, position, result)

  def _learn_ready(self) -> None:
    """Learns from every complete iteration in order, proposing what each allows."""
    while (not self._stopped and self._learned in self._pending
           and self._pending[self._learned].complete):
      it = self._pending[self._learned]
      if not it.confirmed:
        # In (iteration, position) order, so whether a search stops never depends on
        # timing; after recording (the failures are kept), before the agent learns from
        # them.
        for result, was_cached in zip(it.results, it.cached):
          if not was_cached:
            self._failures.see(result)
        self._failures.check()
        it.confirmed = True
      means = self._confirm_iteration(it) if self._confirm.active else {}
      if means is None:  # a re-evaluation is out: learn when it is told
        return
      del self._pending[self._learned]
      failed_reward = self.settings.search.failed_reward
      rewards = np.asarray([means.get(r.canonical_key, r.reward) if r.ok else failed_reward
                            for r in it.results], np.float32)
      self._state = self.strategy.tell(self.space, self._state, it.trajectories,
                                       jnp.asarray(rewards), it.replay_key)
      arrays = state.state_arrays(self._state)
      if self._incumbent is not None:
        arrays[_INCUMBENT] = np.asarray(self._incumbent)
      self.store.save_agent(it.index + 1, arrays)
      self._learned += 1
      if self._on_learned is not None:
        self._on_learned(Learned(it.index, it.epsilon, list(it.results), list(it.cached),
                                 self.finished_here, self.store.best()))
      if self._budget_spent():
        logging.info('budget of %d distinct candidates reached', self.settings.search.budget)
        self._stopped = True
        return
      if self._learned >= self._last:
        return
      self._advance()

  # -- the confirm rule ------------------------------------------------------------------

  def _confirm_iteration(self, it: _Iteration) -> dict[str, float] | None:
    """Runs the confirm rule over iteration ``it``'s new blocks, in position order, replaying
    the re-evaluations already stored; returns each evaluated block's mean reward when it is
    done, or None after handing out the next re-evaluation (``ask``)."""
    if self._reevaluation is not None:
      return None
    # What the confirmation began with, however many evaluations were made since.
    evidence, _ = confirm_lib.store_evidence(self.store, it.index)
    made = {(e.canonical_key, e.replicate): e for e in self.store.evaluations()
            if e.iteration == it.index}
    spent = evidence.total  # trainings so far, as the confirmation began
    budget = self.settings.search.budget
    incumbent = self._incumbent  # as saved after the iteration before
    seen = set()
    for result, was_cached in zip(it.results, it.cached):
      key = result.canonical_key
      if was_cached or key in seen or not result.ok or result.stopped:
        continue  # a stopped block is no challenger: it lost at a rung
      seen.add(key)
      if incumbent is None or incumbent not in evidence:
        incumbent = key
        continue
      while key != incumbent:
        action = evidence.action(self._confirm, key, incumbent)
        if action == confirm_lib.ACCEPT:
          incumbent = key
        if action in (confirm_lib.ACCEPT, confirm_lib.DROP):
          break
        if budget and spent >= budget:
          break  # the budget is spent: the incumbent stays
        target = key if action == confirm_lib.AGAIN else incumbent
        replicate = evidence.made(target)
        stored = made.get((target, replicate))
        if stored is None:
          stored = self._reevaluate(it, target, replicate)
          if stored is None:
            return None
        spent += 1
        evidence.add(target, stored.result.reward if stored.result.ok else None)
        if not stored.result.ok:
          break  # a failed re-evaluation ends the challenge; the incumbent stays
    self._incumbent = incumbent
    return {k: evidence.mean(k) for k in evidence.keys()}

  def _reevaluate(self, it: _Iteration, key: str, replicate: int):
    """Hands out re-evaluation ``replicate`` of ``key`` (returns None), or records and
    returns it at once when the shared evaluation cache holds it."""
    first = self.store.trained(key)
    seed = self._seed(key, replicate)
    if self.cache is not None and (shared := self.cache.get(key, seed)) is not None:
      evaluation = store_lib.Evaluation(key, replicate, it.index, seed, True,
                                        dataclasses.replace(shared, block=first.nsc))
      self.store.record_evaluation(evaluation)
      return evaluation
    block = first.result.parse_block()
    trial = Trial(-1 - len(self.store.evaluations()), it.index, -1, block, key, seed,
                  prepared=self._prepared(block), replicate=replicate)
    self._reevaluation = trial
    self._out[trial.id] = trial
    self._queue.append(trial)
    return None

  def _tell_reevaluation(self, trial: Trial, result: EvalResult) -> EvalResult:
    del self._out[trial.id]
    self._reevaluation = None
    self.finished_here += 1
    if not result.reusable:  # a lost worker, out of memory: hand it out again
      logging.warning('re-evaluation %d of %s failed (%s): it is handed out again',
                      trial.replicate, trial.block.to_text(), result.failure_reason)
      self._out[trial.id] = trial
      self._queue.append(trial)
      self._reevaluation = trial
      return result
    shared = False
    if self.cache is not None:
      result, shared = self.cache.put(trial.canonical_key, trial.seed, result)
    self.store.record_evaluation(store_lib.Evaluation(
        trial.canonical_key, trial.replicate, trial.iteration, trial.seed, shared,
        dataclasses.replace(result, block=trial.block.to_text())))
    if self._on_recorded is not None:
      self._on_recorded(trial.iteration, -1, result)
    self._learn_ready()
    return result

  # -- early stopping ---------------------------------------------------------------------

  def _stop_lines(self, index: int) -> rungs_lib.StopLines | None:
    """The lines of iteration ``index``'s trials: from the rung scores of the candidates
    trained in iterations before ``index - S`` (all learned from whenever ``index`` is
    proposed, so the same however often it is proposed)."""
    early_stop = self.settings.search.early_stop
    if not early_stop.active:
      return None
    before = index - self._staleness
    history = [c.rung_scores for c in self.store.candidates()
               if c.iteration < before and not c.cached and c.ok]
    return rungs_lib.stop_lines(history, early_stop)

  def _with_rungs(self, trial: Trial, result: EvalResult) -> EvalResult:
    """``result`` keeping the scores ``trial``'s trainer reported at its rungs."""
    reports = self.store.reports(trial.id)
    scores = {r: reports[r] for r in trial.stop_lines.rungs if r in reports}
    return dataclasses.replace(result, rungs=results_lib.encode_scores(scores))

  def _stopped_result(self, trial: Trial, metrics: dict[str, Any]) -> EvalResult:
    lines = trial.stop_lines
    reports = self.store.reports(trial.id)
    rung = lines.first_stop(reports) if lines is not None else None
    if rung is None:
      raise StudyError(f'trial {trial.id} is not below the line of a rung it reported '
                       '(should_stop is False): tell it a reward')
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
      raise StudyError(f'unknown metrics {", ".join(unknown)} (known: {", ".join(METRICS)})')
    scores = {r: reports[r] for r in lines.rungs if r in reports and r <= rung}
    return EvalResult(block=trial.block.to_text(), canonical_key=trial.canonical_key,
                      status='ok', reward=reports[rung], stopped_at=rung,
                      rungs=results_lib.encode_scores(scores), **metrics)

  def _known_under_lines(self, result: EvalResult, lines: rungs_lib.StopLines | None
                         ) -> EvalResult:
    """A result read from the shared cache (trained to the end, by another search) as this
    search would have recorded it: stopped at the first rung of ``lines`` its rung scores
    fall below (its accuracy there is the reward plus the block's fixed penalty)."""
    if lines is None or not result.ok or result.stopped:
      return result
    scores = result.rung_scores
    rung = lines.first_stop(scores)
    if rung is None:
      return result
    penalty = result.val_accuracy - result.reward
    kept = {r: v for r, v in scores.items() if r <= rung}
    return dataclasses.replace(result, stopped_at=rung, reward=scores[rung],
                               val_accuracy=scores[rung] + penalty,
                               rungs=results_lib.encode_scores(kept))

  def _trial(self, trial: Trial | int) -> Trial:
    tid = trial.id if isinstance(trial, Trial) else trial
    if isinstance(trial, Trial) and trial.known:
      raise StudyError(f'trial {tid} is a repeat whose result is known: it is not told')
    if not isinstance(tid, (int, np.integer)) or isinstance(tid, bool):
      raise StudyError(f'not a trial: {trial!r}')
    if tid not in self._out or any(t.id == tid for t in self._queue):
      recorded = self.store.iteration_rows(tid // self._batch).get(tid % self._batch) \
          if tid >= 0 else None
      if recorded is not None:
        raise StudyError(f'trial {tid} was told already (reward {recorded.reward})')
      raise StudyError(f'unknown trial id {tid}: not handed out by this study')
    return self._out[tid]

  def _result(self, trial: Trial, reward, failed, result, metrics) -> EvalResult:
    if result is not None:
      if reward is not None or failed is not None or metrics:
        raise StudyError('tell a result, or a reward (with metrics), or failed=: one of them')
      return result
    if (reward is None) == (failed is None):
      raise StudyError(f'tell trial {trial.id} a reward or failed="reason", not '
                       f'{"both" if reward is not None else "neither"}')
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
      raise StudyError(f'unknown metric{"s" if len(unknown) > 1 else ""} {", ".join(unknown)}'
                       f' (known: {", ".join(METRICS)})')
    base = dict(block=trial.block.to_text(), canonical_key=trial.canonical_key)
    if failed is not None:
      if not isinstance(failed, str) or not failed.strip():
        raise StudyError(f'failed= must say why (a non-empty string), got {failed!r}')
      return EvalResult(**base, status='failed', failure_reason=failed.strip(), **metrics)
    if isinstance(reward, (bool, np.bool_)) or not isinstance(
        reward, (int, float, np.integer, np.floating)) or not math.isfinite(float(reward)):
      raise StudyError(f'the reward of trial {trial.id} must be a finite number, got '
                       f'{reward!r}')
    return EvalResult(**base, status='ok', reward=float(reward), **metrics)
