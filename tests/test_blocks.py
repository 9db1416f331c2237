"""One block: parameter counts worked out by hand, layer semantics, dtypes, FLOPs vs XLA."""

from __future__ import annotations

import chex
import flax.linen as nn
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import nsc_examples
import numpy as np
import pytest

from blockqnn_jax.models import blocks, cost
from blockqnn_jax.nsc import grammar as nsc

RESIDUAL = nsc.RESIDUAL_BLOCK
INCEPTION = nsc.INCEPTION_BLOCK


def _variables(block, in_features, features, size=8, **kwargs):
  """Abstract variables (shapes only, nothing computed) of a block on (1, size, size, C_in)."""
  model = blocks.BlockModule(block, features, **kwargs)
  x = jax.ShapeDtypeStruct((1, size, size, in_features), jnp.float32)
  return model, jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)


def _num_params(variables) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables.get('params', {})))


def _flax_params(block, in_features, features) -> int:
  return _num_params(_variables(block, in_features, features)[1])


def _xla_flops(model, variables, x) -> float:
  """XLA's own FLOP count of the inference forward pass."""
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0]
  return float(analysis.get('flops', 0.0))  # a program without arithmetic has no key


def _valid_taps(size: int, kernel: int, stride: int = 1) -> int:
  """Sum over output positions of the kernel taps that land inside the image (SAME)."""
  out = -(-size // stride)
  pad_lo = max((out - 1) * stride + kernel - size, 0) // 2
  return sum(1 for i in range(out) for t in range(kernel)
             if 0 <= i * stride - pad_lo + t < size)


def _padding_aware_block_flops(block, in_features, features, size) -> int:
  """Like ``cost.block_flops`` but skipping taps over the zero padding, as XLA counts."""
  return sum(2 * _valid_taps(size, c.kernel) ** 2 * c.in_features * c.out_features
             for c in cost.block_convs(block, in_features, features))


# -- parameter counts by hand ----------------------------------------------------------------


def test_residual_params_by_hand():
  # RESIDUAL = identity(0), conv3(1), conv3(2), add(1, 3); C_in = F = 16.
  # conv3 16->16: 3*3*16*16 = 2304 kernel + BN scale and bias 2*16 = 32 -> 2336; two: 4672.
  # The add sums two 16-wide tensors: no projection. The only leaf (4) is 16 wide: no
  # output projection. Total 4672.
  assert cost.block_params(RESIDUAL, 16, 16) == 4672
  assert _flax_params(RESIDUAL, 16, 16) == 4672


def test_inception_params_by_hand():
  # INCEPTION = conv1(0), conv3(0), conv5(0), max_pool3(0), conv1(4); C_in = F = 16.
  # conv1 16->16: 256 + 32 = 288; conv3: 2304 + 32 = 2336; conv5: 25*256 = 6400 + 32 = 6432;
  # max_pool3: 0; conv1 after the pool: 288. Leaves 1, 2, 3, 5 concatenate to 64 channels,
  # projected 64->16 by a 1x1 PCC: 1024 + 32 = 1056.
  # Total 288 + 2336 + 6432 + 0 + 288 + 1056 = 10400.
  assert cost.block_params(INCEPTION, 16, 16) == 10400
  assert _flax_params(INCEPTION, 16, 16) == 10400


def test_add_projects_the_narrow_operand():
  # RESIDUAL with C_in = 8, F = 16: identity(0) stays 8 wide.
  # conv3 8->16: 3*3*8*16 = 1152 + 32 = 1184; conv3 16->16: 2336.
  # add(1, 3): operand 1 is 8 wide -> 1x1 PCC 8->16: 128 + 32 = 160; operand 3 is 16 wide.
  # Output: the add, 16 wide, no projection. Total 1184 + 2336 + 160 = 3680.
  assert cost.block_params(RESIDUAL, 8, 16) == 3680
  model, variables = _variables(RESIDUAL, 8, 16)
  assert _num_params(variables) == 3680
  assert set(variables['params']) == {'layer2', 'layer3', 'layer4_proj1'}


def test_add_projects_both_operands():
  # max_pool3(0), add(0, 1) with C_in = 8, F = 16: both operands are 8 wide, so both get
  # a 1x1 PCC 8->16: 2 * (128 + 32) = 320. The add is 16 wide: no output projection.
  block = nsc.parse('1,2,3,0,0 2,5,0,0,1 3,7,0,0,0')
  assert cost.block_params(block, 8, 16) == 320
  _, variables = _variables(block, 8, 16)
  assert _num_params(variables) == 320
  assert set(variables['params']) == {'layer2_proj1', 'layer2_proj2'}


def test_concat_output_is_projected():
  # conv3(0), concat(0, 1) with C_in = 8, F = 16.
  # conv3 8->16: 1152 + 32 = 1184. The concat is 8 + 16 = 24 wide and the only leaf, so
  # the output is projected 24->16: 24*16 = 384 + 32 = 416. Total 1600.
  block = nsc.parse('1,1,3,0,0 2,6,0,0,1 3,7,0,0,0')
  assert cost.layer_widths(block, 8, 16) == {0: 8, 1: 16, 2: 24}
  assert cost.block_params(block, 8, 16) == 1600
  assert _flax_params(block, 8, 16) == 1600


def test_leaves_that_already_sum_to_f_need_no_projection():
  # max_pool3(0), avg_pool3(0) with C_in = 4, F = 8: two 4-wide leaves concatenate to
  # 8 = F channels, so there is nothing to project and no parameter at all.
  block = nsc.parse('1,2,3,0,0 2,3,3,0,0 3,7,0,0,0')
  assert cost.block_params(block, 4, 8) == 0
  assert _flax_params(block, 4, 8) == 0
  # With C_in = F = 8 the leaves are 16 wide: a 1x1 PCC 16->8, 128 + 16 = 144.
  assert cost.block_params(block, 8, 8) == 144
  assert _flax_params(block, 8, 8) == 144


def test_inception_widths_with_a_wider_input():
  # C_in = 8, F = 16: convs are F wide, the pool keeps its input's 8.
  assert cost.layer_widths(INCEPTION, 8, 16) == {0: 8, 1: 16, 2: 16, 3: 16, 4: 8, 5: 16}
  assert cost.output_width(INCEPTION, 8, 16) == 64


def test_submodules_are_the_convs_cost_lists():
  # Both sides agree convolution by convolution, not only in total.
  for block, c_in, f in ((INCEPTION, 8, 16), (RESIDUAL, 4, 8)):
    _, variables = _variables(block, c_in, f)
    expected = {c.name: c.params for c in cost.block_convs(block, c_in, f)}
    actual = {name: _num_params({'params': tree}) for name, tree in variables['params'].items()}
    assert actual == expected
    for c in cost.block_convs(block, c_in, f):
      kernel = variables['params'][c.name]['conv']['kernel']
      assert kernel.shape == (c.kernel, c.kernel, c.in_features, c.out_features)
      assert set(variables['batch_stats'][c.name]['bn']) == {'mean', 'var'}


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(block=nsc_examples.valid_blocks(), c_in=st.sampled_from([2, 4]),
                  f=st.sampled_from([4, 6]))
def test_random_blocks_params_and_shape(block, c_in, f):
  model, variables = _variables(block, c_in, f, size=4)
  assert _num_params(variables) == cost.block_params(block, c_in, f)
  x = jax.ShapeDtypeStruct((2, 4, 4, c_in), jnp.float32)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert out.shape == (2, 4, 4, f)


# -- FLOPs ----------------------------------------------------------------------------------


def test_block_flops_by_hand():
  # 8x8 image, 2 FLOPs per multiply-accumulate.
  # RESIDUAL, C_in = F = 16: two conv3 16->16, 2304 MACs per pixel each:
  # 2 * 4608 * 64 = 589824.
  assert cost.block_flops(RESIDUAL, 16, 16, 8, 8) == 589824
  # INCEPTION, C_in = F = 16: 256 + 2304 + 6400 + 256 + 1024 (projection 64->16)
  # = 10240 MACs per pixel: 2 * 10240 * 64 = 1310720.
  assert cost.block_flops(INCEPTION, 16, 16, 8, 8) == 1310720
  # Non-square: the count scales with H * W.
  assert cost.block_flops(INCEPTION, 16, 16, 4, 16) == 1310720


@pytest.mark.parametrize('text', [
    '1,1,1,0,0 2,1,1,1,0 3,5,0,1,2 4,6,0,0,3 5,7,0,0,0',  # 1x1 convs, add, concat, proj
    '1,4,0,0,0 2,1,1,1,0 3,5,0,0,2 4,7,0,0,0',  # add with a projected operand
])
def test_block_flops_against_xla_1x1(text):
  # 1x1 convolutions have no taps over padding, so XLA counts the convolutions exactly as
  # we do and everything it adds is elementwise, which we leave out: per PCC one op per
  # input element (ReLU), three per output element and two per channel (inference BN), one
  # per element per add (plus whatever producers XLA's fusion duplicates into two
  # consumers, or CSE merges). Per PCC that is about (C_in + 3F) / (2 C_in F) of its conv
  # FLOPs: ~3% at C_in = F = 64 (and 8-12% at 16 -> 32). Measured 1.033 and 1.039 here.
  block = nsc.parse(text)
  model, variables = _variables(block, 64, 64)
  ours = cost.block_flops(block, 64, 64, 8, 8)
  ratio = _xla_flops(model, variables, jax.ShapeDtypeStruct((1, 8, 8, 64), jnp.float32)) / ours
  assert 1.0 < ratio < 1.06


@pytest.mark.parametrize('block', [RESIDUAL, INCEPTION], ids=['residual', 'inception'])
def test_block_flops_against_xla_padding(block):
  # XLA also skips the taps of a SAME window that fall on the zero padding: on an 8x8 image
  # a 3x3 window keeps 22 of 24 taps per row (a factor (22/24)^2 = 0.84 on its FLOPs) and
  # a 5x5 one 34 of 40 (0.72), where our convention counts all k*k. So on small images XLA
  # counts *fewer* FLOPs than we do: measured XLA/ours = 0.856 (residual) and 0.813
  # (inception) at C_in = F = 16. Counting the padding XLA's way, what is left is the
  # elementwise work above: measured +1.9% and +2.9%.
  model, variables = _variables(block, 16, 16)
  xla = _xla_flops(model, variables, jax.ShapeDtypeStruct((1, 8, 8, 16), jnp.float32))
  ours = cost.block_flops(block, 16, 16, 8, 8)
  assert 0.78 < xla / ours < 0.88
  assert 1.0 < xla / _padding_aware_block_flops(block, 16, 16, 8) < 1.04


# -- semantics ------------------------------------------------------------------------------


def _normal(shape, seed=0) -> jax.Array:
  """Standard normal float32 values drawn with NumPy (no RNG program to compile)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _fill(abstract, seed=0):
  """Concrete variables for abstract ones, drawn with NumPy.

  ``model.init`` under jit spends seconds compiling threefry on CPU for every parameter;
  the semantics tests only need some values: kernels ~ N(0, 1/fan_in), BN scale ~ 1 +
  N(0, 0.1^2), bias ~ N(0, 0.1^2), running mean 0 and variance 1 (as ``init`` sets them).
  """
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    name = path[-1].key
    if name == 'mean':
      return jnp.zeros(leaf.shape, leaf.dtype)
    if name == 'var':
      return jnp.ones(leaf.shape, leaf.dtype)
    noise = rng.standard_normal(leaf.shape)
    if name == 'kernel':
      value = noise / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      value = (name == 'scale') + 0.1 * noise
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(one, abstract)


def _apply(block, features, x, **kwargs):
  """(inference output, variables) of a block with ``_fill``ed variables."""
  model, abstract = _variables(block, x.shape[-1], features, size=x.shape[1], **kwargs)
  variables = _fill(abstract)
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x), variables


def test_parameter_free_layers():
  x = _normal((2, 5, 5, 4), seed=1)
  # Identity, and pooling with k = 1, return the input.
  for text in ('1,4,0,0,0 2,7,0,0,0', '1,2,1,0,0 2,7,0,0,0', '1,3,1,0,0 2,7,0,0,0'):
    out, _ = _apply(nsc.parse(text), 4, x)
    chex.assert_trees_all_close(out, x)
  # add(0, identity(0)) with C_in = F: no projection, 2x.
  out, _ = _apply(nsc.parse('1,4,0,0,0 2,5,0,0,1 3,7,0,0,0'), 4, x)
  chex.assert_trees_all_close(out, 2 * x)
  # Two pooling leaves, C_in = 4, F = 8: concatenated in index order, no projection.
  out, _ = _apply(nsc.parse('1,2,3,0,0 2,3,3,0,0 3,7,0,0,0'), 8, x)
  expected = jnp.concatenate([
      nn.max_pool(x, (3, 3), strides=(1, 1), padding='SAME'),
      nn.avg_pool(x, (3, 3), strides=(1, 1), padding='SAME', count_include_pad=False)], -1)
  chex.assert_trees_all_close(out, expected)


def test_avg_pool_excludes_padding():
  # A constant image stays constant, corners included, only if the padding is not counted.
  out, _ = _apply(nsc.parse('1,3,3,0,0 2,7,0,0,0'), 3, jnp.full((1, 4, 4, 3), 5.0))
  chex.assert_trees_all_close(out, jnp.full((1, 4, 4, 3), 5.0))


def test_conv_is_pre_activation():
  # conv3(0), C_in = F = 4: ReLU -> 3x3 SAME conv without bias -> BN, which at inference is
  # (y - mean) / sqrt(var + eps) * scale + bias with the running mean 0 and variance 1.
  x = _normal((2, 6, 6, 4), seed=2)
  out, variables = _apply(nsc.parse('1,1,3,0,0 2,7,0,0,0'), 4, x)
  params = variables['params']['layer1']
  assert set(params['conv']) == {'kernel'}  # no conv bias
  conv = jax.lax.conv_general_dilated(jax.nn.relu(x), params['conv']['kernel'], (1, 1),
                                      'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  expected = conv / jnp.sqrt(1.0 + 1e-5) * params['bn']['scale'] + params['bn']['bias']
  chex.assert_trees_all_close(out, expected, atol=1e-5)


def test_bfloat16_compute_float32_params():
  x = _normal((2, 4, 4, 4), seed=3)
  _, abstract = _variables(INCEPTION, 4, 8, size=4, dtype=jnp.bfloat16)
  for leaf in jax.tree.leaves(abstract):  # the declared dtypes: fp32 master weights
    assert leaf.dtype == jnp.float32
  out, _ = _apply(INCEPTION, 8, x, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  chex.assert_shape(out, (2, 4, 4, 8))
  reference, _ = _apply(INCEPTION, 8, x)  # the same (filled) variables in float32
  chex.assert_trees_all_close(out.astype(jnp.float32), reference, atol=0.1, rtol=0.05)


def test_train_updates_batch_stats():
  x = _normal((4, 4, 4, 4), seed=4) + 3.0
  model, abstract = _variables(RESIDUAL, 4, 4, size=4, bn_momentum=0.5)
  variables = _fill(abstract)
  out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x)
  chex.assert_shape(out, (4, 4, 4, 4))
  before, after = variables['batch_stats'], updates['batch_stats']
  chex.assert_trees_all_equal_shapes(before, after)
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
  assert all(jax.tree.leaves(moved))
  # In training mode BN normalises with the batch's own statistics, so the conv branch has
  # mean ``bias`` per channel and the add's mean is x's plus that.
  chex.assert_trees_all_close(out.mean(axis=(0, 1, 2)),
                              variables['params']['layer3']['bn']['bias'] +
                              x.mean(axis=(0, 1, 2)), atol=1e-4)


def test_invalid_block_is_rejected_clearly():
  no_terminal = nsc.Block.from_tuples([(1, 1, 3, 0, 0)])
  with pytest.raises(nsc.NSCError, match='cannot build block .*no terminal') as info:
    blocks.BlockModule(no_terminal, 4)
  assert info.value.layer == 1
  with pytest.raises(nsc.NSCError, match='pred1=3 must name an earlier layer'):
    cost.block_params(nsc.Block.from_tuples([(1, 1, 3, 3, 0), (2, 7, 0, 0, 0)]), 4, 4)


def test_kernels_outside_the_default_grammar_build():
  # The generator checks structure, not the search space's kernel sets: a 7x7 conv and a
  # 2x2 pooling (even, so SAME pads asymmetrically) build and are counted.
  block = nsc.parse('1,1,7,0,0 2,2,2,1,0 3,7,0,0,0',
                    nsc.Grammar(conv_kernels=(7,), max_pool_kernels=(2,)))
  assert cost.block_params(block, 4, 4) == 49 * 16 + 8
  assert _flax_params(block, 4, 4) == 49 * 16 + 8
  out, _ = _apply(block, 4, jnp.ones((1, 5, 5, 4)))
  chex.assert_shape(out, (1, 5, 5, 4))
