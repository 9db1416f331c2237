"""Flax Linen generator of one NSC block: ``BlockModule`` and its conv cell ``PCC``.

Tensors are NHWC. A block maps ``(B, H, W, C_in)`` to ``(B, H, W, F)``: every layer has
stride 1 and SAME padding, so the resolution never changes inside a block. Layer semantics
(the same rule ``cost`` counts parameters and FLOPs with):

* **conv** ``k``: a pre-activation conv cell (``PCC``): ReLU -> ``k x k`` conv, stride 1,
  SAME, no bias, ``F`` channels -> BatchNorm. Output width ``F``.
* **max / avg pooling** ``k``: stride 1, SAME padding, ``k x k`` window; average pooling
  divides by the number of unpadded taps (``count_include_pad=False``). ``k = 1`` is an
  identity. Width unchanged.
* **identity**: the tensor itself. **concat**: channel concatenation, width ``w1 + w2``.
* **add**: sum of two ``F``-wide tensors; an operand of another width first goes through a
  1x1 ``PCC`` projection to ``F``. Output width ``F``.
* **output**: the channel concatenation of the leaves in index order, projected to ``F`` by
  a 1x1 ``PCC`` when it is not ``F`` wide.

Submodules are named as ``cost.block_convs`` lists them: ``layer{i}`` (conv layer ``i``),
``layer{i}_proj{j}`` (projection of operand ``j`` of add ``i``) and ``out_proj``; each has
``conv`` (kernel ``(k, k, C_in, F)``) and ``bn`` (``scale``, ``bias``; ``mean``, ``var`` in
``batch_stats``).

``dtype`` is the computation dtype (activations; e.g. bfloat16), ``param_dtype`` that of
the parameters (float32 by default, so bf16 training keeps fp32 master weights).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from blockqnn_jax.models import cost, initializers
from blockqnn_jax.nsc import grammar as nsc

Dtype = Any


class PCC(nn.Module):
  """Pre-activation conv cell: ReLU -> k x k conv (stride 1, SAME, no bias) -> BatchNorm.

  Attributes:
    features: output channels.
    kernel: window size k (k x k).
    strides: conv stride (1 inside blocks).
    dtype: computation dtype.
    param_dtype: parameter dtype.
    bn_momentum: decay of BatchNorm's running averages.
    bn_epsilon: added to the variance before its inverse square root.
    activate: apply the leading ReLU (False for a stem conv reading images).
  """

  features: int
  kernel: int = 1
  strides: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  activate: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """``(B, H, W, C) -> (B, ceil(H / strides), ceil(W / strides), features)``.

    Args:
      x: NHWC input.
      train: normalise with batch statistics and update the running ones (needs
        ``mutable=['batch_stats']``); otherwise use the running statistics.
    """
    x = jnp.asarray(x, self.dtype)
    if self.activate:
      x = nn.relu(x)
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.strides,
                padding='SAME', use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=initializers.lecun_normal(),
                name='conv')(x)
    return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                        epsilon=self.bn_epsilon, dtype=self.dtype,
                        param_dtype=self.param_dtype, scale_init=initializers.ones,
                        bias_init=initializers.zeros, name='bn')(x)


class BlockModule(nn.Module):
  """One NSC block as a Flax module: ``(B, H, W, C_in) -> (B, H, W, features)``.

  Attributes:
    block: a structurally valid NSC block (checked on construction, ``nsc.NSCError``
      otherwise; see ``nsc.validate_structure``).
    features: F, the width of conv layers, adds and the block output.
    dtype: computation dtype; the input is cast to it.
    param_dtype: parameter dtype.
    bn_momentum: decay of BatchNorm's running averages.
    bn_epsilon: BatchNorm's variance epsilon.
  """

  block: nsc.Block
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  def __post_init__(self):
    nsc.validate_structure(self.block)  # fail where the module is built, not deep inside init
    super().__post_init__()

  def _pcc(self, name: str, kernel: int, x: jax.Array, train: bool) -> jax.Array:
    return PCC(self.features, kernel, dtype=self.dtype, param_dtype=self.param_dtype,
               bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, name=name)(x, train)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Runs the block.

    Args:
      x: ``(B, H, W, C_in)`` input, any ``C_in``.
      train: BatchNorm mode (batch statistics, updating ``batch_stats``) or inference.

    Returns:
      ``(B, H, W, features)`` in ``dtype``.
    """
    f = self.features
    convs = {c.name: c for c in cost.block_convs(self.block, x.shape[-1], f)}
    nodes = {0: jnp.asarray(x, self.dtype)}
    for layer in self.block.body:
      kind, k = layer.layer_type, layer.kernel
      a = nodes[layer.pred1]
      if kind is nsc.LayerType.CONV:
        out = self._pcc(f'layer{layer.index}', k, a, train)
      elif kind is nsc.LayerType.MAX_POOL:
        out = a if k == 1 else nn.max_pool(a, (k, k), strides=(1, 1), padding='SAME')
      elif kind is nsc.LayerType.AVG_POOL:
        out = a if k == 1 else nn.avg_pool(a, (k, k), strides=(1, 1), padding='SAME',
                                           count_include_pad=False)
      elif kind is nsc.LayerType.IDENTITY:
        out = a
      elif kind is nsc.LayerType.CONCAT:
        out = jnp.concatenate([a, nodes[layer.pred2]], axis=-1)
      else:  # ADD: project each operand that is not F wide (cost.block_convs names them)
        operands = []
        for j, pred in enumerate(layer.preds, start=1):
          name = f'layer{layer.index}_proj{j}'
          v = nodes[pred]
          operands.append(self._pcc(name, 1, v, train) if name in convs else v)
        out = operands[0] + operands[1]
      nodes[layer.index] = out
    leaves = [nodes[i] for i in self.block.leaves()]
    y = leaves[0] if len(leaves) == 1 else jnp.concatenate(leaves, axis=-1)
    if 'out_proj' in convs:
      y = self._pcc('out_proj', 1, y, train)
    return y
