"""Retraining a found block as the final network: long training, checkpoints, test accuracy.

The search (``train``) scores a block with a short, early-stopped run; this module trains the
chosen block once more, stacked deeper (N = 4 per stage), for hundreds of epochs, and reports
its accuracy on the test split, as the paper's tables do.

The pure part follows ``train``: the whole training split lives on the device, and one epoch
is **one jitted call** (``train_epoch``) that scans ``train_step`` over the epoch's batches,
gathering each batch by index and augmenting it in place, so the host dispatches once per
epoch. ``create_train_state``, ``train_step``, ``eval_step``, ``train_epoch`` and
``evaluate`` are pure; the jitted ones take the (hashable) model and ``RetrainConfig`` as
static arguments, so a second run of the same network in a process reuses their programs.

``train_and_evaluate`` is the impure driver (files, logs). Its workdir holds

* ``config.json``: the config and the resolved block of the first run; a later run with a
  different one is refused (``ConfigMismatch``) unless ``config.allow_config_change``;
* ``checkpoints/<epoch>``: Orbax checkpoints of the train state, the PRNG key and the
  progress (epoch, seconds), every ``checkpoint_every_epochs`` epochs and at the end of a
  run (the last 3 kept). A run on a workdir with a checkpoint continues from the latest one;
  since the key is restored too, a resumed run draws the batches and augmentations an
  uninterrupted one would (on CPU it ends bit-identical, as the tests check);
* ``tensorboard/``: TensorBoard event files (tensorboardX), per epoch;
* ``final.json``: written once all epochs are done (see ``train_and_evaluate``).

The test split is read only for that final number; periodic evaluations use the
validation split when ``data.validation_size`` holds one out.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorboardX

from blockqnn_jax import canonical
from blockqnn_jax import cost
from blockqnn_jax import data as data_lib
from blockqnn_jax import networks
from blockqnn_jax import nsc

CONFIG_FILE = 'config.json'
FINAL_FILE = 'final.json'
CHECKPOINT_DIR = 'checkpoints'
TENSORBOARD_DIR = 'tensorboard'
TOP_BLOCKS_FILE = os.path.join('report', 'top_blocks.txt')
SEARCH_DB = 'search.sqlite'
MAX_CHECKPOINTS = 3
# Config keys that decide how a run is bookkept, not what it trains: they may change on resume.
RESUMABLE_CHANGES = ('allow_config_change', 'train.checkpoint_every_epochs',
                     'train.eval_every_epochs', 'train.eval_batch_size')
# A layer of NSC text, ``index,type,kernel,pred1,pred2``, as it appears inside a report line.
_NSC_LAYER = re.compile(r'(?<![\d.])\d+,\d+,\d+,\d+,\d+(?![\d.])')


class ConfigMismatch(RuntimeError):
  """The workdir holds a run with a different config or block."""


class BlockNotFound(ValueError):
  """No block to retrain: empty config, or a search workdir without usable results."""


# ----------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class RetrainConfig:
  """How the final network is trained; ``RetrainConfig(**config.train)``. Hashable: the
  jitted functions take it as a static argument.

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
      than 'threefry2x32' on CPU, see ``train``).
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
      if int(getattr(self, name)) < 1:
        raise ValueError(f'train.{name} must be positive, got {getattr(self, name)}')
    if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
      raise ValueError(f'train.warmup_epochs must be in [0, epochs={self.epochs}), got '
                       f'{self.warmup_epochs}')
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f'train.label_smoothing must be in [0, 1), got {self.label_smoothing}')
    if self.compute_dtype not in ('auto', 'float32', 'bfloat16'):
      raise ValueError(f"train.compute_dtype must be 'auto', 'float32' or 'bfloat16', got "
                       f'{self.compute_dtype!r}')


def learning_rate_schedule(config: RetrainConfig, steps_per_epoch: int) -> optax.Schedule:
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


def make_optimizer(config: RetrainConfig, steps_per_epoch: int
                   ) -> optax.GradientTransformation:
  """SGD (Nesterov) momentum with the schedule and L2 decay of conv and dense kernels."""
  # Decaying BatchNorm scales and biases only fights the normalisation; kernels carry capacity.
  kernels_only = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=kernels_only),
      optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum,
                nesterov=config.nesterov))


def resolve_dtype(compute_dtype: str, device: jax.Device) -> Any:
  """The computation dtype of ``compute_dtype`` on ``device`` ('auto': bf16 off CPU)."""
  if compute_dtype == 'auto':
    return jnp.float32 if device.platform == 'cpu' else jnp.bfloat16
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[compute_dtype]


def build_spec(block: nsc.Block, network_config: Mapping[str, Any],
               image_shape: tuple[int, int, int], num_classes: int) -> networks.NetworkSpec:
  """The final network for ``block`` from ``config.network`` and the data's shapes.

  Args:
    block: the NSC block.
    network_config: ``kind`` ('cifar' or 'imagenet'), ``num_blocks`` (N), ``features`` (F).
    image_shape: ``(H, W, C)`` of the images (H is the spec's image size).
    num_classes: classifier outputs.
  """
  kind = network_config.get('kind', 'cifar')
  make = {'cifar': networks.cifar_spec, 'imagenet': networks.imagenet_spec}.get(kind)
  if make is None:
    raise ValueError(f'network.kind must be "cifar" or "imagenet", got {kind!r}')
  return make(block, network_config['num_blocks'], network_config['features'], num_classes,
              image_shape[0], image_shape[2])


# ----------------------------------------------------------------------------------------------
# Pure training functions.


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree (what a checkpoint saves).

  Attributes:
    step: ``()`` int32, optimiser steps taken.
    params: the model's ``params`` collection (float32).
    batch_stats: the model's BatchNorm running averages.
    opt_state: the optimiser state of ``make_optimizer``.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


@functools.partial(jax.jit, static_argnames=('model', 'config', 'image_shape',
                                             'steps_per_epoch'))
def create_train_state(key: jax.Array, *, model: networks.BlockNet, config: RetrainConfig,
                       image_shape: tuple[int, int, int], steps_per_epoch: int) -> TrainState:
  """Initialises the parameters, BatchNorm statistics and optimiser state.

  Args:
    key: PRNG key of the initialisers.
    model: the network.
    config: the training config (builds the optimiser).
    image_shape: ``(H, W, C)`` of an input image.
    steps_per_epoch: optimiser steps per epoch (the schedule's unit).

  Returns:
    The state at step 0.
  """
  variables = model.init(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  params = variables['params']
  opt_state = make_optimizer(config, steps_per_epoch).init(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables['batch_stats'], opt_state=opt_state)


def _loss(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  """Per-example cross-entropy ``(B,)`` of float32 logits ``(B, K)`` and int labels ``(B,)``."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array,
               mean: jax.Array, std: jax.Array, *, model: networks.BlockNet,
               config: RetrainConfig, steps_per_epoch: int
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on one batch; pure and jittable.

  Args:
    state: the current state.
    images: ``(B, H, W, C)`` uint8 batch (augmented and normalised here).
    labels: ``(B,)`` int32.
    key: PRNG key of the batch's augmentation.
    mean: ``(C,)`` per-channel train mean, pixel units.
    std: ``(C,)`` per-channel train std, pixel units.
    model: the network.
    config: the training config.
    steps_per_epoch: optimiser steps per epoch (the schedule's unit).

  Returns:
    ``(new state, metrics)``; metrics ``loss`` (mean cross-entropy, without the L2 term) and
    ``accuracy`` of the batch, ``()`` float32, measured before the update.
  """
  if config.augment:
    x = data_lib.augment(key, images, mean, std, pad=config.crop_padding)
  else:
    x = data_lib.normalize(images, mean, std)

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, x,
                                  train=True, mutable=['batch_stats'])
    loss = _loss(logits, labels, config.label_smoothing).mean()
    return loss, (updates['batch_stats'], logits)

  (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  tx = make_optimizer(config, steps_per_epoch)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)
  accuracy = (logits.argmax(-1) == labels).mean()
  return new_state, {'loss': loss, 'accuracy': accuracy}


@functools.partial(jax.jit, static_argnames=('model', 'config'))
def train_epoch(state: TrainState, key: jax.Array, images: jax.Array, labels: jax.Array,
                mean: jax.Array, std: jax.Array, *, model: networks.BlockNet,
                config: RetrainConfig) -> tuple[TrainState, dict[str, jax.Array]]:
  """One epoch in one program: ``lax.scan`` of ``train_step`` over a fresh permutation.

  Args:
    state: the state before the epoch.
    key: the epoch's PRNG key (permutation and augmentation).
    images: ``(N, H, W, C)`` uint8, the whole training split on the device.
    labels: ``(N,)`` int32.
    mean: ``(C,)`` per-channel train mean, pixel units.
    std: ``(C,)`` per-channel train std, pixel units.
    model: the network.
    config: the training config.

  Returns:
    ``(state after N // batch_size steps, metrics)``: ``loss`` and ``accuracy``, means over
    the epoch's batches (augmented, in training mode), and ``learning_rate`` of the epoch's
    last step; ``()`` float32 each.
  """
  num_train = images.shape[0]
  steps = num_train // config.batch_size
  if steps == 0:
    raise ValueError(f'batch_size {config.batch_size} exceeds the {num_train} training images')
  perm_key, step_key = jax.random.split(key)
  order = jax.random.permutation(perm_key, num_train)[:steps * config.batch_size]

  def body(state, xs):
    index, batch_key = xs
    return train_step(state, images[index], labels[index], batch_key, mean, std, model=model,
                      config=config, steps_per_epoch=steps)

  state, metrics = jax.lax.scan(
      body, state, (order.reshape(steps, config.batch_size), jax.random.split(step_key, steps)))
  metrics = jax.tree.map(jnp.mean, metrics)
  metrics['learning_rate'] = learning_rate_schedule(config, steps)(state.step - 1)
  return state, metrics


def eval_step(state: TrainState, images: jax.Array, labels: jax.Array, weights: jax.Array,
              mean: jax.Array, std: jax.Array, *, model: networks.BlockNet
              ) -> tuple[jax.Array, jax.Array]:
  """Weighted correct count and summed loss of one batch, BatchNorm in inference mode.

  Args:
    state: the trained state.
    images: ``(B, H, W, C)`` uint8.
    labels: ``(B,)`` int32.
    weights: ``(B,)`` float32, 1 for a real image and 0 for padding.
    mean: ``(C,)`` per-channel train mean, pixel units.
    std: ``(C,)`` per-channel train std, pixel units.
    model: the network.

  Returns:
    ``(correct, loss)``, ``()`` float32 sums over the batch (plain cross-entropy).
  """
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       data_lib.normalize(images, mean, std), train=False)
  correct = ((logits.argmax(-1) == labels) * weights).sum()
  loss = (optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weights).sum()
  return correct, loss


@functools.partial(jax.jit, static_argnames=('model', 'batch_size'))
def evaluate(state: TrainState, images: jax.Array, labels: jax.Array, mean: jax.Array,
             std: jax.Array, *, model: networks.BlockNet, batch_size: int
             ) -> dict[str, jax.Array]:
  """Accuracy and mean loss over a whole split, every image counted once.

  The split is cut into ``ceil(N / batch)`` equal batches under ``lax.map``; the last one is
  padded and the padding masked out.

  Args:
    state: the trained state.
    images: ``(N, H, W, C)`` uint8, N >= 1.
    labels: ``(N,)`` int32.
    mean: ``(C,)`` per-channel train mean, pixel units.
    std: ``(C,)`` per-channel train std, pixel units.
    model: the network.
    batch_size: images per batch (capped at N).

  Returns:
    ``{'accuracy', 'loss'}``, ``()`` float32.
  """
  num = images.shape[0]
  if num == 0:
    raise ValueError('cannot evaluate an empty split')
  batch = min(batch_size, num)
  num_batches = -(-num // batch)
  pad = num_batches * batch - num
  shaped = lambda a: a.reshape((num_batches, batch) + a.shape[1:])
  xs = (shaped(jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))),
        shaped(jnp.pad(labels, (0, pad))),
        shaped(jnp.pad(jnp.ones((num,), jnp.float32), (0, pad))))
  correct, loss = jax.lax.map(
      lambda b: eval_step(state, *b, mean, std, model=model), xs)
  return {'accuracy': correct.sum() / num, 'loss': loss.sum() / num}


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


def top_blocks_from_db(path: str | Path) -> list[str]:
  """The distinct blocks of a search's ``search.sqlite``, by reward, best first.

  Only ``status = 'ok'`` candidates with a reward count. The database is opened read-only.
  """
  try:
    db = sqlite3.connect(f'file:{Path(path).resolve()}?mode=ro', uri=True)
    try:
      rows = db.execute("SELECT nsc FROM candidates WHERE status = 'ok' AND reward IS NOT NULL "
                        'ORDER BY reward DESC').fetchall()
    finally:
      db.close()
  except sqlite3.Error as e:
    raise BlockNotFound(f'{path}: cannot read the candidates table ({e})') from e
  return _distinct([row[0] for row in rows], str(path))


def resolve_block(config) -> tuple[nsc.Block, str]:
  """The block to retrain and where it came from.

  Args:
    config: with ``block`` (NSC text), ``search_workdir`` and ``rank`` (1 = best).

  Returns:
    ``(block, source)``: the validated block, and 'config', or the report / database path
    and rank it was read from.

  Raises:
    BlockNotFound: neither field set, both set, or the search workdir has no such block.
    nsc.NSCError: the block text is invalid.
  """
  text = (config.get('block') or '').strip()
  search_workdir = (config.get('search_workdir') or '').strip()
  if text and search_workdir:
    raise BlockNotFound(f'both block ({text!r}) and search_workdir ({search_workdir!r}) are '
                        "set: pass --config.block='' to retrain the search's block, or drop "
                        'search_workdir')
  if text:
    block = nsc.Block.parse(text)
    source = 'config'
  elif search_workdir:
    rank = int(config.get('rank', 1))
    if rank < 1:
      raise BlockNotFound(f'rank must be >= 1, got {rank}')
    report, db = Path(search_workdir) / TOP_BLOCKS_FILE, Path(search_workdir) / SEARCH_DB
    if report.is_file():
      path, texts = report, top_blocks_from_report(report)
    elif db.is_file():
      path, texts = db, top_blocks_from_db(db)
    else:
      raise BlockNotFound(f'search_workdir {search_workdir!r} has neither {TOP_BLOCKS_FILE} '
                          f'nor {SEARCH_DB}')
    if len(texts) < rank:
      raise BlockNotFound(f'{path} has {len(texts)} distinct successful blocks; rank {rank} '
                          'asked for')
    block = nsc.Block.parse(texts[rank - 1])
    source = f'{path} (rank {rank})'
  else:
    raise BlockNotFound('no block: set config.block (NSC text) or config.search_workdir')
  # The grammar of the search may be larger than the default one: validate structure only.
  nsc.validate(block, nsc.Grammar(max_index=max(2, len(block.layers))))
  return block, source


# ----------------------------------------------------------------------------------------------
# Workdir bookkeeping.


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _write_json(path: Path, obj: Any) -> None:
  """Writes JSON atomically (a kill leaves the old file or the new one)."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + '\n')
  os.replace(tmp, path)


def check_workdir_config(workdir: str | Path, config, block: nsc.Block) -> None:
  """Records the config and block of a workdir's first run; refuses a different one later.

  Keys in ``RESUMABLE_CHANGES`` may differ. With ``config.allow_config_change`` a difference
  is logged and the new config recorded.

  Raises:
    ConfigMismatch: the workdir's ``config.json`` differs (naming the keys).
  """
  path = Path(workdir) / CONFIG_FILE
  # JSON round trip: tuples become lists on both sides of the comparison.
  new = json.loads(json.dumps({'config': config.to_dict(), 'block': block.to_text()},
                              default=str))
  if path.is_file():
    old = json.loads(path.read_text())
    a, b = _flatten(old), _flatten(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and
                     not k.removeprefix('config.').startswith(RESUMABLE_CHANGES))
    if changed:
      details = ', '.join(f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in changed[:8])
      if not config.get('allow_config_change', False):
        raise ConfigMismatch(
            f'{workdir} holds a run with a different config ({details}); use a new --workdir, '
            'or pass --config.allow_config_change=true to continue it with this config')
      logging.warning('continuing %s with a changed config: %s', workdir, details)
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


# ----------------------------------------------------------------------------------------------
# The driver.


def _load_data(config) -> data_lib.ImageSplits:
  d = config.data
  return data_lib.load_splits(d.source, name=d.name, path=d.path or None,
                              validation_size=d.validation_size, seed=config.seed,
                              max_train=d.max_train or None)


def train_and_evaluate(config, workdir: str | Path, *, max_epochs_this_run: int | None = None,
                       on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
                       ) -> dict[str, Any]:
  """Trains the config's block as the final network in ``workdir``, resuming if it can.

  Args:
    config: a ``configs/cifar_final.py`` config.
    workdir: where config, checkpoints, TensorBoard logs and ``final.json`` go.
    max_epochs_this_run: stop (with a checkpoint) after this many epochs of this run, to be
      continued later; None: run to ``train.epochs``.
    on_epoch_end: called with the epoch (1-based) and its host metrics after every epoch.

  Returns:
    The summary. Once all epochs are done it is also written to ``final.json``: ``block``,
    ``block_source``, ``dataset``, ``num_train``/``num_val``/``num_test``,
    ``test_accuracy``/``test_loss`` (None without a test split), ``val_accuracy``/``val_loss``
    (with a validation split), ``final_train_loss``/``final_train_accuracy`` (last epoch),
    ``params`` (trainable scalars), ``flops`` (forward FLOPs per image), ``epochs``,
    ``steps``, ``wall_s`` (seconds of whole runs up to their last checkpoint) and ``train_s``
    (seconds in ``train_epoch``, the first epoch of each run including its compilation), both
    summed over all runs of the workdir, ``resumed_from_epoch``, ``complete``, ``device``,
    ``compute_dtype``. A run stopped by ``max_epochs_this_run`` returns ``complete: False``
    and writes no ``final.json``.

  Raises:
    ConfigMismatch: the workdir holds a run with another config or block.
    BlockNotFound: see ``resolve_block``.
    FloatingPointError: the training loss became non-finite.
  """
  start = time.perf_counter()
  workdir = Path(workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  block, block_source = resolve_block(config)
  check_workdir_config(workdir, config, block)  # before any expensive work
  cfg = RetrainConfig(**config.train)
  logging.info('block %s (from %s)', block.to_text(), block_source)

  splits = _load_data(config)
  num_train, num_val, num_test = (len(splits.train_labels), len(splits.val_labels),
                                  len(splits.test_labels))
  steps_per_epoch = num_train // cfg.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'batch_size {cfg.batch_size} exceeds the {num_train} training images')
  logging.info('data %s: %d train / %d validation / %d test images of %s', splits.name,
               num_train, num_val, num_test, splits.image_shape)
  device = jax.local_devices()[0]
  spec = build_spec(block, config.network, splits.image_shape, splits.num_classes)
  model = networks.BlockNet(spec, dtype=resolve_dtype(cfg.compute_dtype, device),
                            scan_blocks=bool(config.network.get('scan_blocks', False)))
  put = lambda x: jax.device_put(x, device)
  mean, std = (put(np.asarray(s, np.float32)) for s in splits.channel_stats())
  train_images, train_labels = put(splits.train_images), put(splits.train_labels)
  init = functools.partial(create_train_state, model=model, config=cfg,
                           image_shape=splits.image_shape, steps_per_epoch=steps_per_epoch)
  init_key, rng = jax.random.split(jax.random.key(config.seed, impl=cfg.prng_impl))
  key_data = jax.random.key_data(rng)

  manager = ocp.CheckpointManager(
      workdir / CHECKPOINT_DIR,
      options=ocp.CheckpointManagerOptions(max_to_keep=MAX_CHECKPOINTS, create=True))
  progress = {'epoch': 0, 'wall_s': 0.0, 'train_s': 0.0, 'last_metrics': {}}
  latest = manager.latest_step()
  if latest is None:
    # Committed to the device like everything restored or computed later: jit keys its cache
    # on committedness, and an uncommitted first state would compile train_epoch twice.
    state, rng = jax.device_put((init(init_key), rng), device)
  else:
    sharding = jax.sharding.SingleDeviceSharding(device)
    # Shapes only: eval_shape traces init without compiling or running it.
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            jax.eval_shape(init, init_key))
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

  def save(epoch: int, state: TrainState, rng: jax.Array, train_s: float) -> None:
    nonlocal saved_epoch
    record = {'epoch': epoch, 'train_s': train_s, 'last_metrics': metrics,
              'wall_s': progress['wall_s'] + time.perf_counter() - start}
    saved_epoch = epoch  # first: a failed save is not retried by the ``finally`` below
    # The raw key data: Orbax's key handler assumes threefry-shaped keys.
    manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        rng=ocp.args.StandardSave({'key_data': jax.random.key_data(rng)}),
        progress=ocp.args.JsonSave(record)))

  val_images, val_labels = put(splits.val_images), put(splits.val_labels)
  epoch, train_s = start_epoch, float(progress['train_s'])
  metrics = dict(progress.get('last_metrics') or {})
  # purge_step hides the events a crashed run logged after its last checkpoint.
  writer = tensorboardX.SummaryWriter(str(workdir / TENSORBOARD_DIR),
                                      purge_step=start_epoch + 1 if start_epoch else None)
  try:
    for next_epoch in range(start_epoch + 1, end_epoch + 1):
      t0 = time.perf_counter()
      next_rng, epoch_key = jax.random.split(rng)
      next_state, out = train_epoch(state, epoch_key, train_images, train_labels, mean, std,
                                    model=model, config=cfg)
      out = {k: float(v) for k, v in jax.device_get(out).items()}  # waits for the epoch
      seconds = time.perf_counter() - t0
      if not math.isfinite(out['loss']):  # checked first: a diverged state is never saved
        raise FloatingPointError(f'training diverged: loss {out["loss"]} in epoch {next_epoch}')
      # Committed together, so an interrupt never pairs a state with another epoch's key.
      state, rng, epoch, train_s = next_state, next_rng, next_epoch, train_s + seconds
      metrics = dict(out, epoch_s=seconds,
                     images_per_s=steps_per_epoch * cfg.batch_size / seconds)
      line = (f'epoch {epoch}/{cfg.epochs}: loss {out["loss"]:.4f}, train accuracy '
              f'{out["accuracy"]:.4f}, lr {out["learning_rate"]:.4g}, {seconds:.1f} s')
      if num_val and (epoch % cfg.eval_every_epochs == 0 or epoch == cfg.epochs):
        val = evaluate(state, val_images, val_labels, mean, std, model=model,
                       batch_size=cfg.eval_batch_size)
        metrics.update(val_accuracy=float(val['accuracy']), val_loss=float(val['loss']))
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

  summary = {
      'block': block.to_text(), 'block_source': block_source, 'dataset': splits.name,
      'num_train': num_train, 'num_val': num_val, 'num_test': num_test,
      'params': count_params(state.params), 'flops': int(cost.network_flops(spec)),
      'epochs': epoch, 'steps': int(state.step), 'resumed_from_epoch': start_epoch,
      'complete': epoch >= cfg.epochs, 'device': device.device_kind,
      'compute_dtype': jnp.dtype(model.dtype).name,
      'train_s': train_s, 'wall_s': progress['wall_s'] + time.perf_counter() - start,
  }
  if not summary['complete']:
    logging.info('stopped after epoch %d of %d; run again to continue', epoch, cfg.epochs)
    return summary
  if metrics:
    summary.update(final_train_loss=metrics['loss'], final_train_accuracy=metrics['accuracy'])
  # The final numbers: validation (if held out) and, only now, the test split.
  with tensorboardX.SummaryWriter(str(workdir / TENSORBOARD_DIR)) as writer:
    for split, images, labels in (('val', val_images, val_labels),
                                  ('test', splits.test_images, splits.test_labels)):
      if len(labels):
        result = evaluate(state, put(images), put(labels), mean, std, model=model,
                          batch_size=cfg.eval_batch_size)
        summary[f'{split}_accuracy'] = float(result['accuracy'])
        summary[f'{split}_loss'] = float(result['loss'])
        writer.add_scalar(f'{split}/final_accuracy', summary[f'{split}_accuracy'], epoch)
      elif split == 'test':
        logging.warning('%s has no test split: final.json has no test accuracy', splits.name)
        summary.update(test_accuracy=None, test_loss=None)
  summary['wall_s'] = progress['wall_s'] + time.perf_counter() - start
  _write_json(workdir / FINAL_FILE, summary)
  logging.info('test accuracy %s after %d epochs (%s params, %.1f MFLOPs/image, %.0f s)',
               summary['test_accuracy'], epoch, f'{summary["params"]:,}',
               summary['flops'] / 1e6, summary['wall_s'])
  return summary
