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

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorboardX

from blockqnn_jax import architecture
from blockqnn_jax import canonical
from blockqnn_jax import cost
from blockqnn_jax import data as data_lib
from blockqnn_jax import networks
from blockqnn_jax import nsc
from blockqnn_jax import settings as settings_lib
from blockqnn_jax import store as store_lib
from blockqnn_jax.report import analysis
from blockqnn_jax.report import REPORT_DIR
from blockqnn_jax.settings import FinalSettings, FinalTrainConfig
from blockqnn_jax.training import engine
from blockqnn_jax.workdir_lock import WorkdirLock

CONFIG_FILE = 'config.json'
FINAL_FILE = 'final.json'
CHECKPOINT_DIR = 'checkpoints'
TENSORBOARD_DIR = 'tensorboard'
TOP_BLOCKS_FILE = os.path.join(REPORT_DIR, 'top_blocks.txt')
MAX_CHECKPOINTS = 3
# Settings that decide how a run is bookkept, or that retraining does not read, not what it
# trains: they may change on resume.
RESUMABLE_CHANGES = ('allow_config_change', 'train.checkpoint_every_epochs',
                     'train.eval_every_epochs', 'train.eval_batch_size', 'data.download',
                     'data.decode_threads', 'network.num_classes', 'network.image_size')
# A layer of NSC text, ``index,type,kernel,pred1,pred2``, as it appears inside a report line.
_NSC_LAYER = re.compile(r'(?<![\d.])\d+,\d+,\d+,\d+,\d+(?![\d.])')


ConfigMismatch = settings_lib.ConfigMismatch  # the workdir holds a run of other settings


class BlockNotFound(ValueError):
  """No block to retrain: none set, or a search workdir without usable results."""


# ----------------------------------------------------------------------------------------------
# What plugs into the engine.


def learning_rate_schedule(config: FinalTrainConfig, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up over ``warmup_epochs`` then cosine decay to 0 at step ``epochs * steps``.

  Args:
    config: the training config.
    steps_per_epoch: optimiser steps per epoch.

  Returns:
    step (int, counted from 0) -> learning rate.
  """
  total = config.epochs * steps_per_epoch
  warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total - 1)
  return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total, 0.0)


def final_optimizer(config: FinalTrainConfig, steps_per_epoch: int
                    ) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum, the warm-up + cosine schedule and L2 decay of the conv and
  dense kernels: ``engine.make_optimizer('sgd', ...)``, whose chain (decay, then SGD) is the
  one every checkpoint's ``opt_state`` was saved with."""
  return engine.make_optimizer('sgd', learning_rate_schedule(config, steps_per_epoch),
                               momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay)


def final_step(model: networks.BlockNet, config: FinalTrainConfig, steps_per_epoch: int
               ) -> tuple[optax.GradientTransformation, engine.StepOptions, Callable]:
  """``engine.fit_step`` with the final network's model, optimiser and options bound.

  Returns:
    ``(tx, options, step)``: the optimiser, the augmentation and loss options, and
    ``step(state, pixels, labels, mean, std) -> (state, (loss, accuracy))`` on batches
    already augmented (``engine.epoch_batches`` with ``options``).
  """
  tx = final_optimizer(config, steps_per_epoch)
  options = engine.StepOptions(augment=config.augment, crop_padding=config.crop_padding,
                               label_smoothing=config.label_smoothing)

  def step(state, pixels, labels, mean, std):
    return engine.fit_step(state, pixels, labels, mean, std, model=model, tx=tx,
                           options=options)

  return tx, options, step


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted programs of one network under one training config.

  Attributes:
    init: ``key -> engine.TrainState`` at step 0.
    epoch: ``(state, epoch_key, images (N, H, W, C) uint8, labels (N,) int32, mean (C,),
      std (C,)) -> (state, metrics)``: one epoch (``engine.train_epoch``); metrics ``loss``
      and ``accuracy`` are means over the epoch's batches (augmented, in training mode),
      ``learning_rate`` that of the epoch's last step, ``()`` float32 each.
    evaluate: ``(params, batch_stats, images, labels, mean, std) -> (accuracy, loss)``,
      ``()`` float32, every image of the split once (``engine.evaluate``).
  """

  init: Callable
  epoch: Callable
  evaluate: Callable


@functools.lru_cache(maxsize=4)
def compile_programs(model: networks.BlockNet, config: FinalTrainConfig,
                     image_shape: tuple[int, int, int], steps_per_epoch: int) -> Programs:
  """The programs of ``model`` trained under ``config``, jitted once per process for each
  (model, config, shape): a second run of the same network (a resume) reuses them.

  Args:
    model: the network (hashable).
    config: the training config (hashable).
    image_shape: ``(H, W, C)`` of an input image.
    steps_per_epoch: optimiser steps per epoch (the schedule's unit).
  """
  tx, options, step = final_step(model, config, steps_per_epoch)
  schedule = learning_rate_schedule(config, steps_per_epoch)

  def init(key):
    return engine.init_state(key, model, tx, image_shape)

  def epoch(state, key, images, labels, mean, std):
    state, (loss, accuracy) = engine.train_epoch(state, key, images, labels, mean, std,
                                                 step=step, batch_size=config.batch_size,
                                                 options=options)
    return state, {'loss': loss, 'accuracy': accuracy,
                   'learning_rate': schedule(state.step - 1)}

  evaluate = functools.partial(engine.evaluate, model=model, batch_size=config.eval_batch_size)
  # No donation: an interrupt between epochs must find the previous state intact to save it.
  return Programs(jax.jit(init), jax.jit(epoch), jax.jit(evaluate))


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------------------------
# Which block.


def _distinct(texts: list[str], where: str) -> list[str]:
  """Parses NSC texts, keeping the first of each canonical form, in order."""
  seen, out = set(), []
  for text in texts:
    try:
      block = nsc.Block.parse(text)
      key = canonical.canonical_key(block)
    except nsc.NSCError as e:
      raise BlockNotFound(f'{where}: invalid block {text!r} ({e})') from e
    if key not in seen:
      seen.add(key)
      out.append(block.to_text())
  return out


def top_blocks_from_report(path: str | Path) -> list[str]:
  """The distinct blocks of a search report's ``top_blocks.txt``, best first.

  Each line that holds NSC layers (``index,type,kernel,pred1,pred2`` groups, whatever else
  the line says: rank, reward...) gives one block; other lines (headers, ``#`` comments) are
  skipped.
  """
  texts = []
  for line in Path(path).read_text().splitlines():
    if line.lstrip().startswith('#'):
      continue
    layers = _NSC_LAYER.findall(line)
    if layers:
      texts.append(' '.join(layers))
  return _distinct(texts, str(path))


def top_blocks_from_store(search_workdir: str | Path) -> list[str]:
  """The distinct blocks of a search's results store, best first, ranked as the report's
  ``analysis.top_blocks`` ranks them (ok rows with a reward, one per canonical key, the best
  reward first, the earlier row on ties). The store is opened read-only.

  Raises:
    FileNotFoundError: no store in ``search_workdir``.
    store.StoreError: the file there is not a search store.
  """
  with store_lib.ResultsStore.open_read_only(search_workdir) as results_store:
    rows = results_store.candidates()
  return [row.nsc for row in analysis.top_blocks(rows, len(rows))]


def resolve_block(settings: FinalSettings) -> tuple[nsc.Block, str]:
  """The block to retrain and where it came from.

  ``settings.block`` (NSC text) when it is non-empty; otherwise, with ``search_workdir`` set,
  the ``rank``-th distinct block of ``<search_workdir>/report/top_blocks.txt`` or, without
  that file, of the search's results store.

  Returns:
    ``(block, source)``: the validated block, and 'config', or the report / database path
    and rank it was read from.

  Raises:
    BlockNotFound: neither field set, both set, or the search workdir has no such block.
    nsc.NSCError: the block text is invalid.
  """
  text = settings.block.strip()
  search_workdir = settings.search_workdir.strip()
  if text and search_workdir:
    raise BlockNotFound(f'both block ({text!r}) and search_workdir ({search_workdir!r}) are '
                        "set: pass --config.block='' to retrain the search's block, or drop "
                        'search_workdir')
  if text:
    block = nsc.Block.parse(text)
    source = 'config'
  elif search_workdir:
    rank = int(settings.rank)
    if rank < 1:
      raise BlockNotFound(f'rank must be >= 1, got {rank}')
    report = Path(search_workdir) / TOP_BLOCKS_FILE
    if report.is_file():
      path, texts = report, top_blocks_from_report(report)
    else:
      path = Path(search_workdir) / store_lib.DB_NAME
      try:
        texts = top_blocks_from_store(search_workdir)
      except FileNotFoundError:
        raise BlockNotFound(f'search_workdir {search_workdir!r} has neither {TOP_BLOCKS_FILE} '
                            f'nor {store_lib.DB_NAME}') from None
      except store_lib.StoreError as e:
        raise BlockNotFound(f'{path}: cannot read the search results ({e})') from e
    if len(texts) < rank:
      raise BlockNotFound(f'{path} has {len(texts)} distinct successful blocks; rank {rank} '
                          'asked for')
    try:
      block = nsc.Block.parse(texts[rank - 1])
    except nsc.NSCError as e:
      raise BlockNotFound(f'{path}: invalid block {texts[rank - 1]!r} ({e})') from e
    source = f'{path} (rank {rank})'
  else:
    raise BlockNotFound('no block: set config.block (NSC text) or config.search_workdir')
  # Structure only: the search's space (kernels, layers) may be larger than the default one.
  nsc.validate_structure(block)
  return block, source


# ----------------------------------------------------------------------------------------------
# Workdir bookkeeping.


def _write_json(path: Path, obj: Any) -> None:
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
  its default) and compared field by field; those in ``RESUMABLE_CHANGES`` may differ. With
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
    except (settings_lib.SettingsError, nsc.NSCError, KeyError) as e:
      old = {'config.json': f'unreadable ({e})'}  # a record this version cannot read
    changed = settings_lib.refuse_changes(
        workdir, old, new, ignore=tuple(f'config.{k}' for k in RESUMABLE_CHANGES),
        allow_change=settings.allow_config_change,
        allow_flag='--config.allow_config_change=true')
    if changed:
      logging.warning('continuing %s with a changed config: %s', workdir, ', '.join(changed))
  _write_json(path, new)


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


def load_data(settings: FinalSettings) -> data_lib.ImageSplits:
  """The splits of ``settings.data`` (the hold-out seeded by ``settings.seed``)."""
  d = settings.data
  return data_lib.load_splits(d.source, name=d.name, path=d.path or None,
                              validation_size=d.validation_size, seed=settings.seed,
                              max_train=d.max_train or None, download=d.download)


# ----------------------------------------------------------------------------------------------
# The result and the driver.


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


def _train_and_evaluate(settings: FinalSettings, workdir: str | Path, *,
                        max_epochs_this_run: int | None,
                        on_epoch_end: Callable[[int, dict[str, float]], None] | None
                        ) -> FinalResult:
  start = time.perf_counter()
  workdir = Path(workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  block, block_source = resolve_block(settings)
  check_workdir_config(workdir, settings, block)  # before any expensive work
  cfg = settings.train
  logging.info('block %s (from %s)', block.to_text(), block_source)

  splits = load_data(settings)
  num_train, num_val, num_test = (len(splits.train_labels), len(splits.val_labels),
                                  len(splits.test_labels))
  steps_per_epoch = engine.steps_per_epoch(cfg.batch_size, num_train)
  logging.info('data %s: %d train / %d validation / %d test images of %s', splits.name,
               num_train, num_val, num_test, splits.image_shape)
  device = jax.local_devices()[0]
  net = settings.network
  spec = architecture.spec_for(block, net.kind, net.num_blocks, net.features,
                               splits.num_classes, splits.image_shape)
  model = networks.BlockNet(spec, dtype=engine.resolve_dtype(cfg.compute_dtype,
                                                             device.platform),
                            scan_blocks=net.scan_blocks)
  programs = compile_programs(model, cfg, tuple(splits.image_shape), steps_per_epoch)
  put = lambda x: jax.device_put(x, device)
  mean, std = (put(np.asarray(s, np.float32)) for s in splits.channel_stats())
  train_images, train_labels = put(splits.train_images), put(splits.train_labels)
  init_key, rng = jax.random.split(jax.random.key(settings.seed, impl=cfg.prng_impl))
  key_data = jax.random.key_data(rng)

  manager = ocp.CheckpointManager(
      workdir / CHECKPOINT_DIR,
      options=ocp.CheckpointManagerOptions(max_to_keep=MAX_CHECKPOINTS, create=True))
  progress = {'epoch': 0, 'wall_s': 0.0, 'train_s': 0.0, 'last_metrics': {}}
  latest = manager.latest_step()
  if latest is None:
    # Committed to the device like everything restored or computed later: jit keys its cache
    # on committedness, and an uncommitted first state would compile the epoch twice.
    state, rng = jax.device_put((programs.init(init_key), rng), device)
  else:
    sharding = jax.sharding.SingleDeviceSharding(device)
    # Shapes only: eval_shape traces init without compiling or running it. The tree is
    # engine.TrainState over the same optimiser chain as every earlier version saved.
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            jax.eval_shape(programs.init, init_key))
    restored = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), rng=ocp.args.StandardRestore(
            {'key_data': jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=sharding)}),
        progress=ocp.args.JsonRestore()))
    state, progress = restored['state'], dict(restored['progress'])
    rng = jax.device_put(
        jax.random.wrap_key_data(restored['rng']['key_data'], impl=cfg.prng_impl), device)
    logging.info('resumed from the epoch-%d checkpoint in %s', latest, manager.directory)
  start_epoch = int(progress['epoch'])
  saved_epoch = start_epoch
  end_epoch = cfg.epochs if max_epochs_this_run is None else min(
      cfg.epochs, start_epoch + max_epochs_this_run)

  def save(epoch: int, state: engine.TrainState, rng: jax.Array, train_s: float) -> None:
    nonlocal saved_epoch
    record = {'epoch': epoch, 'train_s': train_s, 'last_metrics': metrics,
              'wall_s': progress['wall_s'] + time.perf_counter() - start}
    saved_epoch = epoch  # first: a failed save is not retried by the ``finally`` below
    # The raw key data: Orbax's key handler assumes threefry-shaped keys.
    manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        rng=ocp.args.StandardSave({'key_data': jax.random.key_data(rng)}),
        progress=ocp.args.JsonSave(record)))

  def evaluate(images, labels) -> tuple[float, float]:
    accuracy, loss = programs.evaluate(state.params, state.batch_stats, images, labels,
                                       mean, std)
    return float(accuracy), float(loss)

  val_images, val_labels = put(splits.val_images), put(splits.val_labels)
  epoch, train_s = start_epoch, float(progress['train_s'])
  metrics = dict(progress.get('last_metrics') or {})
  # purge_step hides the events a crashed run logged after its last checkpoint.
  writer = tensorboardX.SummaryWriter(str(workdir / TENSORBOARD_DIR),
                                      purge_step=start_epoch + 1 if start_epoch else None)
  try:
    for next_epoch in range(start_epoch + 1, end_epoch + 1):
      t0 = time.perf_counter()
      # The key chain every version of this loop has drawn: what makes a resume bit-identical.
      next_rng, epoch_key = jax.random.split(rng)
      next_state, out = programs.epoch(state, epoch_key, train_images, train_labels, mean,
                                       std)
      out = {k: float(v) for k, v in jax.device_get(out).items()}  # waits for the epoch
      seconds = time.perf_counter() - t0
      # Checked first: a diverged state is never saved.
      engine.check_divergence([out['loss']], 0.0, splits.num_classes, first_epoch=next_epoch)
      # Committed together, so an interrupt never pairs a state with another epoch's key.
      state, rng, epoch, train_s = next_state, next_rng, next_epoch, train_s + seconds
      metrics = dict(out, epoch_s=seconds,
                     images_per_s=steps_per_epoch * cfg.batch_size / seconds)
      line = (f'epoch {epoch}/{cfg.epochs}: loss {out["loss"]:.4f}, train accuracy '
              f'{out["accuracy"]:.4f}, lr {out["learning_rate"]:.4g}, {seconds:.1f} s')
      if num_val and (epoch % cfg.eval_every_epochs == 0 or epoch == cfg.epochs):
        metrics['val_accuracy'], metrics['val_loss'] = evaluate(val_images, val_labels)
        line += f', val accuracy {metrics["val_accuracy"]:.4f}'
      logging.info(line)
      for name, tag in (('loss', 'train/loss'), ('accuracy', 'train/accuracy'),
                        ('learning_rate', 'train/learning_rate'),
                        ('images_per_s', 'train/images_per_s'),
                        ('val_accuracy', 'val/accuracy'), ('val_loss', 'val/loss')):
        if name in metrics:
          writer.add_scalar(tag, metrics[name], epoch)
      writer.flush()
      if on_epoch_end is not None:
        on_epoch_end(epoch, dict(metrics))
      if epoch % cfg.checkpoint_every_epochs == 0:
        save(epoch, state, rng, train_s)
  except (KeyboardInterrupt, SystemExit):
    logging.warning('interrupted after epoch %d: saving its checkpoint', epoch)
    raise
  finally:
    # Every run ends on a checkpoint of its last finished epoch (an error or an interrupt too).
    try:
      if epoch > saved_epoch:
        save(epoch, state, rng, train_s)
      manager.wait_until_finished()
    finally:
      manager.close()
      writer.close()

  result = FinalResult(
      block=block.to_text(), block_source=block_source, dataset=splits.name,
      num_train=num_train, num_val=num_val, num_test=num_test,
      params=count_params(state.params), flops=int(cost.network_flops(spec)), epochs=epoch,
      steps=int(state.step), resumed_from_epoch=start_epoch, complete=epoch >= cfg.epochs,
      device=device.device_kind, compute_dtype=jnp.dtype(model.dtype).name, train_s=train_s,
      wall_s=progress['wall_s'] + time.perf_counter() - start)
  if not result.complete:
    logging.info('stopped after epoch %d of %d; run again to continue', epoch, cfg.epochs)
    return result
  final: dict[str, Any] = {}
  if metrics:
    final.update(final_train_loss=metrics['loss'], final_train_accuracy=metrics['accuracy'])
  # The final numbers: validation (if held out) and, only now, the test split.
  with tensorboardX.SummaryWriter(str(workdir / TENSORBOARD_DIR)) as writer:
    for split, images, labels in (('val', val_images, val_labels),
                                  ('test', splits.test_images, splits.test_labels)):
      if len(labels):
        final[f'{split}_accuracy'], final[f'{split}_loss'] = evaluate(put(images), put(labels))
        writer.add_scalar(f'{split}/final_accuracy', final[f'{split}_accuracy'], epoch)
      elif split == 'test':
        logging.warning('%s has no test split: final.json has no test accuracy', splits.name)
  result = dataclasses.replace(result, **final,
                               wall_s=progress['wall_s'] + time.perf_counter() - start)
  _write_json(workdir / FINAL_FILE, result.to_dict())
  logging.info('test accuracy %s after %d epochs (%s params, %.1f MFLOPs/image, %.0f s)',
               result.test_accuracy, epoch, f'{result.params:,}', result.flops / 1e6,
               result.wall_s)
  return result
