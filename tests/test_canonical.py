"""Canonical forms: equal exactly for equivalent blocks (checked against networkx)."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import networkx as nx
import pytest

from blockqnn_jax import canonical
from blockqnn_jax import nsc
from strategies import NARROW_GRAMMAR
from strategies import renumberings
from strategies import SMALL_GRAMMAR
from strategies import valid_blocks

# Grammars of every size the brief cares about, so hypothesis mixes short and long blocks.
GRAMMARS = st.integers(4, 10).map(
    lambda t: nsc.Grammar(max_index=t, conv_kernels=(1, 3), max_pool_kernels=(3,),
                          avg_pool_kernels=(3,)))
ANY_BLOCK = GRAMMARS.flatmap(valid_blocks)


def _blk(*layers) -> nsc.Block:
  """A block from ``(type, kernel, pred1, pred2)`` rows, indexed 1.. and terminated."""
  rows = [(i, *row) for i, row in enumerate(layers, start=1)]
  rows.append((len(rows) + 1, nsc.LayerType.TERMINAL, 0, 0, 0))
  return nsc.validate(nsc.Block.from_tuples(rows), nsc.Grammar(max_index=64))


def _digraph(block: nsc.Block) -> nx.DiGraph:
  """The block's labelled DAG as the brief defines equivalence on it."""
  graph = nx.DiGraph()
  graph.add_node(0, label='input')
  for layer in block.body:
    graph.add_node(layer.index, label=(layer.type, layer.kernel))
    for pred in layer.preds:
      graph.add_edge(pred, layer.index)
  return graph


def _isomorphic(a: nsc.Block, b: nsc.Block) -> bool:
  return nx.is_isomorphic(_digraph(a), _digraph(b),
                          node_match=lambda x, y: x['label'] == y['label'])


@st.composite
def _mutated(draw, block: nsc.Block, grammar: nsc.Grammar) -> nsc.Block:
  """``block`` with one layer redrawn from its legal choices (often a different network)."""
  layers = list(block.layers)
  index = draw(st.integers(1, len(block.body)))
  types = [t for t in grammar.layer_types if index >= 2 or t not in nsc.MERGE_TYPES]
  layer_type = draw(st.sampled_from(types))
  pred1 = draw(st.integers(0, index - 1))
  pred2 = 0
  if layer_type in nsc.MERGE_TYPES:
    pred2 = draw(st.integers(0, index - 1).filter(lambda p: p != pred1))
  kernel = draw(st.sampled_from(grammar.kernels(layer_type)))
  layers[index - 1] = nsc.Layer(index, layer_type, kernel, pred1, pred2)
  return nsc.Block(tuple(layers))


@st.composite
def _block_pairs(draw) -> tuple[nsc.Block, nsc.Block]:
  """Pairs that are equivalent about as often as not: renumbered, mutated or unrelated."""
  a = draw(valid_blocks(NARROW_GRAMMAR))
  how = draw(st.sampled_from(['renumbered', 'mutated', 'unrelated']))
  if how == 'renumbered':
    b = draw(renumberings(a))
  elif how == 'mutated':
    b = draw(renumberings(draw(_mutated(a, NARROW_GRAMMAR))))
  else:
    size = len(a.body)
    b = draw(valid_blocks(NARROW_GRAMMAR, min_layers=size, max_layers=size))
  return a, b


# -- properties ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_renumbering_and_swapping_merge_preds_keep_the_key(data):
  block = data.draw(ANY_BLOCK)
  other = data.draw(renumberings(block))
  nsc.validate(other, nsc.Grammar(max_index=10))
  assert canonical.canonical_key(other) == canonical.canonical_key(block)
  assert canonical.canonical_block(other) == canonical.canonical_block(block)
  assert canonical.is_equivalent(block, other)


@settings(max_examples=300, deadline=None)
@given(_block_pairs())
def test_equal_keys_iff_isomorphic(pair):
  a, b = pair
  same_key = canonical.canonical_key(a) == canonical.canonical_key(b)
  assert same_key == _isomorphic(a, b)
  assert canonical.is_equivalent(a, b) == same_key


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_canonical_block_is_valid_equivalent_and_idempotent(data):
  grammar = data.draw(GRAMMARS)
  block = data.draw(valid_blocks(grammar))
  canon = canonical.canonical_block(block)
  assert nsc.validate(canon, grammar) is canon
  assert _isomorphic(canon, block)
  assert canonical.canonical_block(canon) == canon
  assert canonical.canonical_key(block) == canon.to_text()
  assert nsc.Block.parse(canonical.canonical_key(block)) == canon


@settings(max_examples=200, deadline=None)
@given(valid_blocks(SMALL_GRAMMAR))
def test_canonical_numbering_is_by_depth_with_sorted_merge_preds(block):
  # Depth is the colouring's primary key, so a layer never precedes a shallower one.
  canon = canonical.canonical_block(block)
  depth = {0: 0}
  for layer in canon.body:
    depth[layer.index] = 1 + max(depth[p] for p in layer.preds)
  depths = [depth[layer.index] for layer in canon.body]
  assert depths == sorted(depths)
  for layer in canon.body:
    if layer.type in nsc.MERGE_TYPES:
      assert layer.pred1 < layer.pred2
  assert canon.depth() == block.depth()
  assert len(canon.leaves()) == len(block.leaves())


# -- examples ------------------------------------------------------------------------------


def test_hand_computed_canonical_form():
  # Initial colours (depth, type, kernel): conv1 (1,1,1) sorts before conv3 (1,1,3).
  block = _blk((1, 3, 0, 0), (1, 1, 0, 0), (5, 0, 2, 1))
  assert canonical.canonical_key(block) == '1,1,1,0,0 2,1,3,0,0 3,5,0,1,2 4,7,0,0,0'


def test_residual_block_with_swapped_add_preds():
  swapped = nsc.Block.parse('1,4,0,0,0 2,1,3,1,0 3,1,3,2,0 4,5,0,3,1 5,7,0,0,0')
  assert canonical.canonical_key(swapped) == canonical.canonical_key(nsc.RESIDUAL_BLOCK)
  # Already in canonical order: depths 1, 2, 3, 4.
  assert canonical.canonical_block(swapped) == nsc.RESIDUAL_BLOCK


def test_inception_block_renumbered():
  # The pooled branch (max3 -> conv1) written first, the convolutions after it.
  reordered = nsc.Block.parse('1,2,3,0,0 2,1,5,0,0 3,1,1,1,0 4,1,3,0,0 5,1,1,0,0 6,7,0,0,0')
  assert canonical.is_equivalent(reordered, nsc.INCEPTION_BLOCK)


def test_sharing_matters():
  # add(conv3(a), conv3(a)) with one shared a vs two separate a's: same expression tree.
  shared = _blk((1, 3, 0, 0), (1, 3, 1, 0), (1, 3, 1, 0), (5, 0, 2, 3))
  unshared = _blk((1, 3, 0, 0), (1, 3, 0, 0), (1, 3, 1, 0), (1, 3, 2, 0), (5, 0, 3, 4))
  assert canonical.canonical_key(shared) != canonical.canonical_key(unshared)
  assert not canonical.is_equivalent(shared, unshared)


def test_sharing_matters_at_equal_size():
  # Same layer count, leaves, depth and expression trees; only where sharing happens differs.
  # A shares the conv3 under the add and not the conv1 under the concat; B the reverse.
  a = _blk((1, 3, 0, 0), (1, 3, 1, 0), (1, 3, 1, 0), (5, 0, 2, 3),
           (1, 1, 0, 0), (1, 1, 0, 0), (2, 3, 5, 0), (2, 3, 6, 0), (6, 0, 7, 8))
  b = _blk((1, 3, 0, 0), (1, 3, 0, 0), (1, 3, 1, 0), (1, 3, 2, 0), (5, 0, 3, 4),
           (1, 1, 0, 0), (2, 3, 6, 0), (2, 3, 6, 0), (6, 0, 7, 8))
  assert len(a.body) == len(b.body) and a.depth() == b.depth()
  assert len(a.leaves()) == len(b.leaves())
  assert canonical.canonical_key(a) != canonical.canonical_key(b)
  assert not _isomorphic(a, b)


def test_kernel_and_type_are_part_of_the_label():
  base = _blk((1, 3, 0, 0), (1, 3, 1, 0))
  assert not canonical.is_equivalent(base, _blk((1, 3, 0, 0), (1, 1, 1, 0)))
  assert not canonical.is_equivalent(base, _blk((1, 3, 0, 0), (3, 3, 1, 0)))
  assert not canonical.is_equivalent(_blk((1, 3, 0, 0), (1, 1, 0, 0), (5, 0, 1, 2)),
                                     _blk((1, 3, 0, 0), (1, 1, 0, 0), (6, 0, 1, 2)))


def _cycle_of_adds(cycles: list[int]) -> nsc.Block:
  """conv3 layers on the input, joined by adds around cycles of the given lengths."""
  convs = sum(cycles)
  rows = [(1, 3, 0, 0)] * convs
  start = 1
  for length in cycles:
    members = list(range(start, start + length))
    rows += [(5, 0, members[i], members[(i + 1) % length]) for i in range(length)]
    start += length
  return _blk(*rows)


def test_refinement_blind_pairs_are_told_apart():
  # One 6-cycle vs two triangles: every node has the same colour-refinement signature,
  # so only individualization separates them.
  hexagon, triangles = _cycle_of_adds([6]), _cycle_of_adds([3, 3])
  assert canonical.canonical_key(hexagon) != canonical.canonical_key(triangles)
  assert not _isomorphic(hexagon, triangles)


@settings(max_examples=20, deadline=None)
@given(st.data())
def test_refinement_blind_blocks_are_renumbering_invariant(data):
  for block in (_cycle_of_adds([6]), _cycle_of_adds([3, 3]), _cycle_of_adds([4, 5])):
    other = data.draw(renumberings(block))
    assert canonical.canonical_key(other) == canonical.canonical_key(block)


def _cycle_partitions(total: int, smallest: int = 3) -> list[tuple[int, ...]]:
  """Every way to split ``total`` into cycle lengths of at least ``smallest``, ascending."""
  if total == 0:
    return [()]
  return [(first,) + rest for first in range(smallest, total + 1)
          for rest in _cycle_partitions(total - first, first)]


def _cycle_lengths(total: int) -> st.SearchStrategy[list[int]]:
  """A split of ``total`` into cycle lengths, in random order."""
  return st.sampled_from(_cycle_partitions(total)).flatmap(st.permutations)


@settings(max_examples=60, deadline=None)
@given(st.integers(6, 10).flatmap(lambda n: st.tuples(_cycle_lengths(n), _cycle_lengths(n))),
       st.data())
def test_refinement_blind_families(lengths, data):
  # Random numberings of blocks that colour refinement alone cannot split. The cycles hang
  # off the input as separate components, so the blocks are isomorphic iff their cycle
  # lengths agree as multisets (networkx's VF2 takes seconds on some of these pairs).
  a = data.draw(renumberings(_cycle_of_adds(lengths[0])))
  b = data.draw(renumberings(_cycle_of_adds(lengths[1])))
  same_key = canonical.canonical_key(a) == canonical.canonical_key(b)
  assert same_key == (sorted(lengths[0]) == sorted(lengths[1]))


def _parallel_chains(copies: int, length: int) -> nsc.Block:
  """``copies`` disjoint chains of ``length`` conv3 layers on the input, chain by chain."""
  rows = []
  for _ in range(copies):
    start = len(rows)
    rows += [(1, 3, start + i if i else 0, 0) for i in range(length)]
  return _blk(*rows)


@pytest.mark.parametrize('copies,length', [(11, 2), (22, 1), (7, 3), (5, 4)])
def test_symmetric_blocks_are_fast_and_exact(copies, length):
  block = _parallel_chains(copies, length)
  start = time.perf_counter()
  canon = canonical.canonical_block(block)
  assert time.perf_counter() - start < 5.0  # generous: milliseconds in practice
  # Canonical: all first layers, then all second layers, ..., each reading its own chain.
  expected = [(1, 3, 0, 0)] * copies
  for step in range(1, length):
    expected += [(1, 3, (step - 1) * copies + c + 1, 0) for c in range(copies)]
  assert canon == _blk(*expected)


def test_interleaved_chains_match_chain_by_chain():
  # The 11 chains written layer by layer instead of chain by chain, second layers reversed.
  rows = [(1, 3, 0, 0)] * 11 + [(1, 3, 11 - c, 0) for c in range(11)]
  assert canonical.is_equivalent(_blk(*rows), _parallel_chains(11, 2))


def test_nested_symmetry():
  # Three copies of (conv3 -> two conv1 twins -> concat), each copy's twins swappable.
  rows = []
  for _ in range(3):
    s = len(rows)
    rows += [(1, 3, 0, 0), (1, 1, s + 1, 0), (1, 1, s + 1, 0), (6, 0, s + 2, s + 3)]
  block = _blk(*rows)
  canon = canonical.canonical_block(block)
  assert _isomorphic(canon, block)
  assert canonical.canonical_block(canon) == canon


def test_malformed_blocks_raise():
  with pytest.raises(nsc.NSCError) as info:
    canonical.canonical_block(nsc.Block.parse('1,1,3,0,0 2,1,3,2,0 3,7,0,0,0'))
  assert (info.value.layer, info.value.rule) == (2, 'pred_order')
  with pytest.raises(nsc.NSCError) as info:
    canonical.canonical_block(nsc.Block.parse('1,1,3,0,0 3,1,3,1,0 4,7,0,0,0'))
  assert (info.value.layer, info.value.rule) == (3, 'consecutive')
