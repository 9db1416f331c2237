r"""What a first run shows: does the smoke preset's reward rank blocks, and does its search learn?

Two parts, printed and written to ``results/smoke.json`` (``--json``):

* ``reward``: ``--blocks`` distinct blocks drawn as the random phase draws them, each trained
  from two seeds exactly as the smoke search trains a candidate and its first re-evaluation:
  the validation accuracy against chance (0.1), the reward's seed noise (the same block, two
  seeds) against its spread over blocks, and Kendall τ between the two seeds' rankings.
* ``search``: the smoke search as ``scripts/smoke`` runs it (``experiments.search
  --config=configs/cifar.py:smoke``), from a new workdir once per ``--seeds`` entry, then
  ``experiments.report`` on it, both timed as a user waits for them. Per seed: the mean
  reward in the random phase (ε = 1) and at the lowest ε, the best reward and the iteration
  that found it (after the random phase or not), and the kept block.

  python -m benchmarks.smoke                                   # both parts, ~12 min here
  python -m benchmarks.smoke --measure=reward --json=results/smoke_before.json \
      --set=train.augment=True --set=train.epochs=3 --set=data.max_train=1000 \
      --set=data.validation_size=200       # the reward of the smoke preset before 2026-12-06

``--set FIELD=VALUE`` changes the preset for both parts (the search gets it as
``--config.FIELD=VALUE``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
import shutil
import subprocess
import sys
import time

from absl import app, flags
import jax
import numpy as np

from benchmarks import fidelity, fixtures
from blockqnn_jax.data import search_data
from blockqnn_jax.executors import local as local_executor
from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import space as space_lib
from blockqnn_jax.search import study as study_lib
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.storage import store as store_lib
from blockqnn_jax.strategies import confirm as confirm_lib
from blockqnn_jax.strategies import paths
from configs import cifar

_MEASURE = flags.DEFINE_list('measure', ['reward', 'search'], "What to measure: 'reward', "
                           "'search' or both.")
_BLOCKS = flags.DEFINE_integer('blocks', 24, 'Blocks drawn for the reward part.')
_DRAW_SEED = flags.DEFINE_integer('draw_seed', 0, 'Seeds the draw of blocks.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2', '3', '4'], 'Search seeds (--config.seed).')
_SET = flags.DEFINE_multi_string('set', [], 'FIELD=VALUE: a change to the smoke preset, e.g. '
                                 'train.epochs=3.')
_WORKDIRS = flags.DEFINE_string('workdirs', 'workdirs/bench_smoke',
                                'Where the searches run (seed<k>/; each started afresh).')
_JSON = flags.DEFINE_string('json', 'results/smoke.json', 'Where the figures go.')

CHANCE = 0.1  # ten digit classes
REPLICATES = (0, 1)  # a candidate's first evaluation and its first re-evaluation


def smoke_config(changes: list[str]):
  """The smoke preset with ``changes`` (``FIELD=VALUE``) applied."""
  return fixtures.preset_config('smoke', changes)


def drawn_blocks(settings: SearchSettings, n: int, seed: int):
  """``n`` distinct blocks (canonically) drawn uniformly action by action, as ε = 1 draws."""
  space = space_lib.build_space(settings.space)
  blocks, keys = [], set()
  key = jax.random.key(seed)
  while len(blocks) < n:
    key, draw = jax.random.split(key)
    for block in space.decode_batch(np.asarray(paths.random_paths(space, draw, 4 * n).states)):
      k = canonical.canonical_key(block)
      if k not in keys and len(blocks) < n:
        keys.add(k)
        blocks.append(block)
  return blocks


def measure_reward(settings: SearchSettings, n: int, seed: int) -> dict:
  """Trains ``n`` drawn blocks from two seeds each; the figures of the reward part."""
  blocks = drawn_blocks(settings, n, seed)
  splits = search_data.load_search_data(settings.data, settings.network,
                                        settings.data.holdout(settings.seed))
  shape = (len(blocks), len(REPLICATES))
  reward, accuracy, seconds = np.zeros(shape), np.zeros(shape), np.zeros(shape)
  start = time.perf_counter()
  with local_executor.LocalExecutor(splits, settings, devices=jax.local_devices()[:1]) as ex:
    futures = [[ex.submit(b, seed=study_lib.candidate_seed(settings.seed,
                                                           canonical.canonical_key(b), r))
                for r in REPLICATES] for b in blocks]
    for i, row in enumerate(futures):
      for j, future in enumerate(row):
        result = future.result()
        if not result.ok:
          raise RuntimeError(f'{result.block} failed: {result.failure_reason}')
        reward[i, j], accuracy[i, j] = result.reward, result.val_accuracy
        seconds[i, j] = result.compile_s + result.train_s + result.eval_s
  from scipy import stats  # pylint: disable=import-outside-toplevel
  return dict(
      blocks=len(blocks), chance=CHANCE,
      accuracy_mean=float(accuracy.mean()), accuracy_min=float(accuracy.min()),
      accuracy_max=float(accuracy.max()),
      **fidelity.noise_figures(reward),
      kendall_tau_between_seeds=float(stats.kendalltau(reward[:, 0], reward[:, 1]).statistic),
      seconds_per_training=float(seconds.mean()),
      wall_s=time.perf_counter() - start,
      per_block=[dict(nsc=b.to_text(), rewards=[float(x) for x in reward[i]])
                 for i, b in enumerate(blocks)])


def _timed(command: list[str], log: Path) -> float:
  start = time.perf_counter()
  with open(log, 'a') as out:
    done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
  if done.returncode:
    raise RuntimeError(f'{" ".join(command)} exited {done.returncode}: see {log}')
  return time.perf_counter() - start


def _mean(values) -> float:
  return float(np.mean(values)) if len(values) else math.nan


def search_figures(workdir: Path) -> dict:
  """One finished search's figures, read from its store."""
  with store_lib.ResultsStore.open_read_only(workdir) as store:
    rows = store.candidates()
    kept = confirm_lib.kept_block(store)
    trainings = store.trainings()
  ok = [c for c in rows if c.ok]
  lowest = min(c.epsilon for c in rows)
  best = max(ok, key=lambda c: c.reward)
  return dict(
      iterations=1 + max(c.iteration for c in rows), candidates=len(rows),
      trainings=trainings, failed=len(rows) - len(ok),
      random_mean=_mean([c.reward for c in ok if c.epsilon == 1.0]),
      lowest_epsilon=float(lowest),
      lowest_epsilon_mean=_mean([c.reward for c in ok if c.epsilon == lowest]),
      best_reward=best.reward, best_iteration=best.iteration,
      best_after_random=bool(best.epsilon < 1.0),
      kept=None if kept is None else dict(block=kept.block, reward=kept.reward,
                                          evaluations=kept.evaluations, rule=kept.rule),
      rows=[(c.iteration, c.epsilon, c.reward if c.ok else None) for c in rows])


def run_search(seed: str, changes: list[str]) -> dict:
  """The smoke search of ``seed`` from a new workdir, then its report; their figures."""
  workdir = Path(_WORKDIRS.value) / f'seed{seed}'
  shutil.rmtree(workdir, ignore_errors=True)
  workdir.parent.mkdir(parents=True, exist_ok=True)
  log = workdir.parent / f'seed{seed}.log'
  log.unlink(missing_ok=True)
  search_s = _timed([sys.executable, '-m', 'experiments.search',
                     '--config=configs/cifar.py:smoke', f'--workdir={workdir}',
                     f'--config.seed={seed}', '--noprogress',
                     *(f'--config.{c}' for c in changes)], log)
  report_s = _timed([sys.executable, '-m', 'experiments.report', f'--workdir={workdir}'], log)
  return dict(seed=int(seed), search_s=search_s, report_s=report_s,
              **search_figures(workdir))


def _print_reward(r: dict) -> None:
  print(f"reward: {r['blocks']} blocks x {len(REPLICATES)} seeds, "
        f"{r['seconds_per_training']:.1f} s per training")
  print(f"  validation accuracy {r['accuracy_mean']:.3f} on average "
        f"({r['accuracy_min']:.3f} - {r['accuracy_max']:.3f}; chance {r['chance']:.1f})")
  print(f"  seed noise {r['seed_noise']:.4f}, spread over blocks "
        f"{r['spread_over_blocks']:.4f}: {r['signal_to_noise']:.1f}x; Kendall tau between "
        f"the seeds' rankings {r['kendall_tau_between_seeds']:.2f}")


def _print_searches(runs: list[dict]) -> None:
  print('| seed | random phase, mean | lowest ε, mean | best (iteration) | found after the '
        'random phase | kept (evaluations) | search + report |')
  print('|---|---|---|---|---|---|---|')
  for r in runs:
    kept = r['kept'] or {}
    print(f"| {r['seed']} | {r['random_mean']:.3f} | {r['lowest_epsilon_mean']:.3f} | "
          f"{r['best_reward']:.3f} ({r['best_iteration']}) | "
          f"{'yes' if r['best_after_random'] else 'no'} | "
          f"{kept.get('reward', math.nan):.3f} ({kept.get('evaluations', 0)}) | "
          f"{r['search_s']:.0f} + {r['report_s']:.0f} s |")
  gains = [r['lowest_epsilon_mean'] - r['random_mean'] for r in runs]
  after = sum(r['best_after_random'] for r in runs)
  total = [r['search_s'] + r['report_s'] for r in runs]
  print(f"lowest ε minus random phase: {np.mean(gains):+.3f} on average "
        f"({sum(g > 0 for g in gains)} of {len(runs)} seeds above); best block found after "
        f"the random phase on {after} of {len(runs)} seeds; search + report "
        f"{np.mean(total):.0f} s on average (max {np.max(total):.0f} s)")


def main(argv):
  del argv
  changes = list(_SET.value)
  settings = SearchSettings.from_config(smoke_config(changes))
  path = Path(_JSON.value)
  path.parent.mkdir(parents=True, exist_ok=True)
  report = json.loads(path.read_text()) if path.exists() else {}
  if report.get('changes', []) != changes:
    report = {}  # another preset's figures: start over
  report.update(changes=changes, command=' '.join(
      ['python -m benchmarks.smoke', *(f'--set={c}' for c in changes),
       *([f'--json={path}'] if str(path) != _JSON.default else [])]))
  if 'reward' in _MEASURE.value:
    report['reward'] = measure_reward(settings, _BLOCKS.value, _DRAW_SEED.value)
    path.write_text(json.dumps(report, indent=1))
    _print_reward(report['reward'])
  if 'search' in _MEASURE.value:
    runs = []
    for seed in _SEEDS.value:
      runs.append(run_search(seed, changes))
      print(f"seed {seed}: {runs[-1]['search_s']:.0f} s", flush=True)
    report['searches'] = runs
    path.write_text(json.dumps(report, indent=1))
    _print_searches(runs)
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
