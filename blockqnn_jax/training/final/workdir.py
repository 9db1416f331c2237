"""A retraining's workdir: its recorded config, its checkpoints, its data."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from absl import logging
import orbax.checkpoint as ocp

from blockqnn_jax.data import readers, splits
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings import base
from blockqnn_jax.settings.final import FinalSettings

CONFIG_FILE = 'config.json'
FINAL_FILE = 'final.json'
CHECKPOINT_DIR = 'checkpoints'
TENSORBOARD_DIR = 'tensorboard'
MAX_CHECKPOINTS = 3
# Settings that decide how a run is bookkept, or that retraining does not read, not what it
# trains: they may change on resume.
FINAL_RESUMABLE_CHANGES = ('allow_config_change', 'train.checkpoint_every_epochs',
                           'train.eval_every_epochs', 'train.eval_batch_size', 'data.download',
                           'data.decode_threads', 'network.num_classes', 'network.image_size')

def write_json(path: Path, obj: Any) -> None:
  """Writes JSON atomically (a kill leaves the old file or the new one)."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + '\n')
  os.replace(tmp, path)


def _record(settings: FinalSettings, block: nsc.Block) -> dict[str, Any]:
  """What ``config.json`` holds: the settings and the resolved block's NSC text."""
  return {'config': settings.to_dict(), 'block': block.to_text()}


def check_workdir_config(workdir: str | Path, settings: FinalSettings,
                         block: nsc.Block) -> None:
  """Records the settings and block of a workdir's first run; refuses different ones later.

  The stored settings are read back as ``FinalSettings`` (a field the workdir predates takes
  its default) and compared field by field; those in ``FINAL_RESUMABLE_CHANGES`` may differ. With
  ``allow_config_change`` a difference is logged and the new settings recorded.

  Raises:
    ConfigMismatch: the workdir's ``config.json`` differs (naming the fields).
  """
  path = Path(workdir) / CONFIG_FILE
  new = _record(settings, block)
  if path.is_file():
    stored = json.loads(path.read_text())
    try:
      old = _record(FinalSettings.from_config(stored.get('config', {})),
                    nsc.Block.parse(stored['block']))
    except (base.SettingsError, nsc.NSCError, KeyError) as e:
      old = {'config.json': f'unreadable ({e})'}  # a record this version cannot read
    changed = base.refuse_changes(
        workdir, old, new, ignore=tuple(f'config.{k}' for k in FINAL_RESUMABLE_CHANGES),
        allow_change=settings.allow_config_change,
        allow_flag='--config.allow_config_change=true')
    if changed:
      logging.warning('continuing %s with a changed config: %s', workdir, ', '.join(changed))
  write_json(path, new)


def restore_checkpoint(workdir: str | Path, step: int | None = None) -> dict[str, Any]:
  """A checkpoint of a workdir as plain arrays, without building the model.

  Args:
    workdir: the run's workdir.
    step: the epoch of the checkpoint; None: the latest.

  Returns:
    ``{'epoch', 'state' (nested dict of arrays: step, params, batch_stats, opt_state),
    'progress'}``.
  """
  with ocp.CheckpointManager(Path(workdir).resolve() / CHECKPOINT_DIR) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{workdir} has no checkpoint')
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), progress=ocp.args.JsonRestore()))
  return {'epoch': step, 'state': restored['state'], 'progress': restored['progress']}


def load_data(settings: FinalSettings) -> splits.ImageSplits:
  """The splits of ``settings.data`` (the hold-out seeded by ``settings.seed``)."""
  d = settings.data
  return readers.load_splits(d.source, name=d.name, path=d.path or None,
                             validation_size=d.validation_size, seed=settings.seed,
                             max_train=d.max_train or None, download=d.download)
