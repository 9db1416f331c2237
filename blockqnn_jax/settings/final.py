"""A final retraining's settings (``FinalSettings``)."""

from __future__ import annotations

import dataclasses

from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.base import (
  COMPUTE_DTYPES,
  DATA_SOURCES,
  PRNG_IMPLS,
  FromConfig,
  check,
  one_of,
)
from blockqnn_jax.settings.search import DataSettings, NetworkSettings

# -- the final retraining (``training.final``) -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class FinalTrainConfig:
  """How the final network is trained (``training.final``). Hashable: its compiled programs
  are cached by it.

  The defaults are a standard long CIFAR schedule, not the paper's exact one (which it does
  not fully give) [reconstructed]: SGD with Nesterov momentum 0.9, lr 0.1 warmed up linearly
  over 5 epochs then cosine-decayed to 0, L2 weight decay 5e-4 on conv and dense kernels
  only, batch 128, 300 epochs, pad-4 crop + flip; bf16 compute on GPU/TPU.

  Attributes:
    epochs: passes over the training split.
    batch_size: images per step; each epoch runs ``N_train // batch_size`` steps over a fresh
      permutation (the remainder is dropped, a different one each epoch).
    learning_rate: peak learning rate of SGD.
    warmup_epochs: linear warm-up from 0 to ``learning_rate`` (fractions allowed), then cosine
      decay to 0 at the last step.
    momentum: SGD momentum.
    nesterov: Nesterov momentum.
    weight_decay: L2 penalty coefficient on conv and dense kernels (not BatchNorm, not biases),
      added to the gradient before momentum.
    label_smoothing: mass spread uniformly over the classes (0: plain cross-entropy).
    augment: random crop (reflect padding) and horizontal flip of every training batch.
    crop_padding: padding in pixels of the random crop.
    compute_dtype: 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32' or 'bfloat16';
      parameters, optimiser state, head and loss stay float32.
    prng_impl: PRNG of initialisation, shuffling and augmentation ('rbg' compiles far faster
      than 'threefry2x32' on CPU, see ``TrainConfig.prng_impl``).
    eval_batch_size: images per evaluation batch.
    eval_every_epochs: validation accuracy every this many epochs (if a validation split
      exists).
    checkpoint_every_epochs: a checkpoint every this many epochs (and at the end of a run).
  """

  epochs: int = 300
  batch_size: int = 128
  learning_rate: float = 0.1
  warmup_epochs: float = 5.0
  momentum: float = 0.9
  nesterov: bool = True
  weight_decay: float = 5e-4
  label_smoothing: float = 0.0
  augment: bool = True
  crop_padding: int = 4
  compute_dtype: str = 'auto'
  prng_impl: str = 'rbg'
  eval_batch_size: int = 1000
  eval_every_epochs: int = 1
  checkpoint_every_epochs: int = 5

  def __post_init__(self):
    for name in ('epochs', 'batch_size', 'eval_batch_size', 'eval_every_epochs',
                 'checkpoint_every_epochs'):
      check(int(getattr(self, name)) >= 1, f'train.{name}', 'must be positive',
            getattr(self, name))
    check(0 <= self.warmup_epochs < self.epochs, 'train.warmup_epochs',
          f'must be in [0, epochs={self.epochs})', self.warmup_epochs)
    check(0 <= self.label_smoothing < 1, 'train.label_smoothing', 'must be in [0, 1)',
          self.label_smoothing)
    one_of(self.compute_dtype, COMPUTE_DTYPES, 'train.compute_dtype')
    one_of(self.prng_impl, PRNG_IMPLS, 'train.prng_impl')


@dataclasses.dataclass(frozen=True)
class FinalNetworkSettings(NetworkSettings):
  """The final network: the search's network stacked deeper (N = 4 per stage).

  ``num_classes`` and ``image_size`` are unused: the data always says them here. F = 32 is
  [reconstructed]: the paper gives the depth, not the width of its CIFAR networks;
  reimplementations use 32-64.
  """

  num_blocks: int = 4


@dataclasses.dataclass(frozen=True)
class FinalDataSettings(DataSettings):
  """The final network's data: by default all of CIFAR-10's training split, no hold-out.

  Unlike a search, retraining needs no validation split (0: none; the test split gives the
  final number), and holds its data in memory (``stream`` must stay off; ``decode_threads``
  is unused).
  """

  name: str = 'cifar10'
  validation_size: float = 0

  def __post_init__(self):
    # Not DataSettings' checks: those refuse validation_size 0, which is the default here.
    one_of(self.source, DATA_SOURCES, 'data.source')
    check(self.validation_size >= 0, 'data.validation_size', 'must be >= 0 (0 = none)',
          self.validation_size)
    check(self.max_train >= 0, 'data.max_train', 'must be >= 0 (0 = all)', self.max_train)
    check(not self.stream, 'data.stream',
          'must be off: the final network trains on data held in memory', self.stream)


@dataclasses.dataclass(frozen=True)
class FinalSettings(FromConfig):
  """Everything a final retraining is (``configs/cifar_final.py``), one value per section.

  Attributes:
    seed: seeds initialisation, shuffling, augmentation and the validation hold-out.
    block: NSC text of the block to retrain ('' to take it from ``search_workdir``); by
      default the paper's residual example block.
    search_workdir: a search's workdir whose ``rank``-th best distinct block is retrained.
    rank: 1 = the block the search kept (the confirm rule's incumbent, else the best
      single reward); 2, 3, ... the next distinct blocks by best single reward.
    allow_config_change: continue a workdir whose stored settings differ.
    network: the network the block is stacked into.
    data: the images.
    train: the training schedule.
    preset: the config preset's name (a label).
  """

  seed: int = 0
  block: str = nsc.RESIDUAL_BLOCK.to_text()
  search_workdir: str = ''
  rank: int = 1
  allow_config_change: bool = False
  network: FinalNetworkSettings = FinalNetworkSettings()
  data: FinalDataSettings = FinalDataSettings()
  train: FinalTrainConfig = FinalTrainConfig()
  preset: str = ''
