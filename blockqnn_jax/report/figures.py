"""The report's pictures: reward per iteration, reward by ε, accuracy vs FLOPs, and blocks.

Each ``plot_*`` / ``draw_block`` function draws one PNG from the store's rows
(``results.Candidate``) or a parsed block, and returns its path. The numbers come from
``analysis`` and the block geometry from ``layout``; this module only draws.

matplotlib is used through its Agg canvas on this module's own ``Figure`` objects, never
pyplot, so drawing needs no display and leaves the caller's backend alone; it is imported
inside the functions, so importing the report stays light.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path
from typing import Sequence

from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.nsc.grammar import LayerType
from blockqnn_jax.report import analysis
from blockqnn_jax.report.layout import INPUT, OUTPUT, layout_block, node_label
from blockqnn_jax.storage.results import Candidate

# One colour map for ε everywhere, so a phase reads the same in every figure.
_EPSILON_CMAP = 'viridis'


def new_figure(width: float, height: float, layout: str | None = 'constrained'):
  """A Figure on the Agg canvas: no pyplot, no global backend switch, no display."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), layout=layout)
  FigureCanvasAgg(fig)
  return fig


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi)
  return path


def _epsilon_colour(epsilon: float):
  import matplotlib  # pylint: disable=g-import-not-at-top
  return matplotlib.colormaps[_EPSILON_CMAP](epsilon)


def _no_data(ax, message: str):
  ax.text(0.5, 0.5, message, ha='center', va='center', transform=ax.transAxes, color='0.4')


def plot_reward_per_iteration(rows: Sequence[Candidate], path: str | Path) -> Path:
  """Mean, max and best-so-far reward per iteration, every candidate a faint dot.

  The ε phases are shaded in their ε colour and named along the top axis; failed
  candidates are marked by red crosses along the bottom edge.
  """
  fig = new_figure(10, 4.8)
  ax = fig.add_subplot()
  ok = [r for r in rows if r.ok]
  failed = [r for r in rows if not r.ok]
  phases = analysis.epsilon_phases(rows)
  for phase in phases:
    ax.axvspan(phase.first_iteration - 0.5, phase.last_iteration + 0.5,
               color=_epsilon_colour(phase.epsilon), alpha=0.13, lw=0)
  for phase in phases[1:]:
    ax.axvline(phase.first_iteration - 0.5, color='0.5', lw=0.6, ls=':')
  if ok:
    # The more dots, the fainter each, so that dense regions still read as density.
    alpha = 0.5 if len(ok) < 500 else 0.15
    ax.scatter([r.iteration for r in ok], [r.reward for r in ok], s=6, color='0.35',
               alpha=alpha, lw=0, label='candidate', zorder=2)
    by_it: dict[int, list[float]] = collections.defaultdict(list)
    for r in ok:
      by_it[r.iteration].append(r.reward)
    its = sorted(by_it)
    means = [sum(by_it[i]) / len(by_it[i]) for i in its]
    maxes = [max(by_it[i]) for i in its]
    best, running = [], -math.inf
    for m in maxes:
      running = max(running, m)
      best.append(running)
    marker = 'o' if len(its) <= 30 else None
    ax.plot(its, means, color='tab:blue', lw=1.8, marker=marker, ms=3, label='mean',
            zorder=3)
    ax.plot(its, maxes, color='tab:orange', lw=1.2, marker=marker, ms=3, label='max',
            zorder=3)
    ax.plot(its, best, color='tab:red', lw=1.0, ls='--', label='best so far', zorder=3)
  else:
    _no_data(ax, 'no successful candidate yet')
  if failed:
    ax.scatter([r.iteration for r in failed], [0.02] * len(failed), marker='x', s=14,
               color='tab:red', lw=0.8, transform=ax.get_xaxis_transform(),
               label=f'failed ({len(failed)})', zorder=4)
  if phases:
    ax.set_xlim(phases[0].first_iteration - 0.5, phases[-1].last_iteration + 0.5)
    top = ax.secondary_xaxis('top')
    top.set_xticks([(p.first_iteration + p.last_iteration) / 2 for p in phases],
                   [f'{p.epsilon:g}' for p in phases], fontsize=8)
    top.tick_params(length=0)
    top.set_xlabel('ε phase', fontsize=9)
  ax.set_xlabel('iteration')
  ax.set_ylabel('reward')
  ax.set_title('Reward per iteration', fontsize=11)
  ax.grid(axis='y', alpha=0.3)
  if ok or failed:
    legend = fig.legend(loc='outside right upper', fontsize=8)
    for handle in legend.legend_handles:
      handle.set_alpha(1.0)  # the faint dots must still be visible in the key
  return save_figure(fig, path)


def plot_reward_by_epsilon(rows: Sequence[Candidate], path: str | Path) -> Path:
  """Box plots of the rewards sampled at each ε, ε descending, with counts under each box."""
  by_eps = analysis.by_epsilon(rows)
  epsilons = list(by_eps)  # ε descending
  fig = new_figure(max(5.0, 0.9 * len(epsilons) + 2.5), 4.6)
  ax = fig.add_subplot()
  labels, mean_labelled = [], False
  for pos, eps in enumerate(epsilons, start=1):
    rewards = [r.reward for r in by_eps[eps] if r.ok]
    n_failed = len(by_eps[eps]) - len(rewards)
    labels.append(f'{eps:g}\nn={len(rewards)}' + (f'\n{n_failed} failed' if n_failed else ''))
    if not rewards:
      continue  # an all-failed ε keeps its slot and label, with no box
    box = ax.boxplot([rewards], positions=[pos], widths=0.6, patch_artist=True,
                     showfliers=False, medianprops=dict(color='black'))
    box['boxes'][0].set(facecolor=_epsilon_colour(eps), alpha=0.55)
    # Deterministic jitter (golden-ratio sequence): the same data gives the same image.
    jitter = [((i * 0.6180339887) % 1.0 - 0.5) * 0.35 for i in range(len(rewards))]
    ax.scatter([pos + j for j in jitter], rewards, s=5, color='0.25', lw=0,
               alpha=0.5 if len(rewards) < 300 else 0.12, zorder=3)
    ax.scatter([pos], [sum(rewards) / len(rewards)], marker='D', s=28, color='white',
               edgecolor='black', zorder=4, label=None if mean_labelled else 'mean')
    mean_labelled = True
  ax.set_xticks(range(1, len(epsilons) + 1), labels, fontsize=8)
  ax.set_xlim(0.4, len(epsilons) + 0.6)
  ax.set_xlabel('ε (exploration rate), descending')
  ax.set_ylabel('reward')
  ax.set_title('Reward distribution per ε', fontsize=11)
  ax.grid(axis='y', alpha=0.3)
  if any(r.ok for r in rows):
    ax.legend(loc='lower right', fontsize=8)
  else:
    _no_data(ax, 'no successful candidate yet')
  return save_figure(fig, path)


def plot_accuracy_vs_flops(rows: Sequence[Candidate], path: str | Path,
                           top_k: int = 5) -> Path:
  """Validation accuracy against FLOPs (log x) of every distinct block, coloured by ε.

  Each block is drawn once (at the ε it was first trained at); the top-k by reward are
  ringed and numbered by rank.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  # FLOPs go on a log axis: a row recorded without FLOPs (0) has no place there.
  points = [r for r in analysis.distinct_trained(rows)
            if math.isfinite(r.val_accuracy) and r.flops > 0]
  fig = new_figure(8, 5.2)
  ax = fig.add_subplot()
  if points:
    norm = matplotlib.colors.Normalize(0.0, 1.0)
    sc = ax.scatter([r.flops for r in points], [r.val_accuracy for r in points],
                    c=[r.epsilon for r in points], cmap=_EPSILON_CMAP, norm=norm, s=16,
                    alpha=0.75, lw=0)
    fig.colorbar(sc, ax=ax, label='ε when first trained', pad=0.01)
    best = analysis.top_blocks(rows, top_k)
    keys = {r.canonical_key: r for r in points}
    shown = [(rank, keys[r.canonical_key]) for rank, r in enumerate(best, start=1)
             if r.canonical_key in keys]
    if shown:
      ax.scatter([r.flops for _, r in shown], [r.val_accuracy for _, r in shown], s=110,
                 facecolor='none', edgecolor='tab:red', lw=1.6, zorder=4,
                 label=f'top {len(best)} by reward')
      # Neighbouring ranks get labels on different sides, so close points stay readable.
      offsets = ((6, 5), (-12, -12), (6, -12), (-12, 5))
      for rank, r in shown:
        ax.annotate(str(rank), (r.flops, r.val_accuracy), xytext=offsets[(rank - 1) % 4],
                    textcoords='offset points', fontsize=8, color='tab:red',
                    fontweight='bold')
      ax.legend(loc='lower right', fontsize=8)
    ax.set_xscale('log')
  else:
    _no_data(ax, 'no block with both accuracy and FLOPs')
  ax.set_xlabel('FLOPs (log scale)')
  ax.set_ylabel('validation accuracy')
  ax.set_title(f'Accuracy vs FLOPs ({len(points)} distinct blocks)', fontsize=11)
  ax.grid(alpha=0.3, which='both', lw=0.5)
  return save_figure(fig, path)


_NODE_COLOURS = {
    INPUT: '#d9d9d9', OUTPUT: '#d9d9d9',
    LayerType.CONV: '#9ecae1', LayerType.MAX_POOL: '#fdae6b', LayerType.AVG_POOL: '#fdd49e',
    LayerType.IDENTITY: '#f0f0f0', LayerType.ADD: '#a1d99b', LayerType.CONCAT: '#bcbddc',
}


def _smooth_path(points: Sequence[tuple[float, float]]):
  """A path through ``points``' ends that bends smoothly at the interior ones.

  Straight up to the midpoint of the first segment, then one quadratic Bézier per interior
  point (the point its control, the midpoints around it on the curve), then straight on.
  """
  from matplotlib.path import Path as MplPath  # pylint: disable=g-import-not-at-top
  vertices, codes = [points[0]], [MplPath.MOVETO]
  def mid(p, q):
    return ((p[0] + q[0]) / 2, (p[1] + q[1]) / 2)

  for a, b, c in zip(points, points[1:], points[2:]):
    vertices += [mid(a, b), b, mid(b, c)]
    codes += [MplPath.LINETO, MplPath.CURVE3, MplPath.CURVE3]
  vertices.append(points[-1])
  codes.append(MplPath.LINETO)
  return MplPath(vertices, codes)


def draw_block(block: nsc.Block, path: str | Path, title: str | None = None) -> Path:
  """Draws a block as a DAG, input at the top, output at the bottom; writes a PNG.

  Nodes are labelled with their op and kernel (``conv3``, ``max_pool3``, ``add``...) and,
  small on their left, their NSC index; every leaf feeds ``output`` (their concatenation).
  """
  from matplotlib import patches  # pylint: disable=g-import-not-at-top
  layout = layout_block(block)
  box_w, box_h = 0.82, 0.42
  xs = [x for x, _ in layout.positions.values()]
  xs += [x for route in layout.routes.values() for x, _ in route]
  x_lo, x_hi = min(xs) - 0.6, max(xs) + 0.6
  y_lo, y_hi = -(layout.levels - 1) - 0.45, 0.45 + (0.35 if title else 0.0)
  fig_w = min(max((x_hi - x_lo) * 1.15, 3.2), 40.0)
  fig_h = min(max((y_hi - y_lo) * 0.78, 2.4), 40.0)
  fig = new_figure(fig_w, fig_h, layout=None)  # one full-figure axes: nothing to lay out
  ax = fig.add_axes((0, 0, 1, 1))
  ax.set_xlim(x_lo, x_hi)
  ax.set_ylim(y_lo, y_hi)
  ax.axis('off')
  layers = {l.index: l for l in block.body}

  # Spread the ports along a box's top (in) and bottom (out) edges, ordered by where the
  # edge comes from / goes to, so merges show two distinct arrows.
  def ports(side: int) -> dict[tuple, float]:
    by_node = collections.defaultdict(list)
    for edge, route in layout.routes.items():
      node, other = (edge[1], route[-2]) if side == 1 else (edge[0], route[1])
      by_node[node].append((other[0], edge))
    out = {}
    for node, items in by_node.items():
      items.sort()
      for j, (_, edge) in enumerate(items):
        out[edge] = layout.positions[node][0] + box_w * 0.7 * ((j + 1) / (len(items) + 1) - 0.5)
    return out

  in_port, out_port = ports(1), ports(0)
  for edge, route in layout.routes.items():
    points = list(route)
    points[0] = (out_port[edge], route[0][1] - box_h / 2)
    points[-1] = (in_port[edge], route[-1][1] + box_h / 2)
    ax.add_patch(patches.FancyArrowPatch(path=_smooth_path(points), arrowstyle='-|>',
                                         mutation_scale=10, color='0.35', lw=1.0, zorder=1))
  for node, (x, y) in layout.positions.items():
    if node in (INPUT, OUTPUT):
      label, colour = node, _NODE_COLOURS[node]
      if node == OUTPUT and len(block.leaves()) > 1:
        label = 'output\n(concat)'  # the block output concatenates its leaves
    else:
      layer = layers[node]
      label = node_label(layer)
      colour = _NODE_COLOURS.get(layer.type, 'white')
      ax.text(x - box_w / 2 - 0.04, y, str(node), ha='right', va='center', fontsize=6.5,
              color='0.45', zorder=3)
    ax.add_patch(patches.FancyBboxPatch((x - box_w / 2, y - box_h / 2), box_w, box_h,
                                        boxstyle='round,pad=0,rounding_size=0.08',
                                        facecolor=colour, edgecolor='0.3', lw=0.8, zorder=2))
    ax.text(x, y, label, ha='center', va='center', fontsize=8.5 if '\n' not in label else 7,
            zorder=3)
  if title:
    ax.text((x_lo + x_hi) / 2, y_hi - 0.12, title, ha='center', va='top', fontsize=9.5)
  return save_figure(fig, path)
