"""Several searches on one figure: what each found against the distinct candidates it trained.

Training candidates is the whole cost of a search, so a strategy is judged by what it has
found after B distinct candidates (a repeat of a trained block is free: its reward is
reused). For each search this draws, against the number of distinct candidates trained so
far, the best reward found and the mean of the 10 best distinct rewards; each strategy has
one colour, each seed a thin line, and the mean over seeds ± its standard error a band.
``compare_searches`` also writes the figures at the common budget (the fewest candidates
any of the searches trained) as a table, with each strategy's seed-by-seed differences
from random search.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence
import warnings

import numpy as np

from blockqnn_jax.report.figures import new_figure, save_figure
from blockqnn_jax.storage import store as store_lib
from blockqnn_jax.storage.results import Candidate

TOP = 10


@dataclasses.dataclass(frozen=True)
class Curve:
  """One search's progress: index i is after ``i + 1`` distinct candidates trained.

  Attributes:
    label: the search's name in the figure (strategy and seed when the config says them).
    strategy: the strategy (``strategy_name`` of the stored config).
    best: ``(n,)`` best reward so far (NaN before the first success).
    top_mean: ``(n,)`` mean of the ``TOP`` best distinct rewards so far (NaN until there
      are ``TOP``).
    seed: the search's seed (None when the config does not say).
    shared: of the distinct candidates, how many were read from the evaluation cache
      shared with other searches (trained by another search, or by an earlier one).
    best_block: the NSC text of the best block found (None before the first success).
  """

  label: str
  strategy: str
  best: np.ndarray
  top_mean: np.ndarray
  seed: int | None = None
  shared: int = 0
  best_block: str | None = None

  @property
  def trained(self) -> int:
    return len(self.best)


def curve(rows: Sequence[Candidate], label: str = '', strategy: str = '',
          seed: int | None = None) -> Curve:
  """The progress of one search from its rows, taken in the order they were recorded."""
  rewards: list[float] = []
  best, top_mean = [], []
  best_row = None
  shared = 0
  for row in sorted(rows, key=lambda r: r.id):
    if row.cached:  # a repeat costs nothing: it is not a step on the x axis
      continue
    shared += row.shared
    if row.ok:
      rewards.append(row.reward)
      if best_row is None or row.reward > best_row.reward:
        best_row = row
    best.append(max(rewards) if rewards else math.nan)
    top = sorted(rewards, reverse=True)[:TOP]
    top_mean.append(float(np.mean(top)) if len(top) == TOP else math.nan)
  return Curve(label, strategy, np.asarray(best, float), np.asarray(top_mean, float), seed,
               shared, None if best_row is None else best_row.nsc)


# Agent fields whose non-paper values make the Q-learner the fast one (settings.AgentSettings).
_FAST_AGENT = {'exploration': 'mutation', 'avoid_repeats': True, 'monotone': True,
               'restart': True}


def strategy_name(config: dict) -> str:
  """The strategy a stored config ran: 'qlearning_paper' or 'qlearning_fast' for the
  Q-learner (fast: any of its beyond-the-paper exploration fields on), else
  ``search.strategy``; '+confirm' after it when the search ran the confirm rule
  (``search.confirm`` > 1)."""
  search = config.get('search', {})
  strategy = search.get('strategy', 'qlearning')
  if strategy == 'qlearning':
    agent = config.get('agent', {})
    fast = any(agent.get(k) == v for k, v in _FAST_AGENT.items())
    strategy = 'qlearning_fast' if fast else 'qlearning_paper'
  return strategy + ('+confirm' if int(search.get('confirm', 1)) > 1 else '')


def rows_within(workdir: str | Path, budget: int) -> list[Candidate]:
  """A search's rows up to its ``budget``-th distinct candidate (repeats included)."""
  with store_lib.ResultsStore.open_read_only(workdir) as store:
    rows = sorted(store.candidates(), key=lambda r: r.id)
  out, distinct = [], 0
  for row in rows:
    if not row.cached:
      if distinct == budget:
        break
      distinct += 1
    out.append(row)
  return out


def load_curve(workdir: str | Path) -> Curve:
  """A workdir's curve, labelled with its strategy and seed from the stored config."""
  with store_lib.ResultsStore.open_read_only(workdir) as store:
    rows, meta = store.candidates(), store.meta()
  config = json.loads(meta.get('config') or '{}')
  strategy = strategy_name(config)
  seed = config.get('seed')
  return curve(rows, f'{strategy} seed {seed if seed is not None else "?"} '
               f'({Path(workdir).name})', strategy, seed)


def _sem(x: np.ndarray) -> float:
  """Standard error of the mean (0 for a single value)."""
  return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def at_budget(curves: Sequence[Curve], budget: int) -> dict[str, dict[str, Any]]:
  """Per strategy, over its searches that trained ``budget`` distinct candidates: the mean,
  standard deviation and standard error of the best reward and of the top-10 mean after
  ``budget`` candidates, how many searches, and each seed's figures."""
  out = {}
  for strategy in dict.fromkeys(c.strategy for c in curves):
    mine = [c for c in curves if c.strategy == strategy and c.trained >= budget]
    best = np.asarray([c.best[budget - 1] for c in mine])
    top = np.asarray([c.top_mean[budget - 1] for c in mine])
    out[strategy] = dict(searches=len(mine), best_mean=float(np.mean(best)),
                         best_std=float(np.std(best)), best_sem=_sem(best),
                         top_mean=float(np.mean(top)), top_std=float(np.std(top)),
                         top_sem=_sem(top),
                         seeds={c.seed: (float(c.best[budget - 1]), float(c.top_mean[budget - 1]))
                                for c in mine})
  return out


def paired_with(figures: dict[str, dict[str, Any]], baseline: str
                ) -> dict[str, dict[str, Any]]:
  """Per strategy, its figures minus the ``baseline`` strategy's, seed by seed (the seeds
  both ran): ``{strategy: {'seeds': {seed: (Δbest, Δtop)}, 'top_mean', 'top_sem', ...}}``."""
  base = figures.get(baseline, {}).get('seeds', {})
  out = {}
  for strategy, f in figures.items():
    if strategy == baseline:
      continue
    pairs = {seed: (b - base[seed][0], t - base[seed][1])
             for seed, (b, t) in f['seeds'].items() if seed in base}
    if not pairs:
      continue
    d_best = np.asarray([p[0] for p in pairs.values()])
    d_top = np.asarray([p[1] for p in pairs.values()])
    out[strategy] = dict(seeds=pairs, best_mean=float(d_best.mean()), best_sem=_sem(d_best),
                         top_mean=float(d_top.mean()), top_sem=_sem(d_top),
                         top_wins=int((d_top > 0).sum()), pairs=len(pairs))
  return out


def plot_comparison(curves: Sequence[Curve], path: str | Path) -> Path:
  """Best-so-far and top-10 mean reward against distinct candidates trained: one colour per
  strategy, a thin line per seed, the mean over seeds ± its standard error as a band."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  fig = new_figure(11, 4.2)
  ax_best, ax_top = fig.subplots(1, 2, sharex=True)
  palette = matplotlib.colormaps['tab10']
  strategies = list(dict.fromkeys(c.strategy for c in curves))
  colours = {s: palette(i % 10) for i, s in enumerate(strategies)}
  for strategy in strategies:
    mine = [c for c in curves if c.strategy == strategy]
    colour = colours[strategy]
    for ax, field in ((ax_best, 'best'), (ax_top, 'top_mean')):
      for c in mine:
        ax.plot(np.arange(1, c.trained + 1), getattr(c, field), color=colour, lw=0.6,
                alpha=0.45)
      n = min(c.trained for c in mine)
      values = np.asarray([getattr(c, field)[:n] for c in mine])
      x = np.arange(1, n + 1)
      with warnings.catch_warnings():  # columns before a search's 10th success are NaN
        warnings.simplefilter('ignore', RuntimeWarning)
        mean = np.nanmean(values, axis=0)
        sem = (np.nanstd(values, axis=0, ddof=1) / np.sqrt(len(mine)) if len(mine) > 1
               else np.zeros(n))
      label = f'{strategy} ({len(mine)} seed{"s" if len(mine) > 1 else ""})'
      ax.plot(x, mean, color=colour, lw=2.0, label=label if ax is ax_best else None)
      ax.fill_between(x, mean - sem, mean + sem, color=colour, alpha=0.2, lw=0)
  ax_best.set_title('best reward so far (mean ± s.e. over seeds)')
  ax_top.set_title(f'mean of the {TOP} best distinct rewards so far')
  for ax in (ax_best, ax_top):
    ax.set_xlabel('distinct candidates trained')
    ax.grid(alpha=0.3)
  ax_best.set_ylabel('reward')
  if strategies:
    ax_best.legend(loc='lower right', fontsize=8)
  return save_figure(fig, path)


def comparison_table(curves: Sequence[Curve], baseline: str = 'random') -> tuple[int, list[str]]:
  """``(budget, markdown lines)``: the figures at the common budget (mean ± s.e. over seeds),
  then each strategy's seed-by-seed differences from ``baseline``."""
  budget = min((c.trained for c in curves), default=0)
  lines = [f'At the common budget of {budget} distinct candidates (mean ± standard error '
           'over the seeds of a strategy):', '',
           f'| strategy | seeds | best reward | mean of the {TOP} best |', '|---|---|---|---|']
  if not budget:
    return budget, lines
  figures = at_budget(curves, budget)
  for strategy, f in figures.items():
    lines.append(f'| {strategy} | {f["searches"]} | {f["best_mean"]:.4f} ± '
                 f'{f["best_sem"]:.4f} | {f["top_mean"]:.4f} ± {f["top_sem"]:.4f} |')
  pairs = paired_with(figures, baseline)
  if pairs:
    lines += ['', f'Against {baseline}, seed by seed (difference at the same seed; mean ± '
              's.e. of the differences):', '',
              f'| strategy | Δ best per seed | Δ best | Δ top-{TOP} per seed | Δ top-{TOP} | '
              f'top-{TOP} ahead |', '|---|---|---|---|---|---|']
    for strategy, p in pairs.items():
      per_best = ', '.join(f'{s}: {d[0]:+.4f}' for s, d in sorted(p['seeds'].items()))
      per_top = ', '.join(f'{s}: {d[1]:+.4f}' for s, d in sorted(p['seeds'].items()))
      lines.append(f'| {strategy} | {per_best} | {p["best_mean"]:+.4f} ± {p["best_sem"]:.4f} '
                   f'| {per_top} | {p["top_mean"]:+.4f} ± {p["top_sem"]:.4f} | '
                   f'{p["top_wins"]}/{p["pairs"]} |')
  return budget, lines


def compare_searches(workdirs: Sequence[str | Path], out_dir: str | Path
                     ) -> tuple[Path, Path]:
  """Draws ``comparison.png`` and writes ``comparison.md`` (figures at the common budget)
  into ``out_dir``; returns both paths."""
  curves = [load_curve(w) for w in workdirs]
  out_dir = Path(out_dir)
  png = plot_comparison(curves, out_dir / 'comparison.png')
  _, table = comparison_table(curves)
  lines = [f'# {len(curves)} searches compared', ''] + table
  lines += ['', 'Searches:', ''] + [
      f'- {c.label}: {c.trained} distinct candidates'
      f'{f" ({c.shared} read from the shared evaluation cache)" if c.shared else ""}, '
      f'best {c.best[-1]:.4f}: `{c.best_block}`' if c.trained else f'- {c.label}: none yet'
      for c in curves]
  lines += ['', f'![comparison]({png.name})', '']
  md = out_dir / 'comparison.md'
  md.write_text('\n'.join(lines))
  return png, md
