"""Several searches on one figure: what each found against the distinct candidates it trained.

Training candidates is the whole cost of a search, so a strategy is judged by what it has
found after B distinct candidates (a repeat of a trained block is free: its reward is
reused). For each search this draws, against the number of distinct candidates trained so
far, the best reward found and the mean of the 10 best distinct rewards; searches of one
strategy share a colour, one line per seed. ``compare_searches`` also returns the figures
at the common budget (the fewest candidates any of the searches trained) as a table.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from blockqnn_jax import store as store_lib
from blockqnn_jax.report.figures import new_figure, save_figure
from blockqnn_jax.results import Candidate

TOP = 10


@dataclasses.dataclass(frozen=True)
class Curve:
  """One search's progress: index i is after ``i + 1`` distinct candidates trained.

  Attributes:
    label: the search's name in the figure (strategy and seed when the config says them).
    strategy: the strategy (``search.strategy``; 'qlearning' for older workdirs).
    best: ``(n,)`` best reward so far (NaN before the first success).
    top_mean: ``(n,)`` mean of the ``TOP`` best distinct rewards so far (NaN until there
      are ``TOP``).
  """

  label: str
  strategy: str
  best: np.ndarray
  top_mean: np.ndarray

  @property
  def trained(self) -> int:
    return len(self.best)


def curve(rows: Sequence[Candidate], label: str = '', strategy: str = '') -> Curve:
  """The progress of one search from its rows, taken in the order they were recorded."""
  rewards: list[float] = []
  best, top_mean = [], []
  for row in sorted(rows, key=lambda r: r.id):
    if row.cached:  # a repeat costs nothing: it is not a step on the x axis
      continue
    if row.ok:
      rewards.append(row.reward)
    best.append(max(rewards) if rewards else math.nan)
    top = sorted(rewards, reverse=True)[:TOP]
    top_mean.append(float(np.mean(top)) if len(top) == TOP else math.nan)
  return Curve(label, strategy, np.asarray(best, float), np.asarray(top_mean, float))


def load_curve(workdir: str | Path) -> Curve:
  """A workdir's curve, labelled with its strategy and seed from the stored config."""
  with store_lib.ResultsStore.open_read_only(workdir) as store:
    rows, meta = store.candidates(), store.meta()
  config = json.loads(meta.get('config') or '{}')
  strategy = config.get('search', {}).get('strategy', 'qlearning')
  seed = config.get('seed', '?')
  return curve(rows, f'{strategy} seed {seed} ({Path(workdir).name})', strategy)


def at_budget(curves: Sequence[Curve], budget: int) -> dict[str, dict[str, float]]:
  """Per strategy: mean and standard deviation over its searches of the best reward and the
  top-10 mean after ``budget`` distinct candidates, and how many searches."""
  out = {}
  for strategy in dict.fromkeys(c.strategy for c in curves):
    mine = [c for c in curves if c.strategy == strategy and c.trained >= budget]
    best = np.asarray([c.best[budget - 1] for c in mine])
    top = np.asarray([c.top_mean[budget - 1] for c in mine])
    out[strategy] = dict(searches=len(mine), best_mean=float(np.mean(best)),
                         best_std=float(np.std(best)), top_mean=float(np.mean(top)),
                         top_std=float(np.std(top)))
  return out


def plot_comparison(curves: Sequence[Curve], path: str | Path) -> Path:
  """Best-so-far and top-10 mean reward against distinct candidates trained, one line per
  search, one colour per strategy."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  fig = new_figure(11, 4.2)
  ax_best, ax_top = fig.subplots(1, 2, sharex=True)
  palette = matplotlib.colormaps['tab10']
  colours = {s: palette(i % 10) for i, s in enumerate(dict.fromkeys(c.strategy for c in curves))}
  labelled = set()
  for c in curves:
    x = np.arange(1, c.trained + 1)
    label = c.strategy if c.strategy not in labelled else None
    labelled.add(c.strategy)
    ax_best.plot(x, c.best, color=colours[c.strategy], lw=1.4, alpha=0.85, label=label)
    ax_top.plot(x, c.top_mean, color=colours[c.strategy], lw=1.4, alpha=0.85)
  ax_best.set_title('best reward so far')
  ax_top.set_title(f'mean of the {TOP} best distinct rewards so far')
  for ax in (ax_best, ax_top):
    ax.set_xlabel('distinct candidates trained')
    ax.grid(alpha=0.3)
  ax_best.set_ylabel('reward')
  if labelled:
    ax_best.legend(loc='lower right', fontsize=8)
  return save_figure(fig, path)


def compare_searches(workdirs: Sequence[str | Path], out_dir: str | Path
                     ) -> tuple[Path, Path]:
  """Draws ``comparison.png`` and writes ``comparison.md`` (figures at the common budget)
  into ``out_dir``; returns both paths."""
  curves = [load_curve(w) for w in workdirs]
  out_dir = Path(out_dir)
  png = plot_comparison(curves, out_dir / 'comparison.png')
  budget = min((c.trained for c in curves), default=0)
  lines = [f'# {len(curves)} searches compared', '',
           f'At the common budget of {budget} distinct candidates trained (mean ± std over '
           'the searches of a strategy):', '',
           f'| strategy | searches | best reward | mean of the {TOP} best |', '|---|---|---|---|']
  if budget:
    for strategy, f in at_budget(curves, budget).items():
      lines.append(f'| {strategy} | {f["searches"]} | {f["best_mean"]:.4f} ± '
                   f'{f["best_std"]:.4f} | {f["top_mean"]:.4f} ± {f["top_std"]:.4f} |')
  lines += ['', 'Searches:', ''] + [f'- {c.label}: {c.trained} trained' for c in curves]
  lines += ['', f'![comparison]({png.name})', '']
  md = out_dir / 'comparison.md'
  md.write_text('\n'.join(lines))
  return png, md
