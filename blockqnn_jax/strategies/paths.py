"""Paths of a search space as arrays: legality, random paths, one-layer neighbours and
mutations (the moves evolution, local search and the fast agent make)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from blockqnn_jax.nsc.grammar import LayerType
from blockqnn_jax.nsc.space import SearchSpace
from blockqnn_jax.strategies.qlearning import Trajectories
from blockqnn_jax.strategies.tried import key_hash


def _index(space: SearchSpace) -> jnp.ndarray:
  """``(num_states,)`` the layer index (step) of every state."""
  return space.layers[:, 0]


def _identity_like(space: SearchSpace) -> jnp.ndarray:
  """``(num_states,)`` bool: layers that compute their input unchanged.

  The generator (``blocks.BlockModule``) runs identity, and max/avg pooling with a 1x1
  window (stride 1, SAME padding), as the tensor itself. Non-NSC spaces have none.
  """
  if space.grammar is None:
    return jnp.zeros(space.layers.shape[0], bool)
  kind, kernel = space.layers[:, 1], space.layers[:, 2]
  pool = (kind == LayerType.MAX_POOL) | (kind == LayerType.AVG_POOL)
  return (kind == LayerType.IDENTITY) | (pool & (kernel == 1))


def _is_merge(space: SearchSpace) -> jnp.ndarray:
  if space.grammar is None:
    return jnp.zeros(space.layers.shape[0], bool)
  kind = space.layers[:, 1]
  return (kind == LayerType.ADD) | (kind == LayerType.CONCAT)


def _groups(space: SearchSpace):
  """Where each index's states are: ``(first, count, terminal)``.

  ``first``/``count``: ``(T + 2,)`` numpy, the first state id at each index and how many
  states it has (static: read off ``step_widths``, since the actions of a state at index i
  are all the states at index i + 1, numbered consecutively); ``terminal``: ``(T + 1,)``
  the terminal state at each index, -1 where none.
  """
  count = np.asarray((1,) + tuple(space.step_widths) + (0,), np.int32)
  first = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int32)
  index = _index(space)
  ids = jnp.arange(index.shape[0], dtype=jnp.int32)
  at = (index[None, :] == jnp.arange(space.max_index + 1)[:, None]) & space.is_terminal
  terminal = jnp.where(at, ids, -1).max(axis=1)
  return first, count, terminal


@jax.jit
def path_valid(space: SearchSpace, states: jnp.ndarray, lengths: jnp.ndarray) -> jnp.ndarray:
  """Whether each path avoids merging a tensor with itself; ``(B,)`` bool.

  Every path of the space is a valid block. An add/concat whose two operands are one
  tensor read through identity-like layers (identity, 1x1 pooling), e.g. add(x, identity(x))
  = 2x, is valid too (the paper's agent samples it, a per-layer state cannot see it coming)
  but degenerate: the strategies beyond the paper do not propose it. Always True on
  non-NSC spaces.

  Args:
    space: the search space.
    states: ``(B, T+1)`` state ids, start state first.
    lengths: ``(B,)`` layers including the terminal.
  """
  states = jnp.asarray(states)
  if space.grammar is None:
    return jnp.ones(states.shape[:1], bool)
  identity, merge = _identity_like(space), _is_merge(space)
  pred1, pred2 = space.layers[:, 3], space.layers[:, 4]
  rows = jnp.arange(states.shape[0])

  def step(carry, t):
    root, ok = carry  # root[b, i]: the layer whose tensor layer i outputs
    s = states[:, t]
    r1, r2 = root[rows, pred1[s]], root[rows, pred2[s]]
    ok &= ~((t < lengths) & merge[s] & (r1 == r2))
    return (root.at[:, t].set(jnp.where(identity[s], r1, t)), ok), None

  root = jnp.zeros((states.shape[0], space.max_index + 1), jnp.int32)
  # Index T holds only the terminal: layers 1 .. T-1 can merge.
  (_, ok), _ = jax.lax.scan(step, (root, jnp.ones(states.shape[:1], bool)),
                            jnp.arange(1, space.max_index))
  return ok


@functools.partial(jax.jit, static_argnames=('n',))
def random_paths(space: SearchSpace, key: jax.Array, n: int) -> Trajectories:
  """``n`` blocks drawn with a uniform legal action at every step; ``(n, T+1)`` paths.

  On NSC spaces an add/concat that would merge a tensor with itself is not a legal action
  (see ``path_valid``), so every path is valid; elsewhere this is ``sample_blocks`` at ε = 1
  in distribution.
  """
  identity, merge = _identity_like(space), _is_merge(space)
  pred1, pred2 = space.layers[:, 3], space.layers[:, 4]
  last = space.layers.shape[0] - 1
  width = space.max_actions
  columns = jnp.arange(width)
  rows = jnp.arange(n)

  # One scan step per index at the full Q width (steps differ only in how many columns
  # are legal): one compiled body instead of T unrolled ones.
  def step(carry, xs):
    state, done, length, root = carry
    t, draws = xs
    legal = columns < space.num_actions[state][:, None]
    targets = jnp.minimum(space.action_offset[state][:, None] + columns, last)
    r1 = jnp.take_along_axis(root, pred1[targets], axis=1)
    r2 = jnp.take_along_axis(root, pred2[targets], axis=1)
    legal &= ~(merge[targets] & (r1 == r2))
    action = jnp.argmax(jnp.where(legal, draws, -1.0), axis=-1).astype(jnp.int32)
    state = jnp.where(done, state, space.action_offset[state] + action)
    root = root.at[:, t + 1].set(jnp.where(identity[state], root[rows, pred1[state]], t + 1))
    length = length + (~done).astype(jnp.int32)
    done = done | space.is_terminal[state]
    return (state, done, length, root), state

  start = jnp.zeros((n,), jnp.int32)
  carry = (start, jnp.zeros((n,), bool), start, jnp.zeros((n, space.max_index + 1), jnp.int32))
  draws = jax.random.uniform(key, (space.max_index, n, width))
  (_, _, length, _), path = jax.lax.scan(step, carry, (jnp.arange(space.max_index), draws))
  return Trajectories(states=jnp.concatenate([start[:, None], path.T], axis=1), lengths=length)


@jax.jit
def neighbours(space: SearchSpace, states: jnp.ndarray, length: jnp.ndarray):
  """Every one-layer neighbour of one path, indexed by the state it puts in.

  Args:
    space: the search space.
    states: ``(T+1,)`` one path.
    length: its layers including the terminal.

  Returns:
    ``(paths, lengths, ok)``: ``(S, T+1)``, ``(S,)`` and ``(S,)`` bool, S = num_states.
    Row s is the path with state s at its index: a replaced layer, the terminal one index
    earlier (the last layer dropped) or a layer appended before the terminal; ``ok`` says
    which rows are neighbours (another block, also canonically, structurally legal and
    ``path_valid``).
  """
  index = _index(space)
  _, _, terminal_at = _groups(space)
  num_states = index.shape[0]
  ids = jnp.arange(num_states, dtype=jnp.int32)
  columns = jnp.arange(space.max_index + 1)
  term = space.is_terminal
  replace = ~term & (index >= 1) & (index <= length - 1)
  drop = term & (index == length - 1)
  append = ~term & (index == length)
  structural = (replace | drop | append) & (ids != states[index])
  after = columns[None, :] > index[:, None]
  paths = jnp.where(columns[None, :] == index[:, None], ids[:, None], states[None, :])
  paths = jnp.where(drop[:, None] & after, ids[:, None], paths)
  next_terminal = terminal_at[jnp.minimum(index + 1, space.max_index)]
  paths = jnp.where(append[:, None] & after, next_terminal[:, None], paths)
  lengths = jnp.where(drop, length - 1, jnp.where(append, length + 1, length))
  return paths, lengths, (structural & path_valid(space, paths, lengths)
                          & _differs(space, paths, states))


def _differs(space: SearchSpace, paths: jnp.ndarray, path: jnp.ndarray) -> jnp.ndarray:
  """``(S,)`` bool: which of ``paths`` ``(S, T+1)`` is another block than ``path`` (by
  ``key_hash``: on NSC an equivalent block is the same block)."""
  return (key_hash(space, paths) != key_hash(space, path[None])).any(axis=-1)


MUTATION_ATTEMPTS = 8


def mutation_uniforms(space: SearchSpace) -> int:
  """How many uniforms ``mutate`` reads per path (see ``mutate``'s ``uniforms``)."""
  return MUTATION_ATTEMPTS * (space.max_index + 2)


@jax.jit
def mutate(space: SearchSpace, key: jax.Array, trajectories: Trajectories,
           uniforms: jnp.ndarray | None = None) -> Trajectories:
  """One random one-layer neighbour of each path: a uniform position, then a uniform change.

  The position is uniform over those with at least one structural alternative; the new
  state is uniform over the other states at that position (the terminal only where it drops
  the last layer). On NAS-Bench-201 this is "one uniform edge gets a uniform other op", and
  never fails. On NSC a change that breaks ``path_valid``, or gives an equivalent block
  (``key_hash``), is redrawn, up to ``MUTATION_ATTEMPTS`` times; if all fail, the path
  comes back unchanged.

  Args:
    space: the search space.
    key: PRNG key (unused when ``uniforms`` is given).
    trajectories: B paths.
    uniforms: optional ``(B, mutation_uniforms(space))`` uniforms in [0, 1) to use instead
      of drawing from ``key`` (one draw for many mutations compiles much faster).

  Returns:
    The B mutants.
  """
  first, count, terminal_at = _groups(space)
  first, count = jnp.asarray(first), jnp.asarray(count)
  T = space.max_index
  batch = trajectories.lengths.shape[0]
  if uniforms is None:
    uniforms = jax.random.uniform(key, (batch, mutation_uniforms(space)))
  uniforms = uniforms.reshape(batch, MUTATION_ATTEMPTS, T + 2)
  positions = jnp.arange(T + 1)
  has_terminal = terminal_at >= 0

  def one(states, length, u):
    # Alternatives per position: the other states there, minus a terminal except where it
    # drops the last layer; past the terminal slot (or at a full block's terminal) none.
    alternatives = count[:T + 1] - 1 - (has_terminal & (positions < length - 1))
    alternatives = jnp.where((positions >= 1) & (positions <= length), alternatives, 0)
    position = jnp.argmax(jnp.where(alternatives > 0, u[:, :T + 1], -1.0), axis=-1)
    current = states[position] - first[position]
    size = count[position]
    shift = 1 + jnp.floor(u[:, T + 1] * (size - 1)).astype(jnp.int32)  # 1 .. size-1
    new = first[position] + (current + shift) % jnp.maximum(size, 1)
    is_term = space.is_terminal[new]
    legal = (alternatives[position] > 0) & (~is_term | (position == length - 1))
    at = positions[None, :] == position[:, None]
    after = positions[None, :] > position[:, None]
    append = (~is_term & (position == length))[:, None] & after
    paths = jnp.where(at | (is_term[:, None] & after), new[:, None], states[None, :])
    paths = jnp.where(append, terminal_at[jnp.minimum(position + 1, T)][:, None], paths)
    lengths = jnp.where(is_term, length - 1, jnp.where(position == length, length + 1, length))
    legal &= path_valid(space, paths, lengths) & _differs(space, paths, states)
    chosen = jnp.argmax(legal)
    found = legal[chosen]
    return jnp.where(found, paths[chosen], states), jnp.where(found, lengths[chosen], length)

  states, lengths = jax.vmap(one)(trajectories.states, trajectories.lengths, uniforms)
  return Trajectories(states=states, lengths=lengths)


def select(mask: jnp.ndarray, a: Trajectories, b: Trajectories) -> Trajectories:
  """Per path, ``a`` where ``mask`` else ``b``."""
  return Trajectories(states=jnp.where(mask[..., None], a.states, b.states),
                      lengths=jnp.where(mask, a.lengths, b.lengths))
