r"""Early stopping at rungs measured on the real space: the cpu preset at 4 epochs, with and
without stopping, each search resumable in ``results/early_stop/<variant>_seed<k>/``.

Variants of ``configs/cifar.py:cpu`` at ``train.epochs=4`` (the fast agent, no confirm
rule, the first ~10% of the budget random):

* ``full``: every candidate trains 4 epochs, and is scored (not stopped) at epochs 1, 2 and
  3 (``search.early_stop.promote=1``): the rungs' Kendall tau against the final reward.
* ``stop``: rungs at epochs 1 and 2, the best third of the earlier iterations' candidates
  go on at each (successive halving with eta = 3), on twice the budget.
* ``window``: as ``stop``, but the best quarter goes on, of the last 8 candidates to reach
  the rung (``search.early_stop.window``): lines that follow the agent's proposals as they
  get better.

The report also replays each pruned variant's rule on the ``full`` searches (the same
blocks, judged after the fact): what it would stop and which block it would keep.

Each variant has an evaluation cache of its own, so every candidate is trained by the search
that records it and the candidates per hour are the search's own. Then it writes
``results/early_stop/early_stop.md`` and ``.json``: tau per rung, epochs and wall seconds per
candidate, candidates per hour, and (``--es_retrain``) each search's kept block retrained at
the high fidelity of ``benchmarks.fidelity`` from three seeds.

  mkdir -p data && cp ../shared/data/cifar10-exact-subset.npz data/
  python -m benchmarks.early_stop                         # run (or continue) the searches
  python -m benchmarks.early_stop --es_report_only --es_retrain --es_priced_by=full,stop  # tables
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
import subprocess
import sys
import time
from typing import Any

from absl import app, flags
import numpy as np

EPOCHS = 4
# What each variant changes in configs/cifar.py:cpu.
VARIANTS = {
    'full': ('search.confirm=1', f'train.epochs={EPOCHS}', 'search.budget=48',
             'search.epsilon_schedule=((1.0,1),(0.0,29))',
             'search.early_stop.rungs=(1,2,3)', 'search.early_stop.promote=1.0'),
    'stop': ('search.confirm=1', f'train.epochs={EPOCHS}', 'search.budget=96',
             'search.epsilon_schedule=((1.0,2),(0.0,58))',
             'search.early_stop.rungs=(1,2)', 'search.early_stop.promote=0.3333'),
    'window': ('search.confirm=1', f'train.epochs={EPOCHS}', 'search.budget=96',
               'search.epsilon_schedule=((1.0,2),(0.0,58))',
               'search.early_stop.rungs=(1,2)', 'search.early_stop.promote=0.25',
               'search.early_stop.window=8'),
}

_DATA = flags.DEFINE_string('es_data', 'data/cifar10-exact-subset.npz',
                            'The CIFAR-10 exact subset (.npz).')
_SEEDS = flags.DEFINE_list('es_seeds', ['0', '1', '2'], 'Seeds (each a pair of searches).')
_VARIANTS = flags.DEFINE_list('es_variants', list(VARIANTS), 'Variants to run.')
_ROOT = flags.DEFINE_string('es_root', 'results/early_stop', 'Where the searches live.')
_REPORT_ONLY = flags.DEFINE_bool('es_report_only', False, 'Only the tables.')
_RETRAIN = flags.DEFINE_bool('es_retrain', False, "Each search's kept block at the high "
                             'fidelity (3 seeds), from the fidelity cache or trained; without '
                             'it the tables leave that column empty.')
_PRICED_BY = flags.DEFINE_list('es_priced_by', list(VARIANTS), 'The variants whose searches '
                                'set the pooled prices (leave out one that ran on a busy '
                                'machine).')
_FIDELITY_CACHE = flags.DEFINE_string('es_fidelity_cache', 'results/fidelity/cache.sqlite',
                                      "The high fidelity's cache (benchmarks.fidelity's).")


def workdir(variant: str, seed: str) -> Path:
  return Path(_ROOT.value) / f'{variant}_seed{seed}'


def command(variant: str, seed: str) -> list[str]:
  """The search of ``variant`` from ``seed``: ``experiments.search`` on the cpu preset."""
  return [sys.executable, '-m', 'experiments.search', '--config=configs/cifar.py:cpu',
          f'--workdir={workdir(variant, seed)}', f'--config.seed={seed}',
          f'--config.data.path={_DATA.value}',
          f'--config.search.eval_cache={Path(_ROOT.value) / f"eval_cache_{variant}.sqlite"}',
          '--noprogress', *(f'--config.{o}' for o in VARIANTS[variant])]


def run_searches() -> None:
  """Runs (or continues) each seed's pair of searches, one at a time."""
  logs = Path(_ROOT.value) / 'logs'
  logs.mkdir(parents=True, exist_ok=True)
  for seed in _SEEDS.value:
    for variant in _VARIANTS.value:
      started = time.perf_counter()
      with open(logs / f'{variant}_seed{seed}.log', 'a') as log:
        code = subprocess.call(command(variant, seed), stdout=log, stderr=subprocess.STDOUT,
                               env=dict(os.environ))
      print(f'{variant}_seed{seed}: exit {code} after {time.perf_counter() - started:.0f} s',
            flush=True)


# The fractions promoted that the rung table tries on the blocks trained to the end.
FRACTIONS = {'third': 1 / 3, 'half': 1 / 2}


def trained_rows(w: Path, shared: bool = False) -> list:
  """The successful candidates of the search in ``w`` that it trained itself: not reused
  from an identical block it had scored, nor (unless ``shared``) from another search
  through the shared cache."""
  from blockqnn_jax.storage import store as store_lib  # pylint: disable=import-outside-toplevel
  with store_lib.ResultsStore.open_read_only(w) as store:
    return [c for c in store.candidates() if c.ok and not c.cached and (shared or not c.shared)]


def kendall(full: dict[str, list]) -> dict[str, Any]:
  """Kendall tau of each rung's score against the final reward, per seed and over the seeds
  pooled, from the searches that train every candidate to the end; and, of each search's
  five best final rewards, how many are in its best third (half) at the rung."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  out = {}
  steps = sorted({s for rows in full.values() for c in rows for s in c.rung_scores})
  for step in steps:
    per_seed, kept_top, pooled = {}, {}, ([], [])
    for seed, rows in full.items():
      rows = [c for c in rows if step in c.rung_scores]
      rung = np.asarray([c.rung_scores[step] for c in rows])
      final = np.asarray([c.reward for c in rows])
      per_seed[seed] = float(stats.kendalltau(rung, final).statistic)
      pooled[0].extend(rung)
      pooled[1].extend(final)
      top5 = np.argsort(-final)[:5]
      kept_top[seed] = {name: int(sum(i in set(np.argsort(-rung)[:math.ceil(len(rows) * f)])
                                      for i in top5)) for name, f in FRACTIONS.items()}
    out[str(step)] = dict(
        tau_per_seed=per_seed, tau_mean=float(np.mean(list(per_seed.values()))),
        tau_pooled=float(stats.kendalltau(*pooled).statistic),
        top5_kept=kept_top, blocks=len(pooled[0]))
  return out


def early_stop_of(variant: str):
  """The ``EarlyStop`` settings ``variant`` searches with."""
  from benchmarks import fixtures  # pylint: disable=import-outside-toplevel
  from blockqnn_jax.settings.search import SearchSettings  # pylint: disable=import-outside-toplevel
  config = fixtures.preset_config('cpu', VARIANTS[variant])
  return SearchSettings.from_config(config).search.early_stop


def replay(rows: list, early_stop) -> dict[str, Any]:
  """``early_stop``'s rule applied after the fact to a search that trained every candidate
  to the end and scored it at every rung (``full``).

  Candidates in the order they were proposed; each is judged against the rung scores of the
  earlier iterations' candidates as the rule would have left them (a stopped candidate has
  no score beyond its rung), as ``strategies.rungs.stop_lines`` decides in a search with
  ``max_staleness`` 0. What it cannot show: a search that stops learns from other rewards,
  so it would propose other blocks. Returns the epochs per candidate, how many stop, and the
  block it would keep (the best final reward among those not stopped) with that block's
  rank among the final rewards of all candidates (1: the best).
  """
  from blockqnn_jax.strategies import rungs  # pylint: disable=import-outside-toplevel
  rows = sorted(rows, key=lambda c: (c.iteration, c.position))
  reached, stops = [], []
  for c in rows:
    history = [h for h, other in zip(reached, rows) if other.iteration < c.iteration]
    at = rungs.stop_lines(history, early_stop).first_stop(c.rung_scores)
    stops.append(at)
    reached.append({r: v for r, v in c.rung_scores.items() if at is None or r <= at})
  finished = [c for c, at in zip(rows, stops) if at is None]
  best = max(finished, key=lambda c: c.reward)
  return dict(candidates=len(rows), stopped=sum(at is not None for at in stops),
              epochs_per_candidate=float(np.mean([at or EPOCHS for at in stops])),
              kept=best.block, kept_rank=1 + sum(c.reward > best.reward for c in rows))


def _epochs(c) -> int:
  return c.stopped_at or EPOCHS


def _validations_run(c) -> int:
  """Validations a candidate ran: one at each rung it reached, then one at the end unless
  stopped."""
  return len(c.rung_scores) + (0 if c.stopped else 1)


def _validations(c, variant: str) -> int:
  """Validations a candidate of ``variant`` needs: those it ran, but one in the unpruned
  search, whose rungs are measurement only."""
  return 1 if variant == 'full' else _validations_run(c)


def prices(rows: dict[tuple[str, str], list]) -> dict[str, float]:
  """Seconds of one epoch of training, of one validation, and of the rest of a candidate
  (set-up, what compile-ahead did not hide), pooled over every search's trainings."""
  every = [c for rs in rows.values() for c in rs]
  return dict(
      epoch_s=sum(c.train_s for c in every) / sum(_epochs(c) for c in every),
      validation_s=sum(c.eval_s for c in every) / sum(_validations_run(c) for c in every),
      other_s=float(np.mean([c.total_s - c.train_s - c.eval_s for c in every])))


def throughput(rows: list, variant: str, price: dict[str, float]) -> dict[str, float]:
  """Trainings, those stopped, epochs and seconds per training, trainings per hour (the
  seconds summed over trainings: the searches ran one at a time, one candidate at a time),
  and trainings per hour at the pooled ``prices`` (what the epochs saved give, whatever the
  machine's load and the blocks' sizes when each search ran)."""
  seconds = sum(c.total_s for c in rows)
  priced = float(np.mean([price['epoch_s'] * _epochs(c) + price['other_s'] +
                          price['validation_s'] * _validations(c, variant) for c in rows]))
  return dict(trainings=len(rows), stopped=sum(c.stopped for c in rows),
              epochs_per_candidate=float(np.mean([_epochs(c) for c in rows])),
              seconds=float(seconds), seconds_per_candidate=seconds / len(rows),
              compile_s_per_candidate=float(np.mean([c.compile_s for c in rows])),
              candidates_per_hour=3600 * len(rows) / seconds,
              priced_candidates_per_hour=3600 / priced)


def high_fidelity(blocks: list[str]) -> dict[str, list[float]]:
  """Each block's accuracy at ``benchmarks.fidelities.high`` from 3 seeds (replicates 0-2),
  read from the fidelity cache or trained and stored there (it decodes the full JPEG
  CIFAR-10 first, a few minutes)."""
  from benchmarks import fidelities  # pylint: disable=import-outside-toplevel
  from blockqnn_jax.nsc import canonical  # pylint: disable=import-outside-toplevel
  from blockqnn_jax.nsc import grammar as nsc  # pylint: disable=import-outside-toplevel
  high = fidelities.high(data=fidelities.JPEG_FULL)
  parsed = [nsc.parse(b) for b in blocks]
  got = fidelities.evaluate(high, parsed, (0, 1, 2), _FIDELITY_CACHE.value)
  out = {}
  for b, block in zip(blocks, parsed):
    key = canonical.canonical_key(block)
    accs = [got[(key, r)].val_accuracy for r in (0, 1, 2)
            if got[(key, r)] is not None and got[(key, r)].ok]
    if accs:
      out[b] = accs
  return out


def kept(workdirs: dict[tuple[str, str], Path]) -> dict[tuple[str, str], Any]:
  """The block each search kept (``confirm.kept_block``: the best single reward among the
  candidates trained to the end)."""
  from blockqnn_jax.storage import store as store_lib  # pylint: disable=import-outside-toplevel
  from blockqnn_jax.strategies import confirm  # pylint: disable=import-outside-toplevel
  out = {}
  for run, w in workdirs.items():
    with store_lib.ResultsStore.open_read_only(w) as store:
      out[run] = confirm.kept_block(store)
  return out


def _se(values) -> float:
  values = np.asarray(values, dtype=float)
  return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else math.nan


def compare(variant: str, speed: dict, kept_blocks: dict, accs: dict) -> dict[str, Any]:
  """``variant`` against ``full``, over the seeds both ran: candidates per hour (as timed, at
  pooled prices) and the kept block's high-fidelity accuracy, seed by seed."""
  seeds = [s for s in _SEEDS.value if (variant, s) in speed and ('full', s) in speed]
  def ratios(field):
    return [speed[(variant, s)][field] / speed[('full', s)][field] for s in seeds]
  def accuracy(v, s):
    k = kept_blocks.get((v, s))
    return np.mean(accs[k.block]) if k is not None and k.block in accs else None

  ratio, priced = ratios('candidates_per_hour'), ratios('priced_candidates_per_hour')
  pairs = [(accuracy(variant, s), accuracy('full', s)) for s in seeds]
  diff = [a - b for a, b in pairs if a is not None and b is not None]
  full_acc = [b for _, b in pairs if b is not None]
  return dict(
      seeds=seeds, candidates_per_hour_ratio=ratio,
      candidates_per_hour_ratio_mean=float(np.mean(ratio)) if ratio else math.nan,
      priced_ratio=priced, priced_ratio_mean=float(np.mean(priced)) if priced else math.nan,
      high_fidelity_difference=[float(d) for d in diff],
      high_fidelity_difference_mean=float(np.mean(diff)) if diff else math.nan,
      high_fidelity_difference_se=_se(diff),
      full_high_fidelity_se=_se(full_acc))


def report(retrain: bool) -> dict[str, Any]:
  """Writes ``early_stop.md`` and ``early_stop.json`` under the root from the searches
  there; returns what the json holds."""
  root = Path(_ROOT.value)
  workdirs = {(v, s): workdir(v, s) for s in _SEEDS.value for v in VARIANTS
              if (workdir(v, s) / 'search.sqlite').is_file()}
  from benchmarks import cpu_comparison  # pylint: disable=import-outside-toplevel
  cpu_comparison.compact(list(workdirs.values()),
                         [str(root / f'eval_cache_{v}.sqlite') for v in VARIANTS])
  rows = {run: trained_rows(w) for run, w in workdirs.items()}
  taus = kendall({s: r for (v, s), r in rows.items() if v == 'full'})
  price = prices({(v, s): r for (v, s), r in rows.items() if v in _PRICED_BY.value})
  speed = {(v, s): throughput(r, v, price) for (v, s), r in rows.items() if r}
  kept_blocks = {run: k for run, k in kept(workdirs).items() if k is not None}
  accs = high_fidelity(sorted({k.block for k in kept_blocks.values()})) if retrain else {}
  summary = {v: compare(v, speed, kept_blocks, accs) for v in VARIANTS if v != 'full'}
  proposed = {s: trained_rows(w, shared=True) for (v, s), w in workdirs.items()
              if v == 'full'}
  replays = {v: {s: replay(r, early_stop_of(v)) for s, r in proposed.items()}
             for v in VARIANTS if v != 'full'}
  data = dict(
      epochs=EPOCHS, variants={v: list(o) for v, o in VARIANTS.items()}, kendall_tau=taus,
      prices=price, priced_by=[f'{v}_seed{s}' for (v, s) in rows if v in _PRICED_BY.value],
      searches={f'{v}_seed{s}': dict(
          **speed.get((v, s), {}),
          kept=kept_blocks[(v, s)].block if (v, s) in kept_blocks else None,
          kept_reward=kept_blocks[(v, s)].reward if (v, s) in kept_blocks else None,
          kept_high_fidelity=accs.get(kept_blocks[(v, s)].block) if (v, s) in kept_blocks
          else None) for (v, s) in workdirs},
      summary={v: m for v, m in summary.items() if m['seeds']},
      replay={v: r for v, r in replays.items() if r})
  (root / 'early_stop.json').write_text(json.dumps(data, indent=1) + '\n')
  (root / 'early_stop.md').write_text('\n'.join(markdown(data)) + '\n')
  print((root / 'early_stop.md').read_text())
  return data


def markdown(data: dict[str, Any]) -> list[str]:
  """The tables of ``report`` as markdown lines."""
  lines = [f'### Do the early rungs rank? (`full`: every candidate trained {data["epochs"]} '
           'epochs)', '', 'Kendall τ of the score (reward) at each rung against the final '
           'reward of the same training, and of each search\'s 5 best final rewards how many '
           'are in its best third (half) at the rung, seed by seed:', '',
           '| rung (epoch) | blocks | τ per seed | τ mean | τ pooled | top 5 in the best third '
           '| top 5 in the best half |', '|---|---|---|---|---|---|---|']
  for step, t in data['kendall_tau'].items():
    per = ', '.join(f'{v:.3f}' for v in t['tau_per_seed'].values())
    top = ' | '.join(', '.join(str(v[f]) for v in t['top5_kept'].values()) for f in FRACTIONS)
    lines.append(f'| {step} | {t["blocks"]} | {per} | {t["tau_mean"]:.3f} | '
                 f'{t["tau_pooled"]:.3f} | {top} |')
  lines += ['', '### Candidates per hour and the kept block', '',
            '| search | trainings | stopped | epochs / candidate | training s | s / candidate | '
            'compile s / candidate | candidates / hour | at pooled prices | kept block | '
            'its reward | high-fidelity accuracy (3 seeds) |',
            '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for name, s in data['searches'].items():
    if 'trainings' not in s:
      continue
    acc = s['kept_high_fidelity']
    acc_text = f'{np.mean(acc):.4f} ± {_se(acc):.4f}' if acc else '–'
    lines.append(f'| {name} | {s["trainings"]} | {s["stopped"]} | '
                 f'{s["epochs_per_candidate"]:.2f} | {s["seconds"]:.0f} | '
                 f'{s["seconds_per_candidate"]:.1f} | '
                 f'{s["compile_s_per_candidate"]:.1f} | {s["candidates_per_hour"]:.0f} | '
                 f'{s["priced_candidates_per_hour"]:.0f} | '
                 f'`{s["kept"]}` | {s["kept_reward"]:.4f} | {acc_text} |')
  if data.get('replay'):
    lines += ['', '### The rules replayed on `full`', '',
              "Each pruned variant's rule applied after the fact to the `full` searches' "
              'candidates in proposal order (`replay`: the same blocks, so it shows what the '
              'rule stops and keeps, not the other blocks a pruned search would propose):', '',
              '| rule | seed | candidates | stopped | epochs / candidate | kept block | '
              'its rank among the final rewards |', '|---|---|---|---|---|---|---|']
    for variant, per_seed in data['replay'].items():
      for seed, r in per_seed.items():
        lines.append(f'| {variant} | {seed} | {r["candidates"]} | {r["stopped"]} | '
                     f'{r["epochs_per_candidate"]:.2f} | `{r["kept"]}` | {r["kept_rank"]} |')
  p = data['prices']
  for variant, m in data['summary'].items():
    per = ', '.join(f'{r:.2f}×' for r in m['candidates_per_hour_ratio'])
    at = ', '.join(f'{r:.2f}×' for r in m['priced_ratio'])
    lines += ['', f'Candidates per hour, `{variant}` over `full`, seed by seed: {per} '
              f'(mean {m["candidates_per_hour_ratio_mean"]:.2f}×) as measured; {at} (mean '
              f'{m["priced_ratio_mean"]:.2f}×) at the prices pooled over the '
              f'{len(data["priced_by"])} searches of {", ".join(_PRICED_BY.value)} '
              f'({p["epoch_s"]:.2f} s an epoch, '
              f'{p["validation_s"]:.2f} s a validation, {p["other_s"]:.2f} s the rest of a '
              f'candidate: compile-ahead hid the compile behind the previous training), which '
              f'count only the epochs and validations each candidate needed, not the load on '
              f'the machine or the sizes of the blocks each search happened to train.']
    if m['high_fidelity_difference']:
      per = ', '.join(f'{d:+.4f}' for d in m['high_fidelity_difference'])
      lines += ['', f'The kept block\'s high-fidelity accuracy, `{variant}` minus `full`, seed '
                f'by seed: {per}; mean {m["high_fidelity_difference_mean"]:+.4f} ± '
                f'{m["high_fidelity_difference_se"]:.4f} (the `full` kept blocks\' standard '
                f'error over seeds: {m["full_high_fidelity_se"]:.4f}).']
  return lines


def main(argv):
  del argv
  if not _REPORT_ONLY.value:
    run_searches()
  report(_RETRAIN.value)


if __name__ == '__main__':
  app.run(main)
