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
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blockqnn_jax import nb201
from blockqnn_jax import strategies as st


def _search_one(key, accuracies, budget, max_iterations, space, strategy, batch: int,
                trace_len: int):
  """One search as a ``while_loop``; returns (trace, queries, iterations)."""

  def cond(carry):
    *_, count, it = carry
    return (count < budget) & (it < max_iterations)

  def body(carry):
    key, state, seen, trace, count, it = carry
    key, ask_key, tell_key = jax.random.split(key, 3)
    state, proposals = strategy.ask(space, state, ask_key, batch, it)
    codes = nb201.path_codes(proposals.states)
    acc = accuracies[codes]

    def record(carry, x):  # in proposal order: a new cell spends one unit of budget
      seen, trace, count = carry
      code, value = x
      new = ~seen[code] & (count < budget)
      best = jnp.where(count > 0, trace[jnp.maximum(count - 1, 0)], -jnp.inf)
      trace = trace.at[count].set(jnp.where(new, jnp.maximum(best, value), trace[count]),
                                  mode='drop')
      return (seen.at[code].set(seen[code] | new), trace, count + new), None

    (seen, trace, count), _ = jax.lax.scan(record, (seen, trace, count), (codes, acc))
    state = strategy.tell(space, state, proposals, acc / 100.0, tell_key)
    return key, state, seen, trace, count, it + 1

  init_key, key = jax.random.split(key)
  carry = (key, strategy.init(space, init_key, budget=budget), jnp.zeros(nb201.NUM_CELLS, bool),
           jnp.full(trace_len, -jnp.inf, jnp.float32), jnp.int32(0), jnp.int32(0))
  *_, trace, count, it = jax.lax.while_loop(cond, body, carry)
  return trace, count, it


# Budgets, datasets and seeds are data: one compilation per strategy serves a whole sweep,
# and every (dataset, budget, seed) search runs as one lane of a single vmapped loop.
@functools.partial(jax.jit, static_argnames=('strategy', 'batch', 'trace_len'))
def _search_lanes(keys, tables, dataset, budget, max_iterations, space, strategy, batch,
                  trace_len):
  def one(key, d, b, cap):
    return _search_one(key, tables[d], b, cap, space, strategy, batch, trace_len)
  return jax.vmap(one)(keys, dataset, budget, max_iterations)


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """Searches over datasets, budgets and seeds.

  Attributes:
    traces: ``(datasets, budgets, seeds, max budget)`` best-so-far per distinct query; past
      a search's budget, or where it hit the iteration cap before spending its budget, its
      last best is carried forward.
    queries: ``(datasets, budgets, seeds)`` distinct cells queried (``< budget`` only at the
      cap).
    iterations: ``(datasets, budgets, seeds)`` asks made.
  """

  traces: np.ndarray
  queries: np.ndarray
  iterations: np.ndarray

  def best(self, budget_index: int, budget: int, dataset_index: int = 0) -> np.ndarray:
    """``(seeds,)`` best accuracy within ``budget`` distinct cells of one run."""
    return self.traces[dataset_index, budget_index, :, budget - 1]


def search_batch(strategy: st.Strategy, accuracies, budgets, seeds: Sequence[int],
                 batch: int = 1, max_iterations_factor: int = 50) -> SearchResult:
  """Runs one search per (dataset, budget, seed), all in one jitted, vmapped call.

  Args:
    strategy: any strategy (hashable: it is a static argument). Each search's budget is
      also passed to ``strategy.init``, so budget-sized strategies size themselves to it.
    accuracies: ``(15625,)`` or ``(datasets, 15625)`` accuracies (percent) by cell code
      (``NB201Table.by_code``).
    budgets: an int or a sequence: distinct cells each search may query.
    seeds: one search per seed (its PRNG key is ``PRNGKey(seed)``, shared across datasets
      and budgets).
    batch: proposals per ask.
    max_iterations_factor: cap on asks, as a multiple of ``ceil(budget / batch)`` (a search
      whose proposals are all known cells would otherwise never end).

  Returns:
    A ``SearchResult``; its leading axes are squeezed neither for one dataset nor budget.
  """
  tables = np.atleast_2d(np.asarray(accuracies, np.float32))
  budgets = np.atleast_1d(np.asarray(budgets, np.int32))
  if budgets.min() < 1 or budgets.max() > nb201.NUM_CELLS:
    raise ValueError(f'budgets {budgets.tolist()} must be in [1, {nb201.NUM_CELLS}]')
  seeds = np.asarray(seeds, np.uint32)
  shape = (tables.shape[0], budgets.size, seeds.size)
  dataset, budget_index, seed = (a.ravel() for a in np.indices(shape))
  budget = budgets[budget_index]
  caps = np.asarray([max_iterations_factor * st.planned_iterations(int(b), batch)
                     for b in budget], np.int32)
  keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds[seed]))
  trace_len = int(budgets.max())
  traces, queries, iterations = _search_lanes(
      keys, jnp.asarray(tables), jnp.asarray(dataset), jnp.asarray(budget), jnp.asarray(caps),
      nb201.build_nb201_space(), strategy, batch, trace_len)
  # Carry the last best past an early stop and past the budget.
  traces = np.maximum.accumulate(np.asarray(traces), axis=1)
  return SearchResult(traces=traces.reshape(*shape, trace_len),
                      queries=np.asarray(queries).reshape(shape),
                      iterations=np.asarray(iterations).reshape(shape))


def search(strategy: st.Strategy, table: nb201.NB201Table, budget: int, seed: int,
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
               max_trials_factor: int = 20) -> np.ndarray:
  """Optuna's ``TPESampler`` (default settings, seeded) until ``budget`` distinct cells.

  Each edge is one categorical parameter over the 5 ops; a trial that repeats a known cell
  gets its stored accuracy and costs nothing. Returns the best-so-far trace ``(budget,)``
  (its last value carried forward if ``max_trials_factor * budget`` trials end it early).

  Raises:
    ImportError: Optuna is not installed (``pip install blockqnn_jax[bench]``).
  """
  import optuna  # pylint: disable=g-import-not-at-top
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  study = optuna.create_study(direction='maximize',
                              sampler=optuna.samplers.TPESampler(seed=seed))
  choices = list(range(nb201.NUM_OPS))
  seen: dict[int, float] = {}
  trace: list[float] = []
  for _ in range(max_trials_factor * budget):
    if len(seen) >= budget:
      break
    trial = study.ask()
    ops = [trial.suggest_categorical(f'edge{e}', choices) for e in range(nb201.NUM_EDGES)]
    code = nb201.cell_code(ops)
    if code not in seen:
      seen[code] = float(accuracies[code])
      trace.append(max(trace[-1], seen[code]) if trace else seen[code])
    study.tell(trial, seen[code])
  return np.pad(np.asarray(trace), (0, budget - len(trace)), mode='edge')
