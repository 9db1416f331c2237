"""The report of a search: what it found and how the agent learned, from its SQLite database.

``write_report(workdir)`` reads ``WORKDIR/search.sqlite`` (the ``candidates`` and ``meta``
tables written by the search) and writes ``WORKDIR/report/``:

* ``reward_per_iteration.png`` — mean, max and best-so-far reward per iteration over every
  candidate as a faint dot, with the ε phases shaded: the paper's picture of Q-learning
  overtaking random exploration once ε drops;
* ``reward_by_epsilon.png`` — the distribution of rewards at each ε, ε descending;
* ``accuracy_vs_flops.png`` — accuracy against FLOPs of every distinct block, coloured by ε,
  the top-k ringed;
* ``block_1.png`` ... — the top-k blocks drawn as DAGs;
* ``top_blocks.txt`` (one NSC per line, best first), ``top_blocks.json`` and ``summary.md``.

The database is read with ``sqlite3`` directly, read-only, so a report can be made while the
search is still writing. Everything but the ``plot_*``/``draw_block``/``write_*`` functions
is pure; the plotting uses matplotlib's Agg canvas on its own ``Figure`` objects, never
pyplot, so it neither needs a display nor touches the caller's backend.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
import sqlite3
from pathlib import Path
from typing import Hashable, Iterable, Sequence

from blockqnn_jax import nsc
from blockqnn_jax.nsc import LayerType

DB_NAME = 'search.sqlite'
REPORT_DIR = 'report'

# One colour map for ε everywhere, so a phase reads the same in every figure.
_EPSILON_CMAP = 'viridis'


# -- rows ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CandidateRow:
  """One row of the ``candidates`` table; non-finite numbers are read as ``None``."""

  id: int
  iteration: int
  position: int
  epsilon: float
  nsc: str
  canonical_key: str
  cached: bool
  status: str
  failure_reason: str = ''
  reward: float | None = None
  val_accuracy: float | None = None
  flops: int | None = None
  density: float | None = None
  params: int | None = None
  final_loss: float | None = None
  compile_s: float | None = None
  train_s: float | None = None
  eval_s: float | None = None
  total_s: float | None = None
  device: str | None = None
  created_at: float = 0.0

  @property
  def ok(self) -> bool:
    """Whether the candidate has a usable reward."""
    return self.status == 'ok' and self.reward is not None

  @property
  def block(self) -> nsc.Block:
    """The NSC text parsed (form only: the run's grammar may differ from the default)."""
    return nsc.Block.parse(self.nsc)


_FIELDS = tuple(f.name for f in dataclasses.fields(CandidateRow))
_REQUIRED = ('id', 'iteration', 'position', 'epsilon', 'nsc', 'canonical_key', 'cached',
             'status')


def _clean(value):
  """NaN/inf (which some writers store instead of NULL) become None."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def database_path(path: str | Path) -> Path:
  """The database of a workdir, or ``path`` itself if it is the database file.

  Raises:
    FileNotFoundError: if the workdir or its database does not exist.
  """
  path = Path(path)
  if path.is_dir():
    path = path / DB_NAME
    if not path.is_file():
      raise FileNotFoundError(f'no search database {path} (is this a search workdir?)')
    return path
  if not path.is_file():
    raise FileNotFoundError(f'no search workdir or database at {path}')
  return path


def _connect(path: Path) -> sqlite3.Connection:
  """Opens read-only, so the report can never create, lock or change the search's database."""
  try:
    db = sqlite3.connect(f'{path.resolve().as_uri()}?mode=ro', uri=True)
    db.execute('SELECT 1 FROM sqlite_master LIMIT 1')
    return db
  except sqlite3.OperationalError:
    # A WAL database in a read-only directory cannot make its -shm file: read it as a file.
    return sqlite3.connect(f'{path.resolve().as_uri()}?immutable=1', uri=True)


def load_candidates(db_path: str | Path) -> list[CandidateRow]:
  """Every candidate of a search, ordered by (iteration, position).

  Args:
    db_path: the ``search.sqlite`` file, or the workdir holding it.

  Returns:
    The rows; columns the dataclass does not know are ignored, and optional columns the
    database lacks are left at their defaults.

  Raises:
    FileNotFoundError: if there is no database.
    ValueError: if the database has no ``candidates`` table or it lacks a required column.
  """
  path = database_path(db_path)
  db = _connect(path)
  try:
    db.row_factory = sqlite3.Row
    try:
      rows = db.execute('SELECT * FROM candidates ORDER BY iteration, position, id').fetchall()
    except sqlite3.DatabaseError as e:
      raise ValueError(f'{path} is not a search database: {e}') from None
  finally:
    db.close()
  if rows:
    missing = [c for c in _REQUIRED if c not in rows[0].keys()]
    if missing:
      raise ValueError(f'{path}: table candidates lacks columns {missing}')
  out = []
  for row in rows:
    values = {k: _clean(row[k]) for k in row.keys() if k in _FIELDS}
    values['cached'] = bool(values['cached'])
    values['failure_reason'] = values.get('failure_reason') or ''
    values['created_at'] = values.get('created_at') or 0.0
    out.append(CandidateRow(**values))
  return out


def load_meta(db_path: str | Path) -> dict[str, str]:
  """The ``meta`` table as a dict (empty if the database has none)."""
  path = database_path(db_path)
  db = _connect(path)
  try:
    return dict(db.execute('SELECT key, value FROM meta').fetchall())
  except sqlite3.DatabaseError:
    return {}
  finally:
    db.close()


# -- analysis (pure) -------------------------------------------------------------------------


def top_blocks(rows: Iterable[CandidateRow], k: int) -> list[CandidateRow]:
  """The ``k`` best distinct blocks by reward, best first.

  Blocks are distinct by canonical key; only ``ok`` rows count. For each key the row with
  the highest reward represents it (the earliest on ties, i.e. the trained one rather than
  a cached reuse). Ties between keys go to the block found first.
  """
  best: dict[str, CandidateRow] = {}
  for row in rows:
    if not row.ok:
      continue
    held = best.get(row.canonical_key)
    if held is None or (row.reward, -row.id) > (held.reward, -held.id):
      best[row.canonical_key] = row
  return sorted(best.values(), key=lambda r: (-r.reward, r.id))[:max(k, 0)]


@dataclasses.dataclass(frozen=True)
class Phase:
  """A run of consecutive iterations at one ε."""

  epsilon: float
  first_iteration: int
  last_iteration: int


def epsilon_phases(rows: Iterable[CandidateRow]) -> list[Phase]:
  """The ε phases of the search, in iteration order (ε read from each iteration's rows)."""
  by_iteration: dict[int, float] = {}
  for row in rows:
    by_iteration.setdefault(row.iteration, row.epsilon)
  phases: list[Phase] = []
  for iteration in sorted(by_iteration):
    epsilon = by_iteration[iteration]
    if phases and phases[-1].epsilon == epsilon:
      phases[-1] = dataclasses.replace(phases[-1], last_iteration=iteration)
    else:
      phases.append(Phase(epsilon, iteration, iteration))
  return phases


@dataclasses.dataclass(frozen=True)
class EpsilonStats:
  """Rewards of all candidates sampled at one ε (cached reuses included: they are samples)."""

  epsilon: float
  candidates: int
  ok: int
  mean_reward: float | None
  max_reward: float | None


@dataclasses.dataclass(frozen=True)
class Summary:
  """Headline numbers of a search.

  Attributes:
    candidates: rows, i.e. blocks sampled.
    iterations: distinct iterations.
    distinct_blocks: distinct canonical keys.
    cached: candidates whose reward was reused from an earlier identical block.
    cache_hit_rate: cached / candidates.
    failed: candidates whose status is not 'ok' (or that have no reward).
    failure_reasons: (reason, count), most frequent first.
    wall_s: from the start of the first candidate to the last record (None if unknown).
    compute_s: summed ``total_s`` of the candidates actually trained.
    candidates_per_hour: candidates / wall time (None if the wall time is zero).
    by_epsilon: reward statistics per ε, ε descending.
    best: the best ok row (None if none succeeded).
  """

  candidates: int
  iterations: int
  distinct_blocks: int
  cached: int
  cache_hit_rate: float
  failed: int
  failure_reasons: tuple[tuple[str, int], ...]
  wall_s: float | None
  compute_s: float
  candidates_per_hour: float | None
  by_epsilon: tuple[EpsilonStats, ...]
  best: CandidateRow | None

  def exploration_vs_exploitation(self) -> tuple[EpsilonStats, EpsilonStats] | None:
    """The ε=1 phase (or the highest ε) and the lowest-ε phase; None with a single ε."""
    if len(self.by_epsilon) < 2:
      return None
    return self.by_epsilon[0], self.by_epsilon[-1]


def _mean(values: Sequence[float]) -> float | None:
  return sum(values) / len(values) if values else None


def summarize(rows: Sequence[CandidateRow]) -> Summary:
  """Computes the headline numbers of a search from its rows."""
  rows = list(rows)
  failed = [r for r in rows if not r.ok]
  reasons = collections.Counter((r.failure_reason.strip() or '(no reason recorded)')
                                for r in failed)
  starts = [r.created_at - (r.total_s or 0.0) for r in rows if r.created_at]
  ends = [r.created_at for r in rows if r.created_at]
  wall = max(ends) - min(starts) if ends else None
  by_eps: dict[float, list[CandidateRow]] = collections.defaultdict(list)
  for r in rows:
    by_eps[r.epsilon].append(r)
  stats = []
  for eps in sorted(by_eps, reverse=True):
    rewards = [r.reward for r in by_eps[eps] if r.ok]
    stats.append(EpsilonStats(eps, len(by_eps[eps]), len(rewards), _mean(rewards),
                              max(rewards) if rewards else None))
  cached = sum(r.cached for r in rows)
  best = top_blocks(rows, 1)
  return Summary(
      candidates=len(rows),
      iterations=len({r.iteration for r in rows}),
      distinct_blocks=len({r.canonical_key for r in rows}),
      cached=cached,
      cache_hit_rate=cached / len(rows) if rows else 0.0,
      failed=len(failed),
      # Most frequent first; equal counts alphabetically, so the page is deterministic.
      failure_reasons=tuple(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
      wall_s=wall,
      compute_s=sum(r.total_s or 0.0 for r in rows if not r.cached),
      # Under a second of records (e.g. one instant cached row) gives no meaningful rate.
      candidates_per_hour=len(rows) / (wall / 3600) if wall and wall >= 1.0 else None,
      by_epsilon=tuple(stats),
      best=best[0] if best else None,
  )


# -- block layout (pure) ---------------------------------------------------------------------

INPUT = 'input'
OUTPUT = 'output'


def node_label(layer: nsc.Layer) -> str:
  """The op of a layer with its kernel: ``conv3``, ``max_pool3``, ``identity``, ``add``."""
  if layer.type not in LayerType.__members__.values():
    return f'type{layer.type}'
  name = LayerType(layer.type).short_name
  if layer.type in (LayerType.CONV, LayerType.MAX_POOL, LayerType.AVG_POOL):
    name = f'{name}{layer.kernel}'
  return name


def block_edges(block: nsc.Block) -> list[tuple[Hashable, Hashable]]:
  """The DAG's edges: predecessor links (0 is ``INPUT``) and each leaf into ``OUTPUT``.

  Raises:
    NSCError: if a layer reads a layer that does not precede it.
  """
  seen: set[int] = {0}
  edges: list[tuple[Hashable, Hashable]] = []
  for layer in block.body:
    for p in dict.fromkeys(layer.preds):  # add(1, 1) is invalid; draw its edge once
      if p not in seen:
        raise nsc.NSCError(f'reads {p}, which is not an earlier layer', layer=layer.index,
                           rule='pred_order')
      edges.append((INPUT if p == 0 else p, layer.index))
    seen.add(layer.index)
  edges.extend((leaf, OUTPUT) for leaf in block.leaves())
  return edges


def _crossings(upper: Sequence, lower: Sequence, segments: Sequence[tuple]) -> int:
  """Crossings between two adjacent levels' orderings (quadratic; blocks are small)."""
  pos_u = {n: i for i, n in enumerate(upper)}
  pos_l = {n: i for i, n in enumerate(lower)}
  pairs = [(pos_u[a], pos_l[b]) for a, b in segments]
  return sum(1 for i, (a1, b1) in enumerate(pairs) for a2, b2 in pairs[i + 1:]
             if (a1 - a2) * (b1 - b2) < 0)


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Where to draw a block's DAG, top to bottom.

  Attributes:
    positions: node -> (x, y) for ``INPUT``, the layer indices and ``OUTPUT``; y is minus
      the node's depth (longest path from the input), so every edge points down.
    routes: edge (u, v) -> the points it passes through, from u's position to v's; edges
      spanning several levels bend through reserved slots so that they never cross a box.
    levels: the number of levels (input to output).
  """

  positions: dict[Hashable, tuple[float, float]]
  routes: dict[tuple[Hashable, Hashable], tuple[tuple[float, float], ...]]
  levels: int


def _spaced_fit(targets: Sequence[float], widths: Sequence[float]) -> list[float]:
  """The positions closest (least squares) to ``targets`` that keep their order and do not
  overlap, item i being ``widths[i]`` wide.

  With ``offset_i`` the packed position of item i, ``y_i = x_i - offset_i`` must be
  non-decreasing: isotonic regression of ``targets - offset``, solved by pooling adjacent
  violators.
  """
  offsets, left = [], 0.0
  for i, w in enumerate(widths):
    left += 0.0 if i == 0 else (widths[i - 1] + w) / 2
    offsets.append(left)
  pools: list[list[float]] = []  # [sum, count] of each pooled run
  for t, o in zip(targets, offsets):
    pools.append([t - o, 1])
    while len(pools) > 1 and pools[-2][0] * pools[-1][1] > pools[-1][0] * pools[-2][1]:
      total, count = pools.pop()
      pools[-1][0] += total
      pools[-1][1] += count
  fitted = [total / count for total, count in pools for _ in range(int(count))]
  return [y + o for y, o in zip(fitted, offsets)]


def layout_block(block: nsc.Block, sweeps: int = 8, dummy_width: float = 0.45,
                 x_passes: int = 6) -> BlockLayout:
  """A layered (Sugiyama-style) layout of the block's DAG.

  Nodes go on the level of their depth; edges longer than one level get a dummy node on
  each level they cross; the order within levels is improved by barycenter sweeps, keeping
  the ordering with the fewest crossings. Then x: a real node takes 1 unit and a dummy
  ``dummy_width``; ``x_passes`` rounds pull each node toward its neighbours' mean x without
  reordering or overlapping, so chains come out straight; the input sits at x = 0.
  """
  if not block.body:
    raise nsc.NSCError('empty block: no layer before the terminal', rule='empty')
  edges = block_edges(block)
  depth: dict[Hashable, int] = {INPUT: 0}
  for u, v in edges:  # edges come in topological order of their target
    depth[v] = max(depth.get(v, 0), depth[u] + 1)
  num_levels = depth[OUTPUT] + 1
  levels: list[list[Hashable]] = [[] for _ in range(num_levels)]
  for node in [INPUT] + [l.index for l in block.body] + [OUTPUT]:
    levels[depth[node]].append(node)
  chains: dict[tuple, list[Hashable]] = {}
  segments: list[list[tuple]] = [[] for _ in range(num_levels - 1)]  # between d and d+1
  for u, v in edges:
    chain = [u] + [('dummy', u, v, d) for d in range(depth[u] + 1, depth[v])] + [v]
    for d, node in zip(range(depth[u] + 1, depth[v]), chain[1:-1]):
      levels[d].append(node)
    for step, (a, b) in enumerate(zip(chain, chain[1:])):
      segments[depth[u] + step].append((a, b))
    chains[(u, v)] = chain

  def total(order):
    return sum(_crossings(order[d], order[d + 1], segments[d]) for d in range(num_levels - 1))

  def sweep(order, down: bool):
    order = [list(level) for level in order]
    span = range(1, num_levels) if down else range(num_levels - 2, -1, -1)
    for d in span:
      ref = order[d - 1] if down else order[d + 1]
      pos = {n: i for i, n in enumerate(ref)}
      links = segments[d - 1] if down else segments[d]
      neighbours = collections.defaultdict(list)
      for a, b in links:
        mine, other = (b, a) if down else (a, b)
        neighbours[mine].append(pos[other])
      current = {n: i for i, n in enumerate(order[d])}
      # Nodes without neighbours on the reference level keep their place.
      order[d].sort(key=lambda n: (sum(neighbours[n]) / len(neighbours[n])
                                   if neighbours[n] else current[n], current[n]))
    return order

  best, best_crossings = levels, total(levels)
  order = levels
  for i in range(sweeps):
    order = sweep(order, down=(i % 2 == 0))
    crossings = total(order)
    if crossings < best_crossings:
      best, best_crossings = order, crossings

  # x: start packed around 0, then pull every node toward the mean x of its neighbours
  # (levels alternately top-down and bottom-up), keeping each level's order and spacing.
  width = {n: dummy_width if isinstance(n, tuple) else 1.0 for level in best for n in level}
  x: dict[Hashable, float] = {}
  for level in best:
    left = -sum(width[n] for n in level) / 2
    for node in level:
      x[node] = left + width[node] / 2
      left += width[node]
  neighbours = collections.defaultdict(list)
  for level_segments in segments:
    for a, b in level_segments:
      neighbours[a].append(b)
      neighbours[b].append(a)
  for i in range(2 * x_passes):
    for level in (best if i % 2 == 0 else best[::-1]):
      targets = [sum(x[m] for m in neighbours[n]) / len(neighbours[n]) if neighbours[n]
                 else x[n] for n in level]
      for node, value in zip(level, _spaced_fit(targets, [width[n] for n in level])):
        x[node] = value
  shift = x[INPUT]  # the input at x = 0
  positions = {n: (x[n] - shift, -float(d)) for d, level in enumerate(best) for n in level}
  routes = {edge: tuple(positions[n] for n in chain) for edge, chain in chains.items()}
  return BlockLayout({n: p for n, p in positions.items() if not isinstance(n, tuple)},
                     routes, num_levels)


# -- plotting --------------------------------------------------------------------------------


def _figure(width: float, height: float, layout: str | None = 'constrained'):
  """A Figure on the Agg canvas: no pyplot, no global backend switch, no display."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), layout=layout)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path: str | Path, dpi: int = 110) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi)
  return path


def _epsilon_colour(epsilon: float):
  import matplotlib  # pylint: disable=g-import-not-at-top
  return matplotlib.colormaps[_EPSILON_CMAP](epsilon)


def _no_data(ax, message: str):
  ax.text(0.5, 0.5, message, ha='center', va='center', transform=ax.transAxes, color='0.4')


def plot_reward_per_iteration(rows: Sequence[CandidateRow], path: str | Path) -> Path:
  """Mean, max and best-so-far reward per iteration, every candidate a faint dot.

  The ε phases are shaded in their ε colour and named along the top axis; failed
  candidates are marked by red crosses along the bottom edge.
  """
  fig = _figure(10, 4.8)
  ax = fig.add_subplot()
  ok = [r for r in rows if r.ok]
  failed = [r for r in rows if not r.ok]
  phases = epsilon_phases(rows)
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
  return _save(fig, path)


def plot_reward_by_epsilon(rows: Sequence[CandidateRow], path: str | Path) -> Path:
  """Box plots of the rewards sampled at each ε, ε descending, with counts under each box."""
  by_eps: dict[float, list[CandidateRow]] = collections.defaultdict(list)
  for r in rows:
    by_eps[r.epsilon].append(r)
  epsilons = sorted(by_eps, reverse=True)
  fig = _figure(max(5.0, 0.9 * len(epsilons) + 2.5), 4.6)
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
  return _save(fig, path)


def _distinct_trained(rows: Sequence[CandidateRow]) -> list[CandidateRow]:
  """One ok row per canonical key: the first trained one (else the first reuse)."""
  chosen: dict[str, CandidateRow] = {}
  for r in rows:
    if not r.ok:
      continue
    held = chosen.get(r.canonical_key)
    if held is None or (held.cached and not r.cached):
      chosen[r.canonical_key] = r
  return list(chosen.values())


def plot_accuracy_vs_flops(rows: Sequence[CandidateRow], path: str | Path,
                           top_k: int = 5) -> Path:
  """Validation accuracy against FLOPs (log x) of every distinct block, coloured by ε.

  Each block is drawn once (at the ε it was first trained at); the top-k by reward are
  ringed and numbered by rank.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  points = [r for r in _distinct_trained(rows)
            if r.val_accuracy is not None and r.flops is not None and r.flops > 0]
  fig = _figure(8, 5.2)
  ax = fig.add_subplot()
  if points:
    norm = matplotlib.colors.Normalize(0.0, 1.0)
    sc = ax.scatter([r.flops for r in points], [r.val_accuracy for r in points],
                    c=[r.epsilon for r in points], cmap=_EPSILON_CMAP, norm=norm, s=16,
                    alpha=0.75, lw=0)
    fig.colorbar(sc, ax=ax, label='ε when first trained', pad=0.01)
    best = top_blocks(rows, top_k)
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
  return _save(fig, path)


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
  fig = _figure(fig_w, fig_h, layout=None)  # one full-figure axes: nothing to lay out
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
  return _save(fig, path)


# -- the report ------------------------------------------------------------------------------


def _fmt(value, spec: str = '.4f', none: str = '–') -> str:
  return none if value is None else format(value, spec)


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return '–'
  if seconds < 120:
    return f'{seconds:.0f} s'
  if seconds < 2 * 3600:
    return f'{seconds / 60:.1f} min'
  return f'{seconds / 3600:.2f} h'


def _one_line(text: str, limit: int = 160) -> str:
  """A failure reason fit for a Markdown cell: one line, no pipes or backticks, bounded."""
  line = ' '.join(text.split()).replace('|', '/').replace('`', "'")
  return line if len(line) <= limit else line[:limit - 1] + '…'


def top_block_records(rows: Sequence[CandidateRow], k: int) -> list[dict]:
  """The top-k as JSON-ready dicts (the content of ``top_blocks.json``)."""
  samples = collections.Counter(r.canonical_key for r in rows)
  out = []
  for rank, r in enumerate(top_blocks(rows, k), start=1):
    block = r.block
    out.append(dict(
        rank=rank, nsc=r.nsc, canonical_key=r.canonical_key, reward=r.reward,
        val_accuracy=r.val_accuracy, flops=r.flops, params=r.params,
        density=r.density if r.density is not None else block.density(),
        layers=[list(layer.as_tuple()) for layer in block.layers],
        iteration=r.iteration, epsilon=r.epsilon, times_sampled=samples[r.canonical_key]))
  return out


def render_summary(summary: Summary, top: Sequence[dict], images: dict[str, str],
                   source: str = '', config: str | None = None) -> str:
  """The Markdown page of ``summary.md``.

  Args:
    summary: from ``summarize``.
    top: from ``top_block_records``.
    images: section title -> image path relative to the page.
    source: the database path, shown in the header.
    config: the run's config JSON, shown folded, if known.
  """
  s = summary
  lines = ['# BlockQNN search report', '']
  if source:
    lines += [f'Source: `{source}`', '']
  lines += ['| | |', '|---|---|',
            f'| Candidates | {s.candidates:,} in {s.iterations:,} iterations |',
            f'| Distinct blocks | {s.distinct_blocks:,} |',
            f'| Cache hit rate | {s.cache_hit_rate:.1%} ({s.cached:,} rewards reused from '
            f'identical earlier blocks) |',
            f'| Failures | {s.failed:,} ({s.failed / max(s.candidates, 1):.1%}) |',
            f'| Wall time | {_duration(s.wall_s)} (training time summed over trained '
            f'candidates: {_duration(s.compute_s)}) |',
            f'| Candidates per hour | {_fmt(s.candidates_per_hour, ",.1f")} |']
  for e in s.by_epsilon:
    if e is s.by_epsilon[0] or e is s.by_epsilon[-1]:
      which = 'exploration' if e is s.by_epsilon[0] else 'lowest ε'
      if len(s.by_epsilon) == 1:
        which = 'only ε'
      lines.append(f'| Mean reward at ε={e.epsilon:g} ({which}) | {_fmt(e.mean_reward)} '
                   f'(n={e.ok:,}; max {_fmt(e.max_reward)}) |')
  if s.best is not None:
    lines.append(f'| Best reward | {s.best.reward:.4f} (accuracy '
                 f'{_fmt(s.best.val_accuracy)}, iteration {s.best.iteration}) |')
  pair = s.exploration_vs_exploitation()
  if pair and pair[0].mean_reward is not None and pair[1].mean_reward is not None:
    gain = pair[1].mean_reward - pair[0].mean_reward
    verdict = ('the agent exploits what it learned' if gain > 0
               else 'no gain over random exploration')
    lines += ['', f'Mean reward {"rose" if gain > 0 else "fell"} by {abs(gain):.4f} from '
              f'ε={pair[0].epsilon:g} to ε={pair[1].epsilon:g}: {verdict}.']
  if s.failure_reasons:
    lines += ['', '## Failures by reason', '', '| count | reason |', '|---:|---|']
    lines += [f'| {n:,} | {_one_line(reason)} |' for reason, n in s.failure_reasons]
  for title, image in images.items():
    lines += ['', f'## {title}', '', f'![{title}]({image})']
  lines += ['', f'## Top {len(top)} blocks', '']
  if top:
    lines += ['| # | reward | val acc | MFLOPs | params | density | sampled | found (it, ε) '
              '| NSC |', '|---:|---:|---:|---:|---:|---:|---:|---|---|']
    for t in top:
      mflops = None if t['flops'] is None else t['flops'] / 1e6
      lines.append(
          f'| {t["rank"]} | {t["reward"]:.4f} | {_fmt(t["val_accuracy"])} | '
          f'{_fmt(mflops, ",.1f")} | {_fmt(t["params"], ",")} | {_fmt(t["density"], ".2f")} | '
          f'{t["times_sampled"]} | {t["iteration"]}, {t["epsilon"]:g} | `{t["nsc"]}` |')
    blocks = [f'![#{t["rank"]}](block_{t["rank"]}.png)' for t in top]
    lines += ['', ' '.join(blocks)]
  else:
    lines.append('No candidate has succeeded yet.')
  if config:
    try:
      config = json.dumps(json.loads(config), indent=2, sort_keys=True)
    except (TypeError, ValueError):
      pass  # show it as stored
    lines += ['', '<details><summary>Run config</summary>', '', '```json', config, '```', '',
              '</details>']
  return '\n'.join(lines) + '\n'


def _json_text(value) -> str:
  """Indented JSON with each list of integers (an NSC layer) kept on one line."""
  text = json.dumps(value, indent=2)
  return re.sub(r'\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]',
                lambda m: '[' + re.sub(r'\s+', ' ', m.group(1)) + ']', text) + '\n'


def write_report(workdir: str | Path, out_dir: str | Path | None = None,
                 top_k: int = 5) -> Path:
  """Writes the report of the search in ``workdir``; returns the path of ``summary.md``.

  Args:
    workdir: the search's workdir (holding ``search.sqlite``), or the database file.
    out_dir: where to write; default ``WORKDIR/report``.
    top_k: how many of the best distinct blocks to list and draw.

  Raises:
    FileNotFoundError: if the workdir or its database does not exist.
    ValueError: if the database holds no candidates.
  """
  db = database_path(workdir)
  rows = load_candidates(db)
  if not rows:
    raise ValueError(f'the search database {db} holds no candidates yet')
  out = Path(out_dir) if out_dir is not None else db.parent / REPORT_DIR
  out.mkdir(parents=True, exist_ok=True)
  top = top_block_records(rows, top_k)
  images = {
      'Reward per iteration': plot_reward_per_iteration(rows, out / 'reward_per_iteration.png'),
      'Reward by ε': plot_reward_by_epsilon(rows, out / 'reward_by_epsilon.png'),
      'Accuracy vs FLOPs': plot_accuracy_vs_flops(rows, out / 'accuracy_vs_flops.png', top_k),
  }
  for t in top:
    draw_block(nsc.Block.parse(t['nsc']), out / f'block_{t["rank"]}.png',
               title=f'#{t["rank"]}  reward {t["reward"]:.4f}  acc {_fmt(t["val_accuracy"])}')
  (out / 'top_blocks.txt').write_text(''.join(t['nsc'] + '\n' for t in top))
  (out / 'top_blocks.json').write_text(_json_text(top))
  page = render_summary(summarize(rows), top, {k: v.name for k, v in images.items()},
                        source=str(db), config=load_meta(db).get('config'))
  summary_path = out / 'summary.md'
  summary_path.write_text(page)
  return summary_path
