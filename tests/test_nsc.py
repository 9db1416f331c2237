"""The NSC grammar as a user relies on it: formats, validation rules, graph facts."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import pytest

from blockqnn_jax import nsc
from strategies import SMALL_GRAMMAR
from strategies import valid_blocks

GRAMMARS = st.integers(2, 10).map(lambda t: nsc.Grammar(max_index=t))
ANY_BLOCK = GRAMMARS.flatmap(lambda g: st.tuples(st.just(g), valid_blocks(g)))


# -- formats -------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(ANY_BLOCK)
def test_text_round_trip(grammar_and_block):
  grammar, block = grammar_and_block
  assert nsc.Block.parse(block.to_text()) == block
  assert nsc.parse(block.to_text(), grammar) == block
  assert str(block) == block.to_text()


@settings(max_examples=150, deadline=None)
@given(valid_blocks(SMALL_GRAMMAR))
def test_json_round_trip(block):
  assert nsc.Block.from_json(block.to_json()) == block
  assert json.loads(block.to_json()) == {'layers': [list(l.as_tuple()) for l in block.layers]}
  # A bare list of rows is accepted too.
  assert nsc.Block.from_json(json.dumps([list(l.as_tuple()) for l in block.layers])) == block


@settings(max_examples=100, deadline=None)
@given(valid_blocks(SMALL_GRAMMAR), st.sampled_from([' ', ';', '; ', '\n', '  \t']))
def test_text_separators_and_bracketed_form(block, separator):
  assert nsc.Block.parse(separator.join(l.to_text() for l in block.layers)) == block
  bracketed = '[' + ', '.join(f'({l.to_text()})' for l in block.layers) + ']'
  assert nsc.Block.parse(bracketed) == block
  assert nsc.Block.parse(bracketed.replace(', ', ',')) == block


@settings(max_examples=150, deadline=None)
@given(ANY_BLOCK)
def test_validate_accepts_and_returns_valid_blocks(grammar_and_block):
  grammar, block = grammar_and_block
  assert nsc.validate(block, grammar) is block


def test_bracketed_form_example():
  block = nsc.Block.parse('[(1,4,0,0,0), (2,1,3,1,0), (3,1,3,2,0), (4,5,0,1,3), (5,7,0,0,0)]')
  assert block == nsc.RESIDUAL_BLOCK


def test_python_repr_of_tuples_parses():
  text = str([l.as_tuple() for l in nsc.RESIDUAL_BLOCK.layers])
  assert nsc.Block.parse(text) == nsc.RESIDUAL_BLOCK
  assert nsc.Block.parse('1, 1, 3, 0, 0  2, 7, 0, 0, 0') == nsc.parse('1,1,3,0,0 2,7,0,0,0')


@pytest.mark.parametrize('text,rule', [('1,,1,3,0,0 2,7,0,0,0', 'fields'),
                                       ('1,1,3,0, 2,7,0,0,0', 'fields')])
def test_empty_fields_are_rejected(text, rule):
  with pytest.raises(nsc.NSCError) as e:
    nsc.Block.parse(text)
  assert e.value.rule == rule and e.value.layer == 1


def test_bools_and_floats_are_not_layer_fields():
  with pytest.raises(nsc.NSCError, match='integer'):
    nsc.Layer(1, True, 3)
  with pytest.raises(nsc.NSCError) as e:
    nsc.Block.from_json('{"layers": [[1, 1, 3, 0, 0], [2, 7, 0.5, 0, 0]]}')
  assert e.value.layer == 2 and e.value.rule == 'integer'


@pytest.mark.parametrize('text,layer,rule', [
    ('', None, 'empty'),
    ('  ;\n ', None, 'empty'),
    ('1,1,3,0 2,7,0,0,0', 1, 'fields'),
    ('1,1,3,0,0 2,7,0,0,0,0', 2, 'fields'),
    ('1,1,3,0,0 2,7,x,0,0', 2, 'integer'),
    ('1,1,3.0,0,0 2,7,0,0,0', 1, 'integer'),
])
def test_parse_rejects_malformed_text(text, layer, rule):
  with pytest.raises(nsc.NSCError) as info:
    nsc.Block.parse(text)
  assert (info.value.layer, info.value.rule) == (layer, rule)


@pytest.mark.parametrize('text,layer,rule', [
    ('{"layers": [[1, 1, 3, 0, 0]', None, 'json'),
    ('{"blocks": []}', None, 'json'),
    ('7', None, 'json'),
    ('{"layers": [[1, 1, 3, 0, 0], [2, 7, 0, 0]]}', 2, 'fields'),
    ('{"layers": [[1, 1, 3, 0, 0], "2,7,0,0,0"]}', 2, 'fields'),
])
def test_from_json_rejects_malformed_json(text, layer, rule):
  with pytest.raises(nsc.NSCError) as info:
    nsc.Block.from_json(text)
  assert (info.value.layer, info.value.rule) == (layer, rule)


def test_layer_fields_must_be_integers():
  assert nsc.Layer(1, 1.0, 3.0) == nsc.Layer(1, 1, 3)  # integral floats are coerced
  assert isinstance(nsc.Layer(1, 1.0, 3.0).kernel, int)
  for bad in (1.5, '3', None):
    with pytest.raises(nsc.NSCError) as info:
      nsc.Layer(1, 1, bad)
    assert info.value.rule == 'integer'


def test_block_accepts_plain_tuples():
  block = nsc.Block([(1, 1, 3, 0, 0), (2, 7, 0, 0, 0)])
  assert block.layers == (nsc.Layer(1, 1, 3), nsc.Layer(2, 7))
  assert block == nsc.Block.from_tuples([(1, 1, 3, 0, 0), (2, 7, 0, 0, 0)])


# -- validation rules ----------------------------------------------------------------------

# (text, grammar, offending layer, rule); each block breaks exactly one rule.
_T3 = nsc.Grammar(max_index=3)
_CONV_ADD = nsc.Grammar(layer_types=(1, 5))
_INVALID = [
    # unknown type codes
    ('1,8,0,0,0 2,7,0,0,0', None, 1, 'type'),
    ('1,1,3,0,0 2,0,0,1,0 3,7,0,0,0', None, 2, 'type'),
    # type not in grammar.layer_types
    ('1,2,3,0,0 2,7,0,0,0', _CONV_ADD, 1, 'type'),
    ('1,1,3,0,0 2,6,0,0,1 3,7,0,0,0', _CONV_ADD, 2, 'type'),
    # kernel not allowed for the type
    ('1,1,7,0,0 2,7,0,0,0', None, 1, 'kernel'),
    ('1,2,5,0,0 2,7,0,0,0', None, 1, 'kernel'),
    ('1,4,1,0,0 2,7,0,0,0', None, 1, 'kernel'),
    ('1,1,3,0,0 2,5,3,0,1 3,7,0,0,0', None, 2, 'kernel'),
    ('1,1,0,0,0 2,7,0,0,0', None, 1, 'kernel'),
    # a predecessor that is not an earlier layer
    ('1,1,3,0,0 2,1,3,2,0 3,7,0,0,0', None, 2, 'pred_order'),
    ('1,1,3,0,0 2,1,3,5,0 3,7,0,0,0', None, 2, 'pred_order'),
    ('1,1,3,-1,0 2,7,0,0,0', None, 1, 'pred_order'),
    ('1,1,3,0,0 2,5,0,1,2 3,7,0,0,0', None, 2, 'pred_order'),
    ('1,1,3,0,0 2,6,0,1,-1 3,7,0,0,0', None, 2, 'pred_order'),
    # a second predecessor on a one-input op (even an out-of-range one)
    ('1,1,3,0,0 2,1,3,1,1 3,7,0,0,0', None, 2, 'pred2_on_one_input'),
    ('1,1,3,0,0 2,4,0,0,1 3,7,0,0,0', None, 2, 'pred2_on_one_input'),
    ('1,1,3,0,0 2,2,3,1,9 3,7,0,0,0', None, 2, 'pred2_on_one_input'),
    # add/concat reading one tensor twice (pred2 missing, or equal to pred1)
    ('1,5,0,0,0 2,7,0,0,0', None, 1, 'pred2_missing'),
    ('1,1,3,0,0 2,5,0,1,1 3,7,0,0,0', None, 2, 'pred2_missing'),
    ('1,1,3,0,0 2,6,0,0,0 3,7,0,0,0', None, 2, 'pred2_missing'),
    # indices not 1, 2, 3, ...
    ('1,1,3,0,0 3,7,0,0,0', None, 3, 'consecutive'),
    ('0,1,3,0,0 1,7,0,0,0', None, 0, 'consecutive'),
    ('1,1,3,0,0 1,7,0,0,0', None, 1, 'consecutive'),
    ('2,1,3,0,0 3,7,0,0,0', None, 2, 'consecutive'),
    # no terminal at the end
    ('1,1,3,0,0 2,1,3,1,0', None, 2, 'no_terminal'),
    ('1,1,3,0,0', None, 1, 'no_terminal'),
    # layers after the terminal (reported at the terminal)
    ('1,1,3,0,0 2,7,0,0,0 3,1,3,0,0', None, 2, 'after_terminal'),
    # terminal with a kernel or predecessors
    ('1,1,3,0,0 2,7,3,0,0', None, 2, 'terminal_fields'),
    ('1,1,3,0,0 2,7,0,1,0', None, 2, 'terminal_fields'),
    # an index beyond T (the terminal counts)
    ('1,1,3,0,0 2,1,3,1,0 3,1,3,2,0 4,7,0,0,0', _T3, 4, 'max_index'),
    ('1,1,3,0,0 2,1,3,1,0 3,1,3,2,0 4,1,3,3,0 5,7,0,0,0', _T3, 4, 'max_index'),
    # only a terminal
    ('1,7,0,0,0', None, 1, 'empty'),
]


@pytest.mark.parametrize('text,grammar,layer,rule', _INVALID)
def test_each_rule_names_the_offending_layer(text, grammar, layer, rule):
  grammar = grammar or nsc.Grammar()
  block = nsc.Block.parse(text)
  with pytest.raises(nsc.NSCError) as info:
    nsc.validate(block, grammar)
  assert (info.value.layer, info.value.rule) == (layer, rule)
  assert str(info.value).startswith(f'layer {layer}: ')
  with pytest.raises(nsc.NSCError):
    nsc.parse(text, grammar)


def test_empty_block_has_no_layer():
  with pytest.raises(nsc.NSCError) as info:
    nsc.validate(nsc.Block(()))
  assert (info.value.layer, info.value.rule) == (None, 'empty')


def test_nsc_error_is_a_value_error():
  assert issubclass(nsc.NSCError, ValueError)


def test_first_offending_layer_is_reported():
  # Layer 2 has a bad kernel and layer 3 a bad predecessor: layer 2 is named.
  with pytest.raises(nsc.NSCError) as info:
    nsc.parse('1,1,3,0,0 2,1,2,1,0 3,1,3,3,0 4,7,0,0,0')
  assert (info.value.layer, info.value.rule) == (2, 'kernel')


@pytest.mark.parametrize('text', [
    '1,1,3,0,0 2,7,0,0,0',
    '1,4,0,0,0 2,7,0,0,0',
    '1,1,3,0,0 2,5,0,1,0 3,7,0,0,0',  # pred2 = 0 is the input, a legal second tensor
    '1,1,3,0,0 2,6,0,0,1 3,7,0,0,0',
    '1,1,1,0,0 2,2,1,1,0 3,3,3,2,0 4,1,5,3,0 5,7,0,0,0',
])
def test_valid_edge_cases(text):
  assert nsc.parse(text).to_text() == text


def test_terminal_may_sit_at_max_index():
  assert nsc.parse('1,1,3,0,0 2,1,3,1,0 3,7,0,0,0', nsc.Grammar(max_index=3))
  assert nsc.parse('1,1,3,0,0 2,7,0,0,0', nsc.Grammar(max_index=2))


# -- graph facts ---------------------------------------------------------------------------


def test_residual_block_facts():
  block = nsc.RESIDUAL_BLOCK  # 1 identity(0), 2 conv3(1), 3 conv3(2), 4 add(1, 3)
  assert nsc.validate(block) is block
  # Layers 1, 2, 3 are read by later layers; only the add is left over.
  assert block.leaves() == (4,)
  assert block.consumers() == {0: (1,), 1: (2, 4), 2: (3,), 3: (4,), 4: ()}
  # Edges: 1 + 1 + 1 + 2 predecessor links + 1 leaf -> output = 6.
  assert block.num_edges() == 6
  # Nodes: input + 4 layers + output = 6.
  assert block.num_nodes() == 6
  assert block.density() == 1.0
  # Longest path: identity -> conv3 -> conv3 -> add.
  assert block.depth() == 4
  assert [l.preds for l in block.body] == [(0,), (1,), (2,), (1, 3)]


def test_inception_block_facts():
  block = nsc.INCEPTION_BLOCK  # conv1(0), conv3(0), conv5(0), max3(0), conv1(4)
  assert nsc.validate(block) is block
  # Only the max pool (4) is read again, by the conv1 after it.
  assert block.leaves() == (1, 2, 3, 5)
  assert block.consumers() == {0: (1, 2, 3, 4), 1: (), 2: (), 3: (), 4: (5,), 5: ()}
  # Edges: 5 predecessor links + 4 leaf -> output = 9.
  assert block.num_edges() == 9
  # Nodes: input + 5 layers + output = 7.
  assert block.num_nodes() == 7
  assert block.density() == pytest.approx(9 / 7)
  # Longest path: max3 -> conv1.
  assert block.depth() == 2


def test_describe():
  assert nsc.RESIDUAL_BLOCK.describe() == (
      '1: identity(0)\n2: conv3(1)\n3: conv3(2)\n4: add(1, 3)\n5: terminal')
  assert nsc.Layer(1, 2, 3, 0).describe() == 'max_pool3(0)'
  assert nsc.Layer(2, 6, 0, 0, 1).describe() == 'concat(0, 1)'


def test_layer_types():
  assert [t.num_inputs for t in nsc.LayerType] == [1, 1, 1, 1, 2, 2, 0]
  assert nsc.LayerType.AVG_POOL.short_name == 'avg_pool'
  assert nsc.Layer(3, 5, 0, 1, 2).preds == (1, 2)
  assert nsc.Layer(3, 1, 3, 2, 0).preds == (2,)
  assert nsc.Layer(3, 7).preds == ()
  assert nsc.Layer(3, 7).is_terminal


@settings(max_examples=150, deadline=None)
@given(valid_blocks(SMALL_GRAMMAR))
def test_graph_facts_agree_with_their_definitions(block):
  consumers = block.consumers()
  leaves = block.leaves()
  assert set(leaves) == {i for i, c in consumers.items() if i and not c}
  assert block.num_nodes() == len(block.layers) + 1  # the terminal stands for the output
  assert block.num_edges() == sum(len(l.preds) for l in block.body) + len(leaves)
  assert 1 <= block.depth() <= len(block.body)
  assert leaves  # the last body layer is never consumed


# -- grammar -------------------------------------------------------------------------------


@pytest.mark.parametrize('kwargs', [
    dict(max_index=1),
    dict(max_index=0),
    dict(layer_types=()),
    dict(layer_types=(7,)),
    dict(layer_types=(0,)),
    dict(layer_types=(1, 8)),
    dict(conv_kernels=(0,)),
    dict(max_pool_kernels=(3, -1)),
    dict(conv_kernels=()),
    dict(avg_pool_kernels=(), layer_types=(3,)),
])
def test_grammar_rejects_bad_configs(kwargs):
  with pytest.raises(ValueError):
    nsc.Grammar(**kwargs)


def test_grammar_normalises_and_reports_kernels():
  grammar = nsc.Grammar(conv_kernels=[3, 1], layer_types=[1, 5])
  assert grammar.conv_kernels == (3, 1) and grammar.layer_types == (1, 5)
  assert hash(grammar) == hash(nsc.Grammar(conv_kernels=(3, 1), layer_types=(1, 5)))
  assert grammar.kernels(1) == (3, 1)
  assert grammar.kernels(nsc.LayerType.MAX_POOL) == (1, 3)
  assert grammar.kernels(4) == grammar.kernels(5) == grammar.kernels(6) == (0,)
  # Kernels of a type left out of layer_types may be empty.
  assert nsc.Grammar(conv_kernels=(), layer_types=(2, 4)).conv_kernels == ()
