"""The initialisers give Flax's values op by op, from draws shared between kernel shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockqnn_jax.models import architecture, initializers, networks
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.training import engine


@pytest.mark.parametrize('shape', [(3, 3, 8, 8), (1, 1, 24, 8), (3, 3, 40, 32), (80, 10),
                                   (5, 5, 3, 16)])
def test_lecun_normal_is_flaxs_bit_for_bit(shape):
  key = jax.random.fold_in(jax.random.key(3, impl='rbg'), 11)
  ours = initializers.lecun_normal()(key, shape, jnp.float32)
  assert isinstance(ours, np.ndarray) and ours.shape == shape and ours.dtype == np.float32
  flax = jax.jit(lambda k: jax.nn.initializers.lecun_normal()(k, shape, jnp.float32))(key)
  np.testing.assert_array_equal(ours, np.asarray(flax))


def test_a_traced_key_takes_flaxs_own_path():
  key = jax.random.key(0, impl='rbg')
  out = jax.jit(lambda k: initializers.lecun_normal()(k, (3, 3, 4, 4)))(key)
  assert isinstance(out, jax.Array) and out.shape == (3, 3, 4, 4)


def test_draw_sizes_are_few():
  assert initializers.draw_size(1) == 256 and initializers.draw_size(256) == 256
  assert initializers.draw_size(257) == 512 and initializers.draw_size(11520) == 16384
  assert len({initializers.draw_size(n) for n in range(1, 20000)}) == 8


@pytest.mark.slow
def test_network_variables_op_by_op_equal_a_jitted_init():
  block = nsc.parse('1,1,1,0,0 2,1,3,0,0 3,2,3,0,0 4,6,0,1,2 5,5,0,3,4 6,7,0,0,0')
  model = networks.BlockNet(architecture.cifar_spec(block, num_blocks=2, features=4,
                                                   num_classes=3, image_size=8))
  key = jax.random.key(1, impl='rbg')
  eager = engine.init_variables(key, model, (8, 8, 3))
  jitted = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 3)), train=False))(key)
  assert jax.tree.structure(eager) == jax.tree.structure(jitted)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
