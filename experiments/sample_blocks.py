r"""Samples blocks from a config's search space and shows what the search would train.

Each block is printed as NSC text with its canonical key, depth, density, and the parameter
count and forward FLOPs of the network it would be stacked into. Use it to see what a
grammar and an ε produce before spending GPU hours on a search:

  python -m experiments.sample_blocks --config=configs/cifar.py:smoke
  python -m experiments.sample_blocks --config=configs/cifar.py --num=8 --epsilon=1.0
"""

from __future__ import annotations

from absl import app, flags
import jax
from ml_collections import config_flags
import numpy as np

from blockqnn_jax.models import architecture, cost
from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import space as space_lib
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.strategies import qlearning

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar.py:smoke',
                                          'Search config (file[:preset]).')
_NUM = flags.DEFINE_integer('num', 5, 'Blocks to sample.')
_EPSILON = flags.DEFINE_float('epsilon', 1.0, 'ε; with an untrained Q any ε samples '
                              'uniformly among legal actions.')


def main(argv):
  del argv
  settings = SearchSettings.from_config(_CONFIG.value)
  space = space_lib.build_space(settings.space)
  q = qlearning.init_q(space, settings.agent.q_init)
  trajectories = qlearning.sample_blocks(jax.random.PRNGKey(settings.seed), q, space,
                                         _EPSILON.value, _NUM.value)
  print(f'space: T={space.max_index}, {space.num_states} states, '
        f'up to {space.max_actions} actions per state')
  net = settings.network  # the network kind the config searches in (cifar or imagenet)
  print(f'network: {net.kind}, N={net.num_blocks}, F={net.features}, '
        f'{net.image_size}x{net.image_size} images, {net.num_classes} classes')
  for i, block in enumerate(space.decode_batch(np.asarray(trajectories.states))):
    spec = architecture.spec_for(block, net.kind, net.num_blocks, net.features,
                                 net.num_classes, (net.image_size, net.image_size, 3))
    print(f'\n[{i}] {block.to_text()}')
    print(f'    canonical {canonical.canonical_key(block)}')
    print(f'    layers {len(block.body)}  depth {block.depth()}  density {block.density():.2f}'
          f'  network params {cost.network_params(spec):,}'
          f'  MFLOPs/image {cost.network_flops(spec) / 1e6:,.1f}')


if __name__ == '__main__':
  app.run(main)
