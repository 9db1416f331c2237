r"""The strategies compared on the real space, to the end: each search in results/, resumable.

Runs ``experiments.search --config=configs/cifar.py:cpu`` once per strategy and seed, each
in its own workdir ``results/<strategy>_seed<k>/`` (the ``search.sqlite`` there is the
result; compiled programs and TensorBoard events beside it are not kept), all sharing one
evaluation cache (``results/eval_cache.sqlite``) and one validation hold-out, so that no
block is trained twice by any of them. Every search stops at ``search.budget`` distinct
candidates. Run the same command again to continue what was cut short: finished searches
return at once.

Then it draws them on one figure and writes the tables (``report.compare``: best and top-10
mean reward at the common budget, mean ± standard error over seeds, seed-by-seed pairs
against random) to ``results/comparison.png`` / ``results/comparison.md``, and with
``--retrain`` trains each strategy's best block (over its seeds, within the common budget)
at the high fidelity of ``benchmarks.fidelity`` from three seeds
(``results/retrained.md``).

  mkdir -p data && cp ../shared/data/cifar10-exact-subset.npz data/
  python -m benchmarks.cpu_comparison --parallel=2            # run (or continue) them all
  python -m benchmarks.cpu_comparison --report_only --retrain  # tables and figure only

Strategies: ``qlearning_fast`` (the preset's agent), ``qlearning_paper`` (BlockQNN's agent:
α = 0.01, Q from 0.5, replay, per-step ε over the paper's schedule, sized to the budget),
``random``, ``evolution``, ``local_search``; and, outside the default list,
``qlearning_fast+confirm``: the fast agent with the confirm rule (``search.confirm=3``), which
the preset and the others run without:

  python -m benchmarks.cpu_comparison --strategies=qlearning_fast+confirm,qlearning_fast \
      --seeds=0,1,2,3,4 --parallel=2
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import sqlite3
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import app, flags
import numpy as np

from blockqnn_jax.settings.agent import PAPER_EPSILON_SCHEDULE

STRATEGIES = ('qlearning_fast', 'qlearning_paper', 'random', 'evolution', 'local_search')
# What each strategy changes in configs/cifar.py:cpu (whose agent is the fast one). Each
# names its confirm setting, so the searches committed in results/ resume and report with
# the same command whatever the preset's default.
_NO_CONFIRM = ('search.confirm=1',)
OVERRIDES = {
    'qlearning_fast': _NO_CONFIRM,
    'qlearning_paper': (*_NO_CONFIRM,
        'search.strategy=qlearning', 'agent.alpha=0.01', 'agent.q_init=0.5',
        'agent.replay_size=128', 'agent.monotone=False', 'agent.exploration=epsilon',
        'agent.avoid_repeats=False', 'agent.max_resamples=0',
        'agent.restart=False', 'agent.budget_sized=True',
        'search.epsilon_schedule=' + str(tuple(PAPER_EPSILON_SCHEDULE)).replace(' ', '')),
    'random': ('search.strategy=random', *_NO_CONFIRM),
    'evolution': ('search.strategy=evolution', *_NO_CONFIRM),
    'local_search': ('search.strategy=local_search', *_NO_CONFIRM),
    # The fast agent with the confirm rule (off in the preset since it was measured here);
    # compared with qlearning_fast, the same agent without it, at equal trainings.
    'qlearning_fast+confirm': ('search.confirm=3',),
}

_DATA = flags.DEFINE_string('data', 'data/cifar10-exact-subset.npz',
                            'The CIFAR-10 exact subset (.npz).')
_STRATEGIES = flags.DEFINE_list('strategies', list(STRATEGIES), 'Strategies to run.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (each a whole search).')
_ROOT = flags.DEFINE_string('root', 'results', 'Where the searches and tables live.')
_CACHE = flags.DEFINE_string('cache', 'results/eval_cache.sqlite',
                             'The evaluation cache every search shares.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Searches run at a time.')
_OVERRIDES = flags.DEFINE_multi_string('override', [], 'field=value for every search.')
_CONFIG = flags.DEFINE_string('config', 'configs/cifar.py:cpu', 'The search config.')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False, 'Only the tables and the figure.')
_RETRAIN = flags.DEFINE_bool('retrain', False, "Retrain each strategy's best block at the "
                             'high fidelity (3 seeds) after the searches.')
_FIDELITY_CACHE = flags.DEFINE_string('fidelity_cache', 'results/fidelity/cache.sqlite',
                                      "The high fidelity's cache (benchmarks.fidelity's).")
_RETRAIN_KEPT = flags.DEFINE_bool(
    'retrain_kept', False, 'Retrain the block each search kept (its confirm-rule incumbent, '
    'or its best single reward) at the high fidelity (3 seeds), and compare each strategy run '
    'with and without the rule seed by seed.')
_HIGH_DATA = flags.DEFINE_string('high_data', None, "'SOURCE:PATH' of the high fidelity "
                                 "(default: benchmarks.fidelities.JPEG_FULL).")


def workdir(strategy: str, seed: str) -> Path:
  return Path(_ROOT.value) / f'{strategy}_seed{seed}'


def _portable(path: str) -> str:
  """``path`` relative to the working directory when it lies below it: the stores are
  committed, and the config they keep must not name one machine's folders."""
  resolved = Path(path).resolve()
  return str(resolved.relative_to(Path.cwd().resolve())) if resolved.is_relative_to(
      Path.cwd().resolve()) else path


def _command(strategy: str, seed: str) -> list[str]:
  overrides = (*OVERRIDES[strategy], *_OVERRIDES.value)
  return [sys.executable, '-m', 'experiments.search', f'--config={_CONFIG.value}',
          f'--workdir={workdir(strategy, seed)}', f'--config.seed={seed}',
          f'--config.data.path={_portable(_DATA.value)}',
          f'--config.search.eval_cache={_portable(_CACHE.value)}',
          '--noprogress', *(f'--config.{o}' for o in overrides)]


def run_searches(runs: list[tuple[str, str]]) -> None:
  env = dict(os.environ)
  if _PARALLEL.value > 1:  # one host thread each, so parallel searches do not fight
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false '
                        'intra_op_parallelism_threads=1').strip()
  logs = Path(_ROOT.value) / 'logs'
  logs.mkdir(parents=True, exist_ok=True)
  pending, running = list(runs), []
  while pending or running:
    while pending and len(running) < _PARALLEL.value:
      strategy, seed = pending.pop(0)
      log = open(logs / f'{strategy}_seed{seed}.log', 'a')  # pylint: disable=consider-using-with
      running.append((strategy, seed, time.perf_counter(), log, subprocess.Popen(
          _command(strategy, seed), env=env, stdout=log, stderr=subprocess.STDOUT)))
    time.sleep(2)
    for entry in list(running):
      strategy, seed, started, log, process = entry
      if process.poll() is not None:
        running.remove(entry)
        log.close()
        print(f'{strategy}_seed{seed}: exit {process.returncode} after '
              f'{time.perf_counter() - started:.0f} s', flush=True)
        if process.returncode:
          print(f'  see {log.name}', flush=True)


def compact(workdirs, caches: Sequence[str] = ()) -> None:
  """Shrinks the stores to what they hold (``ResultsStore.compact``), each under its
  workdir's lock, so they stay small enough for the repository (one a search holds is
  left), and folds each evaluation cache's log into its file."""
  from blockqnn_jax.storage import store as store_lib  # pylint: disable=import-outside-toplevel
  from blockqnn_jax.storage import workdir_lock  # pylint: disable=import-outside-toplevel
  for w in workdirs:
    try:
      with workdir_lock.WorkdirLock(w, purpose='compaction'), store_lib.ResultsStore(w) as store:
        saved = store.compact()
    except workdir_lock.WorkdirBusy:
      continue
    if saved > 1 << 20:
      print(f'{w.name}: store compacted by {saved / 2**20:.1f} MiB', flush=True)
  for cache in caches:
    if Path(cache).is_file():
      with sqlite3.connect(cache) as db:
        db.execute('PRAGMA wal_checkpoint(TRUNCATE)')


def retrain_best(curves) -> list[str]:
  """Each strategy's best block (over its seeds, at the common budget) at the high
  fidelity, 3 seeds; the markdown lines of the table."""
  from benchmarks import fidelities  # pylint: disable=import-outside-toplevel
  from blockqnn_jax.nsc import canonical  # pylint: disable=import-outside-toplevel
  from blockqnn_jax.nsc import grammar as nsc
  from blockqnn_jax.report import compare  # pylint: disable=import-outside-toplevel
  budget = min(c.trained for c in curves)
  best = {}
  for c in curves:
    rows = compare.rows_within(Path(_ROOT.value) / f'{c.strategy}_seed{c.seed}', budget)
    top = max((r for r in rows if r.ok), key=lambda r: r.reward, default=None)
    if top is not None and (c.strategy not in best or top.reward > best[c.strategy].reward):
      best[c.strategy] = top
  high = fidelities.high(data=_HIGH_DATA.value or fidelities.JPEG_FULL)
  blocks = [nsc.parse(r.nsc) for r in best.values()]
  results = fidelities.evaluate(high, blocks, (0, 1, 2), _FIDELITY_CACHE.value)
  lines = [f"Each strategy's best block within the common budget of {budget} distinct "
           f'candidates, retrained at the high fidelity ({high.spec}: '
           f'{len(high.splits.train_labels)} training images, scored on '
           f'{len(high.splits.val_labels)} test images), 3 seeds (mean ± s.e.):', '',
           '| strategy | block | preset reward | high-fidelity accuracy | high-fidelity reward |',
           '|---|---|---|---|---|']
  for (strategy, row), block in zip(best.items(), blocks):
    key = canonical.canonical_key(block)
    got = [results[(key, r)] for r in (0, 1, 2)]
    acc = np.asarray([g.val_accuracy for g in got if g is not None and g.ok])
    rew = np.asarray([g.reward for g in got if g is not None and g.ok])
    sem = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
    lines.append(f'| {strategy} | `{row.nsc}` | {row.reward:.4f} | {acc.mean():.4f} ± '
                 f'{sem(acc):.4f} | {rew.mean():.4f} ± {sem(rew):.4f} |')
  return lines


def confirm_rule_ran(workdir: Path) -> bool:
  """Whether a search ran the confirm rule (``search.confirm`` > 1)."""
  from blockqnn_jax.settings.search import SearchSettings  # pylint: disable=import-outside-toplevel
  with sqlite3.connect(f'file:{workdir / "search.sqlite"}?mode=ro', uri=True) as db:
    row = db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
  return row is not None and SearchSettings.from_config(row[0]).search.confirm > 1


def kept_blocks(workdirs) -> list[tuple[str, int, int, Any]]:
  """``(strategy, seed, trainings, confirm.Kept)`` of each search."""
  from blockqnn_jax.report import compare  # pylint: disable=import-outside-toplevel
  from blockqnn_jax.storage import store as store_lib  # pylint: disable=import-outside-toplevel
  from blockqnn_jax.strategies import confirm  # pylint: disable=import-outside-toplevel
  out = []
  for w in workdirs:
    with store_lib.ResultsStore.open_read_only(w) as store:
      config = json.loads(store.get_meta('config') or '{}')
      kept = confirm.kept_block(store)
      if kept is not None:
        out.append((compare.strategy_name(config), config.get('seed'), store.trainings(), kept))
  return out


def kept_table(workdirs, retrain: bool) -> list[str]:
  """The markdown lines of each search's kept block (its mean preset reward, evaluations and
  trainings) and, with ``retrain``, its high-fidelity accuracy (3 seeds) and, for each
  strategy run with and without the confirm rule, the difference seed by seed."""
  kept = kept_blocks(workdirs)
  high_acc = {}
  if retrain and kept:
    from benchmarks import fidelities  # pylint: disable=import-outside-toplevel
    from blockqnn_jax.nsc import grammar as nsc  # pylint: disable=import-outside-toplevel
    high = fidelities.high(data=_HIGH_DATA.value or fidelities.JPEG_FULL)
    blocks = {k.canonical_key: nsc.parse(k.block) for *_, k in kept}
    results = fidelities.evaluate(high, list(blocks.values()), (0, 1, 2),
                                  _FIDELITY_CACHE.value)
    for key in blocks:
      got = [results[(key, r)] for r in (0, 1, 2)]
      high_acc[key] = float(np.mean([g.val_accuracy for g in got if g is not None and g.ok]))
  lines = ['The block each search kept (the confirm rule\'s incumbent, or the best single '
           'reward without the rule):', '',
           '| search | trainings | kept block | mean preset reward | evaluations | '
           'high-fidelity accuracy |', '|---|---|---|---|---|---|']
  for strategy, seed, trainings, k in kept:
    se = '' if np.isnan(k.standard_error) else f' ± {k.standard_error:.4f}'
    acc = f'{high_acc[k.canonical_key]:.4f}' if k.canonical_key in high_acc else '–'
    lines.append(f'| {strategy} seed {seed} | {trainings} | `{k.block}` | {k.reward:.4f}{se} | '
                 f'{k.evaluations} | {acc} |')
  by = {(s, seed): high_acc.get(k.canonical_key) for s, seed, _, k in kept}
  for strategy in sorted({s for s, *_ in kept if s.endswith('+confirm')}):
    base = strategy[:-len('+confirm')]
    seeds = sorted(seed for s, seed in by if s == strategy and (base, seed) in by
                   and by[(strategy, seed)] is not None and by[(base, seed)] is not None)
    if not seeds:
      continue
    diff = np.asarray([by[(strategy, seed)] - by[(base, seed)] for seed in seeds])
    se = float(np.std(diff, ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float('nan')
    per_seed = ', '.join(f'{seed}: {d:+.4f}' for seed, d in zip(seeds, diff))
    lines += ['', f'{strategy} against {base}, the kept block\'s high-fidelity accuracy seed '
              f'by seed ({per_seed}): {diff.mean():+.4f} ± {se:.4f} over {len(seeds)} seeds.']
  return lines


def main(argv):
  del argv
  from blockqnn_jax.report import compare  # pylint: disable=import-outside-toplevel
  root = Path(_ROOT.value)
  runs = [(s, seed) for seed in _SEEDS.value for s in _STRATEGIES.value]
  if not _REPORT_ONLY.value:
    run_searches(runs)
  done = [workdir(s, seed) for s, seed in runs if (workdir(s, seed) / 'search.sqlite').is_file()]
  compact(done, [_CACHE.value])
  # Another set of strategies than the committed comparison's gets a folder of its own, so
  # that a run of a few searches never overwrites the comparison of all five.
  out = root if set(_STRATEGIES.value) == set(STRATEGIES) else root / (
      'compare_' + '_'.join(sorted(_STRATEGIES.value)).replace('+', '_with_'))
  out.mkdir(parents=True, exist_ok=True)
  png, md = compare.compare_searches(done, out)
  text = md.read_text()
  if _RETRAIN.value and done:
    curves = [compare.load_curve(w) for w in done]
    retrained = retrain_best(curves)
    (out / 'retrained.md').write_text('\n'.join(retrained) + '\n')
    text += '\n' + '\n'.join(retrained) + '\n'
  if any(confirm_rule_ran(w) for w in done) or _RETRAIN_KEPT.value:
    kept = kept_table(done, _RETRAIN_KEPT.value)
    (out / 'kept.md').write_text('\n'.join(kept) + '\n')
    text += '\n' + '\n'.join(kept) + '\n'
  print(text)
  print(f'figure: {png}')
  (out / 'comparison.json').write_text(json.dumps(
      {'command': 'python -m benchmarks.cpu_comparison --report_only --retrain' if out == root
                  else 'python -m benchmarks.cpu_comparison --report_only --retrain_kept '
                  f'--strategies={",".join(_STRATEGIES.value)} --seeds={",".join(_SEEDS.value)}',
       'searches': [str(w) for w in done]}, indent=1))


if __name__ == '__main__':
  app.run(main)
