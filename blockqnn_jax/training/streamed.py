"""Scoring candidates on datasets too large for device memory (ImageNet): streamed batches.

CIFAR-sized data lives on the device (``candidate.CandidateTrainer``). ImageNet-sized data
cannot: here the host decodes batches ahead on background threads (``data.stream_batches``)
while the device runs one compiled ``engine.fit_step`` per batch. The search still never
sees the test split: ``StreamData.open`` holds a validation part out of the *training*
split (deterministic given the seed), and candidates train on the rest.

``StreamingTrainer`` plugs streamed batches into ``candidate.CandidateScorer``, so it
scores, fails and caches exactly as the in-memory trainer does, and the executors use it
unchanged when they are given an ``OpenStream`` instead of in-memory splits.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blockqnn_jax.data.stream import OpenStream
from blockqnn_jax.models.prepare import PreparedBlock
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.search import NetworkSettings, RewardConfig, TrainConfig
from blockqnn_jax.strategies.rungs import StopLines
from blockqnn_jax.training import candidate as candidate_lib
from blockqnn_jax.training import compile_cache, engine, scorer
from blockqnn_jax.training import devices as devices_lib

__all__ = ['CompiledStep', 'StreamingTrainer']

@dataclasses.dataclass
class CompiledStep:
  model: Any  # the network and optimiser, for the initial state (built op by op)
  tx: Any
  step: Any  # (state, pixels, labels, mean, std) -> (state, loss), augmented batches
  evaluate: Any
  compile_s: float


class StreamingTrainer(scorer.CandidateScorer):
  """Scores candidates on streamed batches; the counterpart of ``CandidateTrainer``.

  As there, a candidate compiles only what depends on its block (one training step on an
  augmented batch, one validation batch); the augmentation of a streamed batch is one
  program shared by every candidate, and the initial state is built op by op.
  """

  def __init__(self, stream: OpenStream, devices: Sequence[jax.Device],
               train_config: TrainConfig, reward_config: RewardConfig,
               network: NetworkSettings, cache: compile_cache.CompileCache | None = None,
               grammar: nsc.Grammar | None = None):
    super().__init__(devices_lib.DeviceMesh.of(devices), train_config, reward_config,
                     network, cache, grammar)
    self.stream = stream
    self.image_shape = stream.image_shape
    self.num_classes = stream.num_classes
    self.steps_per_epoch = engine.steps_per_epoch(train_config.batch_size,
                                                  len(stream.train_indices))
    g = self.group
    self.mean = jax.device_put(np.asarray(stream.data.mean, np.float32), g.replicated)
    self.std = jax.device_put(np.asarray(stream.data.std, np.float32), g.replicated)
    self._shared = compile_cache.CompileCache(max_entries=2)

  def _data_shapes(self) -> tuple:
    return ('stream', self.image_shape, len(self.stream.train_indices))

  def _key_abstract(self) -> jax.ShapeDtypeStruct:
    rng = jax.eval_shape(lambda: jax.random.key(0, impl=self.train_config.prng_impl))
    return self.group.abstract(rng.shape, rng.dtype)

  def _batch(self, n: int, shape, dtype) -> jax.ShapeDtypeStruct:
    return self.group.abstract((n,) + tuple(shape), dtype, self.group.batched)

  def augmentation(self):
    """The compiled ``(data_key, i, images) -> pixels``: batch ``i``'s crop and flip with
    ``fold_in(data_key, i)``, one program for every candidate."""
    g, config = self.group, self.train_config
    options = engine.StepOptions(augment=config.augment)

    def augment(data_key, i, images):
      return engine.augment_batch(jax.random.fold_in(data_key, i), images, options)

    def compile_it():
      return engine.compile_lowered(jax.jit(augment, out_shardings=g.batched).lower(
          self._key_abstract(), g.abstract((), jnp.int32),
          self._batch(config.batch_size, self.image_shape, jnp.uint8)), self.compiler_options)

    key = ('augment', self.image_shape, config.batch_size, config.augment, config.prng_impl,
           tuple(d.id for d in g.devices))
    return self._shared.get_or_compile(key, compile_it)[0]

  def _compile(self, prepared: PreparedBlock) -> CompiledStep:
    """Compiles one training step and one validation batch."""
    start = time.perf_counter()
    g, config = self.group, self.train_config
    model = self.model(prepared)
    tx, _, fit_step = candidate_lib.candidate_step(model, config, self.steps_per_epoch)

    def step(state, pixels, labels, mean, std):
      state, (loss, _) = fit_step(state, pixels, labels, mean, std)
      return state, loss

    def evaluate(params, batch_stats, images, labels, weights, mean, std):
      return engine.eval_sums(params, batch_stats, images, labels, weights, mean, std,
                              model=model)

    state = jax.tree.map(lambda a: g.abstract(a.shape, a.dtype), jax.eval_shape(
        lambda key: engine.init_state(key, model, tx, self.image_shape), self._key_abstract()))
    stats = g.abstract(self.mean.shape, jnp.float32)
    b, e = config.batch_size, config.eval_batch_size
    step_c = jax.jit(step, donate_argnums=(0,), out_shardings=g.replicated).lower(
        state, self._batch(b, self.image_shape, jnp.uint8), self._batch(b, (), jnp.int32),
        stats, stats)
    eval_c = jax.jit(evaluate, out_shardings=g.replicated).lower(
        state.params, state.batch_stats, self._batch(e, self.image_shape, jnp.uint8),
        self._batch(e, (), jnp.int32), self._batch(e, (), jnp.float32), stats, stats)
    return CompiledStep(model, tx, engine.compile_lowered(step_c, self.compiler_options),
                        engine.compile_lowered(eval_c, self.compiler_options),
                        time.perf_counter() - start)

  def _train(self, prepared: PreparedBlock, compiled: CompiledStep, seed: int,
             lines: StopLines | None = None) -> scorer.Trained:
    g, config = self.group, self.train_config
    augment = self.augmentation()
    with jax.default_device(g.devices[0]):  # op by op: small programs every candidate shares
      init_key, data_key = jax.random.split(jax.random.key(seed, impl=config.prng_impl))
      state = engine.init_state(init_key, compiled.model, compiled.tx, self.image_shape)
    state, data_key = jax.device_put((state, data_key), g.replicated)
    t0 = time.perf_counter()
    stream = self.stream.batches('train', config.batch_size, seed=seed,
                                 num_epochs=config.epochs)

    def steps():
      for i, (images, labels) in enumerate(stream):
        yield (augment(data_key, i, jax.device_put(images, g.batched)),
               jax.device_put(labels, g.batched), self.mean, self.std)

    # Checks every epoch (stops streaming a diverged candidate at the end of its epoch), and
    # at the rungs validates and stops a loser.
    watch = self._watch(prepared, lines, lambda state: self._validate(
        compiled, state.params, state.batch_stats), check_every_epoch=True)
    batches = steps()
    try:
      state, epoch_loss = engine.step_loop(state, batches, compiled.step,
                                           self.steps_per_epoch, on_epoch=watch)
    finally:
      batches.close()  # a stopped candidate's stream stops decoding
      stream.close()
    epoch_losses = [float(x) for x in epoch_loss]
    jax.block_until_ready(state)
    train_s = time.perf_counter() - t0 - watch.eval_s
    images_seen = len(epoch_losses) * self.steps_per_epoch * config.batch_size
    if watch.stopped is not None:
      _, accuracy, val_loss = watch.stopped
      return scorer.Trained(np.asarray(epoch_losses), accuracy, val_loss, train_s,
                            watch.eval_s, images_seen / train_s, watch.scores,
                            watch.stopped_at)
    t0 = time.perf_counter()
    accuracy, val_loss = self._validate(compiled, state.params, state.batch_stats)
    eval_s = time.perf_counter() - t0 + watch.eval_s
    return scorer.Trained(np.asarray(epoch_losses), accuracy, val_loss, train_s,
                          eval_s, images_seen / train_s, watch.scores)

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


