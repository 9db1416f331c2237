"""Canonical forms: equal exactly for equivalent blocks (checked against networkx)."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st
import networkx as nx
from nsc_examples import NARROW_GRAMMAR, SMALL_GRAMMAR, renumberings, valid_blocks
import numpy as np
import pytest

from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import grammar as nsc

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


def _digraph(block: nsc.Block) -> nx.MultiDiGraph:
  """The block's contracted DAG as the module docstring defines equivalence on it.

  Written independently of ``canonical``: identity-like layers (identity, 1x1 pooling) are
  bypassed, and an explicit output node gets one edge per leaf, from the tensor the leaf
  carries (so multiplicities count).
  """
  def identity_like(layer):
    return layer.type == 4 or (layer.type in (2, 3) and layer.kernel == 1)

  graph = nx.MultiDiGraph()
  graph.add_node(0, label='input')
  graph.add_node('out', label='output')
  tensor = {0: 0}
  for layer in block.body:
    if identity_like(layer):
      tensor[layer.index] = tensor[layer.pred1]
      continue
    tensor[layer.index] = layer.index
    graph.add_node(layer.index, label=(layer.type, layer.kernel))
    for pred in layer.preds:
      graph.add_edge(tensor[pred], layer.index)
  for leaf in block.leaves():
    graph.add_edge(tensor[leaf], 'out')
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
  contracted = canonical.contract_identities(block)
  assert canon.depth() == contracted.depth()
  assert len(canon.leaves()) == len(contracted.leaves()) == len(block.leaves())


# -- examples ------------------------------------------------------------------------------


def test_hand_computed_canonical_form():
  # Initial colours (depth, type, kernel): conv1 (1,1,1) sorts before conv3 (1,1,3).
  block = _blk((1, 3, 0, 0), (1, 1, 0, 0), (5, 0, 2, 1))
  assert canonical.canonical_key(block) == '1,1,1,0,0 2,1,3,0,0 3,5,0,1,2 4,7,0,0,0'


def test_residual_block_with_swapped_add_preds():
  swapped = nsc.Block.parse('1,4,0,0,0 2,1,3,1,0 3,1,3,2,0 4,5,0,3,1 5,7,0,0,0')
  assert canonical.canonical_key(swapped) == canonical.canonical_key(nsc.RESIDUAL_BLOCK)
  # The identity is contracted: the add reads the input itself.
  assert canonical.canonical_block(swapped) == nsc.Block.parse(
      '1,1,3,0,0 2,1,3,1,0 3,5,0,0,2 4,7,0,0,0')


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


# -- identity-like layers ------------------------------------------------------------------

# Identity and both 1x1 poolings, beside 3x3 pooling (not identity-like) and convs.
IDENTITY_GRAMMAR = nsc.Grammar(max_index=8, conv_kernels=(1, 3), max_pool_kernels=(1, 3),
                               avg_pool_kernels=(1, 3))
IDENTITY_LIKE = ((4, 0), (2, 1), (3, 1))


@st.composite
def _with_identity_inserted(draw, block: nsc.Block) -> nsc.Block:
  """``block`` with one more identity-like layer u reading some tensor v, and a non-empty
  subset of v's consumers reading u instead (or, where v is a leaf, u as the new leaf):
  the same function, one layer longer."""
  consumers = block.consumers()
  v = draw(st.sampled_from(sorted(consumers)))
  readers = list(consumers[v])
  if not readers and v == 0:
    return block
  moved = set(draw(st.lists(st.sampled_from(readers), min_size=1, unique=True))) if readers \
      else set()
  shift = lambda p: p + 1 if p > v else p  # layers after v move up one index
  layers = [l for l in block.body if l.index <= v]
  kind, kernel = draw(st.sampled_from(IDENTITY_LIKE))
  layers.append(nsc.Layer(v + 1, kind, kernel, v, 0))
  for layer in block.body:
    if layer.index <= v:
      continue
    preds = [v + 1 if p == v and layer.index in moved else shift(p) for p in layer.preds]
    if layer.index in moved and len(preds) == 2 and preds[0] == preds[1] == v + 1:
      preds[1] = v  # a merge reading v twice is not valid anyway; keep one operand on v
    preds += [0] * (2 - len(preds))
    layers.append(nsc.Layer(layer.index + 1, layer.type, layer.kernel, *preds))
  layers.append(nsc.Layer(len(layers) + 1, nsc.LayerType.TERMINAL))
  return nsc.Block(tuple(layers))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_identity_like_layers_do_not_change_the_key(data):
  block = data.draw(valid_blocks(IDENTITY_GRAMMAR, max_layers=5))
  other = block
  for _ in range(data.draw(st.integers(1, 2))):
    other = data.draw(_with_identity_inserted(other))
  other = data.draw(renumberings(other))
  nsc.validate(other, nsc.Grammar(max_index=16))
  assert canonical.canonical_key(other) == canonical.canonical_key(block)
  assert _isomorphic(other, block)


def _evaluate(block: nsc.Block, x: np.ndarray, features: int = 4) -> list[tuple]:
  """The block's output as a multiset of leaf tensors, each a multiset of channel values.

  Every label gets one fixed function, and every function reads its input's channels as a
  multiset, since equivalence is up to channel order (concat's operands are unordered):
  conv k is tanh(W_{k,width} sort(x)), 3x3 max/avg pooling fixed elementwise maps,
  identity and 1x1 pooling the tensor itself, add sums its operands (each projected by
  tanh(P_width sort(v)) when not ``features`` wide), concat concatenates.
  """
  def weights(*key):
    return np.random.default_rng(abs(hash(key)) % 2**32).normal(size=(features, key[-1]))

  nodes = {0: x}
  for layer in block.body:
    a = nodes[layer.pred1]
    if layer.type == 1:
      out = np.tanh(weights('conv', layer.kernel, a.size) @ np.sort(a))
    elif layer.type in (2, 3) and layer.kernel != 1:
      out = np.maximum(a, 0.1) + 0.3 if layer.type == 2 else 0.5 * a + 0.1
    elif layer.type in (2, 3, 4):
      out = a
    elif layer.type == 6:
      out = np.concatenate([a, nodes[layer.pred2]])
    else:  # F-wide tensors (convs, adds, pools of them) are never concats: 3 + 3 > F
      ops = [v if v.size == features else np.tanh(weights('proj', v.size) @ np.sort(v))
             for v in (a, nodes[layer.pred2])]
      out = ops[0] + ops[1]
    nodes[layer.index] = out
  return sorted(tuple(np.sort(np.round(nodes[i], 9))) for i in block.leaves())


@settings(max_examples=200, deadline=None)
@given(valid_blocks(IDENTITY_GRAMMAR))
def test_canonical_block_computes_the_same_function(block):
  x = np.random.default_rng(0).normal(size=3)
  canon = canonical.canonical_block(block)
  assert _evaluate(canon, x) == _evaluate(block, x)
  assert len(canon.layers) <= len(block.layers)
  nsc.validate(canon, IDENTITY_GRAMMAR)


@pytest.mark.parametrize('a,b,same', [
    # max_pool 1x1, avg_pool 1x1 and identity are all the tensor itself.
    ('1,2,1,0,0 2,7,0,0,0', '1,3,1,0,0 2,7,0,0,0', True),
    ('1,2,1,0,0 2,7,0,0,0', '1,4,0,0,0 2,7,0,0,0', True),
    ('1,2,1,0,0 2,1,3,1,0 3,7,0,0,0', '1,1,3,0,0 2,7,0,0,0', True),
    ('1,1,3,0,0 2,3,1,1,0 3,4,0,2,0 4,7,0,0,0', '1,1,3,0,0 2,7,0,0,0', True),
    # An identity leaf reading a consumed tensor puts that tensor in the output...
    ('1,1,3,0,0 2,4,0,0,0 3,7,0,0,0', '1,1,3,0,0 2,7,0,0,0', False),
    # ... and two identity leaves of one tensor output it twice.
    ('1,1,3,0,0 2,4,0,1,0 3,4,0,1,0 4,7,0,0,0', '1,1,3,0,0 2,4,0,1,0 3,7,0,0,0', False),
    # 3x3 pooling is not identity-like.
    ('1,2,3,0,0 2,1,3,1,0 3,7,0,0,0', '1,1,3,0,0 2,7,0,0,0', False),
    ('1,2,3,0,0 2,7,0,0,0', '1,3,3,0,0 2,7,0,0,0', False),
])
def test_identity_like_examples(a, b, same):
  a, b = nsc.Block.parse(a), nsc.Block.parse(b)
  assert (canonical.canonical_key(a) == canonical.canonical_key(b)) == same
  assert _isomorphic(a, b) == same
  x = np.random.default_rng(1).normal(size=3)
  assert (_evaluate(a, x) == _evaluate(b, x)) == same


def test_a_merge_through_identities_keys_with_its_equivalents():
  # add(x, identity(x)) is a block (2x); identity and 1x1 pooling spell it the same way.
  block = nsc.parse('1,4,0,0,0 2,5,0,0,1 3,7,0,0,0')
  assert canonical.canonical_key(block) == canonical.canonical_key(
      nsc.parse('1,2,1,0,0 2,3,1,1,0 3,5,0,2,0 4,7,0,0,0'))  # add(pool1(pool1(x)), x)
  assert nsc.validate(canonical.canonical_block(block)) is not None
  assert canonical.canonical_key(block) != canonical.canonical_key(
      nsc.Block.parse('1,1,1,0,0 2,5,0,0,1 3,7,0,0,0'))
