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
(``train_and_evaluate``, ``FinalResult``); import each name from its module.

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
