"""The architecture of a network stacked from one block, as pure data (no Flax, no JAX).

``NetworkSpec`` says what ``networks.BlockNet`` builds and what ``cost`` counts: a stem, stages
of N copies of the block at widths F·m_s, and a classifier head (see ``networks`` for the
exact layers). ``cifar_spec`` / ``imagenet_spec`` are BlockQNN's two networks; ``spec_for``
builds the one a ``settings.NetworkSettings`` names for a dataset's image shape and classes.
``network_shape`` gives the widths and resolutions of every stage.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from blockqnn_jax.nsc import grammar as nsc


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
  """The architecture of a network built from one block (see the module docstring).

  Attributes:
    block: the NSC block every block position runs (validated structurally on creation).
    num_blocks: N, blocks per stage.
    features: F, width of the first stage.
    num_classes: classifier outputs.
    image_size: S, input height and width in pixels.
    in_channels: C_img, image channels.
    stage_multipliers: stage ``s`` is ``F * stage_multipliers[s]`` wide.
    stem_stride: stride of the stem conv.
    stem_pool: 3x3 stride-2 max pooling after the stem.
  """

  block: nsc.Block
  num_blocks: int
  features: int
  num_classes: int
  image_size: int
  in_channels: int = 3
  stage_multipliers: tuple[int, ...] = (1, 2, 4)
  stem_stride: int = 1
  stem_pool: bool = False

  def __post_init__(self):
    if not isinstance(self.block, nsc.Block):
      raise TypeError(f'block must be an nsc.Block, got {type(self.block).__name__}')
    nsc.validate_structure(self.block)
    object.__setattr__(self, 'stage_multipliers', tuple(int(m) for m in self.stage_multipliers))
    for name in ('num_blocks', 'features', 'num_classes', 'image_size', 'in_channels',
                 'stem_stride'):
      if int(getattr(self, name)) < 1:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
    if not self.stage_multipliers or min(self.stage_multipliers) < 1:
      raise ValueError(f'stage_multipliers must be positive and non-empty, got '
                       f'{self.stage_multipliers}')

  @property
  def shape(self) -> NetworkShape:
    """Widths and resolutions of the stem and every stage."""
    return network_shape(self)


def cifar_spec(block: nsc.Block, num_blocks: int, features: int, num_classes: int,
               image_size: int = 32, in_channels: int = 3) -> NetworkSpec:
  """BlockQNN's CIFAR network: stride-1 3x3 stem, stages of N blocks at F, 2F, 4F."""
  return NetworkSpec(block, num_blocks, features, num_classes, image_size, in_channels,
                     stage_multipliers=(1, 2, 4), stem_stride=1, stem_pool=False)


def imagenet_spec(block: nsc.Block, num_blocks: int, features: int, num_classes: int = 1000,
                  image_size: int = 224, in_channels: int = 3) -> NetworkSpec:
  """BlockQNN's ImageNet network: stride-2 3x3 stem, 3x3 stride-2 max pooling, then stages
  of N blocks at F, 2F, 4F, 8F (a 224 image reaches the stages at 56, 28, 14, 7)."""
  return NetworkSpec(block, num_blocks, features, num_classes, image_size, in_channels,
                     stage_multipliers=(1, 2, 4, 8), stem_stride=2, stem_pool=True)


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
  """Geometry of a whole network (see ``NetworkSpec``).

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


def network_shape(spec: NetworkSpec) -> NetworkShape:
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


NETWORK_KINDS = {'cifar': cifar_spec, 'imagenet': imagenet_spec}


def spec_for(block: nsc.Block, kind: str, num_blocks: int, features: int, num_classes: int,
             image_shape: Sequence[int]) -> NetworkSpec:
  """The ``kind`` ('cifar' or 'imagenet') network of ``block`` for images ``(H, W, C)``."""
  make = NETWORK_KINDS.get(kind)
  if make is None:
    raise ValueError(f'network.kind must be one of {sorted(NETWORK_KINDS)}, got {kind!r}')
  return make(block, num_blocks, features, num_classes, image_shape[0], image_shape[2])
