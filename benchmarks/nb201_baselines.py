"""Any search strategy on the NAS-Bench-201 table, measured in DISTINCT cells queried.

Every search returns its *trace*: the best accuracy found after each distinct query
(``trace[k]`` is the best over the first ``k + 1`` distinct cells). Re-querying a known cell
is free, as it is for a real search that caches its trained networks.

* ``search_batch`` — any ``strategies`` strategy (Q-learning, random, aging evolution, local
  search) through its ask/tell interface on ``nb201.build_nb201_space()``, reward =
  accuracy / 100. The whole search, lookup and distinct-cell bookkeeping included, runs in
  one jitted ``while_loop``, vmapped over seeds: the strategies' per-ask work is tiny, so
  per-call dispatch, not arithmetic, is what costs on a CPU.
* ``tpe_search`` — Optuna's TPE sampler (an optional dependency: the ``bench`` extra), one
  categorical parameter per edge; what a user might reach for instead of a NAS codebase.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import nb201_space as nb201
from blockqnn_jax.settings import agent
from blockqnn_jax.strategies import confirm as cf
from blockqnn_jax.strategies import interface
from blockqnn_jax.strategies import state as state_lib

# fold_in stream of a search's key for its evaluation noise: apart from the strategy's own
# draws, so a strategy proposes what it did without noise, and every strategy of one seed
# meets the same noise on the same (cell, evaluation).
_NOISE_STREAM = 0x6E6F6973


class _Evidence(NamedTuple):
  """A search's record of its trainings, per cell code (dense: the space is small)."""

  mean: jax.Array  # (cells,) mean observed accuracy
  m2: jax.Array  # (cells,) sum of squared deviations from it (Welford)
  n: jax.Array  # (cells,) evaluations
  noise_ss: jax.Array  # () pooled within-cell sum of squares
  noise_df: jax.Array  # () its degrees of freedom
  incumbent: jax.Array  # () the kept cell (-1: none yet)
  count: jax.Array  # () trainings so far: the budget spent
  best_trace: jax.Array  # (trace_len,) best TRUE accuracy trained, after each training
  kept_trace: jax.Array  # (trace_len,) true accuracy of the kept cell, after each training


def _select(flag, a, b):
  return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


def _search_one(key, accuracies, sigma, budget, max_iterations, space, strategy, batch: int,
                trace_len: int, confirm: agent.Confirm):
  """One search as a ``while_loop``; returns (best trace, kept trace, trainings, asks).

  A training of cell ``c`` observes ``accuracies[c]`` plus ``sigma`` × a normal draw of its
  own (run, cell, evaluation); a proposal of a cell already trained is free and gets its
  mean. Without ``confirm`` the kept cell is the best observed; with it, ``confirm``'s
  incumbent, and each newly trained cell is a challenger (``confirm.next_action``) before
  the strategy learns the iteration from the cells' mean observations.
  """
  noise_key = jax.random.fold_in(key, _NOISE_STREAM)

  def incumbent(ev, code):
    kept = ev.kept_trace.at[ev.count - 1].set(accuracies[code], mode='drop')
    return ev._replace(incumbent=code, kept_trace=kept)

  def train(ev, code):  # one more evaluation of ``code``, one unit of budget
    draw = jax.random.normal(jax.random.fold_in(jax.random.fold_in(noise_key, code),
                                                ev.n[code]))
    x = accuracies[code] + sigma * draw
    mean, m2, n, ss = cf.noise_update(ev.mean[code], ev.m2[code], ev.n[code], x, xp=jnp)
    best = jnp.where(ev.count > 0, ev.best_trace[jnp.maximum(ev.count - 1, 0)], -jnp.inf)
    ev = ev._replace(
        mean=ev.mean.at[code].set(mean), m2=ev.m2.at[code].set(m2), n=ev.n.at[code].set(n),
        noise_ss=ev.noise_ss + ss, noise_df=ev.noise_df + (ev.n[code] > 0),
        count=ev.count + 1,
        best_trace=ev.best_trace.at[ev.count].set(jnp.maximum(best, accuracies[code]),
                                                  mode='drop'),
        kept_trace=ev.kept_trace.at[ev.count].set(
            accuracies[jnp.maximum(ev.incumbent, 0)], mode='drop'))
    # The first cell is kept until another beats it; without the rule, the best observed.
    better = (ev.incumbent < 0) | (not confirm.active) & (x > ev.mean[ev.incumbent])
    return _select(better, incumbent(ev, code), ev)

  def challenge(ev, code):  # the rule, until the challenger is accepted or dropped
    def cond(carry):
      return ~carry[1]

    def body(carry):
      ev, _ = carry
      inc = ev.incumbent
      action = cf.next_action(confirm, ev.mean[code], ev.n[code], ev.mean[inc], ev.n[inc],
                              ev.noise_ss, ev.noise_df, xp=jnp)
      again = ((action == cf.AGAIN) | (action == cf.AGAIN_INCUMBENT)) & (ev.count < budget)
      target = jnp.where(action == cf.AGAIN, code, inc)
      ev = _select(again, train(ev, target), ev)
      ev = _select(action == cf.ACCEPT, incumbent(ev, code), ev)
      return ev, ~again

    return jax.lax.while_loop(cond, body, (ev, code == ev.incumbent))[0]

  def cond(carry):
    _, _, ev, it = carry
    return (ev.count < budget) & (it < max_iterations)

  def body(carry):
    key, state, ev, it = carry
    key, ask_key, tell_key = jax.random.split(key, 3)
    state, proposals = strategy.ask(space, state, ask_key, batch, it)
    codes = nb201.path_codes(proposals.states)

    def first(ev, code):  # in proposal order: a new cell spends one unit of budget
      new = (ev.n[code] == 0) & (ev.count < budget)
      return _select(new, train(ev, code), ev), new

    ev, new = jax.lax.scan(first, ev, codes)
    if confirm.active:
      ev, _ = jax.lax.scan(lambda ev, x: (_select(x[1], challenge(ev, x[0]), ev), None),
                           ev, (codes, new))
    rewards = jnp.where(ev.n[codes] > 0, ev.mean[codes], accuracies[codes])
    state = strategy.tell(space, state, proposals, rewards / 100.0, tell_key)
    return key, state, ev, it + 1

  init_key, key = jax.random.split(key)
  cells = accuracies.shape[0]
  ev = _Evidence(mean=jnp.zeros(cells, jnp.float32), m2=jnp.zeros(cells, jnp.float32),
                 n=jnp.zeros(cells, jnp.int32), noise_ss=jnp.float32(0),
                 noise_df=jnp.int32(0), incumbent=jnp.int32(-1), count=jnp.int32(0),
                 best_trace=jnp.full(trace_len, -jnp.inf, jnp.float32),
                 kept_trace=jnp.full(trace_len, -jnp.inf, jnp.float32))
  carry = (key, strategy.init(space, init_key, budget=budget), ev, jnp.int32(0))
  _, _, ev, it = jax.lax.while_loop(cond, body, carry)
  return ev.best_trace, ev.kept_trace, ev.count, it


# Budgets, datasets and seeds are data: one compilation per strategy serves a whole sweep,
# and every (dataset, budget, seed) search runs as one lane of a single vmapped loop.
@functools.partial(jax.jit, static_argnames=('strategy', 'batch', 'trace_len', 'confirm'))
def _search_lanes(keys, tables, sigmas, dataset, budget, max_iterations, space, strategy, batch,
                  trace_len, confirm):
  def one(key, d, b, cap):
    return _search_one(key, tables[d], sigmas[d], b, cap, space, strategy, batch, trace_len,
                       confirm)
  return jax.vmap(one)(keys, dataset, budget, max_iterations)


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """Searches over datasets, budgets and seeds.

  Attributes:
    traces: ``(datasets, budgets, seeds, max budget)`` the best TRUE accuracy among the cells
      trained, after each training; past a search's budget, or where it hit the iteration
      cap before spending its budget, its last value is carried forward.
    kept: the same shape: the true accuracy of the cell the search would hand over (the best
      observed, or the ``Confirm`` rule's incumbent) after each training. Without noise and
      without the rule it equals ``traces``.
    queries: ``(datasets, budgets, seeds)`` trainings (``< budget`` only at the cap): distinct
      cells, plus the repeated evaluations of the rule.
    iterations: ``(datasets, budgets, seeds)`` asks made.
  """

  traces: np.ndarray
  kept: np.ndarray
  queries: np.ndarray
  iterations: np.ndarray

  def best(self, budget_index: int, budget: int, dataset_index: int = 0) -> np.ndarray:
    """``(seeds,)`` best accuracy within ``budget`` trainings of one run."""
    return self.traces[dataset_index, budget_index, :, budget - 1]


def noise_sigmas(tables: np.ndarray, scale: float, top: float = 0.1) -> np.ndarray:
  """``(datasets,)`` noise σ: ``scale`` × the standard deviation of each table's best
  ``top`` fraction of cells (the spread a search must resolve near the optimum)."""
  tables = np.atleast_2d(np.asarray(tables, np.float64))
  k = max(2, int(round(top * tables.shape[1])))
  best = -np.sort(-tables, axis=1)[:, :k]
  return (scale * best.std(axis=1)).astype(np.float32)


def search_batch(strategy: interface.Strategy, accuracies, budgets, seeds: Sequence[int],
                 batch: int = 1, max_iterations_factor: int = 50, noise: float = 0.0,
                 confirm: agent.Confirm = agent.OFF) -> SearchResult:
  """Runs one search per (dataset, budget, seed), all in one jitted, vmapped call.

  Args:
    strategy: any strategy (hashable: it is a static argument). Each search's budget is
      also passed to ``strategy.init``, so budget-sized strategies size themselves to it.
    accuracies: ``(15625,)`` or ``(datasets, 15625)`` accuracies (percent) by cell code
      (``NB201Table.by_code``).
    budgets: an int or a sequence: trainings each search may make.
    seeds: one search per seed (its PRNG key is ``PRNGKey(seed)``, shared across datasets
      and budgets).
    batch: proposals per ask.
    max_iterations_factor: cap on asks, as a multiple of ``ceil(budget / batch)`` (a search
      whose proposals are all known cells would otherwise never end).
    noise: each training observes its cell's accuracy plus Gaussian noise of σ = ``noise``
      × the standard deviation of the table's best 10% (``noise_sigmas``), drawn per (seed,
      cell, evaluation); 0: the table itself.
    confirm: the incumbent/challenger rule (``strategies.confirm``); ``OFF`` keeps the best
      observed cell and never trains one twice.

  Returns:
    A ``SearchResult``; its leading axes are squeezed neither for one dataset nor budget.
  """
  tables = np.atleast_2d(np.asarray(accuracies, np.float32))
  budgets = np.atleast_1d(np.asarray(budgets, np.int32))
  if budgets.min() < 1 or budgets.max() > nb201.NUM_CELLS:
    raise ValueError(f'budgets {budgets.tolist()} must be in [1, {nb201.NUM_CELLS}]')
  if noise < 0:
    raise ValueError(f'noise must be >= 0, got {noise}')
  seeds = np.asarray(seeds, np.uint32)
  shape = (tables.shape[0], budgets.size, seeds.size)
  dataset, budget_index, seed = (a.ravel() for a in np.indices(shape))
  budget = budgets[budget_index]
  caps = np.asarray([max_iterations_factor * state_lib.planned_iterations(int(b), batch)
                     for b in budget], np.int32)
  keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds[seed]))
  trace_len = int(budgets.max())
  traces, kept, queries, iterations = _search_lanes(
      keys, jnp.asarray(tables), jnp.asarray(noise_sigmas(tables, noise)), jnp.asarray(dataset),
      jnp.asarray(budget), jnp.asarray(caps), nb201.build_nb201_space(), strategy, batch,
      trace_len, confirm)
  # Carry the last value past an early stop and past the budget.
  traces = np.maximum.accumulate(np.asarray(traces), axis=1)
  kept = np.asarray(kept)
  filled = np.maximum.accumulate(np.where(np.isfinite(kept), np.arange(trace_len), 0), axis=1)
  kept = np.take_along_axis(kept, filled, axis=1)
  return SearchResult(traces=traces.reshape(*shape, trace_len),
                      kept=kept.reshape(*shape, trace_len),
                      queries=np.asarray(queries).reshape(shape),
                      iterations=np.asarray(iterations).reshape(shape))


def search(strategy: interface.Strategy, table: nb201.NB201Table, budget: int, seed: int,
           dataset: str = 'cifar10', batch: int = 1) -> np.ndarray:
  """One search; returns its best-so-far trace, ``(queries,)`` (<= budget)."""
  result = search_batch(strategy, table.by_code(dataset), budget, [seed], batch)
  return result.traces[0, 0, 0, :int(result.queries[0, 0, 0])]


# -- TPE (optional) ---------------------------------------------------------------------------

def tpe_available() -> bool:
  try:
    import optuna  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  del optuna  # only its presence matters here
  return True


def tpe_search(accuracies: np.ndarray, budget: int, seed: int,
               max_trials_factor: int = 20, sigma: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """Optuna's ``TPESampler`` (default settings, seeded) until ``budget`` distinct cells.

  Each edge is one categorical parameter over the 5 ops; a trial that repeats a known cell
  gets its stored observation and costs nothing. A training observes the cell's accuracy
  plus Gaussian noise of ``sigma`` (a generator seeded by ``seed``). Returns the traces
  ``(budget,)`` of the best true accuracy trained and of the true accuracy of the best
  observed cell (the last value carried forward if ``max_trials_factor * budget`` trials end
  it early).

  Raises:
    ImportError: Optuna is not installed (``pip install blockqnn_jax[bench]``).
  """
  import optuna  # pylint: disable=g-import-not-at-top
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  study = optuna.create_study(direction='maximize',
                              sampler=optuna.samplers.TPESampler(seed=seed))
  noise = np.random.default_rng([seed, 0x6E6F6973])
  choices = list(range(nb201.NUM_OPS))
  seen: dict[int, float] = {}
  best: list[float] = []
  kept: list[float] = []
  kept_code = None
  for _ in range(max_trials_factor * budget):
    if len(seen) >= budget:
      break
    trial = study.ask()
    ops = [trial.suggest_categorical(f'edge{e}', choices) for e in range(nb201.NUM_EDGES)]
    code = nb201.cell_code(ops)
    if code not in seen:
      true = float(accuracies[code])
      seen[code] = true + (sigma * noise.standard_normal() if sigma else 0.0)
      best.append(max(best[-1], true) if best else true)
      if kept_code is None or seen[code] > seen[kept_code]:
        kept_code = code
      kept.append(float(accuracies[kept_code]))
    study.tell(trial, seen[code])
  pad = lambda trace: np.pad(np.asarray(trace), (0, budget - len(trace)), mode='edge')
  return pad(best), pad(kept)
