"""BlockQNN search on CIFAR: the paper's settings, and smaller presets of the same file.

  --config=configs/cifar.py          the paper's search
  --config=configs/cifar.py:smoke    the same program sized for a 2-core CPU (bundled digits)
  --config=configs/cifar.py:cpu      the strategies compared on real images, on a 2-core CPU
  --config=configs/cifar.py:gpu      the paper's search network and training on one GPU,
                                     the fast agent sized to 1,000 candidates
  --config.space.max_index=11        any field can be overridden on the command line

The paper's values are the defaults of ``blockqnn_jax.settings`` (``SearchSettings``), each
written there once with what it means and how certain it is ([paper], [consistent],
[reconstructed]); this file starts from them and a preset states only what it changes.
``SearchSettings.from_config(config)`` builds and checks the settings once.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from blockqnn_jax.settings import FAST_AGENT, FAST_CONFIRM, SearchSettings


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config of ``preset``: '' or 'paper' (default), 'smoke', 'cpu' or 'gpu'."""
  preset = preset or 'paper'
  config = SearchSettings.default_config()  # the paper's search
  config.preset = preset
  if preset == 'smoke':
    config.space.max_index = 6
    config.agent.replay_size = 16
    config.agent.memory_capacity = 1024
    config.search.blocks_per_iteration = 4
    config.search.epsilon_schedule = ((1.0, 3), (0.5, 2), (0.1, 2))
    config.network.num_blocks = 1
    config.network.features = 8
    config.network.num_classes = 10
    # scikit-learn's bundled 8x8 digits: runs offline on any machine. For real images pass
    # --config.data.source=npz --config.data.path=PATH/cifar10-exact-subset.npz
    config.data.source = 'digits'
    config.data.name = ''  # a label only; derived from the source or file name
    config.data.validation_size = 200
    config.data.max_train = 1000  # CPU-sized also when pointed at CIFAR (~150 img/s here)
    config.train.epochs = 3
    config.train.batch_size = 64
    config.train.eval_batch_size = 200
  elif preset == 'cpu':
    # The strategies compared on the real space at a size a 2-core CPU runs: a small space,
    # a budget of distinct candidates on the CIFAR-10 exact subset
    # (--config.data.path=PATH/cifar10-exact-subset.npz), a tiny network trained briefly.
    # The agent is the fast one (beyond the paper, settings.FAST_AGENT); every strategy
    # (--config.search.strategy=random, ...) runs on the same budget and hold-out.
    config.space.max_index = 5
    config.space.conv_kernels = (1, 3)
    config.agent.update(dataclasses.asdict(FAST_AGENT))
    config.search.blocks_per_iteration = 8
    # A budget of 100 distinct candidates: the fast agent's first 10% random (FAST_SCHEDULE's
    # proportions, stretched over the budget); the schedule only has to offer enough
    # proposals (50 x 8, four times the budget, as Study does).
    config.search.epsilon_schedule = ((1.0, 5), (0.0, 45))
    config.search.budget = 100
    # A new block that looks as good as the kept one is trained again (up to 3 evaluations,
    # each one of the 100) before the agent learns from it and before it is kept.
    config.search.confirm = FAST_CONFIRM
    config.network.num_blocks = 1
    config.network.features = 8
    config.network.num_classes = 10
    config.data.source = 'npz'
    config.data.name = 'cifar10'
    config.data.validation_size = 1000
    # Every one of the subset's 5,085 training images, 1,000 of them held out, one epoch at
    # F = 8: Kendall tau 0.57 over 40 blocks against 50,000 images x 2 epochs, where 2,000
    # images gave 0.18 (benchmarks.fidelity, results/README.md). Two epochs (2.3x the cost)
    # gave 0.58 and F = 16 (3.5x) 0.59: not worth it.
    config.data.max_train = 0
    # One hold-out for every strategy and seed, so rewards compare across searches and
    # searches share an evaluation cache.
    config.data.holdout_seed = 0
    config.train.epochs = 1
    config.train.batch_size = 64
    config.train.eval_batch_size = 500
  elif preset == 'gpu':
    # One GPU: the paper's search (space, network N = 2 at F = 32, 12 epochs of Adam, batch
    # 256, CIFAR-100 from TFDS, 64 blocks per iteration) with the fast agent (beyond the
    # paper, as in the cpu preset) sized to a budget of 1,000 distinct candidates: a random
    # phase of the first 100, then mutations of the greedy block. The budget ends the
    # search; the schedule only has to offer enough proposals (30 x 64).
    config.agent.update(dataclasses.asdict(FAST_AGENT))
    config.search.epsilon_schedule = ((1.0, 3), (0.0, 27))
    config.search.budget = 1000
    config.search.confirm = FAST_CONFIRM
  elif preset != 'paper':
    raise ValueError(f'unknown preset {preset!r}: use "paper", "smoke", "cpu" or "gpu"')
  return config
