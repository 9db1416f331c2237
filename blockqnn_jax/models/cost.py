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

from blockqnn_jax.models.architecture import NetworkSpec, network_shape
from blockqnn_jax.nsc import grammar as nsc


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
  nsc.validate_structure(block)
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


def network_params(spec: NetworkSpec) -> int:
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


def network_flops(spec: NetworkSpec) -> int:
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
