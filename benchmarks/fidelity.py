r"""Does the search's cheap reward rank blocks as a ten-times longer training would?

Draws blocks uniformly from the distinct canonical blocks of the cpu preset's space (every
legal path enumerated, degenerate merges dropped, one block per canonical key), trains each
at every ``--fidelities`` entry from two seeds, and once at the high fidelity, then reports
per fidelity:

* the reward's seed noise (the same block, two seeds) against its spread over blocks;
* Kendall τ and Spearman ρ against the high fidelity (single seeds, as a search sees them,
  and the mean of the two);
* how many of the high fidelity's top 5 blocks the fidelity's top 10 hold;
* seconds per candidate (compile included, as a search pays it).

The high fidelity trains on the whole training split of ``--high_data`` (by default the full
50,000-image JPEG CIFAR-10) and scores on its test split, never seen by any search.
Every result goes through an evaluation cache (``--cache``), so a run that is stopped
continues where it was, and the figures can be recomputed from the cache alone.

  mkdir -p data && cp ../shared/data/cifar10-exact-subset.npz data/
  python -m benchmarks.fidelity --data=data/cifar10-exact-subset.npz \
      --high_data=image_folder:../shared/data/cifar10-jpeg-full.tar

Writes ``results/fidelity.json`` (``kendall_tau`` at top level: the preset's, single seed)
and ``results/fidelity.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
import time

from absl import app, flags
import numpy as np

from benchmarks import fidelities
from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.nsc import space as space_lib
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.strategies import paths as paths_lib
from configs import cifar

_DATA = flags.DEFINE_string('data', 'data/cifar10-exact-subset.npz',
                            'The CIFAR-10 exact subset (.npz) the preset searches on.')
_HIGH_DATA = flags.DEFINE_string('high_data', fidelities.JPEG_FULL,
                                 "'SOURCE:PATH' of the high fidelity's data (train on its "
                                 'whole training split, score on its test split).')
_FIDELITIES = flags.DEFINE_list(
    'fidelities', ['preset'],
    "Fidelities to judge: 'preset' (configs/cifar.py:cpu as it is) or "
    "NAME=MAX_TRAIN:EPOCHS:FEATURES (MAX_TRAIN images read, 0 = all, the preset's "
    'validation held out of them), e.g. all2=0:2:8.')
_HIGH = flags.DEFINE_string('high', fidelities.HIGH, 'The high fidelity, MAX_TRAIN:EPOCHS:FEATURES.')
_NUM = flags.DEFINE_integer('num_blocks', 40, 'Blocks drawn.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seeds the draw of blocks.')
_MAX_INDEX = flags.DEFINE_integer('max_index', 0, "Draw from the cpu preset's space cut to "
                                  'this many layer indices (a smaller space enumerates '
                                  "faster); 0: the preset's.")
_CACHE = flags.DEFINE_string('cache', 'results/fidelity/cache.sqlite',
                             'Evaluation cache (resumable; shared by the fidelities).')
_OUT = flags.DEFINE_string('out', 'results', 'Where fidelity.json and fidelity.png go.')
_PARTS = flags.DEFINE_list('parts', ['judged', 'high'], "What to train: 'judged' (the "
                           "--fidelities), 'high', or both (two processes may train one each "
                           'at the same time: they share the cache).')
_ONLY_REPORT = flags.DEFINE_bool('report_only', False,
                                 'Compute the tables from the cache; train nothing new.')

SEEDS = (0, 1)  # replicates of every block at every judged fidelity


def canonical_blocks(grammar: nsc.Grammar) -> list[nsc.Block]:
  """One block per canonical key of the space of ``grammar``, in a fixed order: every path
  of the space, those that merge a tensor with itself dropped (``strategies.path_valid``).
  Feasible for small spaces only (T = 5 with two kernel sizes: 124,103 paths)."""
  sp = space_lib.build_space(grammar)
  offset, count, terminal = (np.asarray(a) for a in (sp.action_offset, sp.num_actions,
                                                     sp.is_terminal))
  paths, stack = [], [(0, (0,))]
  while stack:
    state, path = stack.pop()
    if terminal[state]:
      paths.append(path + (path[-1],) * (sp.max_index + 1 - len(path)))
      continue
    stack.extend((offset[state] + a, path + (offset[state] + a,))
                 for a in range(count[state] - 1, -1, -1))
  states = np.asarray(paths, np.int32)
  lengths = np.asarray([_length(p, terminal) for p in paths], np.int32)
  valid = np.asarray(paths_lib.path_valid(sp, states, lengths))
  seen, out = set(), []
  for block in sp.decode_batch(states[valid]):
    key = canonical.canonical_key(block)
    if key not in seen:
      seen.add(key)
      out.append(block)
  return out


def _length(path, terminal) -> int:
  """Layers of a padded path, its terminal included."""
  return next(i for i, s in enumerate(path) if terminal[s])


def _ranks_stats(x: np.ndarray, y: np.ndarray) -> dict:
  from scipy import stats  # pylint: disable=import-outside-toplevel
  tau = stats.kendalltau(x, y).statistic
  rho = stats.spearmanr(x, y).statistic
  return dict(kendall_tau=float(tau), spearman_rho=float(rho))


def _top_overlap(judged: np.ndarray, truth: np.ndarray, k_judged=10, k_truth=5) -> int:
  top_judged = set(np.argsort(-judged, kind='stable')[:k_judged].tolist())
  top_truth = set(np.argsort(-truth, kind='stable')[:k_truth].tolist())
  return len(top_truth & top_judged)


def noise_figures(rewards: np.ndarray) -> dict:
  """Seed noise against spread, of ``rewards`` ``(blocks, 2 seeds)``: the noise is the RMS
  difference of a block's two rewards over sqrt(2) (one reward's std), the spread the std
  over blocks of their two-seed means."""
  noise = float(np.sqrt(np.mean((rewards[:, 0] - rewards[:, 1]) ** 2) / 2))
  spread = float(rewards.mean(axis=1).std(ddof=1))
  return dict(seed_noise=noise, spread_over_blocks=spread,
              signal_to_noise=spread / noise if noise else math.inf)


def summarize(name: str, spec: str, rewards: np.ndarray, accuracies: np.ndarray,
              seconds: np.ndarray, high_reward: np.ndarray, high_accuracy: np.ndarray
              ) -> dict:
  """The figures of one judged fidelity: ``rewards``/``accuracies`` are ``(blocks, seeds)``,
  ``seconds`` and ``high_*`` ``(blocks,)``."""
  mean = rewards.mean(axis=1)
  single = [_ranks_stats(rewards[:, s], high_reward) for s in range(rewards.shape[1])]
  out = dict(
      name=name, spec=spec, blocks=int(rewards.shape[0]),
      **noise_figures(rewards),
      kendall_tau=float(np.mean([s['kendall_tau'] for s in single])),
      spearman_rho=float(np.mean([s['spearman_rho'] for s in single])),
      kendall_tau_per_seed=[s['kendall_tau'] for s in single],
      two_seed_mean=_ranks_stats(mean, high_reward),
      accuracy=dict(**{k: float(np.mean([_ranks_stats(accuracies[:, s], high_accuracy)[k]
                                         for s in range(accuracies.shape[1])]))
                       for k in ('kendall_tau', 'spearman_rho')}),
      top5_of_high_in_top10=float(np.mean([_top_overlap(rewards[:, s], high_reward)
                                           for s in range(rewards.shape[1])])),
      seconds_per_candidate=float(seconds.mean()),
      mean_reward=float(mean.mean()))
  return out


def main(argv):
  del argv
  grammar = SearchSettings.from_config(cifar.get_config('cpu')).space
  if _MAX_INDEX.value:
    grammar = dataclasses.replace(grammar, max_index=_MAX_INDEX.value)
  t0 = time.perf_counter()
  space_blocks = canonical_blocks(grammar)
  print(f'the cpu space (T = {grammar.max_index}): {len(space_blocks)} distinct canonical '
        f'blocks ({time.perf_counter() - t0:.0f} s to enumerate)', flush=True)
  rng = np.random.default_rng(_SEED.value)
  blocks = [space_blocks[i] for i in sorted(rng.choice(len(space_blocks), _NUM.value,
                                                       replace=False))]
  keys = [canonical.canonical_key(b) for b in blocks]
  train = not _ONLY_REPORT.value
  judged = []
  for entry in _FIDELITIES.value:
    name, _, spec = entry.partition('=')
    judged.append(fidelities.judged(name, spec or fidelities.preset_spec(), _DATA.value))
  results = {f.name: fidelities.evaluate(f, blocks, SEEDS, _CACHE.value,
                                         train and 'judged' in _PARTS.value) for f in judged}
  high = fidelities.high(_HIGH.value, _HIGH_DATA.value)
  results['high'] = fidelities.evaluate(high, blocks, (0,), _CACHE.value,
                                        train and 'high' in _PARTS.value)

  def table(name, seeds, field):
    return np.asarray([[getattr(results[name][(k, s)], field) if results[name][(k, s)]
                        else np.nan for s in seeds] for k in keys], np.float64)

  high_reward, high_acc = table('high', (0,), 'reward')[:, 0], table('high', (0,),
                                                                     'val_accuracy')[:, 0]
  complete = np.isfinite(high_reward)
  summaries = []
  for f in judged:
    r, a = table(f.name, SEEDS, 'reward'), table(f.name, SEEDS, 'val_accuracy')
    ok = complete & np.isfinite(r).all(axis=1)
    if ok.sum() < 3:
      print(f'{f.name}: too few blocks with every result ({ok.sum()})')
      continue
    # A cold candidate's cost: its compile (paid by one of the two seeds) and its training.
    cost = (table(f.name, SEEDS, 'compile_s') + table(f.name, SEEDS, 'train_s')
            + table(f.name, SEEDS, 'eval_s')).max(axis=1)
    summaries.append(summarize(f.name, f.spec, r[ok], a[ok], cost[ok], high_reward[ok],
                               high_acc[ok]))
  preset = next((s for s in summaries if s['spec'] == fidelities.preset_spec()), None)
  report = dict(
      kendall_tau=preset['kendall_tau'] if preset else None,
      preset=fidelities.preset_spec(), high=dict(spec=high.spec, data=_HIGH_DATA.value,
                                       train_images=int(len(high.splits.train_labels)),
                                       test_images=int(len(high.splits.val_labels)),
                                       seconds_per_candidate=float(np.nanmean(
                                           table('high', (0,), 'compile_s')
                                           + table('high', (0,), 'train_s')))),
      space_size=len(space_blocks), draw_seed=_SEED.value,
      fidelities=summaries,
      blocks=[dict(nsc=b.to_text(), canonical_key=k, high_reward=float(high_reward[i]),
                   high_accuracy=float(high_acc[i]),
                   **{f.name: [float(x) for x in table(f.name, SEEDS, 'reward')[i]]
                      for f in judged})
              for i, (b, k) in enumerate(zip(blocks, keys))],
      command='python -m benchmarks.fidelity ' + ' '.join(
          f'--{n}={v}' for n, v in (('fidelities', ','.join(_FIDELITIES.value)),
                                    ('high', _HIGH.value), ('num_blocks', _NUM.value))))
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'fidelity.json').write_text(json.dumps(report, indent=1))
  _print(summaries, report)
  _figure(judged, table, high_reward, out / 'fidelity.png')
  print(f'wrote {out / "fidelity.json"} and {out / "fidelity.png"}')


def _print(summaries, report) -> None:
  h = report['high']
  print(f'\nhigh fidelity {h["spec"]} on {h["train_images"]} images of {h["data"]}, scored '
        f'on {h["test_images"]} test images ({h["seconds_per_candidate"]:.0f} s per block)')
  print(f'{"fidelity":>10} {"spec":>10} {"blocks":>6} {"s/cand":>7} {"seed σ":>7} {"blocks σ":>8} '
        f'{"S/N":>5} {"τ":>6} {"ρ":>6} {"τ 2-seed":>8} {"τ acc":>6} {"top5⊂top10":>10}')
  for s in summaries:
    print(f'{s["name"]:>10} {s["spec"]:>10} {s["blocks"]:>6} {s["seconds_per_candidate"]:>7.1f} '
          f'{s["seed_noise"]:>7.4f} {s["spread_over_blocks"]:>8.4f} '
          f'{s["signal_to_noise"]:>5.1f} {s["kendall_tau"]:>6.3f} {s["spearman_rho"]:>6.3f} '
          f'{s["two_seed_mean"]["kendall_tau"]:>8.3f} {s["accuracy"]["kendall_tau"]:>6.3f} '
          f'{s["top5_of_high_in_top10"]:>10.1f}')


def _figure(judged, table, high_reward, path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(judged), figsize=(4.2 * len(judged), 4), squeeze=False)
  for ax, f in zip(axes[0], judged):
    r = table(f.name, SEEDS, 'reward')
    ax.errorbar(high_reward, r.mean(axis=1), yerr=np.abs(r[:, 0] - r[:, 1]) / 2, fmt='o',
                ms=4, alpha=0.8, elinewidth=1)
    ax.set_xlabel('high-fidelity reward')
    ax.set_ylabel(f'{f.name} reward (mean of 2 seeds, bar: half the gap)')
    ax.set_title(f'{f.name} ({f.spec}: images:epochs:F)')
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == '__main__':
  app.run(main)
