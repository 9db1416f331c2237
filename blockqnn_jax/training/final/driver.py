"""The retraining itself: ``train_and_evaluate`` (files, logs, checkpoints) and its result."""

from __future__ import annotations

import dataclasses
from pathlib import Path
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorboardX

from blockqnn_jax.models import architecture, cost, networks
from blockqnn_jax.settings.final import FinalSettings
from blockqnn_jax.storage.workdir_lock import WorkdirLock
from blockqnn_jax.training import engine
from blockqnn_jax.training.final.block_choice import resolve_block
from blockqnn_jax.training.final.programs import compile_programs, count_params
from blockqnn_jax.training.final.workdir import (
  CHECKPOINT_DIR,
  FINAL_FILE,
  MAX_CHECKPOINTS,
  TENSORBOARD_DIR,
  write_json,
  check_workdir_config,
  load_data,
)


@dataclasses.dataclass(frozen=True)
class FinalResult:
  """What a retraining run ends with; ``to_dict()`` is ``final.json``.

  Attributes:
    block: NSC text of the retrained block.
    block_source: 'config', or the report / store path and rank it was read from.
    dataset: the data's name.
    num_train, num_val, num_test: images per split.
    params: trainable scalars of the network.
    flops: forward FLOPs per image.
    epochs: epochs trained so far (all runs of the workdir).
    steps: optimiser steps so far.
    resumed_from_epoch: the epoch this run started from (0: from scratch).
    complete: all ``train.epochs`` are done (only then are the final numbers measured).
    device: the device kind.
    compute_dtype: 'float32' or 'bfloat16', as resolved.
    train_s: seconds in the epochs' programs (the first epoch of each run including its
      compilation), summed over all runs of the workdir.
    wall_s: seconds of whole runs up to their last checkpoint, summed over all runs.
    final_train_loss, final_train_accuracy: the last epoch's means (once complete).
    val_accuracy, val_loss: on the validation split (once complete, if one is held out).
    test_accuracy, test_loss: on the test split (once complete; None without a test split).
  """

  block: str
  block_source: str
  dataset: str
  num_train: int
  num_val: int
  num_test: int
  params: int
  flops: int
  epochs: int
  steps: int
  resumed_from_epoch: int
  complete: bool
  device: str
  compute_dtype: str
  train_s: float
  wall_s: float
  final_train_loss: float | None = None
  final_train_accuracy: float | None = None
  val_accuracy: float | None = None
  val_loss: float | None = None
  test_accuracy: float | None = None
  test_loss: float | None = None

  def to_dict(self) -> dict[str, Any]:
    """The fields as ``final.json`` has them: the final numbers only where they apply
    (``test_*`` once complete, None without a test split; ``val_*`` with a validation split;
    ``final_train_*`` once an epoch ran)."""
    out = dataclasses.asdict(self)
    for prefix, keep in (('final_train_', self.final_train_loss is not None),
                         ('val_', self.val_accuracy is not None), ('test_', self.complete)):
      if not keep:
        out = {k: v for k, v in out.items() if not k.startswith(prefix)}
    return out


def train_and_evaluate(settings: FinalSettings, workdir: str | Path, *,
                       max_epochs_this_run: int | None = None,
                       on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
                       ) -> FinalResult:
  """Trains the settings' block as the final network in ``workdir``, resuming if it can.

  Args:
    settings: the retraining's settings (``FinalSettings.from_config(config)``).
    workdir: where config, checkpoints, TensorBoard logs and ``final.json`` go.
    max_epochs_this_run: stop (with a checkpoint) after this many epochs of this run, to be
      continued later; None: run to ``train.epochs``.
    on_epoch_end: called with the epoch (1-based) and its host metrics (``loss``,
      ``accuracy``, ``learning_rate``, ``epoch_s``, ``images_per_s``, and ``val_accuracy``,
      ``val_loss`` on evaluation epochs) after every epoch.

  Returns:
    The result. Once all epochs are done it is also written to ``final.json``. A run
    stopped by ``max_epochs_this_run`` returns ``complete=False`` and writes no
    ``final.json``.

  Raises:
    ConfigMismatch: the workdir holds a run with other settings or another block.
    BlockNotFound: see ``resolve_block``.
    results.Diverged: the training loss became non-finite or exploded.
    workdir_lock.WorkdirBusy: another run (or a search) holds the workdir.
  """
  # One run per workdir: two would interleave checkpoints and overwrite config.json.
  with WorkdirLock(workdir, purpose='retraining'):
    return _train_and_evaluate(settings, workdir, max_epochs_this_run=max_epochs_this_run,
                               on_epoch_end=on_epoch_end)


# The metrics written to TensorBoard each epoch, under their tags.
_EPOCH_SCALARS = (('loss', 'train/loss'), ('accuracy', 'train/accuracy'),
                  ('learning_rate', 'train/learning_rate'), ('images_per_s', 'train/images_per_s'),
                  ('val_accuracy', 'val/accuracy'), ('val_loss', 'val/loss'))


def _build(settings: FinalSettings, block):
  """``(splits, spec, model, programs)``: the data and the network it trains, compiled."""
  cfg, net = settings.train, settings.network
  splits = load_data(settings)
  logging.info('data %s: %d train / %d validation / %d test images of %s', splits.name,
               len(splits.train_labels), len(splits.val_labels), len(splits.test_labels),
               splits.image_shape)
  steps_per_epoch = engine.steps_per_epoch(cfg.batch_size, len(splits.train_labels))
  spec = architecture.spec_for(block, net.kind, net.num_blocks, net.features,
                               splits.num_classes, splits.image_shape)
  model = networks.build(spec, scan_blocks=net.scan_blocks, dtype=engine.resolve_dtype(
      cfg.compute_dtype, jax.local_devices()[0].platform))
  return splits, spec, model, compile_programs(model, cfg, tuple(splits.image_shape),
                                               steps_per_epoch)


def _restore_or_init(workdir: Path, programs, seed: int, device, prng_impl: str):
  """``(checkpoint manager, state, rng, progress)``: the workdir's checkpoints, and the
  latest one's state, key and progress, else the initial ones (from ``seed``)."""
  init_key, rng = jax.random.split(jax.random.key(seed, impl=prng_impl))
  manager = ocp.CheckpointManager(
      workdir / CHECKPOINT_DIR,
      options=ocp.CheckpointManagerOptions(max_to_keep=MAX_CHECKPOINTS, create=True))
  progress = {'epoch': 0, 'wall_s': 0.0, 'train_s': 0.0, 'last_metrics': {}}
  latest = manager.latest_step()
  if latest is None:
    # Committed to the device like everything restored or computed later: jit keys its cache
    # on committedness, and an uncommitted first state would compile the epoch twice.
    state, rng = jax.device_put((programs.init(init_key), rng), device)
    return manager, state, rng, progress
  sharding = jax.sharding.SingleDeviceSharding(device)
  key_data = jax.random.key_data(rng)
  # Shapes only: eval_shape traces init without compiling or running it. The tree is
  # engine.TrainState over the same optimiser chain as every earlier version saved.
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          jax.eval_shape(programs.init, init_key))
  restored = manager.restore(latest, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), rng=ocp.args.StandardRestore(
          {'key_data': jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=sharding)}),
      progress=ocp.args.JsonRestore()))
  rng = jax.device_put(
      jax.random.wrap_key_data(restored['rng']['key_data'], impl=prng_impl), device)
  logging.info('resumed from the epoch-%d checkpoint in %s', latest, manager.directory)
  return manager, restored['state'], rng, dict(restored['progress'])


def _save(manager: ocp.CheckpointManager, epoch: int, state: engine.TrainState, rng: jax.Array,
          progress: dict[str, Any]) -> None:
  # The raw key data: Orbax's key handler assumes threefry-shaped keys.
  manager.save(epoch, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      rng=ocp.args.StandardSave({'key_data': jax.random.key_data(rng)}),
      progress=ocp.args.JsonSave(progress)))


def _train_epoch(programs, state: engine.TrainState, rng: jax.Array, data: tuple,
                 num_classes: int, epoch: int):
  """Epoch ``epoch`` from ``state``: ``(state, rng, host metrics, seconds)``, or
  ``results.Diverged`` (checked before anything is committed or saved)."""
  t0 = time.perf_counter()
  # The key chain every version of this loop has drawn: what makes a resume bit-identical.
  next_rng, epoch_key = jax.random.split(rng)
  next_state, out = programs.epoch(state, epoch_key, *data)
  out = {k: float(v) for k, v in jax.device_get(out).items()}  # waits for the epoch
  seconds = time.perf_counter() - t0
  engine.check_divergence([out['loss']], 0.0, num_classes, first_epoch=epoch)
  return next_state, next_rng, out, seconds


def _log_epoch(writer: tensorboardX.SummaryWriter, metrics: dict[str, float], epoch: int,
               epochs: int) -> None:
  line = (f'epoch {epoch}/{epochs}: loss {metrics["loss"]:.4f}, train accuracy '
          f'{metrics["accuracy"]:.4f}, lr {metrics["learning_rate"]:.4g}, '
          f'{metrics["epoch_s"]:.1f} s')
  if 'val_accuracy' in metrics:
    line += f', val accuracy {metrics["val_accuracy"]:.4f}'
  logging.info(line)
  for name, tag in _EPOCH_SCALARS:
    if name in metrics:
      writer.add_scalar(tag, metrics[name], epoch)
  writer.flush()


def _finish(workdir: Path, result: FinalResult, splits, metrics: dict[str, float], evaluate,
            put, start: float) -> FinalResult:
  """The complete result: the last epoch's training means, validation (if held out) and,
  only now, the test split; written to ``final.json``."""
  final: dict[str, Any] = {}
  if metrics:
    final.update(final_train_loss=metrics['loss'], final_train_accuracy=metrics['accuracy'])
  with tensorboardX.SummaryWriter(str(workdir / TENSORBOARD_DIR)) as writer:
    for split, images, labels in (('val', splits.val_images, splits.val_labels),
                                  ('test', splits.test_images, splits.test_labels)):
      if len(labels):
        final[f'{split}_accuracy'], final[f'{split}_loss'] = evaluate(put(images), put(labels))
        writer.add_scalar(f'{split}/final_accuracy', final[f'{split}_accuracy'], result.epochs)
      elif split == 'test':
        logging.warning('%s has no test split: final.json has no test accuracy', splits.name)
  result = dataclasses.replace(result, **final,
                               wall_s=result.wall_s + time.perf_counter() - start)
  write_json(workdir / FINAL_FILE, result.to_dict())
  logging.info('test accuracy %s after %d epochs (%s params, %.1f MFLOPs/image, %.0f s)',
               result.test_accuracy, result.epochs, f'{result.params:,}', result.flops / 1e6,
               result.wall_s)
  return result


def _train_and_evaluate(settings: FinalSettings, workdir: str | Path, *,
                        max_epochs_this_run: int | None,
                        on_epoch_end: Callable[[int, dict[str, float]], None] | None
                        ) -> FinalResult:
  start = time.perf_counter()
  workdir = Path(workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  block, block_source = resolve_block(settings)
  check_workdir_config(workdir, settings, block)  # before any expensive work
  cfg, device = settings.train, jax.local_devices()[0]
  logging.info('block %s (from %s)', block.to_text(), block_source)
  splits, spec, model, programs = _build(settings, block)
  steps_per_epoch = engine.steps_per_epoch(cfg.batch_size, len(splits.train_labels))
  put = lambda x: jax.device_put(x, device)
  mean, std = (put(np.asarray(s, np.float32)) for s in splits.channel_stats())
  train_images, train_labels = put(splits.train_images), put(splits.train_labels)
  val_images, val_labels = put(splits.val_images), put(splits.val_labels)
  manager, state, rng, progress = _restore_or_init(workdir, programs, settings.seed, device,
                                                   cfg.prng_impl)
  start_epoch = saved_epoch = epoch = int(progress['epoch'])
  end_epoch = cfg.epochs if max_epochs_this_run is None else min(
      cfg.epochs, start_epoch + max_epochs_this_run)
  train_s, metrics = float(progress['train_s']), dict(progress.get('last_metrics') or {})

  def evaluate(images, labels) -> tuple[float, float]:
    accuracy, loss = programs.evaluate(state.params, state.batch_stats, images, labels,
                                       mean, std)
    return float(accuracy), float(loss)

  def save() -> None:
    nonlocal saved_epoch
    saved_epoch = epoch  # first: a failed save is not retried by the ``finally`` below
    wall_s = progress['wall_s'] + time.perf_counter() - start
    _save(manager, epoch, state, rng, dict(epoch=epoch, train_s=train_s, last_metrics=metrics,
                                           wall_s=wall_s))

  # purge_step hides the events a crashed run logged after its last checkpoint.
  writer = tensorboardX.SummaryWriter(str(workdir / TENSORBOARD_DIR),
                                      purge_step=start_epoch + 1 if start_epoch else None)
  try:
    for next_epoch in range(start_epoch + 1, end_epoch + 1):
      next_state, next_rng, out, seconds = _train_epoch(
          programs, state, rng, (train_images, train_labels, mean, std), splits.num_classes,
          next_epoch)
      # Committed together, so an interrupt never pairs a state with another epoch's key.
      state, rng, epoch, train_s = next_state, next_rng, next_epoch, train_s + seconds
      metrics = dict(out, epoch_s=seconds,
                     images_per_s=steps_per_epoch * cfg.batch_size / seconds)
      if len(val_labels) and (epoch % cfg.eval_every_epochs == 0 or epoch == cfg.epochs):
        metrics['val_accuracy'], metrics['val_loss'] = evaluate(val_images, val_labels)
      _log_epoch(writer, metrics, epoch, cfg.epochs)
      if on_epoch_end is not None:
        on_epoch_end(epoch, dict(metrics))
      if epoch % cfg.checkpoint_every_epochs == 0:
        save()
  except (KeyboardInterrupt, SystemExit):
    logging.warning('interrupted after epoch %d: saving its checkpoint', epoch)
    raise
  finally:
    # Every run ends on a checkpoint of its last finished epoch (an error or an interrupt too).
    try:
      if epoch > saved_epoch:
        save()
      manager.wait_until_finished()
    finally:
      manager.close()
      writer.close()

  result = FinalResult(
      block=block.to_text(), block_source=block_source, dataset=splits.name,
      num_train=len(splits.train_labels), num_val=len(splits.val_labels),
      num_test=len(splits.test_labels), params=count_params(state.params),
      flops=int(cost.network_flops(spec)), epochs=epoch, steps=int(state.step),
      resumed_from_epoch=start_epoch, complete=epoch >= cfg.epochs, device=device.device_kind,
      compute_dtype=jnp.dtype(model.dtype).name, train_s=train_s,
      wall_s=progress['wall_s'] + time.perf_counter() - start)
  if not result.complete:
    logging.info('stopped after epoch %d of %d; run again to continue', epoch, cfg.epochs)
    return result
  return _finish(workdir, result, splits, metrics, evaluate, put, time.perf_counter())
