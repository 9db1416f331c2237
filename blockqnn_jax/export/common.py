"""What the exported files share: ``module_source`` assembles one from a framework's
``Dialect`` (its imports, helpers and the writers of its block and network classes), with
the header and constants written here from the network's spec."""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Callable, Sequence

from blockqnn_jax.models import cost
from blockqnn_jax.models.architecture import NetworkSpec
from blockqnn_jax.nsc import grammar as nsc

WIDTH = 96  # the exported files' line length


def commented(code: str, comment: str, indent: int = 4) -> list[str]:
  """``code`` with ``comment`` after it, or above it where the line would run too long;
  a comment ``code`` has already is kept after the new one."""
  code, _, own = code.partition('  # ')
  comment = f'{comment}; {own}' if own else comment
  pad = ' ' * indent
  line = f'{pad}{code}  # {comment}'
  return [line] if len(line) <= WIDTH else [f'{pad}# {comment}', f'{pad}{code}']


def header(spec: NetworkSpec, framework: str, source: str, weights: str | None,
           layout: str, loader: str, normalised: bool) -> str:
  """The module docstring of an exported network: the block, the network, its cost."""
  shape = spec.shape
  widths = ', '.join(str(s.features) for s in shape.stages)
  layers = '\n'.join(f'  {layer.to_text():<12} {layer.describe()}'
                     for layer in spec.block.layers)
  stem = (f'a 3x3 stride-{spec.stem_stride} stem conv to {shape.stem_features} channels'
          + (', 3x3 stride-2 max pooling' if spec.stem_pool else ''))
  flops = cost.network_flops(spec)
  lines = [
      f'"""A BlockQNN network exported by blockqnn_jax: {framework}.',
      '',
      f'Block (NSC): {spec.block.to_text()}',
      layers,
  ]
  if source:
    lines.append(f'Source: {source}')
  network = (
      f'Network: {stem}; {len(shape.stages)} stages of {spec.num_blocks} '
      f'block{"s" * (spec.num_blocks > 1)} at {widths} channels, 2x2 stride-2 max pooling '
      'between stages; ReLU, global average pooling and a dense classifier. Every conv is '
      'pre-activated (ReLU, conv, BatchNorm); an add operand or a block output that is not '
      "the block's width first goes through a 1x1 one.")
  how = ' (normalise())' if normalised else ''
  lines += textwrap.wrap(network, WIDTH) + textwrap.wrap(
      f'Input: {layout} float images, {spec.image_size} x {spec.image_size} x '
      f'{spec.in_channels}, normalised per channel as in training{how}; output: '
      f'{spec.num_classes} logits.', WIDTH) + [
      f'Parameters: {cost.network_params(spec):,}; forward FLOPs per image: {flops:,} '
      f'({flops / 1e6:.2f} M).',
      (f"Weights: {weights} beside this file ({loader}())." if weights else
       'Weights: none exported; the network initialises afresh.'),
      '"""',
  ]
  return '\n'.join(lines)


def constants(spec: NetworkSpec, weights: str | None,
              normalisation: tuple[Sequence[float], Sequence[float]] | None) -> list[str]:
  """The module constants every exported file defines."""
  lines = [
      f'BLOCK = {spec.block.to_text()!r}',
      f'NUM_CLASSES = {spec.num_classes}',
      f'IMAGE_SIZE = {spec.image_size}',
      f'IN_CHANNELS = {spec.in_channels}',
      f'PARAMS = {cost.network_params(spec)}',
  ]
  if weights:
    lines.append(f'WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '
                 f'{weights!r})')
  if normalisation is not None:
    mean, std = (tuple(float(x) for x in v) for v in normalisation)  # exact: float32 values
    lines += ["# The training split's per-channel pixel mean and std (0..255): the network reads",
              '# (pixels - MEAN) / STD (normalise()).', f'MEAN = {mean}', f'STD = {std}']
  return lines


@dataclasses.dataclass(frozen=True)
class Dialect:
  """What makes an exported module Flax's or PyTorch's, beside its block and network.

  Attributes:
    framework: what the header calls it.
    layout: the images' layout, 'NHWC' or 'NCHW'.
    imports: the module's import lines.
    helpers: the code before the block (the conv cell and what it needs).
    normalise: ``normalise(pixels)``, written when the data's statistics are known.
    loader: the name of the function ``load`` defines.
    load: the function that reads the weights beside the module.
    main: the ``__main__`` part.
    block_class: the ``Block`` class of an NSC block, as lines.
    network_class: the ``Network`` class of a spec, as lines.
  """

  framework: str
  layout: str
  imports: tuple[str, ...]
  helpers: str
  normalise: str
  loader: str
  load: str
  main: str
  block_class: Callable[[nsc.Block], list[str]]
  network_class: Callable[[NetworkSpec], list[str]]


def module_source(spec: NetworkSpec, dialect: Dialect, *, bn_momentum: float = 0.9,
                  bn_epsilon: float = 1e-5, weights: str | None = None, source: str = '',
                  normalisation: tuple[Sequence[float], Sequence[float]] | None = None
                  ) -> str:
  """The text of a standalone module in ``dialect`` defining ``spec``'s network as
  ``Network``: header, imports, constants, helpers, the block and network classes, and
  what the weights and statistics add.

  Args:
    spec: the network.
    dialect: the framework's (``flax_file.FLAX``, ``torch_file.TORCH``).
    bn_momentum: BatchNorm's running-average decay as Flax counts it (``BlockNet``'s).
    bn_epsilon: BatchNorm's variance epsilon.
    weights: the file name of the trained weights beside the module, or None.
    source: where the block came from, for the header.
    normalisation: the training split's per-channel pixel mean and std, for ``normalise``.
  """
  normalised = normalisation is not None
  parts = [
      header(spec, dialect.framework, source, weights, dialect.layout, dialect.loader,
             normalised), '',
      *dialect.imports, '',
      *constants(spec, weights, normalisation),
      f"BN_DECAY = {bn_momentum!r}  # of the running statistics (PyTorch's momentum is 1 - it)",
      f'BN_EPSILON = {bn_epsilon!r}', '', '',
      dialect.helpers.strip('\n'), '', '',
      *dialect.block_class(spec.block), '', '',
      *dialect.network_class(spec), '',
  ]
  if normalised:
    parts += ['', dialect.normalise.strip('\n'), '']
  if weights is not None:
    parts += ['', dialect.load.strip('\n'), '']
  parts += ['', dialect.main.strip('\n')]
  return '\n'.join(parts) + '\n'
