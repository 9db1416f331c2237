"""Canonical forms of NSC blocks: one representative per network.

Many NSC codes describe the same network. Two blocks get one key exactly when their
*contracted* DAGs are isomorphic (as defined below), which implies that they compute the
same function under the generator's rules (``blocks.BlockModule``), up to the order of the
output's channels:

1. **Identity-like layers are contracted.** The generator runs identity (type 4) and max or
   average pooling with a 1x1 window (stride 1, SAME padding) as the tensor itself, so each
   such layer — and each chain of them — is replaced by the tensor it reads: a layer that
   read it reads that tensor, and where it was a leaf, that tensor goes to the output.
2. The contracted DAG's nodes are the block input (a label of its own) and every remaining
   non-terminal layer, labelled ``(type, kernel)``. A one-input layer has one edge from its
   predecessor; add and concat have one from each of their two, in no order (the two are
   different tensors in any block ``nsc.validate`` accepts; for other blocks the key simply
   records both edges from the one tensor).
3. The output is the *multiset* of tensors the original leaves carry after contraction
   (concatenated in no particular order): a tensor reaching the output through two
   identity leaves is concatenated twice, and the input can be part of the output.
4. The numbering does not matter: any topological order of the same DAG is the same block.

Nothing else is identified: functions that merely happen to agree (an add of a tensor with
itself, the same conv stacks in a different parameterisation, pooling of pooling) keep
distinct keys, and the Q-learner still searches over the raw NSC codes.

The canonical block writes the contracted DAG as a valid NSC: its remaining layers, then
one identity leaf per output occurrence of each tensor that is not, once, a leaf of the
contracted DAG (a tensor consumed elsewhere, the input, or one output more than once),
then the terminal. It never has more layers than the block it came from, and it computes the same
function (its leaves carry the same multiset of tensors).

``canonical_block`` picks one representative per class with the individualization-refinement
scheme of nauty (McKay & Piperno, "Practical graph isomorphism, II", 2014), specialised to
these small DAGs:

1. every node starts with the colour ``(depth, type, kernel)``, depth being the longest path
   from the input. Depth is the primary key, so any discrete colouring read in colour order
   is a topological order and hence a valid NSC numbering;
2. colour refinement splits classes by the multisets of predecessor and consumer colours
   until stable, always keeping the order of the old colours;
3. where classes remain, one vertex of the first non-singleton class is individualized
   (given a colour just below the rest of its class) and the search recurses; each
   discrete colouring (a *leaf*) is encoded as the tuple, in colour order, of
   ``(type, kernel, sorted predecessor colours)``, and the smallest encoding wins;
4. automorphisms found on the way (two leaves with equal encodings), twin vertices and a
   prefix bound prune the search, so symmetric blocks stay cheap.

The key is the canonical block's text, so it is exact: equal exactly for equivalent blocks.
Everything here is pure Python; no JAX.
"""

from __future__ import annotations

from typing import Sequence

from blockqnn_jax.nsc import grammar as nsc

# The input's type code: below every layer type, so it can never collide with a layer.
_INPUT_TYPE = 0


def is_identity_like(layer: nsc.Layer) -> bool:
  """Whether the generator runs ``layer`` as the tensor it reads (identity, 1x1 pooling)."""
  return (layer.type == nsc.LayerType.IDENTITY
          or (layer.type in (nsc.LayerType.MAX_POOL, nsc.LayerType.AVG_POOL)
              and layer.kernel == 1))


def contract_identities(block: nsc.Block) -> nsc.Block:
  """The block with identity-like layers contracted (see the module docstring).

  The remaining layers keep their order and are renumbered 1, 2, ...; then come the
  identity layers that write the output's extra occurrences, then the terminal. Blocks
  without identity-like layers come back as they are (with their terminal renumbered).

  Args:
    block: a block whose layers are numbered 1, 2, ... and read only earlier layers.

  Raises:
    NSCError: if the layers are not numbered consecutively or read a later layer.
  """
  _check_numbering(block)
  root = {0: 0}  # layer index -> the index of the tensor it outputs
  new_index = {0: 0}
  twin: dict[int, int] = {}  # tensor -> the identity of it that self-merges read
  layers = []
  for layer in block.body:
    if is_identity_like(layer):
      root[layer.index] = root[layer.pred1]
      continue
    root[layer.index] = layer.index
    preds = [new_index[root[p]] for p in layer.preds] + [0] * (2 - len(layer.preds))
    if len(layer.preds) == 2 and preds[0] == preds[1]:
      # A merge of one tensor with itself through identity-like layers (add: 2x): one
      # explicit identity of that tensor, shared by all such merges, stands for every
      # spelling of the second operand, so the contracted block stays a valid NSC no
      # longer than the block (which had at least one identity-like layer there).
      if preds[0] not in twin:
        layers.append(nsc.Layer(len(layers) + 1, nsc.LayerType.IDENTITY, 0, preds[0], 0))
        twin[preds[0]] = len(layers)
      preds[1] = twin[preds[0]]
    new_index[layer.index] = len(layers) + 1
    layers.append(nsc.Layer(len(layers) + 1, layer.type, layer.kernel, *preds))
  consumed = {p for layer in layers for p in layer.preds}
  outputs: dict[int, int] = {}
  for leaf in block.leaves():
    target = new_index[root[leaf]]
    outputs[target] = outputs.get(target, 0) + 1
  for target in sorted(outputs):
    # A leaf of the contracted DAG carries its one occurrence itself; any other count, or
    # a tensor consumed elsewhere (or the input), is written as that many identity leaves
    # (an identity reading a leaf would make it a leaf no more).
    if outputs[target] == 1 and target != 0 and target not in consumed:
      continue
    for _ in range(outputs[target]):
      layers.append(nsc.Layer(len(layers) + 1, nsc.LayerType.IDENTITY, 0, target, 0))
  layers.append(nsc.Layer(len(layers) + 1, nsc.LayerType.TERMINAL))
  return nsc.Block(tuple(layers))


def _check_numbering(block: nsc.Block) -> None:
  for position, layer in enumerate(block.body, start=1):
    if layer.index != position:
      raise nsc.NSCError(f'index {layer.index} out of sequence (expected {position})',
                         layer=layer.index, rule='consecutive')
    if any(p < 0 or p >= layer.index for p in layer.preds):
      raise nsc.NSCError(f'predecessors {layer.preds} must name earlier layers',
                         layer=layer.index, rule='pred_order')


def canonical_block(block: nsc.Block) -> nsc.Block:
  """The canonical representative of ``block``'s class (see the module docstring).

  Identity-like layers are contracted (``contract_identities``); the canonical block then
  numbers the layers by canonical rank (so equivalent blocks give equal blocks), writes
  add/concat predecessors in ascending order and ends with the terminal.

  Args:
    block: a block whose layers are numbered 1, 2, ... and read only earlier layers (any
      block that passes ``nsc.validate``).

  Returns:
    The canonical representative of ``block``'s equivalence class: a block that computes
    the same function, valid under any grammar ``block`` is valid under that allows
    identity layers.

  Raises:
    NSCError: if the layers are not numbered consecutively or read a later layer.
  """
  graph = _Graph.from_block(contract_identities(block))
  colour = _Canonizer(graph).run()
  order = [0] * graph.size
  for vertex, c in enumerate(colour):
    order[c] = vertex
  layers = []
  for rank in range(1, graph.size):
    vertex = order[rank]
    preds = sorted(colour[p] for p in graph.preds[vertex])
    if len(preds) == 1:
      preds.append(0)
    layers.append(nsc.Layer(rank, graph.types[vertex], graph.kernels[vertex], *preds))
  layers.append(nsc.Layer(graph.size, nsc.LayerType.TERMINAL))
  return nsc.Block(tuple(layers))


def canonical_key(block: nsc.Block) -> str:
  """A string equal for equivalent blocks and different otherwise (no hashing): the text
  of ``canonical_block``. Blocks that differ only by identity-like layers (identity, 1x1
  max/avg pooling) share it; see the module docstring for exactly what is identified."""
  return canonical_block(block).to_text()


def is_equivalent(a: nsc.Block, b: nsc.Block) -> bool:
  """Whether ``a`` and ``b`` describe the same network (isomorphic contracted DAGs)."""
  return canonical_key(a) == canonical_key(b)


class _Graph:
  """The block's DAG as adjacency lists; vertex 0 is the input, vertex i is layer i."""

  def __init__(self, types: Sequence[int], kernels: Sequence[int],
               preds: Sequence[tuple[int, ...]]):
    self.size = len(types)
    self.types = tuple(types)
    self.kernels = tuple(kernels)
    self.preds = tuple(tuple(p) for p in preds)
    consumers: list[list[int]] = [[] for _ in range(self.size)]
    for vertex, ps in enumerate(self.preds):
      for p in ps:
        consumers[p].append(vertex)
    self.consumers = tuple(tuple(c) for c in consumers)
    depth = [0] * self.size
    for vertex in range(1, self.size):
      depth[vertex] = 1 + max(depth[p] for p in self.preds[vertex])
    self.depth = tuple(depth)

  @classmethod
  def from_block(cls, block: nsc.Block) -> '_Graph':
    _check_numbering(block)
    types, kernels, preds = [_INPUT_TYPE], [0], [()]
    for layer in block.body:
      types.append(layer.type)
      kernels.append(layer.kernel)
      preds.append(layer.preds)
    return cls(types, kernels, preds)


def _ranks(keys: Sequence) -> list[int]:
  """Dense ranks of ``keys`` among their sorted distinct values."""
  rank = {key: i for i, key in enumerate(sorted(set(keys)))}
  return [rank[key] for key in keys]


class _UnionFind:
  """Orbits of a permutation group from its generators."""

  def __init__(self, size: int):
    self.parent = list(range(size))

  def find(self, x: int) -> int:
    while self.parent[x] != x:
      self.parent[x] = self.parent[self.parent[x]]
      x = self.parent[x]
    return x

  def union(self, x: int, y: int):
    rx, ry = self.find(x), self.find(y)
    if rx != ry:
      self.parent[max(rx, ry)] = min(rx, ry)


class _Leaf:
  """A discrete colouring reached by the search, with its encoding and path."""

  def __init__(self, encoding: tuple, colour: list[int], path: tuple[int, ...]):
    self.encoding = encoding
    self.colour = colour
    self.path = path
    self.order = [0] * len(colour)
    for vertex, c in enumerate(colour):
      self.order[c] = vertex


class _Canonizer:
  """One depth-first individualization-refinement search over a graph's colourings.

  Colourings are lists of dense ranks (vertex -> colour in 0..k-1); a vertex's colour is
  also its position in the ordered partition, so a discrete colouring is a numbering.
  """

  def __init__(self, graph: _Graph):
    self.graph = graph
    self.first: _Leaf | None = None
    self.best: _Leaf | None = None
    self.generators: list[tuple[int, ...]] = []
    # Twins (same label, predecessors and consumers) are swapped by an automorphism that
    # fixes every other vertex, so exploring one of them per search node is enough.
    twin_keys = [(graph.types[v], graph.kernels[v], tuple(sorted(graph.preds[v])),
                  tuple(sorted(graph.consumers[v]))) for v in range(graph.size)]
    self.twin = _ranks(twin_keys)

  def run(self) -> list[int]:
    """Returns the canonical colouring: vertex -> canonical rank (the input gets 0)."""
    g = self.graph
    colour = _ranks([(g.depth[v], g.types[v], g.kernels[v]) for v in range(g.size)])
    self._search(colour, ())
    return self.best.colour

  # -- refinement --------------------------------------------------------------------------

  def _refine(self, colour: list[int]) -> list[int]:
    """Splits colour classes by neighbour colours until stable; keeps the classes' order."""
    preds, consumers = self.graph.preds, self.graph.consumers
    size = self.graph.size
    num = max(colour) + 1
    while num < size:
      signatures = [(colour[v], tuple(sorted([colour[p] for p in preds[v]])),
                     tuple(sorted([colour[c] for c in consumers[v]]))) for v in range(size)]
      new = _ranks(signatures)
      new_num = max(new) + 1
      if new_num == num:
        break
      colour, num = new, new_num
    return colour

  @staticmethod
  def _individualize(colour: list[int], vertex: int) -> list[int]:
    """Gives ``vertex`` a colour just below the rest of its class, all else in order."""
    c = colour[vertex]
    return [x + 1 if x > c or (x == c and u != vertex) else x for u, x in enumerate(colour)]

  # -- leaves ------------------------------------------------------------------------------

  def _element(self, vertex: int, colour: list[int]) -> tuple:
    g = self.graph
    return (g.types[vertex], g.kernels[vertex], tuple(sorted([colour[p] for p in g.preds[vertex]])))

  def _worse_than_best(self, colour: list[int], settled: int, order: list[int]) -> bool:
    """Whether the settled prefix of the encoding already exceeds the best leaf's.

    Positions below the first non-singleton class hold single vertices whose predecessors
    (lower depth, so lower colour) are settled too: that part of the encoding is final.
    """
    best = self.best.encoding
    for position in range(settled):
      element = self._element(order[position], colour)
      if element != best[position]:
        return element > best[position]
    return False

  def _leaf(self, colour: list[int], path: tuple[int, ...]) -> int | None:
    """Records a leaf; returns the level to jump back to when it repeats a stored leaf."""
    order = [0] * len(colour)
    for vertex, c in enumerate(colour):
      order[c] = vertex
    encoding = tuple(self._element(v, colour) for v in order)
    leaf = _Leaf(encoding, colour, path)
    if self.first is None:
      self.first = self.best = leaf
      return None
    jump = None
    for stored in (self.first, self.best):
      if encoding != stored.encoding:
        continue
      # Equal encodings: mapping this leaf onto the stored one is an automorphism, and it
      # carries this leaf's branch below the common ancestor onto the stored leaf's branch,
      # which was fully explored (depth first), so that whole branch can be abandoned.
      gamma = tuple(stored.order[c] for c in colour)
      if gamma not in self.generators:
        self.generators.append(gamma)
      common = 0
      while path[common] == stored.path[common]:
        common += 1  # two distinct leaves diverge before either path ends
      jump = common if jump is None else min(jump, common)
    if jump is None and encoding < self.best.encoding:
      self.best = leaf
    return jump

  # -- search ------------------------------------------------------------------------------

  def _orbits(self, path: tuple[int, ...]) -> _UnionFind:
    """Orbits of the group generated by the known automorphisms that fix ``path``.

    An automorphism fixing the individualized vertices maps this search node to itself,
    so it maps child subtrees onto child subtrees.
    """
    orbits = _UnionFind(self.graph.size)
    for gamma in self.generators:
      if all(gamma[v] == v for v in path):
        for v, image in enumerate(gamma):
          orbits.union(v, image)
    return orbits

  def _search(self, colour: list[int], path: tuple[int, ...]) -> int | None:
    """Explores the subtree at ``path``; returns a level to jump back to, or None."""
    colour = self._refine(colour)
    size = self.graph.size
    counts = [0] * size
    for c in colour:
      counts[c] += 1
    target = next((c for c in range(size) if counts[c] > 1), None)
    if target is None:
      return self._leaf(colour, path)
    if self.best is not None:
      order = [0] * size
      for vertex, c in enumerate(colour):
        if counts[c] == 1:
          order[c] = vertex
      if self._worse_than_best(colour, target, order):
        return None  # every leaf below is worse than the best one
    level = len(path)
    cell = [v for v in range(size) if colour[v] == target]
    explored: list[int] = []
    explored_twins: set[int] = set()
    orbits, num_generators = None, -1
    for vertex in cell:
      if self.twin[vertex] in explored_twins:
        continue
      if explored and self.generators:
        if len(self.generators) != num_generators:
          orbits, num_generators = self._orbits(path), len(self.generators)
        root = orbits.find(vertex)
        if any(orbits.find(u) == root for u in explored):
          continue  # its subtree is the image of an explored sibling's
      explored.append(vertex)
      explored_twins.add(self.twin[vertex])
      jump = self._search(self._individualize(colour, vertex), path + (vertex,))
      if jump is not None and jump < level:
        return jump
    return None
