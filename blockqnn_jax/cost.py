"""Analytic parameter and FLOP counts of blocks and networks, in pure Python.

The counts follow the generator's semantics exactly (``blocks.BlockModule``,
``networks.BlockNet``), which are fixed here once:

* **conv** ``k``: a pre-activation conv cell (PCC): ReLU -> ``k x k`` convolution, stride 1,
  SAME padding, no bias, ``F`` output channels -> BatchNorm (a learned scale and bias per
  channel; running mean and variance are state, not parameters). Output width ``F``.
* **max / avg pooling** ``k``: stride 1, SAME padding (average pooling divides by the
  number of unpadded taps); ``k = 1`` is an identity. Width unchanged.
* **identity**: width unchanged. **concat**: channel concatenation, width ``w1 + w2``.
* **add**: sums ``F``-wide tensors; an operand whose width is not ``F`` first goes through a
  1x1 PCC projection to ``F``. Output width ``F``.
* **block output**: the channel concatenation of the leaves in index order; when its width
  is not ``F``, a 1x1 PCC projection to ``F``. So a block always outputs ``F`` channels,
  whatever its input width ``C_in``.

Units:

* **params** are trainable parameters: convolution kernels, BatchNorm scales and biases,
  and the classifier's kernel and bias. BatchNorm running statistics are not counted.
* **FLOPs** are ``2 x`` the multiply-accumulates of the convolutions (layers and
  projections, ``k * k * C_in * C_out`` per output pixel, taps over the zero padding
  included) and of the dense classifier, per image, forward pass. Elementwise ops (ReLU,
  BatchNorm, add), pooling and concatenation are not counted.

Everything is computed from frozen dataclasses; this module imports no JAX, so the agent
can price blocks without touching an accelerator.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from blockqnn_jax import nsc

if TYPE_CHECKING:  # networks imports Flax; the counts only read the spec's fields.
  from blockqnn_jax import networks


@dataclasses.dataclass(frozen=True)
class ConvCost:
  """One convolution a block runs: a PCC (ReLU -> conv k x k, stride 1, no bias -> BN).

  Attributes:
    name: the Flax submodule name in ``blocks.BlockModule`` (``layer3``, ``layer4_proj1``,
      ``out_proj``).
    kernel: kernel size k (the window is k x k).
    in_features: input channels.
    out_features: output channels.
  """

  name: str
  kernel: int
  in_features: int
  out_features: int

  @property
  def params(self) -> int:
    """Kernel ``k*k*C_in*C_out`` plus BatchNorm scale and bias ``2*C_out``."""
    return self.kernel * self.kernel * self.in_features * self.out_features + 2 * self.out_features

  @property
  def macs_per_pixel(self) -> int:
    """Multiply-accumulates per output pixel (stride 1, so per input pixel too)."""
    return self.kernel * self.kernel * self.in_features * self.out_features


def buildable(block: nsc.Block) -> nsc.Block:
  """Checks that ``block`` is a structurally valid NSC; returns it or raises ``NSCError``.

  The check is ``nsc.validate`` under the loosest grammar the block could belong to (any
  positive kernel size, any index): the generator can build any such block, while which
  kernels and how many layers are allowed is the search space's business.
  """
  def kernels(layer_type: nsc.LayerType) -> tuple[int, ...]:
    # The block's own positive kernels (1 when it has none) make its kernels legal.
    used = {l.kernel for l in block.layers if l.type == layer_type and l.kernel >= 1}
    return tuple(sorted(used)) or (1,)

  grammar = nsc.Grammar(max_index=max(2, len(block.layers)),
                        conv_kernels=kernels(nsc.LayerType.CONV),
                        max_pool_kernels=kernels(nsc.LayerType.MAX_POOL),
                        avg_pool_kernels=kernels(nsc.LayerType.AVG_POOL))
  try:
    return nsc.validate(block, grammar)
  except nsc.NSCError as e:
    error = nsc.NSCError(f'cannot build block {block.to_text()!r}: {e}', rule=e.rule)
    error.layer = e.layer
    raise error from e


def _check_widths(in_features: int, features: int) -> None:
  if in_features < 1 or features < 1:
    raise ValueError(f'widths must be positive, got in_features={in_features}, '
                     f'features={features}')


def layer_widths(block: nsc.Block, in_features: int, features: int) -> dict[int, int]:
  """Channel width of every node of the block.

  Args:
    block: a valid NSC block.
    in_features: C_in, the width of the block input.
    features: F, the block's width.

  Returns:
    ``{node: channels}``: node 0 is the input (``in_features``), then every non-terminal
    layer index (see the module docstring for each type's rule).
  """
  _check_widths(in_features, features)
  widths = {0: in_features}
  for layer in block.body:
    kind = layer.layer_type
    if kind in (nsc.LayerType.CONV, nsc.LayerType.ADD):
      widths[layer.index] = features
    elif kind is nsc.LayerType.CONCAT:
      widths[layer.index] = widths[layer.pred1] + widths[layer.pred2]
    else:  # pooling and identity keep their input's width
      widths[layer.index] = widths[layer.pred1]
  return widths


def output_width(block: nsc.Block, in_features: int, features: int) -> int:
  """Width of the concatenated leaves, before any output projection."""
  widths = layer_widths(block, in_features, features)
  return sum(widths[i] for i in block.leaves())


def block_convs(block: nsc.Block, in_features: int, features: int) -> tuple[ConvCost, ...]:
  """Every convolution the block runs, in execution order: layers and 1x1 projections.

  This is the single statement of which projections exist; the Flax builder creates
  exactly these submodules, under these names.

  Args:
    block: a valid NSC block.
    in_features: C_in, the width of the block input.
    features: F, the block's (and its output's) width.

  Returns:
    ``ConvCost`` per convolution: ``layer{i}`` for a conv layer, ``layer{i}_proj{j}`` for
    the projection of operand ``j`` (1 or 2) of add layer ``i``, ``out_proj`` for the
    output projection.
  """
  buildable(block)
  widths = layer_widths(block, in_features, features)
  convs = []
  for layer in block.body:
    if layer.type == nsc.LayerType.CONV:
      convs.append(ConvCost(f'layer{layer.index}', layer.kernel, widths[layer.pred1], features))
    elif layer.type == nsc.LayerType.ADD:
      for j, pred in enumerate(layer.preds, start=1):
        if widths[pred] != features:
          convs.append(ConvCost(f'layer{layer.index}_proj{j}', 1, widths[pred], features))
  out = sum(widths[i] for i in block.leaves())
  if out != features:
    convs.append(ConvCost('out_proj', 1, out, features))
  return tuple(convs)


def block_params(block: nsc.Block, in_features: int, features: int) -> int:
  """Trainable parameters of one block (conv kernels, BN scales and biases).

  Args:
    block: a valid NSC block.
    in_features: C_in, the width of the block input.
    features: F, the block's width.
  """
  return sum(c.params for c in block_convs(block, in_features, features))


def block_flops(block: nsc.Block, in_features: int, features: int, height: int,
                width: int) -> int:
  """Forward FLOPs of one block on one ``height x width`` image (2 x conv MACs).

  Args:
    block: a valid NSC block.
    in_features: C_in, the width of the block input.
    features: F, the block's width.
    height: H, input (and output) height in pixels.
    width: W, input (and output) width in pixels.
  """
  macs = sum(c.macs_per_pixel for c in block_convs(block, in_features, features))
  return 2 * macs * height * width


def pooled_size(size: int, stride: int) -> int:
  """Spatial size after a stride-``stride`` SAME-padded conv or pooling: ``ceil(size/s)``."""
  return -(-size // stride)


@dataclasses.dataclass(frozen=True)
class StageShape:
  """Geometry of one stage of a network: N blocks at one width and resolution.

  Attributes:
    in_features: input width of the stage's first block (the previous stage's width, or
      the stem's for the first stage).
    features: width F_s of every block of the stage.
    height: H_s, pixels.
    width: W_s, pixels.
  """

  in_features: int
  features: int
  height: int
  width: int


@dataclasses.dataclass(frozen=True)
class NetworkShape:
  """Geometry of a whole network (see ``networks.NetworkSpec``).

  Attributes:
    stem_features: output width of the stem conv.
    stem_height: H after the stem conv (before the optional stem pooling).
    stem_width: W after the stem conv.
    stages: one ``StageShape`` per stage, in order.
  """

  stem_features: int
  stem_height: int
  stem_width: int
  stages: tuple[StageShape, ...]


def network_shape(spec: networks.NetworkSpec) -> NetworkShape:
  """Widths and resolutions of the stem and stages of ``spec``.

  Stem: 3x3 conv, stride ``stem_stride``, SAME; then, if ``stem_pool``, 3x3 stride-2 SAME
  max pooling. Between stages: 2x2 stride-2 SAME max pooling. Stage ``s`` has width
  ``features * stage_multipliers[s]``.
  """
  widths = [spec.features * m for m in spec.stage_multipliers]
  stem_h = pooled_size(spec.image_size, spec.stem_stride)
  h = pooled_size(stem_h, 2) if spec.stem_pool else stem_h
  stages, in_features = [], widths[0]
  for s, features in enumerate(widths):
    if s:
      h = pooled_size(h, 2)
    stages.append(StageShape(in_features, features, h, h))
    in_features = features
  return NetworkShape(widths[0], stem_h, stem_h, tuple(stages))


def network_params(spec: networks.NetworkSpec) -> int:
  """Trainable parameters of the network ``spec`` describes.

  Stem conv kernel ``9 * C_img * F`` and its BN ``2 * F``; every block (the first of a
  stage at its input width); the classifier ``C_last * classes + classes``.
  """
  shape = network_shape(spec)
  total = 9 * spec.in_channels * shape.stem_features + 2 * shape.stem_features
  for stage in shape.stages:
    total += block_params(spec.block, stage.in_features, stage.features)
    total += (spec.num_blocks - 1) * block_params(spec.block, stage.features, stage.features)
  last = shape.stages[-1].features
  return total + last * spec.num_classes + spec.num_classes


def network_flops(spec: networks.NetworkSpec) -> int:
  """Forward FLOPs per image of the network ``spec`` describes (2 x MACs).

  Stem conv at its output resolution, every block at its stage's resolution, and the
  classifier; pooling, BN, ReLU and the global average are not counted.
  """
  shape = network_shape(spec)
  total = 2 * 9 * spec.in_channels * shape.stem_features * shape.stem_height * shape.stem_width
  for stage in shape.stages:
    h, w = stage.height, stage.width
    total += block_flops(spec.block, stage.in_features, stage.features, h, w)
    total += (spec.num_blocks - 1) * block_flops(spec.block, stage.features, stage.features,
                                                 h, w)
  last = shape.stages[-1].features
  return total + 2 * last * spec.num_classes
