"""Hypothesis generators of NSC blocks, shared by the test modules (not the library's
search ``strategies``).

``valid_blocks(grammar)`` draws blocks that pass ``nsc.validate(block, grammar)``, one layer
at a time from the legal choices, so no example is ever filtered away.
``renumberings(block)`` draws the same network written differently: another topological
order of its DAG, with add/concat predecessors randomly swapped.
"""

from __future__ import annotations

from hypothesis import strategies as st

from blockqnn_jax.nsc import grammar as nsc

# Small enough that hypothesis explores it well, with every layer type present.
SMALL_GRAMMAR = nsc.Grammar(max_index=8, conv_kernels=(1, 3), max_pool_kernels=(3,),
                            avg_pool_kernels=(3,))
# Few labels, so random blocks of the same size are often isomorphic.
NARROW_GRAMMAR = nsc.Grammar(max_index=7, conv_kernels=(3,), layer_types=(1, 4, 5, 6))


@st.composite
def valid_blocks(draw, grammar: nsc.Grammar = SMALL_GRAMMAR, min_layers: int = 1,
                 max_layers: int | None = None) -> nsc.Block:
  """Draws a block that is valid under ``grammar``.

  Args:
    draw: supplied by hypothesis.
    grammar: the grammar the block must pass; it needs a one-input layer type, since
      layer 1 can only read the input.
    min_layers: fewest non-terminal layers.
    max_layers: most non-terminal layers; at most (and by default) ``max_index - 1``.

  Returns:
    A block with consecutive indices, legal types, kernels and predecessors, terminal last.
  """
  one_input = [t for t in grammar.layer_types if t not in nsc.MERGE_TYPES]
  if not one_input:
    raise ValueError(f'grammar {grammar} has no one-input layer type: no block is valid')
  limit = grammar.max_index - 1 if max_layers is None else min(max_layers,
                                                                grammar.max_index - 1)
  num_layers = draw(st.integers(min_layers, limit))
  layers = []
  for index in range(1, num_layers + 1):
    # A merge needs two different tensors, and layer 1 has only the input to read.
    types = grammar.layer_types if index >= 2 else one_input
    layer_type = draw(st.sampled_from(types))
    kernel = draw(st.sampled_from(grammar.kernels(layer_type)))
    pred1 = draw(st.integers(0, index - 1))
    pred2 = 0
    if layer_type in nsc.MERGE_TYPES:
      pred2 = draw(st.integers(0, index - 2))
      if pred2 >= pred1:
        pred2 += 1  # skip pred1: uniform over the other earlier tensors
    layers.append(nsc.Layer(index, layer_type, kernel, pred1, pred2))
  layers.append(nsc.Layer(num_layers + 1, nsc.LayerType.TERMINAL))
  return nsc.Block(tuple(layers))


@st.composite
def renumberings(draw, block: nsc.Block, swap: bool = True) -> nsc.Block:
  """Draws ``block`` renumbered by a random topological order of its DAG.

  Args:
    draw: supplied by hypothesis.
    block: a valid block.
    swap: also swap the two predecessors of some add/concat layers at random.

  Returns:
    A valid block describing the same network as ``block``.
  """
  body = {layer.index: layer for layer in block.body}
  new_index = {0: 0}
  ready = sorted(i for i, layer in body.items() if all(p == 0 for p in layer.preds))
  order = []
  while ready:
    old = ready.pop(draw(st.integers(0, len(ready) - 1)))
    order.append(old)
    new_index[old] = len(order)
    ready = sorted(set(ready) | {
        i for i, layer in body.items()
        if i not in new_index and all(p in new_index for p in layer.preds)})
  layers = []
  for old in order:
    layer = body[old]
    preds = [new_index[p] for p in layer.preds]
    if len(preds) == 2 and swap and draw(st.booleans()):
      preds.reverse()
    preds += [0] * (2 - len(preds))
    layers.append(nsc.Layer(new_index[old], layer.type, layer.kernel, *preds))
  layers.append(nsc.Layer(len(order) + 1, nsc.LayerType.TERMINAL))
  return nsc.Block(tuple(layers))
