"""What "already tried" means: a block's hash (canonical on NSC spaces) and a fixed-size
set of the hashes told so far."""

from __future__ import annotations

import functools
import hashlib

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from blockqnn_jax.nsc.space import SearchSpace
from blockqnn_jax.strategies.qlearning import Trajectories


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
  from blockqnn_jax.nsc import space as space_lib  # pylint: disable=import-outside-toplevel
  return space_lib.build_space(grammar)


@functools.lru_cache(maxsize=1 << 17)
def _canonical_hash(grammar, row: tuple[int, ...]) -> tuple[int, int]:
  """Two uint32 of the sha256 of a path's canonical key (``canonical.canonical_key``); a
  row that is no block (an empty slot of a population) hashes as its raw states."""
  from blockqnn_jax.nsc import canonical  # pylint: disable=import-outside-toplevel
  from blockqnn_jax.nsc import grammar as nsc  # pylint: disable=import-outside-toplevel
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


def first_acceptable(space: SearchSpace, candidates: Trajectories, acceptable: jnp.ndarray,
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
