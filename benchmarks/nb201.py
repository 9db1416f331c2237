"""Search strategies on NAS-Bench-201 (tabular), measured in DISTINCT cells queried.

For each strategy, dataset and budget, the mean ± std over seeds of the best test accuracy
found within that many distinct cells (repeats are free). Strategies: BlockQNN's agent with
the paper's settings (``qlearning_paper``, its ε schedule shortened to the budget), the fast
preset that goes beyond the paper (``qlearning_fast``, sized to the budget), random search,
aging evolution, local search, and Optuna's TPE when Optuna is installed (the ``bench``
extra). Every strategy but TPE runs through ``strategies``' ask/tell interface, all
(dataset, budget, seed) searches of one strategy in a single jitted, vmapped loop.

Strategies that do not depend on the budget (random, evolution, local search, TPE) run once
at the largest budget and every smaller budget reads its prefix; the Q-learners size their
schedule to the budget, so each budget is its own search. ``--ablations`` adds one variant
of the fast preset per ingredient it changes back.

  python -m benchmarks.nb201 --table=../shared/data/nb201-tss-200ep-test-acc.csv \\
      --json=/tmp/nb201.json                       # 100 seeds, budgets 50,100,150,300
  python -m benchmarks.nb201 --seeds=10 --datasets=cifar10 --ablations=all

A noisy reward (``--noise=K``): each training of a cell observes its table accuracy plus
Gaussian noise of σ = K × the standard deviation of the table's best 10% of cells, drawn per
(seed, cell, evaluation); a repeat of a cell already trained is free and returns its mean
observation, a re-evaluation (the ``Confirm`` rule's) draws anew and costs one training. Two
regrets are then reported for every strategy and budget: of the best TRUE accuracy among the
cells trained (what papers report), and of the **kept** cell (the one the search hands its
user: the best observed, or the rule's incumbent). Budgets count trainings. K = 0 gives the
noise-free figures exactly.

Each strategy runs with its default rule: the fast agent confirms (``search.confirm``'s
``FAST_CONFIRM`` evaluations), every other strategy keeps its best single observation; a
name ending in ``+confirm`` or ``-confirm`` turns the rule on or off for it
(``--strategies=qlearning_fast-confirm,local_search+confirm``).

  python -m benchmarks.nb201 --noise=1 --budgets=100 --json=results/nb201_noise1.json

Writes ``{"results": {strategy: {dataset: {"<budget>": {"mean", "std", "kept_mean",
"kept_std"}}}}, ...}`` to ``--json`` and the best-so-far plot to ``--plot`` (default: beside
the JSON). Exits 0 with a message when the table is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import time

from absl import app, flags
import numpy as np

from benchmarks import nb201_baselines as bl
from benchmarks import nb201_space as nb201
from blockqnn_jax.settings import agent
from blockqnn_jax.settings.agent import FAST_CONFIRM, AgentSettings
from blockqnn_jax.strategies import evolution, interface, qlearner, registry

_TABLE_NAME = 'nb201-tss-200ep-test-acc.csv'
STRATEGY_NAMES = ('qlearning_paper', 'qlearning_fast', 'random', 'evolution', 'local_search',
                  'tpe')

_TABLE = flags.DEFINE_string(
    'table', None, 'The NAS-Bench-201 CSV; default: $BLOCKQNN_SHARED_DATA or ../shared/data '
    f'beside the repository, file {_TABLE_NAME}.')
_JSON = flags.DEFINE_string('json', None, 'Where to write the results as JSON.')
_PLOT = flags.DEFINE_string('plot', None, 'Where to write the best-so-far plot (PNG); '
                            'default: the JSON path with .png, no plot without --json.')
_DATASETS = flags.DEFINE_list('datasets', list(nb201.DATASETS), 'Datasets to search.')
_BUDGETS = flags.DEFINE_list('budgets', ['50', '100', '150', '300'], 'Distinct-cell budgets.')
_SEEDS = flags.DEFINE_integer('seeds', 100, 'Searches per (strategy, dataset, budget).')
_FIRST_SEED = flags.DEFINE_integer('first_seed', 0, 'Seeds are first_seed, first_seed + 1, '
                                   '... (another range checks a tuning held out).')
_TPE_SEEDS = flags.DEFINE_integer('tpe_seeds', None, 'Seeds for TPE (Python, one search at '
                                  'a time: the slow one); default: --seeds.')
_STRATEGIES = flags.DEFINE_list('strategies', list(STRATEGY_NAMES), 'Strategies to run.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Proposals per ask for every strategy but the '
                              "paper's agent (1: the sequential algorithms).")
_PAPER_BATCH = flags.DEFINE_integer('paper_batch', 8, "Blocks per iteration of the paper's "
                                    'agent (its ε schedule needs several iterations).')
_ABLATIONS = flags.DEFINE_list('ablations', [], 'Variants of qlearning_fast, each changing '
                               'one ingredient back: "all" or names from ABLATIONS.')
_MAX_ITERATIONS = flags.DEFINE_integer(
    'max_iterations_factor', 10, 'Cap on asks, as a multiple of ceil(budget / batch): a '
    'search whose proposals keep repeating known cells stops there (and says so).')
_NOISE = flags.DEFINE_float('noise', 0.0, 'K: noise σ = K × the std of the table\'s best 10% '
                            'of cells (0: the table itself).')
_POPULATION = flags.DEFINE_integer('population', 10, 'Evolution: population P.')
_SAMPLE = flags.DEFINE_integer('sample', 3, 'Evolution: tournament size S.')


def default_table_path() -> Path:
  shared = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
  return Path(os.environ.get('BLOCKQNN_SHARED_DATA', shared)) / _TABLE_NAME


# Each entry changes one ingredient of the fast preset back (towards the paper's agent).
ABLATIONS = {
    'no_random_phase': dict(schedule=((0.0, 1),)),
    # Per-step ε at about one changed layer per block (6 edges): the paper's exploration.
    'per_step_epsilon': dict(exploration='epsilon',
                             schedule=((1.0, 1), (1 / 6, 9))),
    'repeats': dict(avoid_repeats=False, restart=False),
    'no_restart': dict(restart=False),
    'escalate_not_restart': dict(restart=False, max_mutations=3, max_resamples=48),
    'poisson_mutations': dict(mutation_rate=1.0, max_mutations=3),
    'watkins': dict(monotone=False),
    'paper_alpha': dict(alpha=0.01),
    'no_shaping': dict(reward_shaping=False),
    'optimistic_init': dict(q_init=1.0),
    'replay': dict(replay_size=128),
}


def make(name: str, top: int, batch: int) -> tuple[interface.Strategy, bool]:
  """The strategy benchmarked as ``name``, and whether it depends on the budget."""
  if name == 'qlearning_paper':
    # The paper's settings, its schedule shortened to ceil(budget / batch) iterations.
    return qlearner.QLearner(AgentSettings(budget_sized=True, schedule_unit='iterations'),
                             budget=top), True
  if name == 'qlearning_fast':
    return qlearner.fast_qlearner(top, tried_capacity=2 * top + 2 * batch), True
  if name.startswith('qlearning_fast/'):
    return qlearner.fast_qlearner(top, tried_capacity=2 * top + 2 * batch,
                                  **ABLATIONS[name.split('/', 1)[1]]), True
  if name == 'evolution':
    return evolution.AgingEvolution(population=_POPULATION.value, sample=_SAMPLE.value), False
  return registry.make_strategy(name), False


def confirm_rule(name: str) -> tuple[str, agent.Confirm]:
  """A benchmarked name's strategy and rule: the fast agent confirms, the others do not;
  ``+confirm`` / ``-confirm`` at the end turns the rule on / off."""
  for suffix, on in (('+confirm', True), ('-confirm', False)):
    if name.endswith(suffix):
      return name[:-len(suffix)], agent.Confirm(FAST_CONFIRM) if on else agent.OFF
  return name, agent.Confirm(FAST_CONFIRM) if name.startswith('qlearning_fast') else agent.OFF


def run_strategy(name: str, tables: np.ndarray, budgets: list[int], seeds: int):
  """``(traces, kept, note)``: ``(datasets, budgets, seeds, max budget)`` traces of the best
  true accuracy trained and of the kept cell's."""
  top = max(budgets)
  base, rule = confirm_rule(name)
  sigmas = bl.noise_sigmas(tables, _NOISE.value)
  if base == 'tpe':
    if rule.active:
      raise app.UsageError('tpe runs without the confirm rule')
    count = _TPE_SEEDS.value or seeds
    seeds = range(_FIRST_SEED.value, _FIRST_SEED.value + count)
    both = np.stack([np.stack([np.stack(bl.tpe_search(acc, top, seed, sigma=float(sigma)))
                               for seed in seeds]) for acc, sigma in zip(tables, sigmas)])
    both = np.repeat(both[:, None], len(budgets), axis=1)
    return both[..., 0, :], both[..., 1, :], f'{count} seeds'
  batch = _PAPER_BATCH.value if base == 'qlearning_paper' else _BATCH.value
  strategy, sized = make(base, top, batch)
  result = bl.search_batch(strategy, tables, budgets if sized else [top],
                           range(_FIRST_SEED.value, _FIRST_SEED.value + seeds), batch,
                           max_iterations_factor=_MAX_ITERATIONS.value, noise=_NOISE.value,
                           confirm=rule)
  traces, kept = result.traces, result.kept
  if not sized:
    traces, kept = (np.repeat(t, len(budgets), axis=1) for t in (traces, kept))
  short = result.queries < (np.asarray(budgets)[None, :, None] if sized else top)
  note = f'batch {batch}'
  if rule.active:
    note += f', confirm up to {rule.max_evaluations} evaluations'
  if short.any():
    note += f'; {int(short.sum())} searches hit the iteration cap before their budget'
  return traces, kept, note


def summarise(traces: np.ndarray, kept: np.ndarray, datasets: list[str], budgets: list[int]):
  """``{dataset: {"<budget>": {"mean", "std", "kept_mean", "kept_std"}}}``: the best true
  accuracy trained and the kept cell's, over seeds."""
  out = {}
  for d, dataset in enumerate(datasets):
    out[dataset] = {}
    for b, budget in enumerate(budgets):
      best, keep = traces[d, b, :, budget - 1], kept[d, b, :, budget - 1]
      out[dataset][str(budget)] = {'mean': float(best.mean()), 'std': float(best.std()),
                                   'kept_mean': float(keep.mean()),
                                   'kept_std': float(keep.std()),
                                   'kept_per_seed': [round(float(k), 4) for k in keep]}
  return out


def print_pairs(results, datasets: list[str], budgets: list[int]) -> None:
  """The kept cell's accuracy with the rule minus without, seed by seed (every variant of a
  seed meets the same noise), for each strategy run both ways."""
  pairs = []
  for name in results:
    base, rule = confirm_rule(name)
    for other in results:
      if other != name and confirm_rule(other)[0] == base and rule.active and not confirm_rule(
          other)[1].active:
        pairs.append((name, other))
  if not pairs:
    return
  print('\nthe rule\'s gain in the kept cell\'s true accuracy, seed by seed (mean ± s.e.)')
  for on, off in pairs:
    for dataset in datasets:
      cells = []
      for b in budgets:
        diff = (np.asarray(results[on][dataset][str(b)]['kept_per_seed'])
                - np.asarray(results[off][dataset][str(b)]['kept_per_seed']))
        se = diff.std(ddof=1) / np.sqrt(diff.size) if diff.size > 1 else 0.0
        cells.append(f'{diff.mean():+.3f} ± {se:.3f}')
      print(f'{on + " vs " + off:<44} {dataset:<11}' + ''.join(f'{c:>18}' for c in cells))


def print_table(dataset: str, optimum: float, results, budgets: list[int], seeds: int) -> None:
  print(f'\n{dataset} (optimum {optimum:.2f}): regret of the best cell trained / of the '
        f'kept cell (mean over seeds, ± its standard error)')
  print(f'{"strategy":<34}' + ''.join(f'{f"budget {b}":>26}' for b in budgets))
  for name, by_dataset in results.items():
    cells = []
    for b in budgets:
      v = by_dataset[dataset][str(b)]
      cells.append(f'{optimum - v["mean"]:5.2f} / {optimum - v["kept_mean"]:5.2f} '
                   f'± {v["kept_std"] / np.sqrt(seeds):4.2f}')
    print(f'{name:<34}' + ''.join(f'{c:>26}' for c in cells))


def plot(path: str, curves, optima, datasets: list[str], results, budgets: list[int]) -> None:
  """Mean best-so-far against trainings (the budget-sized agents' curve is their run at the
  largest budget; dots mark each budget's own runs); with noise, the kept cell's true
  accuracy dashed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
  for d, (ax, dataset) in enumerate(zip(axes[0], datasets)):
    lows = []
    for name, (traces, kept) in curves.items():
      mean = traces[d, -1].mean(axis=0)
      line, = ax.plot(np.arange(1, mean.size + 1), mean, label=name, lw=1.2)
      if not np.array_equal(kept, traces):  # noise: the kept cell's, dashed
        ax.plot(np.arange(1, mean.size + 1), kept[d, -1].mean(axis=0), ls='--', lw=0.9,
                color=line.get_color())
      ax.plot(budgets, [results[name][dataset][str(b)]['mean'] for b in budgets], 'o',
              color=line.get_color(), ms=3)
      lows.append(mean[min(9, mean.size - 1)])
    ax.axhline(optima[dataset], color='k', ls=':', lw=0.8, label='optimum')
    ax.set_title(dataset)
    ax.set_xlabel('trainings')
    ax.set_ylabel('true test accuracy (%): best trained, kept dashed')
    ax.set_ylim(min(lows), optima[dataset] + 0.3)
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
  datasets = list(_DATASETS.value)
  budgets = sorted(int(b) for b in _BUDGETS.value)
  names = [n for n in _STRATEGIES.value]
  unknown = {confirm_rule(n)[0] for n in names} - set(STRATEGY_NAMES)
  if unknown:
    raise app.UsageError(f'unknown strategies {sorted(unknown)}; known: {STRATEGY_NAMES}')
  ablations = list(ABLATIONS) if _ABLATIONS.value == ['all'] else list(_ABLATIONS.value)
  if set(ablations) - set(ABLATIONS):
    raise app.UsageError(f'unknown ablations {sorted(set(ablations) - set(ABLATIONS))}; '
                         f'known: {list(ABLATIONS)}')
  names += [f'qlearning_fast/{a}' for a in ablations]
  if _NOISE.value < 0:
    raise app.UsageError(f'--noise must be >= 0, got {_NOISE.value}')
  if 'tpe' in names and not bl.tpe_available():
    print('tpe: skipped, Optuna is not installed (pip install -e .[bench]).')
    names.remove('tpe')
  tables = np.stack([table.by_code(d) for d in datasets])
  print(f'seeds={_SEEDS.value} (from {_FIRST_SEED.value}) budgets={budgets} '
        f'datasets={datasets} noise={_NOISE.value} '
        f'(σ {", ".join(f"{s:.3f}" for s in bl.noise_sigmas(tables, _NOISE.value))})')
  results, curves, runtimes = {}, {}, {}
  for name in names:
    t0 = time.perf_counter()
    traces, kept, note = run_strategy(name, tables, budgets, _SEEDS.value)
    runtimes[name] = time.perf_counter() - t0
    print(f'{name}: {runtimes[name]:.1f} s ({note})', flush=True)
    results[name] = summarise(traces, kept, datasets, budgets)
    curves[name] = (traces, kept)
  optima = {d: table.optimum(d) for d in datasets}
  for dataset in datasets:
    print_table(dataset, optima[dataset], results, budgets, _SEEDS.value)
  print_pairs(results, datasets, budgets)
  total = time.perf_counter() - start
  print(f'\ntotal {total:.1f} s')
  if _JSON.value:
    Path(_JSON.value).write_text(json.dumps({
        'results': results, 'optima': optima, 'seeds': _SEEDS.value,
        'first_seed': _FIRST_SEED.value,
        'tpe_seeds': _TPE_SEEDS.value or _SEEDS.value, 'batch': _BATCH.value,
        'paper_batch': _PAPER_BATCH.value, 'noise': _NOISE.value,
        'sigma': dict(zip(datasets, bl.noise_sigmas(tables, _NOISE.value).tolist())),
        'runtime_s': {**runtimes, 'total': total},
    }, indent=1))
    print(f'results written to {_JSON.value}')
  plot_path = _PLOT.value or (str(Path(_JSON.value).with_suffix('.png')) if _JSON.value
                              else None)
  if plot_path:
    plot(plot_path, curves, optima, datasets, results, budgets)
  return 0


if __name__ == '__main__':
  app.run(main)
