"""Parameter initialisers of the generated networks: Flax's values, cheap to make op by op.

A search builds thousands of networks, each with kernels of shapes of its own. Flax's
``lecun_normal`` compiles a truncated-normal program for every new kernel shape, which can
cost as much as compiling the candidate's forward pass. ``lecun_normal`` here computes the same values from a draw
whose size is rounded up to a power of two (the generator's first ``n`` numbers do not
depend on how many follow, on CPU: tested), so a whole search compiles about ten such
programs, and scales them on the host. Under ``jit`` (a traced key) it is Flax's own
initialiser: the values are the same either way, bit for bit.

``zeros`` and ``ones`` likewise make host arrays when called outside a trace.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# The standard deviation of a standard normal truncated to (-2, 2) (as in jax.nn.initializers).
_TRUNCATED_STD = .87962566103423978
_MIN_DRAW = 256


def _traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


@functools.partial(jax.jit, static_argnames=('size', 'dtype'))
def _truncated_normal(key: jax.Array, size: int, dtype) -> jax.Array:
  return jax.random.truncated_normal(key, -2, 2, (size,), dtype)


def draw_size(n: int) -> int:
  """The size of the draw that serves ``n`` numbers: a power of two, at least 256."""
  return max(_MIN_DRAW, 1 << max(0, n - 1).bit_length())


def lecun_normal():
  """``jax.nn.initializers.lecun_normal()`` (Flax's default kernel initialiser), same values.

  Fans are read as Flax's conv and dense kernels lay them out: inputs on axis -2, outputs
  on axis -1, the receptive field the leading axes.
  """
  flax_init = jax.nn.initializers.lecun_normal()

  def init(key, shape, dtype=jnp.float32):
    if _traced(key) or not jnp.issubdtype(dtype, jnp.floating):
      return flax_init(key, shape, dtype)
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    fan_in = shape[-2] * math.prod(shape[:-2]) if len(shape) >= 2 else shape[0]
    dtype = np.dtype(dtype)
    # float32 arithmetic as jax's: variance rounded to dtype, sqrt and divide correctly rounded.
    stddev = np.sqrt(np.asarray(1.0 / fan_in, dtype)) / np.asarray(_TRUNCATED_STD, dtype)
    draw = np.asarray(_truncated_normal(key, draw_size(n), dtype))[:n]
    return (draw.reshape(shape) * stddev).astype(dtype)

  return init


def zeros(key, shape, dtype=jnp.float32):
  del key
  return np.zeros(tuple(shape), dtype)


def ones(key, shape, dtype=jnp.float32):
  del key
  return np.ones(tuple(shape), dtype)
