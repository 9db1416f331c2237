"""The enumerated NSC space: sizes worked out by hand, and paths <-> valid blocks."""

import itertools

import numpy as np
import pytest

from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.nsc import space as space_lib


def _all_paths(space):
  """Every start-to-terminal path of the space, by brute force over the action arrays."""
  offset = np.asarray(space.action_offset)
  count = np.asarray(space.num_actions)
  terminal = np.asarray(space.is_terminal)
  stack, out = [[0]], []
  while stack:
    path = stack.pop()
    s = path[-1]
    if terminal[s]:
      out.append(path)
      continue
    stack.extend(path + [offset[s] + a] for a in range(count[s]))
  return out


def test_state_count_by_hand_t3():
  # T=3: index 1 has conv {1,3,5} x pred {0} = 3, max/avg pool {1,3} x {0} = 2 + 2,
  # identity 1, add/concat need two distinct preds: none -> 8 layers.
  # Index 2: conv 3x2 = 6, pools 4 + 4, identity 2, add (0,1) 1, concat 1 -> 18, plus the
  # terminal at 2 -> 19. Index 3 = T: only the terminal. With the start state: 1+8+19+1 = 29.
  space = space_lib.build_space(nsc.Grammar(max_index=3))
  assert space.num_states == 29
  assert space.max_actions == 19  # from any index-1 state
  num_actions = np.asarray(space.num_actions)
  assert num_actions[0] == 8  # the start state cannot end the block
  index = np.asarray(space.layers)[:, 0]
  terminal = np.asarray(space.is_terminal)
  assert (num_actions[(index == 2) & ~terminal] == 1).all()  # only the terminal fits at T
  assert (num_actions[terminal] == 0).all()


def test_shrunk_grammar():
  # Only 3x3 convolutions: index i offers i preds; T=4 -> 1 + (1) + (2 + term) + (3 + term)
  # + term = 1 + 1 + 3 + 4 + 1 = 10 states.
  space = space_lib.build_space(nsc.Grammar(max_index=4, conv_kernels=(3,), layer_types=(1,)))
  assert space.num_states == 10
  assert set(np.asarray(space.layers)[1:, 1].tolist()) == {1, 7}


@pytest.mark.parametrize('max_index', [2, 3, 4])
def test_every_path_is_a_valid_block(max_index):
  grammar = nsc.Grammar(max_index=max_index)
  space = space_lib.build_space(grammar)
  blocks = [space.decode(np.asarray(p)) for p in _all_paths(space)]
  for block in blocks:
    nsc.validate(block, grammar)
  assert len({b.to_text() for b in blocks}) == len(blocks)  # no block reached twice
  # T=3 by hand: 8 one-layer blocks + 8 x 18 two-layer blocks (see the state count above).
  if max_index == 3:
    assert len(blocks) == 8 + 8 * 18


def test_states_are_exactly_the_legal_layers():
  """At each index the space holds every layer validate() accepts there, merges written once."""
  grammar = nsc.Grammar(max_index=5)
  space = space_lib.build_space(grammar)
  layers = np.asarray(space.layers)
  for i in range(1, grammar.max_index):
    prefix = [(j, 4, 0, j - 1, 0) for j in range(1, i)]  # an identity chain up to i - 1
    accepted = set()
    for t, k, p1, p2 in itertools.product(range(0, 9), range(0, 7), range(-1, i + 1),
                                          range(-1, i + 1)):
      block = nsc.Block.from_tuples(prefix + [(i, t, k, p1, p2), (i + 1, 7, 0, 0, 0)])
      try:
        nsc.validate(block, grammar)
      except nsc.NSCError:
        continue
      # add/concat are symmetric: the space keeps one order, encode() normalises the other.
      accepted.add((i, t, k, min(p1, p2), max(p1, p2)) if t in (5, 6) else (i, t, k, p1, p2))
    states = {tuple(row) for row in layers[(layers[:, 0] == i) & (layers[:, 1] != 7)].tolist()}
    assert states == accepted, i


def test_encode_decode_round_trip():
  grammar = nsc.Grammar(max_index=6)
  space = space_lib.build_space(grammar)
  block = nsc.parse('1,4,0,0,0 2,1,3,1,0 3,1,3,2,0 4,5,0,1,3 5,7,0,0,0', grammar)
  states = space.encode(block)
  assert states.shape == (7,)
  assert states[0] == 0 and states[-1] == states[-2]  # start first, terminal padding last
  assert space.decode(states) == block


def test_encode_accepts_either_order_of_merge_preds():
  space = space_lib.build_space(nsc.Grammar(max_index=6))
  swapped = nsc.parse('1,4,0,0,0 2,1,3,1,0 3,1,3,2,0 4,5,0,3,1 5,7,0,0,0')
  np.testing.assert_array_equal(space.encode(swapped), space.encode(nsc.RESIDUAL_BLOCK))


def test_encode_rejects_blocks_outside_the_grammar():
  space = space_lib.build_space(nsc.Grammar(max_index=3))
  with pytest.raises(nsc.NSCError, match='maximum index'):
    space.encode(nsc.RESIDUAL_BLOCK)  # 5 layers do not fit T=3
