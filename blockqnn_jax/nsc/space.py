"""The finite NSC state/action space, enumerated as arrays for the Q-learning agent.

A *state* is one NSC layer (its index included); the start state is the block input
(``index 0``). An *action* from a state at index ``i`` is the layer chosen at index ``i + 1``,
terminal included, so every action is itself a state. States are numbered index by index,
which makes "action ``a`` from state ``s``" the state ``action_offset[s] + a``: no lookup
tables, and the Q-table is one dense ``(num_states, max_actions)`` array whose rows are
masked by ``num_actions``.

What is enumerated, for a grammar with maximum index T:

* state 0: the start state;
* every legal non-terminal layer at indices 1 .. T-1 (at index T only the terminal fits),
  add and concat once each, with ``pred1 < pred2`` (they are symmetric);
* the terminal at indices 2 .. T (the start state may not end the block: no empty block).

So from a state at index T-1 the only action is the terminal, and every path from the start
state to a terminal is a valid NSC block: sampling cannot produce an invalid block.

A space is also the interface the agent sees: any space with the same fields (see
``SearchSpace``) can be searched by ``qlearning`` unchanged.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np

from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.nsc.grammar import LayerType


@flax.struct.dataclass
class SearchSpace:
  """States and legal actions as arrays; a pytree, so it can be passed to jitted functions.

  Attributes:
    layers: ``(num_states, 5)`` int32, the NSC tuple of each state (the start state is zeros).
    action_offset: ``(num_states,)`` int32, id of the state reached by action 0.
    num_actions: ``(num_states,)`` int32, how many actions are legal (0 for terminal states).
    is_terminal: ``(num_states,)`` bool.
    max_index: T, the longest possible block (terminal included); static.
    max_actions: width of the Q-table; static.
    step_widths: ``step_widths[t]`` is the most actions any state at step t has (a state at
      step t is the t-th of a path, start state = step 0); static. Every path visits each
      step once, which is what lets ``qlearning`` slice Q per step and update a whole block
      in one vectorised pass.
    grammar: the NSC grammar the space enumerates; static (``None`` for non-NSC spaces).
  """

  layers: jnp.ndarray
  action_offset: jnp.ndarray
  num_actions: jnp.ndarray
  is_terminal: jnp.ndarray
  max_index: int = flax.struct.field(pytree_node=False)
  max_actions: int = flax.struct.field(pytree_node=False)
  step_widths: tuple[int, ...] = flax.struct.field(pytree_node=False)
  grammar: nsc.Grammar | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def num_states(self) -> int:
    return int(self.layers.shape[0])

  def state_id(self, layer: nsc.Layer | Sequence[int]) -> int:
    """The state id of an NSC layer; raises ``KeyError`` if the space lacks it."""
    row = np.asarray(layer.as_tuple() if isinstance(layer, nsc.Layer) else tuple(layer))
    hits = np.flatnonzero((np.asarray(self.layers) == row).all(axis=1))
    if hits.size == 0:
      raise KeyError(f'layer {tuple(row.tolist())} is not a state of this space')
    return int(hits[0])

  def encode(self, block: nsc.Block) -> np.ndarray:
    """A block as a trajectory: ``(max_index + 1,)`` state ids, start state first.

    Past the terminal the row repeats the terminal state (padding that updates ignore).
    Add/concat are symmetric, so the space holds them once, with ``pred1 < pred2``; a block
    written the other way round maps to the same states. Raises ``NSCError`` if the block is
    invalid for this space's grammar.
    """
    if self.grammar is not None:
      nsc.validate(block, self.grammar)
    ids = [0] + [self.state_id(_ordered_merge(layer)) for layer in block.layers]
    ids += [ids[-1]] * (self.max_index + 1 - len(ids))
    return np.asarray(ids, dtype=np.int32)

  def decode(self, states: np.ndarray) -> nsc.Block:
    """A trajectory row (as sampled, start state first) back to its NSC block."""
    states = np.asarray(states)
    layers = np.asarray(self.layers)
    terminal = np.asarray(self.is_terminal)
    out = []
    for s in states[1:]:
      out.append(nsc.Layer(*(int(v) for v in layers[s])))
      if terminal[s]:
        break
    return nsc.Block(tuple(out))

  def decode_batch(self, states: np.ndarray) -> list[nsc.Block]:
    return [self.decode(row) for row in np.asarray(states)]


def _ordered_merge(layer: nsc.Layer) -> nsc.Layer:
  if layer.type in nsc.MERGE_TYPES and layer.pred1 > layer.pred2:
    return nsc.Layer(layer.index, layer.type, layer.kernel, layer.pred2, layer.pred1)
  return layer


def legal_layers(grammar: nsc.Grammar, index: int) -> list[tuple[int, int, int, int, int]]:
  """Every legal non-terminal NSC layer at ``index``, in a fixed order."""
  out = []
  for layer_type in grammar.layer_types:
    kind = LayerType(layer_type)
    for kernel in grammar.kernels(kind):
      if kind.num_inputs == 1:
        out.extend((index, layer_type, kernel, p, 0) for p in range(index))
      else:
        out.extend((index, layer_type, kernel, p1, p2)
                   for p1 in range(index) for p2 in range(p1 + 1, index))
  return out


def build_space(grammar: nsc.Grammar = nsc.Grammar()) -> SearchSpace:
  """Enumerates the NSC space of ``grammar`` (see the module docstring)."""
  T = grammar.max_index
  by_index: list[list[tuple[int, ...]]] = [[(0, 0, 0, 0, 0)]]
  for i in range(1, T + 1):
    states = legal_layers(grammar, i) if i < T else []
    if i >= 2:
      states.append((i, int(LayerType.TERMINAL), 0, 0, 0))
    by_index.append(states)
  offsets = np.cumsum([0] + [len(s) for s in by_index])
  layers = np.asarray([s for group in by_index for s in group], dtype=np.int32)
  index = layers[:, 0]
  is_terminal = layers[:, 1] == LayerType.TERMINAL
  counts = np.asarray([len(s) for s in by_index] + [0])
  num_actions = np.where(is_terminal, 0, counts[index + 1]).astype(np.int32)
  action_offset = offsets[np.minimum(index + 1, T)].astype(np.int32)
  return SearchSpace(
      layers=jnp.asarray(layers),
      action_offset=jnp.asarray(action_offset),
      num_actions=jnp.asarray(num_actions),
      is_terminal=jnp.asarray(is_terminal),
      max_index=T,
      max_actions=int(num_actions.max()),
      step_widths=tuple(int(num_actions[index == i].max()) for i in range(T)),
      grammar=grammar,
  )
