r"""Retrains a block as the final network and reports its test accuracy (or resumes doing so).

  python -m experiments.train --config=configs/cifar_final.py:smoke --workdir=workdirs/final_smoke
  python -m experiments.train --config=configs/cifar_final.py --workdir=workdirs/final \
      --config.block='1,1,3,0,0 2,7,0,0,0'
  python -m experiments.train --config=configs/cifar_final.py --workdir=workdirs/final_best \
      --config.block='' --config.search_workdir=workdirs/cifar100 --config.rank=1

Running the same command on the same workdir continues from its latest checkpoint; a
different config on that workdir is refused (``--config.allow_config_change=true`` forces
it). ``--max_epochs_this_run=K`` stops after K epochs with a checkpoint, e.g. to fit a job
into a time slot. Results: ``WORKDIR/final.json``; curves: ``tensorboard --logdir WORKDIR``.
"""

from __future__ import annotations

import logging as std_logging
import signal

from absl import app, flags, logging
from ml_collections import config_flags

from blockqnn_jax.settings.final import FinalSettings
from blockqnn_jax.training.final import block_choice, driver, workdir
from experiments import user_errors

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar_final.py:smoke',
                                          'Retraining config (file[:preset]).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and final.json go.',
                               required=True)
_MAX_EPOCHS = flags.DEFINE_integer('max_epochs_this_run', None,
                                   'Stop after this many epochs of this run (resumable).')
_ORBAX_INFO = flags.DEFINE_bool('orbax_info_logs', False,
                                "Keep Orbax's INFO logs (a dozen lines per checkpoint).")


class _DropOrbaxInfo(std_logging.Filter):
  """Drops Orbax's INFO records, which share absl's logger with ours."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def _exit_on_sigterm(signum, frame):
  del frame
  raise SystemExit(128 + signum)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _ORBAX_INFO.value:
    logging.get_absl_handler().addFilter(_DropOrbaxInfo())
  # The config is read here, once; everything below takes the typed settings.
  settings = FinalSettings.from_config(_CONFIG.value)
  # A block that cannot be found is refused before the workdir is made.
  block_choice.resolve_block(settings)
  # A scheduler's SIGTERM (preemption) unwinds like Ctrl-C: the last finished epoch is saved.
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  result = driver.train_and_evaluate(settings, _WORKDIR.value,
                                     max_epochs_this_run=_MAX_EPOCHS.value)
  if not result.complete:
    print(f'stopped after epoch {result.epochs}; run the same command to continue')
    return
  val, test = result.val_accuracy, result.test_accuracy
  print(f'block {result.block}: test accuracy '
        f'{"n/a" if test is None else f"{test:.4f}"}'
        f'{"" if val is None else f", validation accuracy {val:.4f}"}, '
        f'{result.params:,} params, {result.flops / 1e6:,.1f} MFLOPs/image, '
        f'{result.epochs} epochs, {result.wall_s:.0f} s')
  print(f'results: {_WORKDIR.value}/{workdir.FINAL_FILE}')


if __name__ == '__main__':
  user_errors.run(main)
