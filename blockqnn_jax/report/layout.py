"""Where to draw a block: its DAG's edges, node labels and a layered layout, top to bottom.

Pure (no plotting, no I/O): ``figures.draw_block`` turns a ``BlockLayout`` into a picture,
and the tests check the layout's geometry without rendering anything.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Hashable, Sequence

from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.nsc.grammar import LayerType

# The two nodes that are not layers: the block's input (NSC predecessor 0) and its output
# (the concatenation of its leaves).
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


def _place_x(levels: list[list[Hashable]], segments: list[list[tuple]], dummy_width: float,
             passes: int) -> dict[Hashable, float]:
  """x of every node: start packed around 0, then pull every node toward the mean x of its
  neighbours (levels alternately top-down and bottom-up), keeping each level's order and
  spacing; a real node takes 1 unit, a dummy ``dummy_width``."""
  width = {n: dummy_width if isinstance(n, tuple) else 1.0 for level in levels for n in level}
  x: dict[Hashable, float] = {}
  for level in levels:
    left = -sum(width[n] for n in level) / 2
    for node in level:
      x[node] = left + width[node] / 2
      left += width[node]
  neighbours = collections.defaultdict(list)
  for level_segments in segments:
    for a, b in level_segments:
      neighbours[a].append(b)
      neighbours[b].append(a)
  for i in range(2 * passes):
    for level in (levels if i % 2 == 0 else levels[::-1]):
      targets = [sum(x[m] for m in neighbours[n]) / len(neighbours[n]) if neighbours[n]
                 else x[n] for n in level]
      for node, value in zip(level, _spaced_fit(targets, [width[n] for n in level])):
        x[node] = value
  return x


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

  x = _place_x(best, segments, dummy_width, x_passes)
  shift = x[INPUT]  # the input at x = 0
  positions = {n: (x[n] - shift, -float(d)) for d, level in enumerate(best) for n in level}
  routes = {edge: tuple(positions[n] for n in chain) for edge, chain in chains.items()}
  return BlockLayout({n: p for n, p in positions.items() if not isinstance(n, tuple)},
                     routes, num_levels)
