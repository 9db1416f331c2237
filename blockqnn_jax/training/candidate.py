"""Scoring a search candidate: early-stop training with the data held on the device.

A candidate compiles into two programs and nothing else:

* ``train``: initialisation and *all* epochs, either as one XLA program (``loop='scan'``:
  ``lax.scan`` over epochs and over the steps of an epoch) or as one compiled step driven
  from Python (``loop='steps'``, what XLA:CPU runs fastest); both draw the same keys and
  batches (``engine.epoch_plan``), so they train the same network. The data already lives
  on the device: each step gathers its batch by index and augments it in place. Candidates
  draw from the RBG PRNG (``TrainConfig.prng_impl``): with threefry, initialisation alone
  compiled ten times slower than the forward pass.
* ``evaluate``: the validation accuracy and loss, batched with ``lax.map``.

Both are compiled ahead of time from shapes alone (``jit(...).lower(...).compile()``), so an
executor can compile the next candidates on host threads while the devices train the
current ones, and compile time is a number of its own in the result.

A candidate may span several devices: the batch is then sharded over a ``data`` mesh axis
and the parameters replicated, so it trains data-parallel with the same global batch.

``CandidateScorer`` is the part every way of scoring shares (prepare the block once, compile
or fetch its programs, train, check divergence, validate, reward, one ``EvalResult``, a
failure as a failed result); ``CandidateTrainer`` plugs in on-device data, and
``streamed.StreamingTrainer`` streamed batches.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import threading
import time
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax

from blockqnn_jax import data as data_lib
from blockqnn_jax import networks
from blockqnn_jax import nsc
from blockqnn_jax import results
from blockqnn_jax.prepare import PreparedBlock
from blockqnn_jax.results import EvalResult, RewardConfig
from blockqnn_jax.settings import NetworkSettings, TrainConfig
from blockqnn_jax.training import engine

# A training loss this many times chance level (ln K) has exploded, whether or not it is
# still finite: a learning rate of 1e30 gives losses near 1e30 and chance accuracy.
EXPLODED_LOSS_FACTOR = 100.0


def candidate_optimizer(config: TrainConfig, steps_per_epoch: int
                        ) -> optax.GradientTransformation:
  """Adam (AdamW with weight decay), the learning rate cut by ``lr_decay`` every
  ``lr_decay_epochs`` epochs (the paper's candidate training)."""
  schedule = optax.exponential_decay(config.learning_rate,
                                     config.lr_decay_epochs * steps_per_epoch,
                                     config.lr_decay, staircase=True)
  return engine.make_optimizer('adam', schedule, b1=config.b1, b2=config.b2,
                               weight_decay=config.weight_decay)


def candidate_step(model, config: TrainConfig, steps_per_epoch: int):
  """``engine.train_step`` with a candidate's model, optimiser and augmentation bound."""
  tx = candidate_optimizer(config, steps_per_epoch)
  options = engine.StepOptions(augment=config.augment)

  def step(state, images, labels, key, mean, std):
    return engine.train_step(state, images, labels, key, mean, std, model=model, tx=tx,
                             options=options)

  return tx, step


@dataclasses.dataclass
class DeviceMesh:
  """The devices one candidate runs on, as a one-axis ('data') mesh."""

  devices: tuple[jax.Device, ...]
  mesh: Mesh

  @classmethod
  def of(cls, devices: Sequence[jax.Device]) -> 'DeviceMesh':
    devices = tuple(devices)
    return cls(devices, Mesh(np.asarray(devices), ('data',)))

  @property
  def name(self) -> str:
    return ','.join(f'{d.platform}:{d.id}' for d in self.devices)

  @property
  def platform(self) -> str:
    return self.devices[0].platform

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batched(self) -> NamedSharding:
    """Batches split over the devices."""
    return NamedSharding(self.mesh, P('data'))

  @property
  def batch_sharding(self) -> NamedSharding | None:
    return self.batched if len(self.devices) > 1 else None

  def abstract(self, shape, dtype, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding or self.replicated)


@dataclasses.dataclass
class DeviceGroup(DeviceMesh):
  """The devices one candidate runs on, with the data already placed there."""

  train_images: jax.Array
  train_labels: jax.Array
  val_images: jax.Array
  val_labels: jax.Array
  mean: jax.Array
  std: jax.Array
  num_classes: int

  @classmethod
  def place(cls, splits: data_lib.ImageSplits, devices: Sequence[jax.Device]) -> 'DeviceGroup':
    """Copies the train and validation splits to ``devices`` (replicated on each)."""
    on = DeviceMesh.of(devices)
    put = lambda a: jax.device_put(a, on.replicated)
    mean, std = splits.channel_stats()
    return cls(on.devices, on.mesh, put(splits.train_images), put(splits.train_labels),
               put(splits.val_images), put(splits.val_labels),
               put(np.asarray(mean, np.float32)), put(np.asarray(std, np.float32)),
               splits.num_classes)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train_images.shape[1:])


class CompileCache:
  """Compiled programs keyed by (canonical block, network, training, shapes, devices).

  Equivalent blocks are built from their canonical form, so they lower to the same
  program and share an entry. Thread-safe; bounded (least recently used entries go). A
  program being compiled by one thread is waited for by another that asks for it, never
  compiled twice (``get_or_compile``).
  """

  def __init__(self, max_entries: int = 64):
    self._entries: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()
    self._max = max_entries
    self._compiling: dict[Any, concurrent.futures.Future] = {}
    self.hits = 0
    self.misses = 0

  def get_or_compile(self, key, compile_fn) -> tuple[Any, bool]:
    """``(value, cached)``: the entry, else ``compile_fn()``'s value, stored. ``cached`` is
    True when another call compiled it (before, or while this one waited)."""
    with self._lock:
      if key in self._entries:
        self._entries.move_to_end(key)
        self.hits += 1
        return self._entries[key], True
      future = self._compiling.get(key)
      owner = future is None
      if owner:
        future = self._compiling[key] = concurrent.futures.Future()
        self.misses += 1
      else:
        self.hits += 1
    if not owner:
      return future.result(), True  # raises what the compiling thread raised
    try:
      value = compile_fn()
    except BaseException as e:
      with self._lock:
        del self._compiling[key]
      future.set_exception(e)
      raise
    self.put(key, value)
    with self._lock:
      del self._compiling[key]
    future.set_result(value)
    return value, False

  def get(self, key):
    with self._lock:
      if key in self._entries:
        self._entries.move_to_end(key)
        self.hits += 1
        return self._entries[key]
      self.misses += 1
      return None

  def put(self, key, value):
    with self._lock:
      self._entries[key] = value
      self._entries.move_to_end(key)
      while len(self._entries) > self._max:
        self._entries.popitem(last=False)


@dataclasses.dataclass(frozen=True)
class Trained:
  """What a trainer's ``train`` hands back to the shared scoring."""

  epoch_loss: np.ndarray  # (epochs,) mean training loss per epoch
  accuracy: float  # validation accuracy
  val_loss: float
  train_s: float
  eval_s: float
  images_per_s: float


class CandidateScorer:
  """Scores candidates on one device group: the part every kind of data shares.

  A subclass provides ``image_shape``, ``num_classes``, ``_compile(prepared)`` and
  ``_train(prepared, compiled, seed) -> Trained``; ``evaluate`` does the rest.
  """

  def __init__(self, group: DeviceMesh, train_config: TrainConfig, reward_config: RewardConfig,
               network: NetworkSettings, cache: CompileCache | None = None,
               grammar: nsc.Grammar | None = None):
    self.group = group
    self.train_config = train_config
    self.reward_config = reward_config
    self.network = network
    self.cache = cache if cache is not None else CompileCache()
    self.grammar = grammar
    self.dtype = engine.resolve_dtype(train_config.compute_dtype, group.platform)
    self.loop = engine.resolve_loop(train_config.loop, group.platform)

  image_shape: tuple[int, ...]
  num_classes: int

  def prepare(self, block: nsc.Block) -> PreparedBlock:
    """Validates ``block`` and works out its network and costs for this data."""
    # Without the search's grammar, the default one with room for the block's layers.
    grammar = self.grammar or nsc.Grammar(max_index=max(2, len(block.layers)))
    return PreparedBlock.prepare(block, self.network, self.image_shape, self.num_classes,
                                 grammar)

  def model(self, prepared: PreparedBlock) -> networks.BlockNet:
    return networks.BlockNet(prepared.spec, dtype=self.dtype,
                             scan_blocks=self.network.scan_blocks)

  def _cache_key(self, prepared: PreparedBlock) -> tuple:
    return (prepared.key, self.network, self.train_config, str(self.dtype), self.loop,
            self._data_shapes(), tuple(d.id for d in self.group.devices))

  def _data_shapes(self) -> tuple:
    raise NotImplementedError

  def compile(self, block: nsc.Block | PreparedBlock) -> tuple[Any, bool]:
    """Compiles (or fetches) the programs of ``block``'s canonical form: (programs, cached)."""
    prepared = block if isinstance(block, PreparedBlock) else self.prepare(block)
    return self.cache.get_or_compile(self._cache_key(prepared),
                                     lambda: self._compile(prepared))

  def _compile(self, prepared: PreparedBlock) -> Any:
    raise NotImplementedError

  def _train(self, prepared: PreparedBlock, compiled: Any, seed: int) -> Trained:
    raise NotImplementedError

  def evaluate(self, block: nsc.Block | PreparedBlock, seed: int = 0,
               compiled: tuple[Any, bool] | None = None) -> EvalResult:
    """Trains and validates ``block``; a failure comes back as a failed result, not raised.

    ``block`` may come prepared (``prepare``), and ``compiled`` is what ``compile(block)``
    returned, when the caller prepared and compiled ahead.
    """
    start = time.perf_counter()
    raw = block.block if isinstance(block, PreparedBlock) else block
    base = dict(block=raw.to_text() if isinstance(raw, nsc.Block) else str(raw),
                canonical_key='', device=self.group.name)
    try:
      prepared = block if isinstance(block, PreparedBlock) else self.prepare(block)
      base.update(prepared.result_fields())
      programs, cached = compiled if compiled is not None else self.compile(prepared)
      trained = self._train(prepared, programs, seed)
      check_divergence(trained.epoch_loss, trained.val_loss, self.num_classes)
      return EvalResult(
          **base, status='ok', val_accuracy=trained.accuracy,
          reward=prepared.reward(trained.accuracy, self.reward_config),
          final_loss=float(trained.epoch_loss[-1]),
          compile_s=0.0 if cached else programs.compile_s, train_s=trained.train_s,
          eval_s=trained.eval_s, total_s=time.perf_counter() - start,
          images_per_s=trained.images_per_s, compile_cached=cached)
    except Exception as e:  # a failed candidate is a result; the search goes on
      return EvalResult(**base, status='failed', failure_reason=results.describe_failure(e),
                        total_s=time.perf_counter() - start)


def check_divergence(epoch_loss: Sequence[float], val_loss: float, num_classes: int) -> None:
  """Raises ``results.Diverged`` when a loss is not finite or has exploded past
  ``EXPLODED_LOSS_FACTOR`` times chance level."""
  limit = EXPLODED_LOSS_FACTOR * math.log(max(num_classes, 2))
  for epoch, loss in enumerate(np.asarray(epoch_loss, np.float64), 1):
    if not math.isfinite(loss):
      raise results.Diverged(f'diverged: training loss is {loss} in epoch {epoch}')
    if loss > limit:
      raise results.Diverged(f'diverged: training loss {loss:.3g} in epoch {epoch} exceeds '
                             f'{limit:.3g} ({EXPLODED_LOSS_FACTOR:g}x chance level)')
  if not math.isfinite(val_loss):
    raise results.Diverged(f'diverged: validation loss is {val_loss}')


@dataclasses.dataclass
class CompiledCandidate:
  train: Any  # key, images, labels, mean, std -> (state, epoch_loss)
  evaluate: Any  # params, batch_stats, images, labels, mean, std -> (accuracy, loss)
  compile_s: float


class StepwiseTrain:
  """A candidate's whole training as one compiled step per batch, driven from Python:
  the same epoch keys, batch order and per-step keys as the scanned program."""

  def __init__(self, init, plan, step, epochs: int, steps: int):
    self.init, self.plan, self.step = init, plan, step
    self.epochs, self.steps = epochs, steps

  def __call__(self, key, images, labels, mean, std):
    state, epoch_keys = self.init(key)
    epoch_loss = []
    for epoch in range(self.epochs):
      order, step_keys = self.plan(epoch_keys, epoch)
      losses = []
      for i in range(self.steps):
        state, loss = self.step(state, images, labels, order, step_keys, i, mean, std)
        losses.append(loss)
      epoch_loss.append(jax.numpy.mean(jax.numpy.stack(losses)))
    return state, jax.numpy.stack(epoch_loss)


class CandidateTrainer(CandidateScorer):
  """Scores candidates on one device group whose data is held on the devices."""

  def __init__(self, group: DeviceGroup, train_config: TrainConfig,
               reward_config: RewardConfig, network: NetworkSettings,
               cache: CompileCache | None = None, grammar: nsc.Grammar | None = None):
    super().__init__(group, train_config, reward_config, network, cache, grammar)
    self.image_shape = group.image_shape
    self.num_classes = group.num_classes
    self.steps_per_epoch = engine.steps_per_epoch(train_config.batch_size,
                                                  group.train_images.shape[0])

  def _data_shapes(self) -> tuple:
    g = self.group
    return (g.train_images.shape, g.val_images.shape)

  def _compile(self, prepared: PreparedBlock) -> CompiledCandidate:
    start = time.perf_counter()
    g, config = self.group, self.train_config
    model = self.model(prepared)
    tx, train_step = candidate_step(model, config, self.steps_per_epoch)
    num_train, batch = g.train_images.shape[0], config.batch_size
    abstract = lambda a: g.abstract(a.shape, a.dtype)
    images, labels, stats = abstract(g.train_images), abstract(g.train_labels), abstract(g.mean)
    rng = jax.eval_shape(lambda: jax.random.key(0, impl=config.prng_impl))
    key = g.abstract(rng.shape, rng.dtype)

    def init(key):
      init_key, data_key = jax.random.split(key)
      return (engine.init_state(init_key, model, tx, self.image_shape),
              jax.random.split(data_key, config.epochs))

    jit = lambda f, **kw: jax.jit(f, out_shardings=g.replicated, **kw)
    if self.loop == 'steps':
      init_l = jit(init).lower(key)
      state, epoch_keys = jax.tree.map(abstract, init_l.out_info)
      index = g.abstract((), np.int32)

      def plan(epoch_keys, epoch):
        return engine.epoch_plan(epoch_keys[epoch], num_train, batch)

      plan_l = jit(plan).lower(epoch_keys, index)
      order, step_keys = jax.tree.map(abstract, plan_l.out_info)
      indexed = engine.indexed_step(train_step, g.batch_sharding)

      def step(state, images, labels, order, step_keys, i, mean, std):
        state, (loss, _) = indexed(state, images, labels, order[i], step_keys[i], mean, std)
        return state, loss

      step_l = jit(step, donate_argnums=(0,)).lower(
          state, images, labels, order, step_keys, index, stats, stats)
      train = StepwiseTrain(init_l.compile(), plan_l.compile(), step_l.compile(),
                            config.epochs, self.steps_per_epoch)
      trained_state = state
    else:
      def train_all(key, images, labels, mean, std):
        state, epoch_keys = init(key)

        def epoch(state, epoch_key):
          state, (loss, _) = engine.train_epoch(state, epoch_key, images, labels, mean, std,
                                                step=train_step, batch_size=batch,
                                                batch_sharding=g.batch_sharding)
          return state, loss

        return jax.lax.scan(epoch, state, epoch_keys)

      lowered = jit(train_all).lower(key, images, labels, stats, stats)
      trained_state = lowered.out_info[0]  # shapes of the trained state, known without running
      train = lowered.compile()

    def evaluate(params, batch_stats, images, labels, mean, std):
      return engine.evaluate(params, batch_stats, images, labels, mean, std, model=model,
                             batch_size=config.eval_batch_size)

    evaluate_c = jit(evaluate).lower(
        jax.tree.map(abstract, trained_state.params),
        jax.tree.map(abstract, trained_state.batch_stats), abstract(g.val_images),
        abstract(g.val_labels), stats, stats).compile()
    return CompiledCandidate(train, evaluate_c, time.perf_counter() - start)

  def _train(self, prepared: PreparedBlock, compiled: CompiledCandidate, seed: int) -> Trained:
    g, config = self.group, self.train_config
    key = jax.device_put(jax.random.key(seed, impl=config.prng_impl), g.replicated)
    t0 = time.perf_counter()
    state, epoch_loss = compiled.train(key, g.train_images, g.train_labels, g.mean, g.std)
    epoch_loss = np.asarray(epoch_loss)  # waits for training
    train_s = time.perf_counter() - t0
    # Checked before validating: a diverged network is not worth evaluating.
    check_divergence(epoch_loss, 0.0, self.num_classes)
    t0 = time.perf_counter()
    accuracy, val_loss = compiled.evaluate(state.params, state.batch_stats, g.val_images,
                                           g.val_labels, g.mean, g.std)
    accuracy = float(accuracy)
    eval_s = time.perf_counter() - t0
    images = config.epochs * self.steps_per_epoch * config.batch_size
    return Trained(epoch_loss, accuracy, float(val_loss), train_s, eval_s, images / train_s)


def evaluate(block: nsc.Block, train_config: TrainConfig, reward_config: RewardConfig,
             network: NetworkSettings, splits: data_lib.ImageSplits,
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


def enable_persistent_compilation_cache(directory: str | None) -> None:
  """Keeps every compiled program in ``directory`` (JAX's persistent cache); None disables.

  A resumed search then reloads the programs of the candidates it had in flight instead
  of compiling them again. Call it at the program's edge (it is process-wide state).
  """
  from jax.experimental.compilation_cache import compilation_cache
  compilation_cache.reset_cache()  # so the setting holds even after earlier compiles
  jax.config.update('jax_compilation_cache_dir', None if directory is None else str(directory))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
