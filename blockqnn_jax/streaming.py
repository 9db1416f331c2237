"""Candidate evaluation for datasets too large for device memory (ImageNet): streamed batches.

CIFAR-sized data lives on the device and a candidate's whole training is one XLA program
(``train.CandidateTrainer``). ImageNet-sized data cannot: here the host decodes batches
ahead on background threads (``data.stream_batches``) while the device runs one compiled
step per batch. The search still never sees the test split: ``StreamData.open`` holds a
validation part out of the *training* split (deterministic given the seed), and candidates
train on the rest.

``StreamingTrainer`` has the interface of ``train.CandidateTrainer`` (``compile``,
``evaluate`` -> ``EvalResult``, failures as results), so ``executor.LocalExecutor`` and the
Ray workers use it unchanged when they are given an ``OpenStream`` instead of in-memory
splits.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blockqnn_jax import canonical
from blockqnn_jax import cost
from blockqnn_jax import data as data_lib
from blockqnn_jax import networks
from blockqnn_jax import nsc
from blockqnn_jax import results
from blockqnn_jax import train as train_lib

# Per-channel pixel mean and standard deviation of ImageNet's training set (0-255 scale).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass(frozen=True)
class StreamData:
  """Where a large dataset streams from (see ``data.stream_batches``).

  Attributes:
    source: 'tfds' (e.g. ``name='imagenet2012'``) or 'image_folder' (``path`` to a folder or
      tar laid out ``train/<class>/<image>``).
    name: the TFDS name.
    path: TFDS ``data_dir``, or the folder / tar.
    image_size: images are resized (shorter side) and centre-cropped to this side.
    validation_size: held out of the training split for the reward; a count (>= 1) or a
      fraction.
    seed: decides the held-out part and the shuffles.
    max_train: train on at most this many of the remaining images (0 = all), e.g. the
      common 10% ImageNet proxy.
    mean, std: per-channel normalisation (0-255 scale).
    decode_threads: host threads decoding images.
  """

  source: str
  name: str = ''
  path: str | None = None
  image_size: int = 224
  validation_size: float = 10000
  seed: int = 0
  max_train: int = 0
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  decode_threads: int = 8

  def open(self) -> 'OpenStream':
    """Checks the source and fixes the held-out validation part (reads no images)."""
    total, num_classes = data_lib.stream_info(self.source, name=self.name, split='train',
                                              path=self.path)
    holdout = (int(self.validation_size) if self.validation_size >= 1
               else int(round(self.validation_size * total)))
    if not 0 < holdout < total:
      raise data_lib.DataError(f'validation_size {self.validation_size} must leave both '
                               f'parts of the {total} training images non-empty')
    order = np.random.default_rng([self.seed, 7]).permutation(total)
    train = np.sort(order[holdout:])
    if self.max_train:
      train = np.sort(np.random.default_rng([self.seed, 11]).choice(
          train, min(self.max_train, len(train)), replace=False))
    if len(self.mean) != len(self.std):
      raise ValueError('mean and std need one value per channel')
    return OpenStream(self, num_classes, train, np.sort(order[:holdout]))


@dataclasses.dataclass(frozen=True)
class OpenStream:
  """A ``StreamData`` with its class count and its train / validation example indices."""

  data: StreamData
  num_classes: int
  train_indices: np.ndarray
  val_indices: np.ndarray

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.data.image_size, self.data.image_size, len(self.data.mean))

  @property
  def name(self) -> str:
    return self.data.name or str(self.data.path)

  def batches(self, part: str, batch_size: int, *, seed: int = 0, num_epochs: int = 1):
    """Host batches of the 'train' part (shuffled, full batches only) or the 'val' part
    (in order, last batch partial)."""
    train = part == 'train'
    return data_lib.stream_batches(
        self.data.source, name=self.data.name, split='train', path=self.data.path,
        batch_size=batch_size, image_size=self.data.image_size, seed=seed, shuffle=train,
        num_epochs=num_epochs, drop_remainder=train,
        indices=self.train_indices if train else self.val_indices,
        decode_threads=self.data.decode_threads)


@dataclasses.dataclass
class CompiledStep:
  init: Any
  step: Any
  evaluate: Any
  compile_s: float


class StreamingTrainer:
  """Trains candidates on streamed batches; the counterpart of ``train.CandidateTrainer``."""

  def __init__(self, stream: OpenStream, devices: Sequence[jax.Device],
               train_config: train_lib.TrainConfig, reward_config: results.RewardConfig,
               network_config, cache: train_lib.CompileCache | None = None,
               grammar: nsc.Grammar | None = None):
    self.stream = stream
    self.group = train_lib.DeviceMesh.of(devices)
    self.train_config = train_config
    self.reward_config = reward_config
    self.network_config = network_config
    self.cache = cache if cache is not None else train_lib.CompileCache()
    self.grammar = grammar
    self.dtype = train_lib.resolve_dtype(train_config.compute_dtype, self.group.devices)
    self.steps_per_epoch = train_lib.steps_per_epoch(train_config, len(stream.train_indices))
    g = self.group
    self.mean = jax.device_put(np.asarray(stream.data.mean, np.float32), g.replicated)
    self.std = jax.device_put(np.asarray(stream.data.std, np.float32), g.replicated)

  def spec(self, block: nsc.Block) -> networks.NetworkSpec:
    return train_lib.build_spec(block, self.network_config, self.stream.image_shape,
                                self.stream.num_classes)

  def compile(self, block: nsc.Block) -> tuple[CompiledStep, bool]:
    """Compiles (or fetches) init, one training step and one validation batch."""
    canonical_block = canonical.canonical_block(block)
    cache_key = (canonical_block.to_text(), tuple(sorted(dict(self.network_config).items())),
                 self.train_config, str(self.dtype), self.stream.image_shape,
                 tuple(d.id for d in self.group.devices))
    cached = self.cache.get(cache_key)
    if cached is not None:
      return cached, True
    start = time.perf_counter()
    model = networks.BlockNet(self.spec(canonical_block), dtype=self.dtype)
    config = self.train_config
    tx = train_lib.make_optimizer(config, self.steps_per_epoch)
    g = self.group

    def init(key):
      variables = model.init(key, jnp.zeros((1,) + self.stream.image_shape, jnp.float32),
                             train=False)
      return variables['params'], variables['batch_stats'], tx.init(variables['params'])

    def evaluate(params, batch_stats, images, labels, weights, mean, std):
      logits = model.apply({'params': params, 'batch_stats': batch_stats},
                           data_lib.normalize(images, mean, std), train=False)
      return (((logits.argmax(-1) == labels) * weights).sum(),
              (train_lib._cross_entropy(logits, labels) * weights).sum())

    rng = jax.eval_shape(lambda: jax.random.key(0, impl=config.prng_impl))
    key = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=g.replicated)
    init_c = jax.jit(init, out_shardings=g.replicated).lower(key)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                        sharding=g.replicated),
                         init_c.out_info)
    batch = lambda n, shape, dtype: jax.ShapeDtypeStruct((n,) + shape, dtype,
                                                         sharding=g.batched)
    stats = jax.ShapeDtypeStruct(self.mean.shape, jnp.float32, sharding=g.replicated)
    b, e = config.batch_size, config.eval_batch_size
    one_step = train_lib.make_step(model, tx, config)

    def step(params, batch_stats, opt_state, images, labels, data_key, i, mean, std):
      return one_step(params, batch_stats, opt_state, images, labels,
                      jax.random.fold_in(data_key, i), mean, std)

    index = jax.ShapeDtypeStruct((), jnp.int32, sharding=g.replicated)
    step_c = jax.jit(step, donate_argnums=(0, 1, 2), out_shardings=g.replicated).lower(
        *state, batch(b, self.stream.image_shape, jnp.uint8), batch(b, (), jnp.int32), key,
        index, stats, stats)
    eval_c = jax.jit(evaluate, out_shardings=g.replicated).lower(
        state[0], state[1], batch(e, self.stream.image_shape, jnp.uint8),
        batch(e, (), jnp.int32), batch(e, (), jnp.float32), stats, stats)
    compiled = CompiledStep(init_c.compile(), step_c.compile(), eval_c.compile(),
                            time.perf_counter() - start)
    self.cache.put(cache_key, compiled)
    return compiled, False

  def evaluate(self, block: nsc.Block, seed: int = 0,
               compiled: tuple[CompiledStep, bool] | None = None) -> results.EvalResult:
    """Trains ``block`` on the streamed training part and validates it on the held-out
    part; failures come back as a failed result."""
    start = time.perf_counter()
    base = dict(block=block.to_text(), canonical_key='', device=self.group.name)
    config = self.train_config
    try:
      nsc.validate(block, self.grammar or nsc.Grammar(max_index=max(2, len(block.layers))))
      base['canonical_key'] = canonical.canonical_key(block)
      spec = self.spec(block)
      flops, reference = train_lib.block_cost_terms(block, spec)
      density = block.density()
      base.update(flops=int(flops), density=float(density),
                  params=int(cost.network_params(spec)))
      compiled, cached = compiled if compiled is not None else self.compile(block)
      g = self.group
      init_key, data_key = (jax.device_put(k, g.replicated) for k in jax.random.split(
          jax.random.key(seed, impl=config.prng_impl)))
      state = compiled.init(init_key)
      t0 = time.perf_counter()
      epoch_losses, losses = [], []
      stream = self.stream.batches('train', config.batch_size, seed=seed,
                                   num_epochs=config.epochs)
      for i, (images, labels) in enumerate(stream):
        state, (loss, _) = compiled.step(*state, jax.device_put(images, g.batched),
                                         jax.device_put(labels, g.batched), data_key, i,
                                         self.mean, self.std)
        losses.append(loss)
        if len(losses) == self.steps_per_epoch:
          epoch_losses.append(float(jnp.mean(jnp.stack(losses))))
          losses = []
          if not math.isfinite(epoch_losses[-1]):
            raise results.Diverged(f'diverged: training loss is {epoch_losses[-1]} in '
                                      f'epoch {len(epoch_losses)}')
      jax.block_until_ready(state)
      train_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      accuracy, val_loss = self._validate(compiled, state[0], state[1])
      eval_s = time.perf_counter() - t0
      if not math.isfinite(val_loss):
        raise results.Diverged(f'diverged: validation loss is {val_loss}')
      reward = results.compute_reward(accuracy, flops, reference, density,
                                        self.reward_config)
      images_seen = config.epochs * self.steps_per_epoch * config.batch_size
      return results.EvalResult(
          **base, status='ok', val_accuracy=accuracy, reward=reward,
          final_loss=epoch_losses[-1], compile_s=0.0 if cached else compiled.compile_s,
          train_s=train_s, eval_s=eval_s, total_s=time.perf_counter() - start,
          images_per_s=images_seen / train_s, compile_cached=cached)
    except Exception as e:  # a failed candidate is a result; the search goes on
      return results.EvalResult(**base, status='failed',
                                  failure_reason=results.describe_failure(e),
                                  total_s=time.perf_counter() - start)

  def _validate(self, compiled: CompiledStep, params, batch_stats) -> tuple[float, float]:
    g, size = self.group, self.train_config.eval_batch_size
    correct = loss = 0.0
    count = 0
    for images, labels in self.stream.batches('val', size):
      n = len(labels)
      pad = size - n  # the last batch is padded and masked: one compiled program
      weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      c, l = compiled.evaluate(params, batch_stats, jax.device_put(images, g.batched),
                               jax.device_put(labels, g.batched),
                               jax.device_put(weights, g.batched), self.mean, self.std)
      correct, loss, count = correct + float(c), loss + float(l), count + n
    return correct / count, loss / count


def load_search_data(config) -> data_lib.ImageSplits | OpenStream:
  """The data a search config names: in-memory splits, or an opened stream when
  ``config.data.stream`` (ImageNet-sized data). Either way the validation part is held out
  of the training split, deterministically from ``config.seed``."""
  d = config.data
  if d.get('stream', False):
    if not d.get('path') and d.source == 'image_folder':
      raise data_lib.DataError('data.source=image_folder needs --config.data.path= (a folder '
                               'or tar laid out train/<class>/<image>)')
    return StreamData(d.source, name=d.name, path=d.path or None,
                      image_size=config.network.image_size,
                      validation_size=d.validation_size, seed=config.seed,
                      max_train=d.max_train or 0,
                      decode_threads=d.get('decode_threads', 8)).open()
  return data_lib.load_splits(d.source, name=d.name, path=d.path or None,
                              validation_size=d.validation_size, seed=config.seed,
                              max_train=d.max_train or None)
