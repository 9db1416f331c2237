"""The found network as one standalone PyTorch file: every layer written out, torch only.

``TORCH`` is what ``common.module_source`` needs to write a module defining ``Network``, the
network ``networks.BlockNet`` builds, in PyTorch's NCHW layout: XLA's SAME padding written
out (``pad_same``), BatchNorm's running-average decay as PyTorch's momentum (1 - decay).
``weights.torch_state_dict`` gives trained Flax variables the ``state_dict``'s names and
layouts; the module's ``load_weights`` reads them from the ``.npz`` beside it, so writing
the file needs no PyTorch.
"""

from __future__ import annotations

from blockqnn_jax.export import common
from blockqnn_jax.models.architecture import NetworkSpec
from blockqnn_jax.nsc import grammar as nsc

_HELPERS = '''
def pad_same(x, kernel, stride, value=0.0):
  """XLA's (and TensorFlow's) SAME padding: output ceil(size / stride), the odd pixel of
  padding at the bottom and right."""
  pads = []
  for size in (x.shape[3], x.shape[2]):  # F.pad takes the last dimension first
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    pads += [total // 2, total - total // 2]
  return F.pad(x, pads, value=value) if any(pads) else x


def max_pool_same(x, kernel, stride):
  return F.max_pool2d(pad_same(x, kernel, stride, float('-inf')), kernel, stride)


class PCC(nn.Module):
  """Pre-activation conv cell: ReLU, k x k conv (SAME, no bias), BatchNorm."""

  def __init__(self, in_channels, features, kernel, stride=1, activate=True):
    super().__init__()
    self.kernel, self.stride, self.activate = kernel, stride, activate
    self.conv = nn.Conv2d(in_channels, features, kernel, stride=stride, bias=False)
    self.bn = nn.BatchNorm2d(features, eps=BN_EPSILON, momentum=1 - BN_DECAY)

  def forward(self, x):
    if self.activate:
      x = F.relu(x)
    return self.bn(self.conv(pad_same(x, self.kernel, self.stride)))


def projection(width, features):
  """The 1x1 PCC that makes a tensor ``features`` wide, or None when it already is."""
  return None if width == features else PCC(width, features, 1)


def fit(projection, x):
  return x if projection is None else projection(x)
'''

_LOAD = '''
def load_weights(path=None):
  """The trained ``state_dict`` from the .npz beside this file, for
  ``Network().load_state_dict(load_weights())``."""
  with np.load(path or WEIGHTS) as arrays:
    return {name: torch.from_numpy(arrays[name]) for name in arrays.files}
'''

_NORMALISE = '''
def normalise(pixels):
  """(B, C, H, W) pixels (0..255) as the network reads them."""
  shape = (1, -1, 1, 1)
  return (torch.as_tensor(pixels, dtype=torch.float32) - torch.tensor(MEAN).view(shape)) / (
      torch.tensor(STD).view(shape))
'''

_MAIN = '''
if __name__ == '__main__':
  count = sum(p.numel() for p in Network().parameters())
  print(f'{BLOCK}: {count:,} parameters')
'''


def _layer_lines(layer: nsc.Layer) -> tuple[list[str], str]:
  """The constructor's lines (modules and the node's width) and the forward statement of
  one layer, as ``blocks.BlockModule`` runs it."""
  i, k, p = layer.index, layer.kernel, layer.pred1
  kind = layer.layer_type
  if kind is nsc.LayerType.CONV:
    return [f'self.layer{i} = PCC(w{p}, f, {k})', f'w{i} = f'], f'x{i} = self.layer{i}(x{p})'
  if kind is nsc.LayerType.ADD:
    q = layer.pred2
    return ([f'self.layer{i}_proj1 = projection(w{p}, f)',
             f'self.layer{i}_proj2 = projection(w{q}, f)', f'w{i} = f'],
            f'x{i} = fit(self.layer{i}_proj1, x{p}) + fit(self.layer{i}_proj2, x{q})')
  if kind is nsc.LayerType.CONCAT:
    q = layer.pred2
    return [f'w{i} = w{p} + w{q}'], f'x{i} = torch.cat([x{p}, x{q}], dim=1)'
  width = [f'w{i} = w{p}']
  if kind in (nsc.LayerType.MAX_POOL, nsc.LayerType.AVG_POOL) and k == 1:
    return width, f'x{i} = x{p}  # a 1x1 window'
  if kind is nsc.LayerType.MAX_POOL:  # stride 1, odd k: SAME is k // 2 on every side
    return width, f'x{i} = F.max_pool2d(x{p}, {k}, stride=1, padding={k // 2})'
  if kind is nsc.LayerType.AVG_POOL:
    return width, (f'x{i} = F.avg_pool2d(x{p}, {k}, stride=1, padding={k // 2}, '
                   'count_include_pad=False)')
  return width, f'x{i} = x{p}'  # identity


def _block_class(block: nsc.Block) -> list[str]:
  init = [
      'class Block(nn.Module):',
      '  """The found block, layer by layer: (B, C, H, W) -> (B, features, H, W)."""',
      '',
      '  def __init__(self, in_channels, features):',
      '    super().__init__()',
      '    f = features',
      '    w0 = in_channels  # wN: the width of node N',
  ]
  forward = ['', '  def forward(self, x0):']
  for layer in block.body:
    note = f'{layer.to_text()}: {layer.describe()}'
    made, statement = _layer_lines(layer)
    init += common.commented(made[0], note) + [f'    {line}' for line in made[1:]]
    forward += common.commented(statement, note)
  leaves = [f'x{i}' for i in block.leaves()]
  widths = ' + '.join(f'w{i}' for i in block.leaves())
  out = leaves[0] if len(leaves) == 1 else f'torch.cat([{", ".join(leaves)}], dim=1)'
  init.append(f'    self.out_proj = projection({widths}, f)  # the output: '
              f'the leaves {", ".join(leaves)}')
  forward.append(f'    return fit(self.out_proj, {out})')
  return init + forward


def _network_class(spec: NetworkSpec) -> list[str]:
  shape = spec.shape
  init = [
      'class Network(nn.Module):',
      '  """Images (B, C, H, W), normalised as in training -> (B, classes) logits."""',
      '',
      f'  def __init__(self, num_classes={spec.num_classes}):',
      '    super().__init__()',
      f'    self.stem = PCC(IN_CHANNELS, {shape.stem_features}, 3, stride={spec.stem_stride}, '
      'activate=False)',
  ]
  forward = ['', '  def forward(self, images):', '    x = self.stem(images)']
  if spec.stem_pool:
    forward.append('    x = max_pool_same(x, 3, 2)')
  for s, stage in enumerate(shape.stages):
    blocks = f'{spec.num_blocks} block{"s" * (spec.num_blocks > 1)}'
    comment = f'    # stage {s}: {blocks} at {stage.features} channels, ' \
              f'{stage.height} x {stage.width}'
    init.append(comment)
    forward.append(comment)
    if s:
      forward.append('    x = max_pool_same(x, 2, 2)')
    for b in range(spec.num_blocks):
      width = stage.in_features if b == 0 else stage.features
      init.append(f'    self.stage{s}_block{b} = Block({width}, {stage.features})')
      forward.append(f'    x = self.stage{s}_block{b}(x)')
  init.append(f'    self.head = nn.Linear({shape.stages[-1].features}, num_classes)')
  forward += [
      '    x = F.relu(x).mean(dim=(2, 3))  # ReLU, global average pooling',
      '    return self.head(x)',
  ]
  return init + forward


TORCH = common.Dialect(
    framework='PyTorch (imports torch and numpy only)', layout='NCHW',
    imports=('import os', '', 'import numpy as np', 'import torch', 'from torch import nn',
             'from torch.nn import functional as F'),
    helpers=_HELPERS, normalise=_NORMALISE, loader='load_weights', load=_LOAD, main=_MAIN,
    block_class=_block_class, network_class=_network_class)
