"""Search strategies behind one ask/tell interface, on any ``SearchSpace``.

A strategy is a frozen, hashable dataclass of settings; everything it learns lives in its
*state*, a pytree of arrays (a ``flax.struct`` dataclass), so a search can save the state
with ``np.savez(**state_arrays(state))`` and resume exactly with ``restore_state``. Three
pure functions make a strategy:

  state = strategy.init(space, key, budget)
  state, proposals = strategy.ask(space, state, key, n, iteration)
  state = strategy.tell(space, state, proposals, rewards, key)

``proposals`` is a ``qlearning.Trajectories`` (``states`` ``(n, T+1)`` int32 state ids, start
state first, padded past the terminal; ``lengths`` ``(n,)`` layers including the terminal),
exactly what the search loop stores today; ``rewards`` is ``(n,)`` float32, one per proposal,
repeats included (a repeat's reward is its stored one). ``iteration`` is the 0-based number
of the ask (only the Q-learner reads it, for its ε schedule). ``budget`` (optional) is the
number of distinct blocks the search will train; only budget-sized strategies read it.
Always continue from the state ``ask`` and ``tell`` return: ``ask`` may move the state
(local search advances through a neighbourhood, the fast Q-learner restarts), and the same
(state, key, n, iteration) always gives the same proposals and state, so a resumed search
re-asks an interrupted iteration and gets what it asked before. All functions jit; the
strategy is a static argument.

The strategies (``make_strategy(name)``; ``STRATEGIES`` is the registry):

* ``qlearning`` / ``qlearning_paper`` — BlockQNN's agent, exactly ``qlearning.sample_blocks``
  then ``qlearning.learn``: the paper preset makes bit-for-bit the samples it makes today.
* ``qlearning_fast`` — the same agent with ingredients that go beyond the paper, tuned for
  budgets of a few hundred blocks (``fast_qlearner``; see ``QLearner`` for each field).
* ``random`` — a uniform legal action at every step (the paper's ε = 1 agent): uniform over
  the cells of NAS-Bench-201; on NSC, uniform per step (uniform over whole blocks would make
  nearly every block as long as the grammar allows).
* ``evolution`` — aging evolution (Real et al. 2019): tournament of S out of the last P
  blocks told, mutate one layer of the winner, the oldest dies.
* ``local_search`` — (White, Nolen, Savani 2020) the one-layer neighbours of the incumbent in
  random order; move to the first better one; at a local optimum restart from a random block.

One-layer neighbours of a block with L layers before its terminal: replace layer i (1 <= i <=
L) by another legal layer at index i; drop the last layer (L >= 2); or append a layer at
index L + 1 (when L + 1 < T). On NAS-Bench-201 that is "change one edge's op". A state fixes
its own predecessors by index, so a neighbour keeps every other layer as it is. (This reads
the space as both ``build_space`` and ``build_nb201_space`` make it: states numbered index
by index, and every state at index i + 1 an action of every non-terminal state at i.)

Legal blocks: on NSC spaces every strategy except the paper's agent proposes only blocks that
pass ``nsc.validate`` — in particular no add/concat of two predecessors that are the same
tensor up to identity-like layers (identity, 1x1 pooling), which the space's per-layer states
cannot exclude by themselves. The paper's agent samples what it always sampled, and that
includes such blocks (44% of ε = 1 samples at T = 23, 32% at T = 11); ``path_valid`` is the
check a search loop can apply to them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Any, Callable, Protocol

import flax.serialization
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from blockqnn_jax import qlearning as ql
from blockqnn_jax.nsc import LayerType
from blockqnn_jax.space import SearchSpace

Trajectories = ql.Trajectories


class Strategy(Protocol):
  """What the search loop calls (see the module docstring)."""

  def init(self, space: SearchSpace, key: jax.Array, budget: int | None = None) -> Any: ...

  def ask(self, space: SearchSpace, state: Any, key: jax.Array, n: int,
          iteration: int | jax.Array = 0) -> tuple[Any, Trajectories]: ...

  def tell(self, space: SearchSpace, state: Any, proposals: Trajectories,
           rewards: jax.Array, key: jax.Array) -> Any: ...


# -- the space as arrays ----------------------------------------------------------------------

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


def _select(mask: jnp.ndarray, a: Trajectories, b: Trajectories) -> Trajectories:
  """Per path, ``a`` where ``mask`` else ``b``."""
  return Trajectories(states=jnp.where(mask[..., None], a.states, b.states),
                      lengths=jnp.where(mask, a.lengths, b.lengths))


# -- hashing paths (for "already tried") ------------------------------------------------------

def _hash32(x: jnp.ndarray) -> jnp.ndarray:
  """MurmurHash3's 32-bit finaliser (uint32 in, uint32 out)."""
  x = (x ^ (x >> 16)) * np.uint32(0x85EBCA6B)
  x = (x ^ (x >> 13)) * np.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


@jax.jit
def path_hash(states: jnp.ndarray) -> jnp.ndarray:
  """``(..., T+1)`` paths to ``(..., 2)`` uint32: a 64-bit hash of the raw trajectory.

  Paths are padded past the terminal by repeating it, so equal blocks have equal rows.
  Two blocks share a hash with probability about 2^-64 (then the agent would only skip
  one block as "already tried").
  """
  x = jnp.asarray(states).astype(jnp.uint32)
  out = []
  for seed in (np.uint32(0x243F6A88), np.uint32(0x85A308D3)):
    h = jnp.full(x.shape[:-1], seed, jnp.uint32)
    for t in range(x.shape[-1]):
      h = _hash32(h ^ _hash32(x[..., t] + np.uint32(0x9E3779B9 * (t + 1) % 2**32)))
    out.append(h)
  return jnp.stack(out, axis=-1)


@functools.lru_cache(maxsize=8)
def _host_space(grammar) -> SearchSpace:
  from blockqnn_jax import space as space_lib  # pylint: disable=import-outside-toplevel
  return space_lib.build_space(grammar)


@functools.lru_cache(maxsize=1 << 17)
def _canonical_hash(grammar, row: tuple[int, ...]) -> tuple[int, int]:
  """Two uint32 of the sha256 of a path's canonical key (``canonical.canonical_key``); a
  row that is no block (an empty slot of a population) hashes as its raw states."""
  from blockqnn_jax import canonical  # pylint: disable=import-outside-toplevel
  from blockqnn_jax import nsc  # pylint: disable=import-outside-toplevel
  try:
    key = canonical.canonical_key(_host_space(grammar).decode(np.asarray(row)))
  except nsc.NSCError:
    key = f'raw:{row}'
  digest = hashlib.sha256(key.encode()).digest()
  return int.from_bytes(digest[:4], 'little'), int.from_bytes(digest[4:8], 'little')


def _canonical_hashes(grammar, states: np.ndarray) -> np.ndarray:
  states = np.asarray(states)
  flat = states.reshape(-1, states.shape[-1])
  out = np.asarray([_canonical_hash(grammar, tuple(int(v) for v in row)) for row in flat],
                   np.uint32).reshape(states.shape[:-1] + (2,))
  return out


def key_hash(space: SearchSpace, states: jnp.ndarray) -> jnp.ndarray:
  """``(..., T+1)`` paths to ``(..., 2)`` uint32: a 64-bit hash of what makes a block
  itself. On NSC spaces that is its canonical key (``canonical.canonical_key``), so blocks
  that build the same network (merge operands swapped, independent layers renumbered,
  identity-like layers contracted) hash alike and count as one block tried; elsewhere
  (NAS-Bench-201) the raw path (``path_hash``). The canonical form is computed on the host
  (``jax.pure_callback``); jittable and vmappable."""
  states = jnp.asarray(states)
  if space.grammar is None:
    return path_hash(states)
  shape = jax.ShapeDtypeStruct(states.shape[:-1] + (2,), jnp.uint32)
  return jax.pure_callback(functools.partial(_canonical_hashes, space.grammar), shape,
                           states, vmap_method='broadcast_all')


@flax.struct.dataclass
class TriedSet:
  """Hashes (``key_hash``) of the blocks told so far, in a ring of fixed capacity (the
  oldest forgotten)."""

  hashes: jnp.ndarray  # (capacity, 2) uint32
  size: jnp.ndarray  # () int32, valid entries
  cursor: jnp.ndarray  # () int32, next slot to write


def init_tried(capacity: int) -> TriedSet:
  return TriedSet(hashes=jnp.zeros((capacity, 2), jnp.uint32), size=jnp.zeros((), jnp.int32),
                  cursor=jnp.zeros((), jnp.int32))


def tried_contains(tried: TriedSet, hashes: jnp.ndarray) -> jnp.ndarray:
  """``(..., 2)`` hashes to ``(...)`` bool: already in the set."""
  capacity = tried.hashes.shape[0]
  if capacity == 0:
    return jnp.zeros(hashes.shape[:-1], bool)
  equal = (hashes[..., None, :] == tried.hashes).all(axis=-1)
  return (equal & (jnp.arange(capacity) < tried.size)).any(axis=-1)


@jax.jit
def tried_add(tried: TriedSet, hashes: jnp.ndarray) -> tuple[TriedSet, jnp.ndarray]:
  """Adds ``(n, 2)`` hashes in order; returns the set and how many were new (not repeats)."""
  capacity = tried.hashes.shape[0]
  if capacity == 0:
    return tried, jnp.int32(hashes.shape[0])

  def one(carry, h):
    tried, new_count = carry
    new = ~tried_contains(tried, h)
    slot = tried.cursor
    tried = TriedSet(
        hashes=tried.hashes.at[slot].set(jnp.where(new, h, tried.hashes[slot])),
        size=jnp.where(new, jnp.minimum(tried.size + 1, capacity), tried.size),
        cursor=jnp.where(new, (tried.cursor + 1) % capacity, tried.cursor))
    return (tried, new_count + new.astype(jnp.int32)), None

  (tried, new_count), _ = jax.lax.scan(one, (tried, jnp.int32(0)), hashes)
  return tried, new_count


def _first_acceptable(space: SearchSpace, candidates: Trajectories, acceptable: jnp.ndarray,
                      fallback: Trajectories, avoid_duplicates: bool) -> Trajectories:
  """Per slot, the first acceptable of K candidates, else the fallback.

  Args:
    space: the search space (blocks are compared by ``key_hash``).
    candidates: ``states`` ``(K, n, T+1)``, ``lengths`` ``(K, n)``.
    acceptable: ``(K, n)`` bool (legal and not tried before).
    fallback: ``(n, ...)`` used where no candidate is acceptable.
    avoid_duplicates: also reject a candidate equal to an earlier slot's choice.
  """
  n = acceptable.shape[1]
  hashes = key_hash(space, candidates.states)  # (K, n, 2)
  fallback_hashes = key_hash(space, fallback.states)  # (n, 2)

  def slot(chosen, j):
    ok = acceptable[:, j]
    if avoid_duplicates:
      dup = ((hashes[:, j, None, :] == chosen[None, :, :]).all(-1)
             & (jnp.arange(n) < j)[None, :]).any(-1)
      ok &= ~dup
    k = jnp.argmax(ok)
    found = ok[k]
    states = jnp.where(found, candidates.states[k, j], fallback.states[j])
    length = jnp.where(found, candidates.lengths[k, j], fallback.lengths[j])
    chosen = chosen.at[j].set(jnp.where(found, hashes[k, j], fallback_hashes[j]))
    return chosen, (states, length)

  _, (states, lengths) = jax.lax.scan(slot, jnp.zeros((n, 2), jnp.uint32), jnp.arange(n))
  return Trajectories(states=states, lengths=lengths)


# -- random search ----------------------------------------------------------------------------

@flax.struct.dataclass
class RandomState:
  told: jnp.ndarray  # () int32, blocks told


@dataclasses.dataclass(frozen=True)
class RandomSearch:
  """Uniform legal blocks (see ``random_paths``); it learns nothing."""

  def init(self, space: SearchSpace, key: jax.Array, budget=None) -> RandomState:
    del space, key, budget
    return RandomState(told=jnp.zeros((), jnp.int32))

  def ask(self, space, state, key, n, iteration=0):
    del iteration
    return state, random_paths(space, key, n)

  def tell(self, space, state, proposals, rewards, key):
    del space, proposals, key
    return RandomState(told=state.told + jnp.asarray(rewards).shape[0])


# -- aging evolution --------------------------------------------------------------------------

@flax.struct.dataclass
class EvolutionState:
  """The population: the last P blocks told, in a ring (``cursor`` is the oldest once full)."""

  states: jnp.ndarray  # (P, T+1) int32
  lengths: jnp.ndarray  # (P,) int32
  rewards: jnp.ndarray  # (P,) float32
  born: jnp.ndarray  # (P,) int32, when each member was told (0, 1, 2, ...)
  size: jnp.ndarray  # () int32
  cursor: jnp.ndarray  # () int32
  told: jnp.ndarray  # () int32


@dataclasses.dataclass(frozen=True)
class AgingEvolution:
  """Aging (regularized) evolution, Real et al. 2019.

  The first P blocks told are uniform random; after that each proposal is a one-layer
  mutation (``mutate``) of the best of S members drawn without replacement, and each block
  told joins the population while the oldest member leaves. With n > 1 all n children of
  one ask come from the same population. Repeats join the population too, as in the
  original (a repeat costs no training, only a slot).

  Attributes:
    population: P (NAS-Bench-201's REA uses 10).
    sample: S, the tournament size (3).
  """

  population: int = 10
  sample: int = 3

  def __post_init__(self):
    if not 1 <= self.sample <= self.population:
      raise ValueError(f'need 1 <= sample <= population, got {self.sample}, {self.population}')

  def init(self, space: SearchSpace, key: jax.Array, budget=None) -> EvolutionState:
    del key, budget  # nothing here depends on the budget
    p = self.population
    return EvolutionState(
        states=jnp.zeros((p, space.max_index + 1), jnp.int32),
        lengths=jnp.zeros((p,), jnp.int32), rewards=jnp.full((p,), -jnp.inf, jnp.float32),
        born=jnp.full((p,), -1, jnp.int32), size=jnp.zeros((), jnp.int32),
        cursor=jnp.zeros((), jnp.int32), told=jnp.zeros((), jnp.int32))

  def ask(self, space, state, key, n, iteration=0):
    del iteration
    return state, _evolution_ask(self, space, state, key, n)

  def tell(self, space, state, proposals, rewards, key):
    del space, key
    return _evolution_tell(self, state, proposals, rewards)


@functools.partial(jax.jit, static_argnames=('self', 'n'))
def _evolution_ask(self: AgingEvolution, space, state: EvolutionState, key, n: int):
  random_key, uniform_key = jax.random.split(key)
  fresh = random_paths(space, random_key, n)
  p = self.population
  u = jax.random.uniform(uniform_key, (n, p + mutation_uniforms(space)))
  priorities = jnp.where(jnp.arange(p) < state.size, u[:, :p], -1.0)
  _, contenders = jax.lax.top_k(priorities, self.sample)  # (n, S) distinct members
  winner = jnp.take_along_axis(
      contenders, jnp.argmax(state.rewards[contenders], axis=-1)[:, None], axis=1)[:, 0]
  parents = Trajectories(states=state.states[winner], lengths=state.lengths[winner])
  children = mutate(space, None, parents, u[:, p:])
  # Slot j is still part of the random initial population if fewer than P blocks will have
  # been told before it (an empty population has no parent at all).
  initial = (state.told + jnp.arange(n) < p) | (state.size == 0)
  return _select(initial, fresh, children)


@functools.partial(jax.jit, static_argnames=('self',))
def _evolution_tell(self: AgingEvolution, state: EvolutionState, proposals, rewards):
  def one(state, x):
    states, length, reward = x
    slot = state.cursor
    return EvolutionState(
        states=state.states.at[slot].set(states), lengths=state.lengths.at[slot].set(length),
        rewards=state.rewards.at[slot].set(reward), born=state.born.at[slot].set(state.told),
        size=jnp.minimum(state.size + 1, self.population),
        cursor=(slot + 1) % self.population, told=state.told + 1), None

  state, _ = jax.lax.scan(one, state, (proposals.states, proposals.lengths,
                                       jnp.asarray(rewards, jnp.float32)))
  return state


# -- local search -----------------------------------------------------------------------------

@flax.struct.dataclass
class LocalSearchState:
  """The incumbent and how far through its neighbourhood the search has asked."""

  incumbent: jnp.ndarray  # (T+1,) int32
  length: jnp.ndarray  # () int32
  reward: jnp.ndarray  # () float32
  has_incumbent: jnp.ndarray  # () bool; False: the next ask starts from random blocks
  order: jnp.ndarray  # (num_states,) int32, a random order of the neighbour slots
  cursor: jnp.ndarray  # () int32, next position in ``order``; num_states once exhausted
  restarts: jnp.ndarray  # () int32, local optima reached


@dataclasses.dataclass(frozen=True)
class LocalSearch:
  """Local search (White, Nolen, Savani 2020) with first improvement and random restarts.

  Each ask proposes the incumbent's next unasked neighbours (``neighbours``) in a random
  order drawn when the incumbent was set; slots beyond its last neighbour are filled with
  random blocks. Each tell moves to the first proposal (in ask order) better than the
  incumbent; if none is better and the neighbourhood is exhausted, the incumbent is a
  local optimum and the search restarts: the next ask proposes random blocks and the best
  of them becomes the incumbent. At n = 1 this is exactly the sequential algorithm.
  """

  def init(self, space: SearchSpace, key: jax.Array, budget=None) -> LocalSearchState:
    del key, budget  # nothing here depends on the budget
    num_states = space.layers.shape[0]
    return LocalSearchState(
        incumbent=jnp.zeros((space.max_index + 1,), jnp.int32), length=jnp.zeros((), jnp.int32),
        reward=jnp.full((), -jnp.inf, jnp.float32), has_incumbent=jnp.zeros((), bool),
        order=jnp.arange(num_states, dtype=jnp.int32), cursor=jnp.zeros((), jnp.int32),
        restarts=jnp.zeros((), jnp.int32))

  def ask(self, space, state, key, n, iteration=0):
    del iteration
    return _local_ask(space, state, key, n)

  def tell(self, space, state, proposals, rewards, key):
    del space
    return _local_tell(state, proposals, rewards, key)


@functools.partial(jax.jit, static_argnames=('n',))
def _local_ask(space, state: LocalSearchState, key, n: int):
  num_states = state.order.shape[0]
  paths, lengths, ok = neighbours(space, state.incumbent, state.length)
  ok = ok & state.has_incumbent
  remaining = ok[state.order] & (jnp.arange(num_states) >= state.cursor)
  rank = jnp.cumsum(remaining)  # rank[p]: neighbours left up to and including position p
  wanted = jnp.arange(1, n + 1)
  position = jnp.minimum(jnp.searchsorted(rank, wanted, side='left'), num_states - 1)
  have = wanted <= rank[-1]
  chosen = state.order[position]
  fresh = random_paths(space, key, n)
  proposals = Trajectories(
      states=jnp.where(have[:, None], paths[chosen], fresh.states),
      lengths=jnp.where(have, lengths[chosen], fresh.lengths))
  # Past the last neighbour asked; at the end when none is left after this ask.
  cursor = jnp.where(rank[-1] <= n, num_states, position[n - 1] + 1)
  return state.replace(cursor=jnp.where(state.has_incumbent, cursor, state.cursor)), proposals


@jax.jit
def _local_tell(state: LocalSearchState, proposals, rewards, key):
  rewards = jnp.asarray(rewards, jnp.float32)
  better = rewards > state.reward
  move = state.has_incumbent & better.any()
  start = ~state.has_incumbent
  pick = jnp.where(move, jnp.argmax(better), jnp.argmax(rewards))  # first better / best
  settle = move | start
  exhausted = state.has_incumbent & ~move & (state.cursor >= state.order.shape[0])
  order = jax.random.permutation(key, state.order.shape[0]).astype(jnp.int32)
  return LocalSearchState(
      incumbent=jnp.where(settle, proposals.states[pick], state.incumbent),
      length=jnp.where(settle, proposals.lengths[pick], state.length),
      reward=jnp.where(settle, rewards[pick], state.reward),
      has_incumbent=settle | (state.has_incumbent & ~exhausted),
      order=jnp.where(settle, order, state.order),
      cursor=jnp.where(settle, 0, state.cursor),
      restarts=state.restarts + exhausted.astype(jnp.int32))


# -- Q-learning -------------------------------------------------------------------------------

@flax.struct.dataclass
class QLearnerState:
  """The agent's Q-table and replay memory (as the search saves them today), plus what only
  the budget-sized agent reads: the blocks already told and how many distinct ones."""

  q: jnp.ndarray  # (num_states, max_actions) float32
  memory: ql.ReplayMemory
  tried: TriedSet
  told: jnp.ndarray  # () int32, distinct blocks told (all blocks when none are tracked)
  horizon: jnp.ndarray  # () int32, the budget the schedule is stretched over (0: none)
  restarts: jnp.ndarray  # () int32, times Q was reset at a local optimum (``restart``)


EXPLORATIONS = ('epsilon', 'mutation')
SCHEDULE_UNITS = ('blocks', 'iterations')


@dataclasses.dataclass(frozen=True)
class QLearner:
  """BlockQNN's tabular Q-learning agent; the defaults are the paper's agent, bit for bit.

  The default (``qlearning_paper``) samples with ``qlearning.sample_blocks`` at the ε of
  ``schedule`` for the ask's ``iteration`` and learns with ``qlearning.learn`` — exactly the
  calls the search loop makes today, with the same keys, so the samples are identical.

  The other fields go beyond the paper (``fast_qlearner`` sets them; each has an ablation in
  ``benchmarks/nb201.py``):

  Attributes:
    config: α, γ, Q init (optimism for untried actions), reward shaping, replay
      (``replay_size=0`` turns replay off).
    schedule: the ε schedule.
    budget: None (paper): ``schedule`` runs over ask iterations as written. An int: the
      schedule is sized to a budget of that many distinct blocks (``init``'s ``budget``
      overrides it per search): its phase proportions are kept and stretched over the
      budget, so a search of a few hundred blocks gets a short ε = 1 random phase however
      many blocks each ask makes; past the end the last ε holds.
    schedule_unit: with ``budget``, what the stretched schedule counts: 'blocks' (distinct
      blocks told, as MetaQNN counts its schedule) or 'iterations' (asks, over
      ``ceil(budget / n)`` of them: the paper's schedule merely shortened).
    exploration: 'epsilon' (paper): per-step ε-greedy. 'mutation': with probability ε a
      uniform random block, otherwise the greedy block (ties broken at random) perturbed
      by one-layer mutations (``mutate``) — evolution's and local search's move — instead
      of ε perturbing every step independently.
    mutation_rate: None: as few mutations as give an untried block — of the
      ``max_resamples + 1`` draws the first is the greedy block itself (new when Q prefers
      a splice of good blocks), the rest are split into ``max_mutations`` equal levels of
      1, 2, ... mutations (without ``avoid_repeats`` the greedy block is not a draw: it
      would be proposed again and again). A float: every draw makes a Poisson number of
      mutations with this mean, capped at ``max_mutations``.
    max_mutations: most layers changed (static: that many mutation passes are computed).
    avoid_repeats: do not propose a block already told or already in the same ask: redraw
      up to ``max_resamples`` times (blocks compared by ``key_hash``: canonically), then take
      a uniform random block. On NSC spaces this also redraws invalid blocks.
    max_resamples: redraws per proposal.
    restart: with 'mutation' exploration and ``avoid_repeats``, when the greedy block and
      every one-mutation draw of it (with a ``mutation_rate``: every draw) are already told
      (a local optimum, as far as the draws can tell), reset Q and the replay memory to
      their initial values and propose random blocks: local search's restart, with the
      told blocks still never repeated. With the monotone update the greedy block is the
      best since the last restart; the search's best is in its store.
    tried_capacity: most told blocks remembered for ``avoid_repeats`` and the budget count.
  """

  config: ql.QLearningConfig = ql.QLearningConfig()
  schedule: ql.EpsilonSchedule = ql.EpsilonSchedule()
  budget: int | None = None
  schedule_unit: str = 'blocks'
  exploration: str = 'epsilon'
  mutation_rate: float | None = None
  max_mutations: int = 3
  avoid_repeats: bool = False
  max_resamples: int = 0
  restart: bool = False
  tried_capacity: int = 16384

  def __post_init__(self):
    if self.exploration not in EXPLORATIONS:
      raise ValueError(f'exploration must be one of {EXPLORATIONS}, got {self.exploration!r}')
    if self.schedule_unit not in SCHEDULE_UNITS:
      raise ValueError(f'schedule_unit must be one of {SCHEDULE_UNITS}, got '
                       f'{self.schedule_unit!r}')
    if self.budget is not None and self.budget < 1:
      raise ValueError(f'budget must be positive, got {self.budget}')
    if self.max_mutations < 1 or self.max_resamples < 0:
      raise ValueError('max_mutations must be >= 1 and max_resamples >= 0')
    if self.mutation_rate is not None and self.mutation_rate < 0:
      raise ValueError(f'mutation_rate must be >= 0, got {self.mutation_rate}')

  @property
  def is_paper(self) -> bool:
    """Whether asks are exactly ``qlearning.sample_blocks`` (no field beyond the paper)."""
    return self.budget is None and self.exploration == 'epsilon' and not self.avoid_repeats

  @property
  def _tracks_tried(self) -> bool:
    return self.avoid_repeats or (self.budget is not None and self.schedule_unit == 'blocks')

  def init(self, space: SearchSpace, key: jax.Array, budget=None) -> QLearnerState:
    del key
    if budget is None:
      budget = self.budget or 0
    return QLearnerState(
        q=ql.init_q(space, self.config.q_init),
        memory=ql.init_memory(space, self.config.memory_capacity),
        tried=init_tried(self.tried_capacity if self._tracks_tried else 0),
        told=jnp.zeros((), jnp.int32), horizon=jnp.asarray(budget, jnp.int32),
        restarts=jnp.zeros((), jnp.int32))

  def epsilon(self, state: QLearnerState, iteration, n: int) -> jax.Array:
    """ε for an ask of ``n``: at ``iteration`` of the schedule (paper), or stretched over
    ``state.horizon`` distinct blocks or ``ceil(horizon / n)`` iterations (``budget``)."""
    if self.budget is None:
      return ql.epsilon_at(self.schedule, iteration)
    return _stretched_epsilon(self.schedule, state, iteration, n, self.schedule_unit)

  def ask(self, space, state, key, n, iteration=0):
    if self.is_paper:
      # Exactly the search loop's call: same function, key and ε, so the same samples.
      return state, ql.sample_blocks(key, state.q, space, self.epsilon(state, iteration, n), n)
    moved, proposals = _qlearner_ask(self, space, state, key, n, iteration)
    # Only a restart moves the state on an ask: otherwise hand back the very object, so a
    # caller can tell (``is``) that there is nothing new to save.
    return (moved if self._restarts else state), proposals

  @property
  def _restarts(self) -> bool:
    return self.restart and self.avoid_repeats and self.exploration == 'mutation'

  def tell(self, space, state, proposals, rewards, key):
    rewards = jnp.asarray(rewards, jnp.float32)
    # ``learn`` donates Q: hand it a copy, so the caller's old state stays usable.
    q, memory = ql.learn(key, jnp.array(state.q, copy=True), state.memory, space, proposals,
                         rewards, self.config)
    tried, new = tried_add(state.tried, key_hash(space, proposals.states))
    return state.replace(q=q, memory=memory, tried=tried, told=state.told + new)


def _stretched_epsilon(schedule: ql.EpsilonSchedule, state: QLearnerState, iteration, n: int,
                       unit: str) -> jax.Array:
  """ε of ``schedule`` with its phases stretched over the horizon (a traced value).

  Phase k covers the fraction [C_{k-1}, C_k) / C of the horizon, C_k the cumulative
  iterations of the written schedule; so a 10% random phase is the first 10% of the budget.
  """
  eps = np.asarray([e for e, _ in schedule.phases], np.float32)
  fractions = np.cumsum([c for _, c in schedule.phases]) / schedule.num_iterations
  horizon = jnp.maximum(state.horizon, 1).astype(jnp.float32)
  if unit == 'iterations':
    position = jnp.asarray(iteration, jnp.float32)
    horizon = jnp.ceil(horizon / n)
  else:
    position = state.told.astype(jnp.float32)
  phase = jnp.searchsorted(jnp.asarray(fractions, jnp.float32) * horizon, position,
                           side='right')
  return jnp.asarray(eps)[jnp.minimum(phase, len(eps) - 1)]


@functools.partial(jax.jit, static_argnames=('self', 'n'))
def _qlearner_ask(self: QLearner, space, state: QLearnerState, key, n: int, iteration):
  epsilon = self.epsilon(state, iteration, n)
  draws = self.max_resamples + 1
  total = draws * n
  # Few random draws of many numbers each: every draw site costs compile time.
  greedy_key, random_key, uniform_key = jax.random.split(key, 3)
  rand = random_paths(space, random_key, total + n)
  fallback = jax.tree.map(lambda x: x[total:], rand)
  rand = jax.tree.map(lambda x: x[:total], rand)
  if self.exploration == 'epsilon':  # the paper's per-step ε, redrawn up to K times
    candidates = ql.sample_blocks(greedy_key, state.q, space, epsilon, total)
  else:
    per_mutation = mutation_uniforms(space)
    # Column 0: the Poisson count, column 1: the ε coin, then each mutation pass's share.
    u = jax.random.uniform(uniform_key, (total, 2 + self.max_mutations * per_mutation))
    candidates = ql.sample_blocks(greedy_key, state.q, space, 0.0, total)
    if self.mutation_rate is None:  # draw-major rows: row k*n + j is draw k of slot j
      count = jnp.asarray(np.repeat(_mutation_levels(draws, self.max_mutations,
                                                     self.avoid_repeats), n))
    else:  # a Poisson number per draw, from the uniform in column 0
      count = jnp.searchsorted(_poisson_cdf(self.mutation_rate, self.max_mutations),
                               u[:, 0], side='right')
    for m in range(self.max_mutations):
      mutant = mutate(space, None, candidates,
                      u[:, 2 + m * per_mutation:2 + (m + 1) * per_mutation])
      candidates = _select(count > m, mutant, candidates)
    candidates = _select(u[:, 1] < epsilon, rand, candidates)  # ε: a uniform random block
  acceptable = path_valid(space, candidates.states, candidates.lengths)
  if self.avoid_repeats:
    acceptable &= ~tried_contains(state.tried, key_hash(space, candidates.states))
  candidates = jax.tree.map(lambda x: x.reshape(draws, n, *x.shape[1:]), candidates)
  acceptable = acceptable.reshape(draws, n)
  levels = _mutation_levels(draws, self.max_mutations, self.avoid_repeats)
  proposals = _first_acceptable(space, candidates, acceptable, fallback,
                                self.avoid_repeats)
  if not self._restarts:
    return state, proposals
  # Slot 0 sees only the told blocks (later slots also avoid earlier ones): if nothing
  # within one mutation of its greedy block is new, the climb is over.
  stuck = ~acceptable[(levels <= 1) if self.mutation_rate is None else slice(None), 0].any()
  fresh = self.init(space, key, 0)
  state = state.replace(
      q=jnp.where(stuck, fresh.q, state.q),
      memory=jax.tree.map(lambda a, b: jnp.where(stuck, a, b), fresh.memory, state.memory),
      restarts=state.restarts + stuck.astype(jnp.int32))
  return state, _select(jnp.broadcast_to(stuck, (n,)), fallback, proposals)


def _poisson_cdf(rate: float, cap: int) -> np.ndarray:
  """``(cap,)`` P(X <= k) for X ~ Poisson(rate), k < cap: a uniform's rank is X capped."""
  k = np.arange(cap)
  pmf = np.exp(-rate + k * np.log(max(rate, 1e-30)) - np.cumsum(np.log(np.maximum(k, 1))))
  return np.cumsum(pmf).astype(np.float32)


def _mutation_levels(draws: int, max_mutations: int, greedy_first: bool) -> np.ndarray:
  """``(draws,)`` mutations per draw: 0 (the greedy block itself) if ``greedy_first`` and
  there are two draws or more, then equal levels 1 .. ``max_mutations``."""
  head = [0] if greedy_first and draws > 1 else []
  rest = draws - len(head)
  return np.concatenate([head, 1 + np.arange(rest) * max_mutations // rest]).astype(np.int32)


# -- presets and the registry -----------------------------------------------------------------

def fast_qlearner(budget: int, **overrides) -> QLearner:
  """The Q-learner tuned for a budget of ``budget`` distinct blocks (beyond the paper).

  Tuned on NAS-Bench-201 (``benchmarks/nb201.py``, which runs one ablation per field): the
  first 10% of the budget uniform random; then the greedy block with one layer changed,
  never a block already told (up to 16 redraws), and a restart (Q reset) once nothing
  within one layer of the greedy block is new; α = 1 with the monotone update, γ = 1 and
  reward shaping, so the greedy block is the best block found since the last restart; Q
  starts at 0 (no optimism), no replay.
  """
  fields = dict(
      config=ql.QLearningConfig(alpha=1.0, q_init=0.0, reward_shaping=True, replay_size=0,
                                monotone=True),
      schedule=ql.EpsilonSchedule(((1.0, 1), (0.0, 9))),
      budget=budget, exploration='mutation', max_mutations=1, avoid_repeats=True,
      max_resamples=16, restart=True)
  fields.update(overrides)
  return QLearner(**fields)


STRATEGIES: dict[str, Callable[..., Strategy]] = {
    'qlearning': QLearner,
    'qlearning_paper': QLearner,
    'qlearning_fast': fast_qlearner,
    'random': RandomSearch,
    'evolution': AgingEvolution,
    'local_search': LocalSearch,
}


def make_strategy(name: str, **kwargs) -> Strategy:
  """A strategy by name (``STRATEGIES``); ``kwargs`` go to its constructor.

  ``qlearning_fast`` needs ``budget`` (distinct blocks the search will train).
  """
  if name not in STRATEGIES:
    raise KeyError(f'unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}')
  return STRATEGIES[name](**kwargs)


# -- saving and restoring a state -------------------------------------------------------------

def state_arrays(state) -> dict[str, np.ndarray]:
  """A state as flat ``{name: array}`` (names like ``memory.states``), for ``np.savez``."""
  nested = flax.serialization.to_state_dict(state)
  flat = flax.traverse_util.flatten_dict(nested, sep='.')
  return {name: np.asarray(value) for name, value in flat.items()}


def restore_state(strategy: Strategy, space: SearchSpace, arrays) -> Any:
  """The state saved by ``state_arrays`` (e.g. an ``np.load`` result), checked against the
  shapes and dtypes ``strategy.init(space)`` makes.

  Raises:
    KeyError: a field is missing. ValueError: a shape or dtype differs.
  """
  template = strategy.init(space, jax.random.PRNGKey(0), budget=1)
  names = state_arrays(template)
  restored = {}
  for name, like in names.items():
    if name not in arrays:
      raise KeyError(f'saved state lacks {name!r}')
    value = np.asarray(arrays[name])
    if value.shape != like.shape or value.dtype != like.dtype:
      raise ValueError(f'saved {name!r} is {value.dtype}{list(value.shape)}, expected '
                       f'{like.dtype}{list(like.shape)}')
    restored[name] = jnp.asarray(value)
  nested = flax.traverse_util.unflatten_dict(restored, sep='.')
  return flax.serialization.from_state_dict(template, nested)


def planned_iterations(budget: int, n: int) -> int:
  """Asks of ``n`` proposals needed for ``budget`` blocks without repeats."""
  return max(1, math.ceil(budget / n))
