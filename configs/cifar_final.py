"""Retraining a found block as BlockQNN's final CIFAR network, and a smoke preset of it.

  --config=configs/cifar_final.py          300 epochs on all 50k CIFAR-10 images, test accuracy
  --config=configs/cifar_final.py:smoke    the same program sized for a 2-core CPU (digits)
  --config.block='1,1,3,0,0 2,7,0,0,0'     retrain any block (NSC text)
  --config.block='' --config.search_workdir=workdirs/cifar100 [--config.rank=2]
                                           retrain the search's best (or rank-th) block

Where the block comes from (``training.final.resolve_block``): ``block`` when it is
non-empty; otherwise, with ``search_workdir`` set, the ``rank``-th distinct block of
``<search_workdir>/report/top_blocks.txt`` or, without that file, of the search's results
store (the successful candidates by reward, as the report ranks them). Setting both ``block``
and ``search_workdir`` is refused as ambiguous.

The paper's (and this package's reconstructed) values are the defaults of
``settings.FinalSettings``, written there once; this file starts from them and a preset
states only what it changes.
"""

from __future__ import annotations

import ml_collections

from blockqnn_jax.settings.final import FinalSettings


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config of ``preset``: '' or 'paper' (default) or 'smoke'."""
  preset = preset or 'paper'
  # BlockQNN's final CIFAR-10 network: N = 4 blocks per stage at F = 32, 300 epochs of SGD on
  # all training images, the test split read once at the end (settings.FinalSettings).
  config = FinalSettings.default_config()
  config.preset = preset
  if preset == 'smoke':
    # scikit-learn's bundled 8x8 digits: runs offline on any machine. Sized to show learning
    # in about a minute on a 2-core CPU: the paper's residual block reached 87% test accuracy
    # in 39 s here (12 epochs at F = 8 stopped at 60%).
    config.network.num_blocks = 1
    config.network.features = 16
    config.data.source = 'digits'
    config.data.name = 'digits'
    config.data.validation_size = 200
    config.train.epochs = 20
    config.train.warmup_epochs = 1.0
    config.train.batch_size = 64
    config.train.learning_rate = 0.05
    config.train.eval_batch_size = 200
    config.train.checkpoint_every_epochs = 5
  elif preset != 'paper':
    raise ValueError(f'unknown preset {preset!r}: use "paper" or "smoke"')
  return config
