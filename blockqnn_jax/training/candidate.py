"""Scoring a search candidate: early-stop training with the data held on the device.

A candidate compiles two programs of its own, and only what depends on its block:

* ``fit``: its training steps, either one compiled step driven from Python per batch
  (``loop='steps'``, what XLA:CPU runs fastest) or one ``lax.scan`` over an epoch's steps
  per epoch (``loop='scan'``); both train on the same batches from the same keys, so they
  train the same network.
* ``evaluate``: the validation accuracy and loss, batched with ``lax.map``.

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

``CandidateScorer`` is the part every way of scoring shares (prepare the block once, compile
or fetch its programs, train, check divergence, validate, reward, one ``EvalResult``, a
failure as a failed result); ``CandidateTrainer`` plugs in on-device data, and
``streamed.StreamingTrainer`` streamed batches.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
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
    self.compiler_options = engine.compiler_options(group.platform,
                                                    train_config.xla_cpu_fusion_emitters)

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

  def fit(self, compiled: CompiledCandidate, state: engine.TrainState, epoch_keys: jax.Array
          ) -> tuple[engine.TrainState, np.ndarray]:
    """Trains from ``state``: ``(trained state, per-epoch mean training loss)``."""
    g = self.group
    batches = self.epoch_batches()
    epoch_loss = []
    for epoch_key in epoch_keys:
      pixels, labels = batches(epoch_key, g.train_images, g.train_labels)
      if compiled.loop == 'steps':
        losses = []
        for i in range(self.steps_per_epoch):
          state, loss = compiled.fit(state, pixels, labels, i, g.mean, g.std)
          losses.append(loss)
        epoch_loss.append(jax.numpy.mean(jax.numpy.stack(losses)))
      else:
        state, loss = compiled.fit(state, pixels, labels, g.mean, g.std)
        epoch_loss.append(loss)
    return state, np.asarray(jax.numpy.stack(epoch_loss))  # waits for training

  def train(self, compiled: CompiledCandidate, seed: int
            ) -> tuple[engine.TrainState, np.ndarray]:
    """``start`` then ``fit``: a compiled candidate trained from ``seed``."""
    return self.fit(compiled, *self.start(compiled, seed))

  def _train(self, prepared: PreparedBlock, compiled: CompiledCandidate, seed: int) -> Trained:
    g, config = self.group, self.train_config
    self.epoch_batches()  # compiled by the first candidate only, not part of its training
    state, epoch_keys = self.start(compiled, seed)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    state, epoch_loss = self.fit(compiled, state, epoch_keys)
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
