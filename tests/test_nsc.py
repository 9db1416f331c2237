"""The NSC grammar as a user relies on it: formats, validation rules, graph facts."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from nsc_examples import SMALL_GRAMMAR, valid_blocks
import pytest

from blockqnn_jax.nsc import grammar as nsc

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


# -- any input: a block or NSCError, never another exception -------------------------------

# Characters that trip up a field reader: separators, signs, exponents, and digits int() would
# take but the NSC does not (Arabic-Indic, fullwidth, NKo and mathematical digits, numerals).
_TRICKY = st.sampled_from(list('0123456789,;()[]{}" \n\t-+_.eE') +
                          ['٣', '３', '߂', '𝟡', '½', 'Ⅻ', '\u00a0', '\u2003', '\x00'])


@st.composite
def _mutations(draw, texts):
  """A text from ``texts`` with up to four characters inserted, replaced or deleted."""
  text = draw(texts)
  for _ in range(draw(st.integers(0, 4))):
    at = draw(st.integers(0, len(text)))
    char = draw(_TRICKY | st.characters())
    text = draw(st.sampled_from([text[:at] + char + text[at:], text[:at] + char + text[at + 1:],
                                 text[:at] + text[at + 1:]]))
  return text


_BLOCKS = valid_blocks(SMALL_GRAMMAR)
_ANY_TEXT = st.one_of(st.text(), st.text(_TRICKY),
                      _mutations(_BLOCKS.map(lambda b: b.to_text())),
                      _mutations(_BLOCKS.map(lambda b: str([l.as_tuple() for l in b.layers]))),
                      _mutations(_BLOCKS.map(lambda b: b.to_json())))
_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10**25, 10**25),
                          st.floats(), st.text(_TRICKY, max_size=4))
_JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(
        st.just('layers') | st.text(max_size=6), inner, max_size=3),
    max_leaves=30)
# Shaped like an NSC: a list of rows, most of five small integers, some of them numbers that
# are not field values (non-finite, huge, fractional, or not numbers at all).
_ROW_ENTRIES = st.one_of(
    st.integers(-2, 9),
    st.sampled_from([float('inf'), float('-inf'), float('nan'), 1e300, 0.5, 3.0, True, None,
                     '3', '٣', 10**19, -10**30]),
    _JSON_SCALARS)
_JSON_ROWS = st.lists(st.lists(_ROW_ENTRIES, min_size=5, max_size=5) |
                      st.lists(_ROW_ENTRIES, max_size=7) | _JSON_VALUES, max_size=6)
_JSON_DOCUMENTS = st.one_of(_JSON_VALUES, _JSON_ROWS, _JSON_ROWS.map(lambda r: {'layers': r}))


def _block_or_none(parser, text):
  """``parser(text)``, or None where it raises NSCError; any other exception fails the test."""
  try:
    return parser(text)
  except nsc.NSCError:
    return None


@settings(max_examples=400, deadline=None)
@given(_ANY_TEXT)
def test_any_text_parses_or_raises_nsc_error(text):
  block = _block_or_none(nsc.Block.parse, text)
  _block_or_none(nsc.parse, text)
  _block_or_none(nsc.Block.from_json, text)
  _block_or_none(nsc.Block.from_json, text.encode('utf-8', 'surrogatepass'))
  if block is not None:
    # Only ASCII digits were read, and what was read reads back the same.
    assert not any(c.isnumeric() and c not in '0123456789' for c in text)
    assert nsc.Block.parse(block.to_text()) == block


@settings(max_examples=400, deadline=None)
@given(_JSON_DOCUMENTS)
def test_any_json_parses_or_raises_nsc_error(data):
  text = json.dumps(data)  # non-finite floats come out as NaN and Infinity, as many writers do
  block = _block_or_none(nsc.Block.from_json, text)
  if block is not None:
    assert nsc.Block.from_json(block.to_json()) == block
    assert all(type(v) is int for l in block.layers for v in l.as_tuple())


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_any_bytes_as_json_parse_or_raise_nsc_error(data):
  _block_or_none(nsc.Block.from_json, data)


@pytest.mark.parametrize('text,layer', [
    ('{"layers": [[1, 1, Infinity, 0, 0], [2, 7, 0, 0, 0]]}', 1),
    ('[[1, 1, 3, 0, 0], [2, 7, -Infinity, 0, 0]]', 2),
    ('[[1, 1, 3, 0, 0], [2, 7, 0, NaN, 0]]', 2),
    ('[[1, 1, 1e400, 0, 0], [2, 7, 0, 0, 0]]', 1),  # reads as an infinity
    ('[[1, 1, 3, 0, 0], [2, 7, 0, 0, -1e400]]', 2),
    ('[[1, 1, 3, 0, 0], [2, 7, 0, 0, 1e300]]', 2),  # integral, but longer than any field
    ('[[1, 1, 3, 0, 0], [2, 7, 0, 0, 1000000000000000000]]', 2),
    ('[[1, 1, 3, 0, 0], [2, 7, "3", 0, 0]]', 2),
    ('[[1, 1, 3, 0, 0], [2, 7, "٣", 0, 0]]', 2),
    ('[[1, 1, ' + '[' * 500 + ']' * 500 + ', 0, 0]]', 1),  # quoted shallowly in the message
])
def test_from_json_rejects_non_finite_huge_and_non_integer_fields_at_their_row(text, layer):
  with pytest.raises(nsc.NSCError) as info:
    nsc.Block.from_json(text)
  assert (info.value.layer, info.value.rule) == (layer, 'integer')
  assert len(str(info.value)) < 200


@pytest.mark.parametrize('text', [
    'Infinity', 'NaN', '1e400',
    '[' * 100_000 + ']' * 100_000,  # deeper than the decoder's recursion
    '{"layers": ' + '[' * 100_000,
    '[[' + '1' * 5000 + ', 7, 0, 0, 0]]',  # past int()'s digit limit
    b'\xff\xfe\x00\xd8',  # no encoding JSON allows
    None,
    3,
])
def test_from_json_rejects_unreadable_documents(text):
  with pytest.raises(nsc.NSCError) as info:
    nsc.Block.from_json(text)
  assert (info.value.layer, info.value.rule) == (None, 'json')


@pytest.mark.parametrize('text,layer', [
    ('2,7,0,0,0_0', 1),  # int() reads '0_0' as 0
    ('1,1,3,0,0 2,7,0_0,0,0', 2),
    ('１,７,０,０,０', 1),  # fullwidth digits
    ('1,1,٣,0,0 2,7,0,0,0', 1),  # an Arabic-Indic three
    ('1,1,3,0,0 2,7,0,0,߀', 2),  # an NKo zero
    ('1,1,3,0,0 +2,7,0,0,0', 2),
    ('1,1,3,0,0 2,7,0x0,0,0', 2),
    ('1,1,3,0,0 2,7,' + '9' * 5000 + ',0,0', 2),  # past int()'s digit limit
    ('1,1,3,0,0 2,7,' + '1' * 19 + ',0,0', 2),  # longer than any field
])
def test_parse_reads_only_ascii_digits(text, layer):
  with pytest.raises(nsc.NSCError) as info:
    nsc.Block.parse(text)
  assert (info.value.layer, info.value.rule) == (layer, 'integer')
  assert len(str(info.value)) < 200


def test_parse_still_reads_signs_and_leading_zeros():
  assert nsc.Block.parse('01,1,003,-1,0 2,7,0,0,0') == nsc.Block([(1, 1, 3, -1, 0), (2, 7)])


@pytest.mark.parametrize('parser,text', [
    (nsc.Block.parse, '5,1,3,0,0 9,7,0,0'),
    (nsc.Block.parse, '5,1,3,0,0 9,7,x,0,0'),
    (nsc.Block.parse, '[(5,1,3,0,0), (9,7,0,0,0,0)]'),
    (nsc.Block.from_json, '[[5, 1, 3, 0, 0], [9, 7, 0, 0]]'),
    (nsc.Block.from_json, '{"layers": [[5, 1, 3, 0, 0], [9, 7, 0.5, 0, 0]]}'),
])
def test_parse_errors_name_the_position_not_the_written_index(parser, text):
  with pytest.raises(nsc.NSCError) as info:
    parser(text)
  assert info.value.layer == 2 and str(info.value).startswith('layer 2: ')


@pytest.mark.parametrize('value', [None, b'1,1,3,0,0 2,7,0,0,0', 3, ['1,1,3,0,0']])
def test_parse_refuses_what_is_not_text_with_nsc_error(value):
  with pytest.raises(nsc.NSCError):
    nsc.Block.parse(value)


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


# -- merging a tensor with itself through identity-like layers ----------------------------


@pytest.mark.parametrize('text', [
    '1,4,0,0,0 2,5,0,0,1 3,7,0,0,0',                      # add(x, identity(x)) = 2x
    '1,2,1,0,0 2,5,0,0,1 3,7,0,0,0',                      # max_pool 1x1 is x
])
def test_a_merge_through_identities_is_a_block(text):
  """The generator builds it (2x); a per-layer state cannot avoid it, so the paper agent
  would sample many invalid blocks if it were refused. Its key is its equivalents'."""
  assert nsc.parse(text).to_text() == text


@pytest.mark.parametrize('text', [
    '1,4,0,0,0 2,1,3,1,0 3,1,3,2,0 4,5,0,1,3 5,7,0,0,0',  # the residual block
    '1,2,3,0,0 2,5,0,0,1 3,7,0,0,0',                      # 3x3 pooling is not identity
    '1,1,3,0,0 2,4,0,1,0 3,5,0,0,2 4,7,0,0,0',            # identity of another tensor
])
def test_merging_different_tensors_is_accepted(text):
  assert nsc.parse(text).to_text() == text
