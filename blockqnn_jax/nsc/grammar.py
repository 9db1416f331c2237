"""The Network Structure Code (NSC): BlockQNN's grammar for a convolutional block.

A block is a sequence of layers, each a 5-tuple ``(index, type, kernel, pred1, pred2)``:

=====  ================  ==============  =======  =======
code   type              kernel sizes    pred1    pred2
=====  ================  ==============  =======  =======
1      convolution       1, 3, 5         yes      0
2      max pooling       1, 3            yes      0
3      average pooling   1, 3            yes      0
4      identity          0               yes      0
5      elementwise add   0               yes      yes
6      concat            0               yes      yes
7      terminal          0               0        0
=====  ================  ==============  =======  =======

Indices run 1, 2, 3, ... in order; a predecessor is an earlier index and ``0`` is the
block's input. The last layer is the terminal, whose index is at most ``Grammar.max_index``
(T). Conventions this module fixes where the paper is silent:

* ``pred2 = 0`` on add/concat means the block input (exactly as ``pred1 = 0`` does), so an
  add/concat is only rejected as "missing its second predecessor" when both predecessors
  name the same tensor: merging a tensor with itself is not a merge. A tensor read through
  identity-like layers (identity, 1x1 pooling) counts as another tensor here, so
  ``add(x, identity(x))`` is a block (it computes 2x): rejecting it would make about 44% of
  the paper agent's ε = 1 samples at T = 23 invalid, since a per-layer state cannot see it
  coming. ``canonical`` identifies such blocks with their identity-free equivalents.
* The block output is the channel concatenation of the *leaves*: every non-terminal layer
  that no other layer consumes.
* Density is edges / nodes of the block's DAG, whose nodes are the input, every
  non-terminal layer and the output, and whose edges are the predecessor links plus one
  edge from each leaf to the output.

Everything here is pure Python over frozen dataclasses: no JAX, no files.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import re
import reprlib
from typing import Iterable, Sequence


class LayerType(enum.IntEnum):
  """NSC layer type codes."""

  CONV = 1
  MAX_POOL = 2
  AVG_POOL = 3
  IDENTITY = 4
  ADD = 5
  CONCAT = 6
  TERMINAL = 7

  @property
  def short_name(self) -> str:
    return _SHORT_NAMES[self]

  @property
  def num_inputs(self) -> int:
    """How many predecessors the layer reads (0 for the terminal)."""
    if self is LayerType.TERMINAL:
      return 0
    return 2 if self in (LayerType.ADD, LayerType.CONCAT) else 1


_SHORT_NAMES = {
    LayerType.CONV: 'conv',
    LayerType.MAX_POOL: 'max_pool',
    LayerType.AVG_POOL: 'avg_pool',
    LayerType.IDENTITY: 'identity',
    LayerType.ADD: 'add',
    LayerType.CONCAT: 'concat',
    LayerType.TERMINAL: 'terminal',
}

MERGE_TYPES = (LayerType.ADD, LayerType.CONCAT)


class NSCError(ValueError):
  """An invalid NSC; ``layer`` is the offending layer's index (None for the whole block)."""

  def __init__(self, message: str, layer: int | None = None, rule: str = ''):
    where = f'layer {layer}: ' if layer is not None else ''
    super().__init__(f'{where}{message}')
    self.layer = layer
    self.rule = rule


@dataclasses.dataclass(frozen=True)
class Grammar:
  """Which layers are legal: the configurable part of the NSC search space.

  Attributes:
    max_index: T, the largest layer index, terminal included; so a block has at most T - 1
      layers before its terminal. The paper's value is reconstructed as 23;
      reimplementations use 10 or 11.
    conv_kernels: kernel sizes allowed for convolutions.
    max_pool_kernels: kernel sizes allowed for max pooling.
    avg_pool_kernels: kernel sizes allowed for average pooling.
    layer_types: the non-terminal layer types the search may use (the terminal is always
      allowed). Drop a type here to shrink the space.
  """

  max_index: int = 23
  conv_kernels: tuple[int, ...] = (1, 3, 5)
  max_pool_kernels: tuple[int, ...] = (1, 3)
  avg_pool_kernels: tuple[int, ...] = (1, 3)
  layer_types: tuple[int, ...] = (1, 2, 3, 4, 5, 6)

  def __post_init__(self):
    if isinstance(self.max_index, bool) or not isinstance(self.max_index, int):
      raise ValueError(f'max_index must be an integer, got {self.max_index!r}')
    if self.max_index < 2:
      raise ValueError(f'max_index must be at least 2 (one layer and the terminal), '
                       f'got {self.max_index}')
    types = tuple(dict.fromkeys(int(t) for t in self.layer_types))  # dedupe, keep order
    for t in types:
      if t not in LayerType.__members__.values() or t == LayerType.TERMINAL:
        raise ValueError(f'layer_types may hold the codes 1..6, got {t}')
    if not types:
      raise ValueError('layer_types is empty: the grammar allows no layer')
    for name in ('conv_kernels', 'max_pool_kernels', 'avg_pool_kernels'):
      kernels = tuple(dict.fromkeys(int(k) for k in getattr(self, name)))
      if any(k < 1 for k in kernels):
        raise ValueError(f'{name} must hold positive sizes, got {kernels}')
      object.__setattr__(self, name, kernels)
    object.__setattr__(self, 'layer_types', types)
    for t, name in ((1, 'conv_kernels'), (2, 'max_pool_kernels'), (3, 'avg_pool_kernels')):
      if t in types and not getattr(self, name):
        raise ValueError(f'layer type {t} is allowed but {name} is empty')

  def kernels(self, layer_type: int) -> tuple[int, ...]:
    """Legal kernel sizes of a type; ``(0,)`` for the kernel-less types."""
    layer_type = LayerType(layer_type)
    if layer_type is LayerType.CONV:
      return self.conv_kernels
    if layer_type is LayerType.MAX_POOL:
      return self.max_pool_kernels
    if layer_type is LayerType.AVG_POOL:
      return self.avg_pool_kernels
    return (0,)


@dataclasses.dataclass(frozen=True, order=True)
class Layer:
  """One NSC layer ``(index, type, kernel, pred1, pred2)``; unused fields are 0."""

  index: int
  type: int
  kernel: int = 0
  pred1: int = 0
  pred2: int = 0

  def __post_init__(self):
    for name in _FIELD_NAMES:  # not dataclasses.fields: layers are made by the million
      value = getattr(self, name)
      if type(value) is int:  # pylint: disable=unidiomatic-typecheck  # the common case
        continue
      if isinstance(value, bool):
        raise NSCError(f'{name} must be an integer, got {value!r}', rule='integer')
      if not isinstance(value, int):
        try:
          as_int = int(value)
        except (TypeError, ValueError, OverflowError):
          raise NSCError(f'{name} must be an integer, got {value!r}', rule='integer') from None
        if as_int != value:
          raise NSCError(f'{name} must be an integer, got {value!r}', rule='integer')
        object.__setattr__(self, name, as_int)

  @property
  def layer_type(self) -> LayerType:
    return LayerType(self.type)

  @property
  def is_terminal(self) -> bool:
    return self.type == LayerType.TERMINAL

  @property
  def preds(self) -> tuple[int, ...]:
    """The predecessors the layer reads: one, two (add/concat) or none (terminal)."""
    if self.type == LayerType.TERMINAL:
      return ()
    if self.type in MERGE_TYPES:
      return (self.pred1, self.pred2)
    return (self.pred1,)

  def as_tuple(self) -> tuple[int, int, int, int, int]:
    return (self.index, self.type, self.kernel, self.pred1, self.pred2)

  def to_text(self) -> str:
    return ','.join(str(v) for v in self.as_tuple())

  def describe(self) -> str:
    """Human-readable, e.g. ``conv3(1)`` or ``add(1, 3)``."""
    if self.type not in LayerType.__members__.values():
      return f'type{self.type}'
    name = self.layer_type.short_name
    if self.type in (LayerType.CONV, LayerType.MAX_POOL, LayerType.AVG_POOL):
      name = f'{name}{self.kernel}'
    if self.is_terminal:
      return name
    return f'{name}({", ".join(str(p) for p in self.preds)})'


# -- reading fields from user text (shared by the parsers) ---------------------------------

_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Layer))
# No legal field comes near this many digits; refusing longer ones keeps messages readable
# and keeps away from int()'s 4300-digit limit, past which it raises a bare ValueError.
_MAX_DIGITS = 18
# A text field: an optional minus and ASCII digits. int() alone would also take '+3', '3_0',
# surrounding whitespace and every script's digits ('٣', '３').
_TEXT_INTEGER = re.compile(r'-?[0-9]+')
# Quotes of user input in messages stay short and shallow, whatever the input's size or depth
# (plain repr recurses once per level of a nested JSON list).
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _excerpt(value) -> str:
  """A short repr of user input for an error message; it never raises."""
  try:
    return _REPR.repr(value)
  except (RecursionError, ValueError):  # ValueError: an int too long to print
    return f'a {type(value).__name__}'


def _text_field(field: str, name: str, position: int) -> int:
  """One comma-separated field of the text form as an int, or ``NSCError``."""
  if not _TEXT_INTEGER.fullmatch(field):
    raise NSCError(f'{name} must be an integer in ASCII digits, got {_excerpt(field)}',
                   layer=position, rule='integer')
  if len(field.lstrip('-').lstrip('0')) > _MAX_DIGITS:
    raise NSCError(f'{name} has more than {_MAX_DIGITS} digits', layer=position,
                   rule='integer')
  return int(field)


def _json_field(value, name: str, position: int) -> int:
  """One entry of a JSON row as an int, or ``NSCError``.

  A JSON integer, or a float with an integral value (``3.0``) as ``Layer`` coerces; never a
  bool, a string, NaN or an infinity (JSON's ``1e400`` reads as one).
  """
  if isinstance(value, float) and value.is_integer():  # False for NaN and the infinities
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int):
    raise NSCError(f'{name} must be an integer, got {_excerpt(value)}', layer=position,
                   rule='integer')
  if abs(value) >= 10**_MAX_DIGITS:
    raise NSCError(f'{name} has more than {_MAX_DIGITS} digits', layer=position,
                   rule='integer')
  return value


@dataclasses.dataclass(frozen=True)
class Block:
  """A block: its layers in index order, the terminal last."""

  layers: tuple[Layer, ...]

  def __post_init__(self):
    layers = tuple(l if isinstance(l, Layer) else Layer(*l) for l in self.layers)
    object.__setattr__(self, 'layers', layers)

  # -- construction and formats ------------------------------------------------------------

  @classmethod
  def from_tuples(cls, tuples: Iterable[Sequence[int]]) -> 'Block':
    return cls(tuple(Layer(*t) for t in tuples))

  @classmethod
  def parse(cls, text: str) -> 'Block':
    """Parses the compact text form ``'1,1,3,0,0 2,5,0,1,0 3,7,0,0,0'``.

    Layers are separated by whitespace or ``;``; fields by commas. Also accepts the
    bracketed form ``[(1,1,3,0,0), (2,7,0,0,0)]``. A field is an optional ``-`` and ASCII
    digits, nothing else. Parsing checks the form only; call ``validate`` for the grammar.

    Raises:
      NSCError: whatever the text (and nothing else); its ``layer`` is the offending
        layer's position as written (1 = first), not the index written in it, which may
        be the very thing that is malformed.
    """
    if not isinstance(text, str):
      raise NSCError(f'NSC text must be a string, got {type(text).__name__}', rule='text')
    cleaned = re.sub(r'\s*,\s*', ',', text.strip())  # '1, 1, 3, 0, 0' is one layer
    if cleaned.startswith('[') and cleaned.endswith(']'):
      cleaned = cleaned[1:-1].replace('),', ');').replace('(', ' ').replace(')', ' ')
    chunks = [c for c in cleaned.replace(';', ' ').split() if c]
    if not chunks:
      raise NSCError('empty NSC text', rule='empty')
    layers = []
    for position, chunk in enumerate(chunks, start=1):
      fields = chunk.split(',')
      if len(fields) != 5 or '' in fields:
        raise NSCError(f'expected 5 comma-separated fields (index,type,kernel,pred1,pred2), '
                       f'got {_excerpt(chunk)}', layer=position, rule='fields')
      layers.append(Layer(*(_text_field(f, name, position)
                            for f, name in zip(fields, _FIELD_NAMES))))
    return cls(tuple(layers))

  def to_text(self) -> str:
    return ' '.join(layer.to_text() for layer in self.layers)

  def to_json(self) -> str:
    """JSON: ``{"layers": [[index, type, kernel, pred1, pred2], ...]}``."""
    return json.dumps({'layers': [list(layer.as_tuple()) for layer in self.layers]})

  @classmethod
  def from_json(cls, text: str | bytes) -> 'Block':
    """Parses ``to_json``'s form, or a bare list of rows; checks the form only.

    Raises:
      NSCError: whatever the text (and nothing else); its ``layer`` is the offending row's
        position (1 = first), not the index written in it.
    """
    if not isinstance(text, (str, bytes, bytearray)):
      raise NSCError(f'NSC JSON must be a string, got {type(text).__name__}', rule='json')
    try:
      data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise NSCError(f'not JSON: {e}', rule='json') from None
    except RecursionError:  # the decoder recurses once per level of nesting
      raise NSCError('unreadable JSON: nested too deeply', rule='json') from None
    except ValueError:  # what else json.loads raises: an integer past int()'s digit limit
      raise NSCError('unreadable JSON: a number with too many digits', rule='json') from None
    rows = data.get('layers') if isinstance(data, dict) else data
    if not isinstance(rows, list):
      raise NSCError('JSON must be {"layers": [[i, type, kernel, p1, p2], ...]}', rule='json')
    layers = []
    for position, row in enumerate(rows, start=1):
      if not isinstance(row, list) or len(row) != 5:
        raise NSCError(f'expected a list of 5 integers, got {_excerpt(row)}', layer=position,
                       rule='fields')
      layers.append(Layer(*(_json_field(v, name, position)
                            for v, name in zip(row, _FIELD_NAMES))))
    return cls(tuple(layers))

  def __str__(self) -> str:
    return self.to_text()

  # -- graph facts (assume a valid block) --------------------------------------------------

  @property
  def body(self) -> tuple[Layer, ...]:
    """The layers before the terminal."""
    return tuple(l for l in self.layers if not l.is_terminal)

  def consumers(self) -> dict[int, tuple[int, ...]]:
    """Maps each node (0 = input, then layer indices) to the layers that read it."""
    out: dict[int, list[int]] = {0: []}
    for layer in self.body:
      out[layer.index] = []
    for layer in self.body:
      for p in layer.preds:
        out[p].append(layer.index)
    return {k: tuple(v) for k, v in out.items()}

  def leaves(self) -> tuple[int, ...]:
    """Indices of the layers whose outputs form the block output (nobody consumes them)."""
    consumed = {p for layer in self.body for p in layer.preds}
    return tuple(l.index for l in self.body if l.index not in consumed)

  def num_edges(self) -> int:
    """Predecessor links plus one edge from each leaf to the output."""
    return sum(len(l.preds) for l in self.body) + len(self.leaves())

  def num_nodes(self) -> int:
    """Input, every non-terminal layer, and the output."""
    return len(self.body) + 2

  def density(self) -> float:
    """Edges / nodes of the block's DAG (see the module docstring)."""
    return self.num_edges() / self.num_nodes()

  def depth(self) -> int:
    """Layers on the longest path from the input to the output."""
    depth = {0: 0}
    for layer in self.body:
      depth[layer.index] = 1 + max(depth[p] for p in layer.preds)
    return max(depth[i] for i in self.leaves())

  def describe(self) -> str:
    """One line per layer, e.g. ``2: conv3(1)``."""
    return '\n'.join(f'{l.index}: {l.describe()}' for l in self.layers)


def validate(block: Block, grammar: Grammar = Grammar()) -> Block:
  """Checks ``block`` against the NSC rules; returns it, or raises ``NSCError``.

  The error names the first offending layer and the rule it breaks.
  """
  layers = block.layers
  if not layers:
    raise NSCError('empty block: no layers', rule='empty')
  for position, layer in enumerate(layers, start=1):
    where = layer.index
    if layer.index != position:
      raise NSCError(f'index {layer.index} out of sequence: layer number {position} must have '
                     f'index {position} (indices run 1, 2, 3, ... with no gaps)',
                     layer=where, rule='consecutive')
    if layer.index > grammar.max_index:
      raise NSCError(f'index {layer.index} exceeds the maximum index T={grammar.max_index}',
                     layer=where, rule='max_index')
    if layer.type not in LayerType.__members__.values():
      raise NSCError(f'unknown layer type {layer.type} (codes are 1..7)', layer=where,
                     rule='type')
    kind = LayerType(layer.type)
    if kind is LayerType.TERMINAL:
      if (layer.kernel, layer.pred1, layer.pred2) != (0, 0, 0):
        raise NSCError('terminal takes no kernel and no predecessors (write n,7,0,0,0)',
                       layer=where, rule='terminal_fields')
      if position != len(layers):
        raise NSCError(f'layers follow the terminal (at index {layer.index})', layer=where,
                       rule='after_terminal')
      if position == 1:
        raise NSCError('empty block: the terminal is the only layer', layer=where,
                       rule='empty')
      continue
    if layer.type not in grammar.layer_types:
      raise NSCError(f'layer type {kind.short_name} ({layer.type}) is not in this grammar\'s '
                     f'layer_types {grammar.layer_types}', layer=where, rule='type')
    allowed = grammar.kernels(kind)
    if layer.kernel not in allowed:
      raise NSCError(f'kernel {layer.kernel} not allowed for {kind.short_name}; allowed: '
                     f'{allowed}', layer=where, rule='kernel')
    for name, pred in (('pred1', layer.pred1), ('pred2', layer.pred2)):
      if pred < 0 or pred >= layer.index:
        if name == 'pred2' and kind.num_inputs == 1:
          break  # reported below as a second predecessor on a one-input op
        raise NSCError(f'{name}={pred} must name an earlier layer (0..{layer.index - 1}; '
                       f'0 is the block input)', layer=where, rule='pred_order')
    if kind.num_inputs == 1 and layer.pred2 != 0:
      raise NSCError(f'{kind.short_name} takes one input but pred2={layer.pred2}',
                     layer=where, rule='pred2_on_one_input')
    if kind in MERGE_TYPES and layer.pred1 == layer.pred2:
      raise NSCError(f'{kind.short_name} needs two different predecessors, got '
                     f'pred1=pred2={layer.pred1} (second predecessor missing?)', layer=where,
                     rule='pred2_missing')
  if not layers[-1].is_terminal:
    raise NSCError(f'no terminal layer: the last layer (index {layers[-1].index}) must be '
                   f'followed by {layers[-1].index + 1},7,0,0,0', layer=layers[-1].index,
                   rule='no_terminal')
  return block


def parse(text: str, grammar: Grammar = Grammar()) -> Block:
  """Parses and validates NSC text."""
  return validate(Block.parse(text), grammar)


# The paper's motivating examples, handy as fixtures and in notebooks.
RESIDUAL_BLOCK = Block.from_tuples(
    [(1, 4, 0, 0, 0), (2, 1, 3, 1, 0), (3, 1, 3, 2, 0), (4, 5, 0, 1, 3), (5, 7, 0, 0, 0)])
INCEPTION_BLOCK = Block.from_tuples(
    [(1, 1, 1, 0, 0), (2, 1, 3, 0, 0), (3, 1, 5, 0, 0), (4, 2, 3, 0, 0), (5, 1, 1, 4, 0),
     (6, 7, 0, 0, 0)])


@functools.lru_cache(maxsize=8192)
def validate_structure(block: Block) -> Block:
  """Checks that ``block`` is a structurally valid NSC; returns it or raises ``NSCError``.

  The check is ``validate`` under the loosest grammar the block could belong to (any
  positive kernel size, any number of layers): the generator can build, and retraining can
  train, any such block, while which kernels and how many layers are allowed is the search
  space's business. A valid block's check is remembered (blocks are immutable), so the
  network spec, the cost model and the block builder, which each check the block they are
  given, check a block once between them.
  """
  def kernels(layer_type: LayerType) -> tuple[int, ...]:
    # The block's own positive kernels (1 when it has none) make its kernels legal.
    used = {l.kernel for l in block.layers if l.type == layer_type and l.kernel >= 1}
    return tuple(sorted(used)) or (1,)

  grammar = Grammar(max_index=max(2, len(block.layers)),
                    conv_kernels=kernels(LayerType.CONV),
                    max_pool_kernels=kernels(LayerType.MAX_POOL),
                    avg_pool_kernels=kernels(LayerType.AVG_POOL))
  try:
    return validate(block, grammar)
  except NSCError as e:
    error = NSCError(f'cannot build block {block.to_text()!r}: {e}', rule=e.rule)
    error.layer = e.layer
    raise error from e
