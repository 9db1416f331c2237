"""The found network as one standalone Flax file: every layer written out, jax and flax only.

``FLAX`` is what ``common.module_source`` needs to write a module defining ``Network``, the
network ``networks.BlockNet`` builds (float32), under the same variable names, so the
variables of a trained ``BlockNet`` load into it unchanged (``load_variables`` reads them
from the ``.npz`` that ``writer.write`` writes)."""

from __future__ import annotations

from blockqnn_jax.export import common
from blockqnn_jax.models.architecture import NetworkSpec
from blockqnn_jax.nsc import grammar as nsc

_PCC = '''
class PCC(nn.Module):
  """Pre-activation conv cell: ReLU, k x k conv (SAME, no bias), BatchNorm."""

  features: int
  kernel: int
  strides: int = 1
  activate: bool = True

  @nn.compact
  def __call__(self, x, train):
    if self.activate:
      x = nn.relu(x)
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.strides,
                padding='SAME', use_bias=False, name='conv')(x)
    return nn.BatchNorm(use_running_average=not train, momentum=BN_DECAY,
                        epsilon=BN_EPSILON, name='bn')(x)
'''

_LOAD = '''
def load_variables(path=None):
  """The trained variables ({'params': ..., 'batch_stats': ...}) from the .npz beside this
  file, for ``Network().apply(variables, images)``."""
  with np.load(path or WEIGHTS) as arrays:
    flat = {tuple(name.split('/')): jnp.asarray(arrays[name]) for name in arrays.files}
  return traverse_util.unflatten_dict(flat)
'''

_NORMALISE = '''
def normalise(pixels):
  """(B, H, W, C) pixels (0..255) as the network reads them."""
  return (jnp.asarray(pixels, jnp.float32) - jnp.asarray(MEAN)) / jnp.asarray(STD)
'''

_MAIN = '''
if __name__ == '__main__':
  import jax
  shape = (1, IMAGE_SIZE, IMAGE_SIZE, IN_CHANNELS)
  variables = Network().init(jax.random.key(0), jnp.zeros(shape), train=False)
  count = sum(x.size for x in jax.tree_util.tree_leaves(variables['params']))
  print(f'{BLOCK}: {count:,} parameters')
'''


def _layer_line(layer: nsc.Layer) -> str:
  """One statement of the block's body, as ``blocks.BlockModule`` runs the layer."""
  i, k, a = layer.index, layer.kernel, f'x{layer.pred1}'
  kind = layer.layer_type
  if kind is nsc.LayerType.CONV:
    return f"x{i} = PCC(f, {k}, name='layer{i}')({a}, train)"
  if kind in (nsc.LayerType.MAX_POOL, nsc.LayerType.AVG_POOL) and k == 1:
    return f'x{i} = {a}  # a 1x1 window'
  if kind is nsc.LayerType.MAX_POOL:
    return f"x{i} = nn.max_pool({a}, ({k}, {k}), strides=(1, 1), padding='SAME')"
  if kind is nsc.LayerType.AVG_POOL:
    return (f"x{i} = nn.avg_pool({a}, ({k}, {k}), strides=(1, 1), padding='SAME', "
            'count_include_pad=False)')
  if kind is nsc.LayerType.IDENTITY:
    return f'x{i} = {a}'
  if kind is nsc.LayerType.CONCAT:
    return f'x{i} = jnp.concatenate([{a}, x{layer.pred2}], axis=-1)'
  return f"x{i} = fit({a}, 'layer{i}_proj1') + fit(x{layer.pred2}, 'layer{i}_proj2')"


def _block_class(block: nsc.Block) -> list[str]:
  lines = [
      'class Block(nn.Module):',
      '  """The found block, layer by layer: (B, H, W, C) -> (B, H, W, features)."""',
      '',
      '  features: int',
      '',
      '  @nn.compact',
      '  def __call__(self, x0, train):',
      '    f = self.features',
      '',
      '    def fit(x, name):  # a tensor that is not f wide goes through a 1x1 PCC to f',
      '      return x if x.shape[-1] == f else PCC(f, 1, name=name)(x, train)',
      '',
  ]
  for layer in block.body:
    lines += common.commented(_layer_line(layer), f'{layer.to_text()}: {layer.describe()}')
  leaves = [f'x{i}' for i in block.leaves()]
  out = leaves[0] if len(leaves) == 1 else f'jnp.concatenate([{", ".join(leaves)}], axis=-1)'
  lines.append(f"    return fit({out}, 'out_proj')  # the output: the leaves "
               f"{', '.join(leaves)}")
  return lines


def _network_class(spec: NetworkSpec) -> list[str]:
  shape = spec.shape
  lines = [
      'class Network(nn.Module):',
      '  """Images (B, H, W, C), normalised as in training -> (B, classes) logits."""',
      '',
      f'  num_classes: int = {spec.num_classes}',
      '',
      '  @nn.compact',
      '  def __call__(self, images, train=False):',
      f"    x = PCC({shape.stem_features}, 3, strides={spec.stem_stride}, activate=False, "
      "name='stem')(images, train)",
  ]
  if spec.stem_pool:
    lines.append("    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')")
  for s, stage in enumerate(shape.stages):
    lines.append(f'    # stage {s}: {spec.num_blocks} block{"s" * (spec.num_blocks > 1)} at '
                 f'{stage.features} channels, {stage.height} x {stage.width}')
    if s:
      lines.append("    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')")
    for b in range(spec.num_blocks):
      lines.append(f"    x = Block({stage.features}, name='stage{s}_block{b}')(x, train)")
  lines += [
      '    x = jnp.mean(nn.relu(x), axis=(1, 2))  # ReLU, global average pooling',
      "    return nn.Dense(self.num_classes, name='head')(x)",
  ]
  return lines


FLAX = common.Dialect(
    framework='Flax (imports jax, flax and numpy only)', layout='NHWC',
    imports=('import os', '', 'import flax.linen as nn', 'from flax import traverse_util',
             'import jax.numpy as jnp', 'import numpy as np'),
    helpers=_PCC, normalise=_NORMALISE, loader='load_variables', load=_LOAD, main=_MAIN,
    block_class=_block_class, network_class=_network_class)
