"""Early-stop training of a candidate block: the block in, its reward out.

A candidate is compiled into two XLA programs and nothing else:

* ``train``: parameter initialisation and *all* epochs in one program (``lax.scan`` over
  epochs and over the steps of an epoch). The data already lives on the device, each step
  gathers its batch by index and augments it in place, so the host dispatches one call and
  waits once: no input pipeline, no per-step synchronisation. Initialisation is inside the
  program too (its forward pass is dead code XLA drops); what it does cost to compile is
  the random initialisers, which is why candidates draw from the RBG PRNG
  (``TrainConfig.prng_impl``): with threefry, init alone compiled ten times slower than the
  forward pass.
* ``evaluate``: the validation accuracy and loss, batched with ``lax.map``.

Both are compiled ahead of time from shapes alone (``jit(...).lower(...).compile()``), which
is what lets an executor compile the next candidates on host threads while the devices
train the current ones, and makes compile time a number of its own in the result.

A candidate may span several devices (``devices``): the batch is then sharded over a
``data`` mesh axis and the parameters replicated, so it trains data-parallel with the same
global batch, and the same BatchNorm statistics, as on one device.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax

from blockqnn_jax import canonical
from blockqnn_jax import cost
from blockqnn_jax import data as data_lib
from blockqnn_jax import networks
from blockqnn_jax import nsc
from blockqnn_jax import results
from blockqnn_jax.results import EvalResult, RewardConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How a candidate is trained (paper defaults: 12 epochs of Adam, lr 1e-3 × 0.2 every 5).

  Attributes:
    epochs: training epochs (early stop).
    batch_size: global batch size (split over the candidate's devices).
    learning_rate: Adam's initial learning rate.
    lr_decay: factor applied every ``lr_decay_epochs`` epochs.
    lr_decay_epochs: epochs between decays.
    b1, b2: Adam's betas.
    weight_decay: decoupled weight decay (AdamW); 0 is plain Adam as in the paper.
    compute_dtype: 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32' or 'bfloat16'.
      Parameters and optimiser state stay float32.
    augment: pad-4 random crop and horizontal flip inside the step.
    eval_batch_size: batch size of the validation pass.
    prng_impl: the PRNG of a candidate's initialisation, shuffling and augmentation. 'rbg'
      (XLA's RngBitGenerator) compiles in a fraction of threefry's time — threefry's
      unrolled hash was over half of a small candidate's compile time on CPU — at the cost
      of bit streams that differ between backends.
    loop: how the training steps run. 'scan': the whole training (all epochs) is one XLA
      program, a ``lax.scan`` over steps; 'steps': one compiled step per batch driven from
      Python (same keys, same batches, same updates); 'auto': 'steps' on CPU, where XLA runs
      a scanned body 9-20x slower than the same step dispatched alone (benchmarks/
      evaluate.py), 'scan' on GPU/TPU.
  """

  epochs: int = 12
  batch_size: int = 256
  learning_rate: float = 1e-3
  lr_decay: float = 0.2
  lr_decay_epochs: int = 5
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 0.0
  compute_dtype: str = 'auto'
  augment: bool = True
  eval_batch_size: int = 1000
  prng_impl: str = 'rbg'
  loop: str = 'auto'


def block_cost_terms(block: nsc.Block, spec: networks.NetworkSpec) -> tuple[int, int]:
  """(block FLOPs, reference FLOPs) at the first stage, as ``RewardConfig`` defines them."""
  stage = spec.shape.stages[0]
  f = spec.features
  flops = cost.block_flops(block, f, f, stage.height, stage.width)
  reference = 2 * 9 * f * f * stage.height * stage.width
  return flops, reference


def resolve_dtype(compute_dtype: str, devices: Sequence[jax.Device]) -> Any:
  if compute_dtype == 'auto':
    return jnp.float32 if devices[0].platform == 'cpu' else jnp.bfloat16
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[compute_dtype]


def resolve_loop(loop: str, devices: Sequence[jax.Device]) -> str:
  if loop == 'auto':
    return 'steps' if devices[0].platform == 'cpu' else 'scan'
  if loop not in ('scan', 'steps'):
    raise ValueError(f"train.loop must be 'auto', 'scan' or 'steps', got {loop!r}")
  return loop


@flax.struct.dataclass
class TrainOutput:
  params: Any
  batch_stats: Any
  epoch_loss: jnp.ndarray  # (epochs,) mean training loss per epoch
  epoch_accuracy: jnp.ndarray  # (epochs,) training accuracy per epoch (augmented batches)


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def steps_per_epoch(config: TrainConfig, num_train: int) -> int:
  """Full batches per epoch (the remainder is left out of that epoch's shuffle)."""
  steps = num_train // config.batch_size
  if steps == 0:
    raise ValueError(f'batch_size {config.batch_size} exceeds the {num_train} training '
                     f'images')
  return steps


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam (AdamW with weight decay) with the learning rate cut by ``lr_decay`` every
  ``lr_decay_epochs`` epochs."""
  schedule = optax.exponential_decay(config.learning_rate,
                                     config.lr_decay_epochs * steps_per_epoch,
                                     config.lr_decay, staircase=True)
  if config.weight_decay:
    return optax.adamw(schedule, config.b1, config.b2, weight_decay=config.weight_decay)
  return optax.adam(schedule, config.b1, config.b2)


def make_step(model, tx: optax.GradientTransformation, config: TrainConfig) -> Callable:
  """``step(params, batch_stats, opt_state, batch, labels, key, mean, std)`` -> the updated
  ``(params, batch_stats, opt_state)`` and ``(loss, accuracy)`` of one uint8 batch
  (augmented when ``config.augment``)."""

  def step(params, batch_stats, opt_state, batch, labels, key, mean, std):
    if config.augment:
      x = data_lib.augment(key, batch, mean=mean, std=std)
    else:
      x = data_lib.normalize(batch, mean, std)

    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                                    train=True, mutable=['batch_stats'])
      return _cross_entropy(logits, labels).mean(), (updates['batch_stats'], logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    accuracy = (logits.argmax(-1) == labels).mean()
    return (params, batch_stats, opt_state), (loss, accuracy)

  return step


def make_train_fn(model, config: TrainConfig, num_train: int, batch_sharding=None
                  ) -> Callable:
  """``train(key, images, labels, mean, std) -> TrainOutput``, pure and jittable.

  ``images`` is the whole training split, uint8 ``(N, H, W, C)``; ``labels`` int32 ``(N,)``.
  """
  steps = steps_per_epoch(config, num_train)
  tx = make_optimizer(config, steps)
  one_step = make_step(model, tx, config)

  def constrain(x):
    return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

  def train(key, images, labels, mean, std):
    init_key, data_key = jax.random.split(key)
    variables = model.init(init_key, jnp.zeros((1,) + images.shape[1:], jnp.float32),
                           train=False)
    params, batch_stats = variables['params'], variables['batch_stats']
    opt_state = tx.init(params)

    def step(carry, xs):
      index, step_key = xs
      return one_step(*carry, constrain(images[index]), labels[index], step_key, mean, std)

    def epoch(carry, epoch_key):
      perm_key, step_key = jax.random.split(epoch_key)
      order = jax.random.permutation(perm_key, num_train)[:steps * config.batch_size]
      xs = (order.reshape(steps, config.batch_size), jax.random.split(step_key, steps))
      carry, (loss, accuracy) = jax.lax.scan(step, carry, xs)
      return carry, (loss.mean(), accuracy.mean())

    carry = (params, batch_stats, opt_state)
    (params, batch_stats, _), (loss, accuracy) = jax.lax.scan(
        epoch, carry, jax.random.split(data_key, config.epochs))
    return TrainOutput(params, batch_stats, loss, accuracy)

  return train


class StepwiseTrain:
  """``train(key, images, labels, mean, std) -> TrainOutput`` as ``make_train_fn``'s, but
  with one compiled program per step, driven from Python: the same epoch keys, batch order
  and per-step keys as the scanned program, so the two train the same network.

  Built by ``compile_stepwise`` from ahead-of-time compiled pieces.
  """

  def __init__(self, init, plan, step, epochs: int, steps: int, params_info=None,
               batch_stats_info=None):
    self.init, self.plan, self.step = init, plan, step
    self.epochs, self.steps = epochs, steps
    self.params_info, self.batch_stats_info = params_info, batch_stats_info  # shapes

  def __call__(self, key, images, labels, mean, std) -> TrainOutput:
    state, epoch_keys = self.init(key)
    epoch_loss, epoch_accuracy = [], []
    for epoch in range(self.epochs):
      order, step_keys = self.plan(epoch_keys, epoch)
      losses, accuracies = [], []
      for i in range(self.steps):
        state, (loss, accuracy) = self.step(*state, images, labels, order, step_keys, i,
                                            mean, std)
        losses.append(loss)
        accuracies.append(accuracy)
      epoch_loss.append(jnp.mean(jnp.stack(losses)))
      epoch_accuracy.append(jnp.mean(jnp.stack(accuracies)))
    return TrainOutput(state[0], state[1], jnp.stack(epoch_loss), jnp.stack(epoch_accuracy))


def compile_stepwise(model, config: TrainConfig, key_shape, images, labels, stats,
                     replicated, batch_sharding=None) -> StepwiseTrain:
  """Compiles the pieces of a ``StepwiseTrain`` for abstract (ShapeDtypeStruct) inputs."""
  num_train = images.shape[0]
  steps = steps_per_epoch(config, num_train)
  tx = make_optimizer(config, steps)
  one_step = make_step(model, tx, config)

  def init(key):
    init_key, data_key = jax.random.split(key)
    variables = model.init(init_key, jnp.zeros((1,) + images.shape[1:], jnp.float32),
                           train=False)
    params = variables['params']
    return ((params, variables['batch_stats'], tx.init(params)),
            jax.random.split(data_key, config.epochs))

  def plan(epoch_keys, epoch):
    perm_key, step_key = jax.random.split(epoch_keys[epoch])
    order = jax.random.permutation(perm_key, num_train)[:steps * config.batch_size]
    return order.reshape(steps, config.batch_size), jax.random.split(step_key, steps)

  def step(params, batch_stats, opt_state, images, labels, order, step_keys, i, mean, std):
    index = order[i]
    batch = images[index]
    if batch_sharding is not None:
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return one_step(params, batch_stats, opt_state, batch, labels[index], step_keys[i],
                    mean, std)

  jit = lambda f, **kw: jax.jit(f, out_shardings=replicated, **kw)
  init_l = jit(init).lower(key_shape)
  state, epoch_keys = init_l.out_info
  as_input = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated)
  epoch_keys = as_input(epoch_keys)
  index = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  plan_l = jit(plan).lower(epoch_keys, index)
  order, step_keys = (as_input(a) for a in plan_l.out_info)
  step_l = jit(step, donate_argnums=(0, 1, 2)).lower(
      *jax.tree.map(as_input, state), images, labels, order, step_keys, index, stats, stats)
  return StepwiseTrain(init_l.compile(), plan_l.compile(), step_l.compile(), config.epochs,
                       steps, state[0], state[1])


def make_eval_fn(model, config: TrainConfig, num_eval: int) -> Callable:
  """``evaluate(params, batch_stats, images, labels, mean, std) -> (accuracy, loss)``.

  The validation split is cut into equal batches (the last partial batch is padded and
  masked), so every image counts once.
  """
  batch = min(config.eval_batch_size, num_eval)
  num_batches = -(-num_eval // batch)

  def evaluate(params, batch_stats, images, labels, mean, std):
    pad = num_batches * batch - num_eval
    images = jnp.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0)))
    labels = jnp.pad(labels, (0, pad))
    weights = jnp.pad(jnp.ones((num_eval,), jnp.float32), (0, pad))
    shaped = lambda a: a.reshape((num_batches, batch) + a.shape[1:])

    def one(xs):
      x, y, w = xs
      logits = model.apply({'params': params, 'batch_stats': batch_stats},
                           data_lib.normalize(x, mean, std), train=False)
      correct = (logits.argmax(-1) == y) * w
      return correct.sum(), (_cross_entropy(logits, y) * w).sum()

    correct, loss = jax.lax.map(one, (shaped(images), shaped(labels), shaped(weights)))
    return correct.sum() / num_eval, loss.sum() / num_eval

  return evaluate


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
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batched(self) -> NamedSharding:
    """Batches split over the devices."""
    return NamedSharding(self.mesh, P('data'))


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
  def batch_sharding(self) -> NamedSharding | None:
    return self.batched if len(self.devices) > 1 else None


@dataclasses.dataclass
class CompiledCandidate:
  train: Any  # jax.stages.Compiled
  evaluate: Any
  compile_s: float


class CompileCache:
  """Compiled programs keyed by (canonical block, network, training, shapes, devices).

  Equivalent blocks are built from their canonical form, so they lower to the same
  program and share an entry. Thread-safe; bounded (least recently used entries go).
  """

  def __init__(self, max_entries: int = 64):
    import collections
    import threading
    self._entries: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()
    self._max = max_entries
    self.hits = 0
    self.misses = 0

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


def build_spec(block: nsc.Block, network_config, image_shape: Sequence[int] | None = None,
               num_classes: int | None = None) -> networks.NetworkSpec:
  """The search network for ``block`` from a config section (``config.network``).

  ``image_shape`` (H, W, C) and ``num_classes`` come from the data when given, overriding
  the config's ``image_size`` and ``num_classes``.
  """
  kind = network_config.get('kind', 'cifar')
  make = {'cifar': networks.cifar_spec, 'imagenet': networks.imagenet_spec}.get(kind)
  if make is None:
    raise ValueError(f'network.kind must be "cifar" or "imagenet", got {kind!r}')
  size, channels = network_config.image_size, 3
  if image_shape is not None:
    size, channels = image_shape[0], image_shape[2]
  return make(block, network_config.num_blocks, network_config.features,
              num_classes or network_config.num_classes, size, channels)


class CandidateTrainer:
  """Trains candidates on one device group; reusable across candidates."""

  def __init__(self, group: DeviceGroup, train_config: TrainConfig,
               reward_config: RewardConfig, network_config, cache: CompileCache | None = None,
               grammar: nsc.Grammar | None = None):
    self.group = group
    self.train_config = train_config
    self.reward_config = reward_config
    self.network_config = network_config
    self.cache = cache if cache is not None else CompileCache()
    self.grammar = grammar
    self.dtype = resolve_dtype(train_config.compute_dtype, group.devices)

  def spec(self, block: nsc.Block) -> networks.NetworkSpec:
    """The network ``block`` is trained in, shaped by this group's data."""
    return build_spec(block, self.network_config, self.group.train_images.shape[1:],
                      self.group.num_classes)

  def _cache_key(self, canonical_text: str):
    g = self.group
    return (canonical_text, tuple(sorted(dict(self.network_config).items())),
            self.train_config, str(self.dtype), g.train_images.shape, g.val_images.shape,
            tuple(d.id for d in g.devices))

  def compile(self, block: nsc.Block) -> tuple[CompiledCandidate, bool]:
    """Compiles (or fetches) the train and eval programs of ``block``'s canonical form."""
    canonical_block = canonical.canonical_block(block)
    cache_key = self._cache_key(canonical_block.to_text())
    cached = self.cache.get(cache_key)
    if cached is not None:
      return cached, True
    start = time.perf_counter()
    spec = self.spec(canonical_block)
    model = networks.BlockNet(spec, dtype=self.dtype,
                              scan_blocks=self.network_config.get('scan_blocks', False))
    g = self.group
    abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=g.replicated)
    rng = jax.eval_shape(lambda: jax.random.key(0, impl=self.train_config.prng_impl))
    key_shape = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=g.replicated)
    if resolve_loop(self.train_config.loop, g.devices) == 'steps':
      train = compile_stepwise(model, self.train_config, key_shape, abstract(g.train_images),
                               abstract(g.train_labels), abstract(g.mean), g.replicated,
                               g.batch_sharding)
      params, batch_stats = train.params_info, train.batch_stats_info
    else:
      train_fn = make_train_fn(model, self.train_config, g.train_images.shape[0],
                               g.batch_sharding)
      lowered = jax.jit(train_fn, out_shardings=g.replicated).lower(
          key_shape, abstract(g.train_images), abstract(g.train_labels), abstract(g.mean),
          abstract(g.std))
      trained = lowered.out_info  # shapes of the trained variables, known without running
      params, batch_stats = trained.params, trained.batch_stats
      train = lowered.compile()
    eval_fn = make_eval_fn(model, self.train_config, g.val_images.shape[0])
    evaluate = jax.jit(eval_fn, out_shardings=g.replicated).lower(
        jax.tree.map(abstract, params), jax.tree.map(abstract, batch_stats),
        abstract(g.val_images), abstract(g.val_labels), abstract(g.mean),
        abstract(g.std)).compile()
    compiled = CompiledCandidate(train, evaluate, time.perf_counter() - start)
    self.cache.put(cache_key, compiled)
    return compiled, False

  def evaluate(self, block: nsc.Block, seed: int = 0,
               compiled: tuple[CompiledCandidate, bool] | None = None) -> EvalResult:
    """Trains and validates ``block``; failures come back as a failed result, not raised.

    ``compiled`` is what ``compile(block)`` returned, when the caller compiled ahead.
    """
    start = time.perf_counter()
    base = dict(block=block.to_text(), canonical_key='', device=self.group.name)
    try:
      if self.grammar is not None:
        nsc.validate(block, self.grammar)
      else:
        nsc.validate(block, nsc.Grammar(max_index=max(2, len(block.layers))))
      base['canonical_key'] = canonical.canonical_key(block)
      spec = self.spec(block)
      flops, reference = block_cost_terms(block, spec)
      density = block.density()
      params = cost.network_params(spec)
      base.update(flops=int(flops), density=float(density), params=int(params))
      compiled, cached = compiled if compiled is not None else self.compile(block)
      g = self.group
      key = jax.device_put(jax.random.key(seed, impl=self.train_config.prng_impl),
                           g.replicated)
      t0 = time.perf_counter()
      out = compiled.train(key, g.train_images, g.train_labels, g.mean, g.std)
      losses = np.asarray(out.epoch_loss)  # waits for training
      train_s = time.perf_counter() - t0
      if not np.isfinite(losses).all():
        epoch = int(np.argmin(np.isfinite(losses))) + 1
        raise results.Diverged(f'diverged: training loss is {losses[epoch - 1]} in epoch {epoch}')
      t0 = time.perf_counter()
      accuracy, val_loss = compiled.evaluate(out.params, out.batch_stats, g.val_images,
                                             g.val_labels, g.mean, g.std)
      accuracy = float(accuracy)
      eval_s = time.perf_counter() - t0
      if not math.isfinite(float(val_loss)):
        raise results.Diverged(f'diverged: validation loss is {float(val_loss)}')
      reward = results.compute_reward(accuracy, flops, reference, density, self.reward_config)
      images = self.train_config.epochs * (g.train_images.shape[0] //
                                           self.train_config.batch_size) * \
          self.train_config.batch_size
      return EvalResult(**base, status='ok', val_accuracy=accuracy, reward=reward,
                        final_loss=float(losses[-1]),
                        compile_s=0.0 if cached else compiled.compile_s, train_s=train_s,
                        eval_s=eval_s, total_s=time.perf_counter() - start,
                        images_per_s=images / train_s, compile_cached=cached)
    except Exception as e:  # a failed candidate is a result; the search goes on
      return EvalResult(**base, status='failed', failure_reason=results.describe_failure(e),
                        total_s=time.perf_counter() - start)


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


def evaluate(block: nsc.Block, config, splits: data_lib.ImageSplits,
             devices: Sequence[jax.Device] | None = None, seed: int = 0) -> EvalResult:
  """Evaluates one block on ``devices`` (default: the first local device).

  ``config`` holds ``train``, ``reward`` and ``network`` sections (see configs/cifar.py).
  For many candidates, keep a ``CandidateTrainer`` (or the executor) instead: it places the
  data once and reuses compiled programs.
  """
  devices = devices or jax.local_devices()[:1]
  trainer = CandidateTrainer(DeviceGroup.place(splits, devices), TrainConfig(**config.train),
                             RewardConfig(**config.reward), config.network)
  return trainer.evaluate(block, seed=seed)
