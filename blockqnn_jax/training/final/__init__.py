"""Retraining a found block as the final network: long training, checkpoints, test accuracy.

The search scores a block with a short, early-stopped run (``training.candidate``); this
module trains the chosen block once more, stacked deeper (N = 4 per stage), for hundreds of
epochs, and reports its accuracy on the test split, as the paper's tables do.

It plugs into the one training engine (``training.engine``) what makes the final network
final: SGD with (Nesterov) momentum and L2 on the kernels under a warm-up + cosine schedule
(``final_optimizer``), label smoothing and the crop padding as the step's options, and epochs
driven one by one from the host, because every epoch may end in an evaluation, TensorBoard
events, a checkpoint or an interrupt. The whole training split lives on the device and one
epoch is one jitted call of ``engine.train_epoch``, so the host dispatches once per epoch.
The programs are compiled once per network and training config in a process
(``compile_programs``): a resumed run in the same process reuses them.

One job per module: ``programs`` (optimiser, schedule, compiled programs), ``block_choice``
(which block), ``workdir`` (recorded config, checkpoints, data) and ``driver``
(``train_and_evaluate``, ``FinalResult``); the names below are the package's interface.

``train_and_evaluate`` is the impure driver (files, logs). Its workdir holds

* ``config.json``: the settings and the resolved block of the first run; a later run with
  different ones is refused (``ConfigMismatch``) unless ``allow_config_change``. The stored
  settings are read back into ``settings.FinalSettings``, so a field added since the workdir
  was made compares as its default;
* ``checkpoints/<epoch>``: Orbax checkpoints of the train state (``engine.TrainState``), the
  PRNG key's raw data and the progress (epoch, seconds, last metrics) as JSON, every
  ``checkpoint_every_epochs`` epochs and at the end of a run (the last 3 kept). A run on a
  workdir with a checkpoint continues from the latest one; since the key is restored too, a
  resumed run draws the batches and augmentations an uninterrupted one would (on CPU it ends
  bit-identical, as the tests check);
* ``tensorboard/``: TensorBoard event files (tensorboardX), per epoch;
* ``final.json``: ``FinalResult.to_dict()``, written once all epochs are done.

The test split is read only for that final number; periodic evaluations use the
validation split when ``data.validation_size`` holds one out.
"""

from blockqnn_jax.training.final.block_choice import BlockNotFound
from blockqnn_jax.training.final.block_choice import TOP_BLOCKS_FILE
from blockqnn_jax.training.final.block_choice import resolve_block
from blockqnn_jax.training.final.block_choice import top_blocks_from_report
from blockqnn_jax.training.final.block_choice import top_blocks_from_store
from blockqnn_jax.training.final.driver import FinalResult
from blockqnn_jax.training.final.driver import train_and_evaluate
from blockqnn_jax.training.final.programs import Programs
from blockqnn_jax.training.final.programs import compile_programs
from blockqnn_jax.training.final.programs import count_params
from blockqnn_jax.training.final.programs import final_optimizer
from blockqnn_jax.training.final.programs import final_step
from blockqnn_jax.training.final.programs import learning_rate_schedule
from blockqnn_jax.training.final.workdir import CHECKPOINT_DIR
from blockqnn_jax.training.final.workdir import CONFIG_FILE
from blockqnn_jax.training.final.workdir import ConfigMismatch
from blockqnn_jax.training.final.workdir import FINAL_FILE
from blockqnn_jax.training.final.workdir import MAX_CHECKPOINTS
from blockqnn_jax.training.final.workdir import RESUMABLE_CHANGES
from blockqnn_jax.training.final.workdir import TENSORBOARD_DIR
from blockqnn_jax.training.final.workdir import check_workdir_config
from blockqnn_jax.training.final.workdir import load_data
from blockqnn_jax.training.final.workdir import restore_checkpoint

__all__ = [
    'BlockNotFound', 'CHECKPOINT_DIR', 'CONFIG_FILE', 'ConfigMismatch', 'FINAL_FILE',
    'FinalResult', 'MAX_CHECKPOINTS', 'Programs', 'RESUMABLE_CHANGES', 'TENSORBOARD_DIR',
    'TOP_BLOCKS_FILE', 'check_workdir_config', 'compile_programs', 'count_params',
    'final_optimizer', 'final_step', 'learning_rate_schedule', 'load_data', 'resolve_block',
    'restore_checkpoint', 'top_blocks_from_report', 'top_blocks_from_store',
    'train_and_evaluate',
]
