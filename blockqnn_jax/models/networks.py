"""``BlockNet``: the network stacked from one NSC block (``architecture.NetworkSpec``).

A network (NHWC, images ``(B, S, S, C_img)`` in, float32 logits ``(B, classes)`` out) is

* a **stem**: 3x3 conv to ``F * stage_multipliers[0]`` channels, stride ``stem_stride``,
  SAME, no bias, then BatchNorm; with ``stem_pool``, then 3x3 stride-2 SAME max pooling;
* **stages** ``s = 0, 1, ...`` of ``N`` blocks each at width ``F * stage_multipliers[s]``,
  joined by 2x2 stride-2 SAME max pooling (resolution ``ceil(H / 2)``). The first block of
  a stage reads the previous width, the others their own width (see ``blocks`` for how a
  block handles ``C_in != F``);
* a **head**: ReLU (the blocks end in BatchNorm), global average pooling and a dense
  classifier, both in float32 whatever ``dtype`` is.

``architecture.cifar_spec`` is BlockQNN's CIFAR network (stride-1 stem, three stages at F,
2F, 4F); ``architecture.imagenet_spec`` its ImageNet one (stride-2 stem and stem pooling,
four stages at F, 2F, 4F, 8F). ``cost.network_params`` and ``cost.network_flops`` count the same network.

Variables: ``params`` and ``batch_stats``, under ``stem``, ``stage{s}_block{b}`` (``s``, ``b``
from 0) and ``head``. With ``scan_blocks`` the blocks 1..N-1 of a stage, which share one
input shape, run under ``nn.scan`` as ``stage{s}_scan/block`` with every variable stacked
along a leading axis of length N - 1: the same parameters in another layout, compiled once
per stage instead of once per block.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from blockqnn_jax.models import blocks, initializers
from blockqnn_jax.models.architecture import NetworkSpec
from blockqnn_jax.nsc import grammar as nsc

Dtype = Any


class _ScanCell(nn.Module):
  """One block as an ``nn.scan`` body: ``(x, None) -> (block(x), None)``."""

  block: nsc.Block
  features: int
  train: bool
  dtype: Dtype
  param_dtype: Dtype
  bn_momentum: float
  bn_epsilon: float

  @nn.compact
  def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
    y = blocks.BlockModule(self.block, self.features, dtype=self.dtype,
                           param_dtype=self.param_dtype, bn_momentum=self.bn_momentum,
                           bn_epsilon=self.bn_epsilon, name='block')(x, self.train)
    return y, None


class BlockNet(nn.Module):
  """The network a ``NetworkSpec`` describes: images ``(B, S, S, C_img)`` -> logits.

  Attributes:
    spec: the architecture.
    dtype: computation dtype of the stem and blocks (e.g. bfloat16); the head and logits
      are float32.
    param_dtype: parameter dtype.
    bn_momentum: decay of BatchNorm's running averages.
    bn_epsilon: BatchNorm's variance epsilon.
    scan_blocks: run blocks 1..N-1 of each stage under ``nn.scan`` (see the module
      docstring): same function and parameter count, other variable layout, a program
      that does not grow with N. Off by default: on XLA:CPU a train step of an N = 2 or 3
      network compiled 1.3-1.8x *slower* scanned than unrolled (break-even near N = 8).
  """

  spec: NetworkSpec
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  scan_blocks: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    """Forward pass.

    Args:
      images: ``(B, S, S, C_img)`` float images (normalised by the caller).
      train: BatchNorm mode; ``True`` needs ``mutable=['batch_stats']``.

    Returns:
      ``(B, num_classes)`` float32 logits.
    """
    spec = self.spec
    if images.ndim != 4 or images.shape[-1] != spec.in_channels:
      raise ValueError(f'expected images (B, H, W, {spec.in_channels}), got {images.shape}')
    shape = spec.shape
    bn = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_momentum=self.bn_momentum,
              bn_epsilon=self.bn_epsilon)
    # The stem reads images, so no leading ReLU.
    x = blocks.PCC(shape.stem_features, 3, strides=spec.stem_stride, activate=False,
                   name='stem', **bn)(images, train)
    if spec.stem_pool:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for s, stage in enumerate(shape.stages):
      if s:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
      x = blocks.BlockModule(spec.block, stage.features, name=f'stage{s}_block0', **bn)(
          x, train)
      rest = spec.num_blocks - 1
      if rest and self.scan_blocks:
        scan = nn.scan(_ScanCell, variable_axes={'params': 0, 'batch_stats': 0},
                       split_rngs={'params': True}, length=rest)
        x, _ = scan(spec.block, stage.features, train, name=f'stage{s}_scan', **bn)(x, None)
      else:
        for b in range(1, spec.num_blocks):
          x = blocks.BlockModule(spec.block, stage.features, name=f'stage{s}_block{b}',
                                 **bn)(x, train)
    # Head in float32: the pixel mean and the classifier are cheap and precision-sensitive.
    x = nn.relu(jnp.asarray(x, jnp.float32))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(spec.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                    kernel_init=initializers.lecun_normal(), bias_init=initializers.zeros,
                    name='head')(x)


def build(spec: NetworkSpec, *, scan_blocks: bool = False, dtype: Dtype = jnp.float32
          ) -> BlockNet:
  """The network ``spec`` describes, as every training here builds it: the search's
  candidates (``training.scorer``) and the final network (``training.final``) alike.

  Args:
    spec: the architecture.
    scan_blocks: blocks 1..N-1 of a stage under ``nn.scan`` (``NetworkSettings``).
    dtype: the computation dtype (``engine.resolve_dtype`` of the training's setting).
  """
  return BlockNet(spec, dtype=dtype, scan_blocks=scan_blocks)
