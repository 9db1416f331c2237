"""BlockQNN's agent vs random search and regularized evolution on NAS-Bench-201 (tabular).

For each dataset, method and budget (distinct cells queried), the mean ± std over seeds of
the best test accuracy found, and the regret to the table's optimum. The Q-learner runs in
variants that each drop one of the paper's choices (replay, reward shaping, the ε schedule),
plus one with a larger learning rate. Random search and evolution do not depend on the
budget, so one run per seed at the largest budget gives every budget's figure (its prefix);
the agent's ε schedule is scaled to the budget, so it runs once per budget.

  python -m benchmarks.nb201                          # 100 seeds, budgets 50,100,150,300
  python -m benchmarks.nb201 --seeds=10 --datasets=cifar10 --plot=/tmp/nb201.png

Exits 0 with a message when the table is absent.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from absl import app
from absl import flags
import numpy as np

from blockqnn_jax import baselines as bl
from blockqnn_jax import nb201
from blockqnn_jax import qlearning as ql

_TABLE_NAME = 'nb201-tss-200ep-test-acc.csv'

_TABLE = flags.DEFINE_string(
    'table', None, 'The NAS-Bench-201 CSV; default: $BLOCKQNN_SHARED_DATA or ../shared/data '
    f'beside the repository, file {_TABLE_NAME}.')
_DATASETS = flags.DEFINE_list('datasets', list(nb201.DATASETS), 'Datasets to search.')
_BUDGETS = flags.DEFINE_list('budgets', ['50', '100', '150', '300'], 'Distinct-cell budgets.')
_SEEDS = flags.DEFINE_integer('seeds', 100, 'Searches per (dataset, method, budget).')
_BLOCKS = flags.DEFINE_integer('blocks_per_iteration', 8, 'Agent: cells per iteration.')
_FIXED_EPSILON = flags.DEFINE_float('fixed_epsilon', 0.5, 'Agent: ε of the fixed-ε variant.')
_FAST_ALPHA = flags.DEFINE_float('fast_alpha', 0.1, 'Agent: α of the large-α variant '
                                 '(0 drops the variant).')
_EVOLUTION_P = flags.DEFINE_integer('population', 10, 'Evolution: population P.')
_EVOLUTION_S = flags.DEFINE_integer('sample', 3, 'Evolution: tournament size S.')
_PLOT = flags.DEFINE_string('plot', None, 'Where to write the best-so-far plot (PNG).')


def default_table_path() -> Path:
  shared = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
  return Path(os.environ.get('BLOCKQNN_SHARED_DATA', shared)) / _TABLE_NAME


def agent_variants(blocks: int, fixed_epsilon: float,
                   fast_alpha: float) -> dict[str, bl.QLearnerParams]:
  """The paper's agent and the variants that each change one of its choices."""
  full = bl.QLearnerParams(blocks_per_iteration=blocks)
  variants = {
      'Q full': full,
      'Q no replay': dataclasses.replace(
          full, config=dataclasses.replace(full.config, replay_size=0)),
      'Q no shaping': dataclasses.replace(
          full, config=dataclasses.replace(full.config, reward_shaping=False)),
      f'Q fixed eps={fixed_epsilon:g}': dataclasses.replace(full, fixed_epsilon=fixed_epsilon),
  }
  if fast_alpha > 0:
    variants[f'Q alpha={fast_alpha:g}'] = dataclasses.replace(
        full, config=ql.QLearningConfig(alpha=fast_alpha))
  return variants


def run_dataset(table: nb201.NB201Table, dataset: str, budgets: list[int], seeds: int,
                variants: dict[str, bl.QLearnerParams],
                evolution: bl.EvolutionParams):
  """Runs every method on one dataset.

  Returns:
    ``(results, traces)``: method → budget → ``(seeds,)`` best accuracy found, and method →
    ``(max budget,)`` mean best-so-far trace (the agent's from its largest-budget runs).
  """
  top = max(budgets)
  random_traces = np.stack([bl.random_search(nb201.TabularEvaluator(table, dataset), top,
                                             seed) for seed in range(seeds)])
  evolution_traces = np.stack([
      _pad(bl.regularized_evolution(nb201.TabularEvaluator(table, dataset), top, seed,
                                    evolution), top) for seed in range(seeds)])
  results = {'random': {b: random_traces[:, b - 1] for b in budgets},
             'evolution': {b: evolution_traces[:, b - 1] for b in budgets}}
  traces = {'random': random_traces.mean(0), 'evolution': evolution_traces.mean(0)}
  accuracies = table.by_code(dataset)
  for name, params in variants.items():
    results[name] = {}
    for budget in budgets:
      run = bl.qlearning_search_batch(accuracies, budget, range(seeds), params, trace_len=top)
      results[name][budget] = run.traces[:, -1]
      short = int((run.queries < budget).sum())
      if short:
        print(f'  note: {name} budget {budget}: {short}/{seeds} searches hit the '
              'iteration cap before spending the budget')
      if budget == top:
        traces[name] = run.traces.mean(0)
  return results, traces


def _pad(trace: np.ndarray, length: int) -> np.ndarray:
  return np.pad(trace, (0, length - trace.size), mode='edge')


def print_table(dataset: str, optimum: float, results, budgets: list[int]) -> None:
  print(f'\n{dataset}: best test accuracy found (mean ± std over seeds), regret to the '
        f'optimum {optimum:.2f} in brackets')
  print(f'{"method":<22}' + ''.join(f'{f"budget {b}":>24}' for b in budgets))
  for name, by_budget in results.items():
    cells = [f'{v.mean():6.2f} ± {v.std():4.2f} ({optimum - v.mean():4.2f})'
             for v in (by_budget[b] for b in budgets)]
    print(f'{name:<22}' + ''.join(f'{c:>24}' for c in cells))


def plot(path: str, traces_by_dataset, optima, results_by_dataset, budgets) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  datasets = list(traces_by_dataset)
  fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
  for ax, dataset in zip(axes[0], datasets):
    for name, trace in traces_by_dataset[dataset].items():
      line, = ax.plot(np.arange(1, trace.size + 1), trace, label=name, lw=1.2)
      if name.startswith('Q'):  # the agent's schedule depends on the budget: its own points
        means = [results_by_dataset[dataset][name][b].mean() for b in budgets]
        ax.plot(budgets, means, 'o', color=line.get_color(), ms=3)
    ax.axhline(optima[dataset], color='k', ls=':', lw=0.8, label='optimum')
    ax.set_title(dataset)
    ax.set_xlabel('distinct cells queried')
    ax.set_ylabel('best test accuracy (%)')
    low = min(t[min(9, t.size - 1)] for t in traces_by_dataset[dataset].values())
    ax.set_ylim(low, optima[dataset] + 0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f'\nplot written to {path}')


def main(argv):
  del argv
  path = Path(_TABLE.value) if _TABLE.value else default_table_path()
  if not path.exists():
    print(f'NAS-Bench-201 table not found at {path}: nothing to benchmark.')
    return 0
  start = time.perf_counter()
  table = nb201.NB201Table.load(path)
  budgets = sorted(int(b) for b in _BUDGETS.value)
  variants = agent_variants(_BLOCKS.value, _FIXED_EPSILON.value, _FAST_ALPHA.value)
  evolution = bl.EvolutionParams(population=_EVOLUTION_P.value, sample=_EVOLUTION_S.value)
  print(f'seeds={_SEEDS.value} budgets={budgets} blocks/iteration={_BLOCKS.value} '
        f'evolution P={evolution.population} S={evolution.sample}')
  traces, optima, all_results = {}, {}, {}
  for dataset in _DATASETS.value:
    t0 = time.perf_counter()
    results, traces[dataset] = run_dataset(table, dataset, budgets, _SEEDS.value, variants,
                                           evolution)
    optima[dataset], all_results[dataset] = table.optimum(dataset), results
    print_table(dataset, optima[dataset], results, budgets)
    print(f'({time.perf_counter() - t0:.1f} s)')
  if _PLOT.value:
    plot(_PLOT.value, traces, optima, all_results, budgets)
  print(f'\ntotal {time.perf_counter() - start:.1f} s')
  return 0


if __name__ == '__main__':
  app.run(main)
