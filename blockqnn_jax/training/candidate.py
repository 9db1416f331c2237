"""Scoring a search candidate: early-stop training with the data held on the device.

A candidate compiles two programs of its own, and only what depends on its block:

* ``fit``: its training steps, either one compiled step driven from Python per batch
  (``loop='steps'``, what XLA:CPU runs fastest) or one ``lax.scan`` over an epoch's steps
  per epoch (``loop='scan'``); both train on the same batches from the same keys, so they
  train the same network.
* ``evaluate``: the validation accuracy and loss, batched with ``lax.map``; also what
  scores it at its rungs under early stopping (``scorer.RungWatch``).

What is the same for every block is not compiled per candidate: each epoch's shuffled and
augmented batches come from one program per search and data shape (``engine.epoch_batches``,
gathering from the data already on the device), and the initial state is built op by op
(``initial_state``), whose small per-op programs later candidates share. Candidates draw
from the RBG PRNG (``TrainConfig.prng_impl``): with threefry, initialisation alone compiled
ten times slower than the forward pass.

A candidate's programs are compiled ahead of time from shapes alone
(``jit(...).lower(...).compile()``), so an executor can compile the next candidates on host
threads while the devices train the current ones, and compile time is a number of its own
in the result.

A candidate may span several devices: the batch is then sharded over a ``data`` mesh axis
and the parameters replicated, so it trains data-parallel with the same global batch.

``scorer.CandidateScorer`` is the part every way of scoring shares (prepare the block once,
compile or fetch its programs, train, check divergence, validate, reward, one
``EvalResult``, a failure as a failed result); ``CandidateTrainer`` here plugs in data on
the device (``devices.DeviceGroup``), ``streamed.StreamingTrainer`` streamed batches; both
keep programs in a ``compile_cache.CompileCache``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from blockqnn_jax.data import splits as splits_lib
from blockqnn_jax.models.prepare import PreparedBlock
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.search import NetworkSettings, RewardConfig, TrainConfig
from blockqnn_jax.storage.results import EvalResult
from blockqnn_jax.strategies.rungs import StopLines
from blockqnn_jax.training import engine
from blockqnn_jax.training.compile_cache import CompileCache
from blockqnn_jax.training.devices import DeviceGroup
from blockqnn_jax.training.scorer import CandidateScorer, Trained

__all__ = ['CandidateTrainer', 'CompiledCandidate', 'candidate_optimizer', 'candidate_step',
           'evaluate', 'initial_state']


def candidate_optimizer(config: TrainConfig, steps_per_epoch: int
                        ) -> optax.GradientTransformation:
  """Adam (AdamW with weight decay), the learning rate cut by ``lr_decay`` every
  ``lr_decay_epochs`` epochs (the paper's candidate training).

  With ``flat_optimizer``, applied to all parameters as one flat vector (``optax.flatten``):
  the same update element by element, in a few fused loops instead of a few per parameter,
  which compiles faster (and rounds a few results differently).
  """
  schedule = optax.exponential_decay(config.learning_rate,
                                     config.lr_decay_epochs * steps_per_epoch,
                                     config.lr_decay, staircase=True)
  tx = engine.make_optimizer('adam', schedule, b1=config.b1, b2=config.b2,
                             weight_decay=config.weight_decay)
  return optax.flatten(tx) if config.flat_optimizer else tx


def candidate_step(model, config: TrainConfig, steps_per_epoch: int):
  """``engine.fit_step`` with a candidate's model, optimiser and options bound.

  Returns:
    ``(tx, options, step)``: the optimiser, the augmentation (``engine.augment_batch``, run
    by the programs every candidate shares) and ``step(state, pixels, labels, mean, std)``.
  """
  tx = candidate_optimizer(config, steps_per_epoch)
  options = engine.StepOptions(augment=config.augment)

  def step(state, pixels, labels, mean, std):
    return engine.fit_step(state, pixels, labels, mean, std, model=model, tx=tx,
                           options=options)

  return tx, options, step


def initial_state(model, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
                  key: jax.Array, epochs: int, device: jax.Device
                  ) -> tuple[engine.TrainState, jax.Array]:
  """A candidate's state at step 0 and its epoch keys, from its training key.

  Not a program of its own: the parameters come from the initialisers alone
  (``engine.init_variables``; ``initializers`` makes them from draws shared by every
  network), the optimiser state is zeros of its shape (the candidate optimiser, Adam or
  AdamW, starts all its moments and counts at zero: tested against ``tx.init``), and the
  keys are split op by op on ``device``. A jitted ``init`` was a new program of 0.3-1.8 s
  per block here (benchmarks/evaluate.py); the values are the same, bit for bit.
  """
  with jax.default_device(device):
    init_key, data_key = jax.random.split(key)
    variables = engine.init_variables(init_key, model, image_shape)
    params = variables['params']
    opt_state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                             jax.eval_shape(tx.init, params))
    state = engine.TrainState(step=np.zeros((), np.int32), params=params,
                              batch_stats=variables['batch_stats'], opt_state=opt_state)
    return state, jax.random.split(data_key, epochs)


@dataclasses.dataclass
class CompiledCandidate:
  """A candidate's own programs (what depends on its block) and their compile time."""

  init: Any  # key -> (state, epoch_keys), op by op (``initial_state``)
  fit: Any  # steps: (state, pixels, labels, i, mean, std) -> (state, loss) for batch i;
  #           scan: (state, pixels, labels, mean, std) -> (state, mean loss of the epoch)
  evaluate: Any  # params, batch_stats, images, labels, mean, std -> (accuracy, loss)
  loop: str  # 'steps' or 'scan'
  compile_s: float


class CandidateTrainer(CandidateScorer):
  """Scores candidates on one device group whose data is held on the devices.

  A candidate runs three kinds of program: its initialisation op by op (``initial_state``:
  small programs shared by all candidates), each epoch's shuffled and augmented batches
  (``engine.epoch_batches``: one program for the whole search, compiled on first use), and
  its own two programs, compiled per canonical block: its training steps (one step, or the
  epoch's ``lax.scan`` of steps) and its validation.
  """

  def __init__(self, group: DeviceGroup, train_config: TrainConfig,
               reward_config: RewardConfig, network: NetworkSettings,
               cache: CompileCache | None = None, grammar: nsc.Grammar | None = None):
    super().__init__(group, train_config, reward_config, network, cache, grammar)
    self.image_shape = group.image_shape
    self.num_classes = group.num_classes
    self.steps_per_epoch = engine.steps_per_epoch(train_config.batch_size,
                                                  group.train_images.shape[0])
    self._shared = CompileCache(max_entries=4)  # the programs no block changes

  def _data_shapes(self) -> tuple:
    g = self.group
    return (g.train_images.shape, g.val_images.shape)

  @property
  def _batches_sharding(self) -> NamedSharding:
    """An epoch's batches ``(steps, B, ...)``: each batch split over the group's devices."""
    g = self.group
    return NamedSharding(g.mesh, P(None, 'data')) if len(g.devices) > 1 else g.replicated

  def _key_abstract(self) -> jax.ShapeDtypeStruct:
    rng = jax.eval_shape(lambda: jax.random.key(0, impl=self.train_config.prng_impl))
    return self.group.abstract(rng.shape, rng.dtype)

  def epoch_batches(self):
    """The compiled ``engine.epoch_batches`` of this data: ``(epoch_key, images, labels) ->
    (pixels, labels)``, compiled once for all candidates."""
    g, config = self.group, self.train_config

    def compile_it():
      batches = functools.partial(
          engine.epoch_batches, batch_size=config.batch_size,
          options=engine.StepOptions(augment=config.augment),
          batch_sharding=g.batch_sharding)
      abstract = lambda a: g.abstract(a.shape, a.dtype)
      return engine.compile_lowered(jax.jit(batches, out_shardings=self._batches_sharding).lower(
          self._key_abstract(), abstract(g.train_images), abstract(g.train_labels)),
          self.compiler_options)

    key = ('epoch_batches', self._data_shapes(), config.batch_size, config.augment,
           config.prng_impl, tuple(d.id for d in g.devices))
    return self._shared.get_or_compile(key, compile_it)[0]

  def _compile(self, prepared: PreparedBlock) -> CompiledCandidate:
    start = time.perf_counter()
    g, config = self.group, self.train_config
    model = self.model(prepared)
    tx, _, fit_step = candidate_step(model, config, self.steps_per_epoch)
    abstract = lambda a, sharding=None: g.abstract(a.shape, a.dtype, sharding)
    init = functools.partial(initial_state, model, tx, self.image_shape,
                             epochs=config.epochs, device=g.devices[0])
    # Shapes of the state, traced without running anything.
    state = jax.tree.map(abstract, jax.eval_shape(
        lambda key: engine.init_state(key, model, tx, self.image_shape), self._key_abstract()))
    steps, batch = self.steps_per_epoch, config.batch_size
    pixels = g.abstract((steps, batch) + self.image_shape, np.uint8, self._batches_sharding)
    labels = g.abstract((steps, batch), np.int32, self._batches_sharding)
    stats = abstract(g.mean)
    jit = lambda f, **kw: jax.jit(f, out_shardings=g.replicated, **kw)
    if self.loop == 'steps':
      def fit(state, pixels, labels, i, mean, std):
        state, (loss, _) = fit_step(state, pixels[i], labels[i], mean, std)
        return state, loss

      fit_l = jit(fit, donate_argnums=(0,)).lower(state, pixels, labels,
                                                  g.abstract((), np.int32), stats, stats)
    else:
      def fit(state, pixels, labels, mean, std):
        state, (loss, _) = engine.fit_epoch(state, pixels, labels, mean, std, step=fit_step)
        return state, loss

      fit_l = jit(fit, donate_argnums=(0,)).lower(state, pixels, labels, stats, stats)

    def evaluate(params, batch_stats, images, labels, mean, std):
      return engine.evaluate(params, batch_stats, images, labels, mean, std, model=model,
                             batch_size=config.eval_batch_size)

    evaluate_l = jit(evaluate).lower(state.params, state.batch_stats, abstract(g.val_images),
                                     abstract(g.val_labels), stats, stats)
    return CompiledCandidate(init, engine.compile_lowered(fit_l, self.compiler_options),
                             engine.compile_lowered(evaluate_l, self.compiler_options),
                             self.loop, time.perf_counter() - start)

  def start(self, compiled: CompiledCandidate, seed: int
            ) -> tuple[engine.TrainState, jax.Array]:
    """The initial state and epoch keys of a training from ``seed``, on the group."""
    key = jax.random.key(seed, impl=self.train_config.prng_impl)
    return jax.device_put(compiled.init(key), self.group.replicated)

  def fit(self, compiled: CompiledCandidate, state: engine.TrainState, epoch_keys: jax.Array,
          on_epoch=None) -> tuple[engine.TrainState, np.ndarray]:
    """Trains from ``state``: ``(trained state, per-epoch mean training loss)``; ``on_epoch``
    as ``engine.step_loop``'s (a ``RungWatch`` stops it early)."""
    g = self.group
    batches = self.epoch_batches()
    if compiled.loop == 'scan':  # one program per epoch: the loop is over epochs
      def epochs():
        for epoch_key in epoch_keys:
          yield (*batches(epoch_key, g.train_images, g.train_labels), g.mean, g.std)
      state, epoch_loss = engine.step_loop(state, epochs(), compiled.fit, 1, on_epoch)
    else:
      def steps():
        for epoch_key in epoch_keys:
          pixels, labels = batches(epoch_key, g.train_images, g.train_labels)
          for i in range(self.steps_per_epoch):
            yield pixels, labels, i, g.mean, g.std
      state, epoch_loss = engine.step_loop(state, steps(), compiled.fit, self.steps_per_epoch,
                                           on_epoch)
    return state, np.asarray(jax.numpy.stack(epoch_loss))  # waits for training

  def train(self, compiled: CompiledCandidate, seed: int
            ) -> tuple[engine.TrainState, np.ndarray]:
    """``start`` then ``fit``: a compiled candidate trained from ``seed``."""
    return self.fit(compiled, *self.start(compiled, seed))

  def _train(self, prepared: PreparedBlock, compiled: CompiledCandidate, seed: int,
             lines: StopLines | None = None) -> Trained:
    g, config = self.group, self.train_config
    self.epoch_batches()  # compiled by the first candidate only, not part of its training

    def validate(state):
      accuracy, loss = compiled.evaluate(state.params, state.batch_stats, g.val_images,
                                         g.val_labels, g.mean, g.std)
      return float(accuracy), float(loss)

    watch = self._watch(prepared, lines, validate)
    state, epoch_keys = self.start(compiled, seed)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    state, epoch_loss = self.fit(compiled, state, epoch_keys, watch)
    train_s = time.perf_counter() - t0 - watch.eval_s
    # Checked before validating: a diverged network is not worth evaluating.
    engine.check_divergence(epoch_loss, 0.0, self.num_classes)
    images = len(epoch_loss) * self.steps_per_epoch * config.batch_size
    if watch.stopped is not None:
      _, accuracy, val_loss = watch.stopped
      return Trained(epoch_loss, accuracy, val_loss, train_s, watch.eval_s, images / train_s,
                     watch.scores, watch.stopped_at)
    t0 = time.perf_counter()
    accuracy, val_loss = validate(state)
    eval_s = time.perf_counter() - t0 + watch.eval_s
    return Trained(epoch_loss, accuracy, val_loss, train_s, eval_s, images / train_s,
                   watch.scores)


def evaluate(block: nsc.Block, train_config: TrainConfig, reward_config: RewardConfig,
             network: NetworkSettings, splits: splits_lib.ImageSplits,
             devices: Sequence[jax.Device] | None = None, seed: int = 0,
             grammar: nsc.Grammar | None = None) -> EvalResult:
  """Scores one block on ``devices`` (default: the first local device).

  For many candidates keep a ``CandidateTrainer`` (or an executor) instead: it places the
  data once and reuses compiled programs.
  """
  devices = devices or jax.local_devices()[:1]
  trainer = CandidateTrainer(DeviceGroup.place(splits, devices), train_config, reward_config,
                             network, grammar=grammar)
  return trainer.evaluate(block, seed=seed)
