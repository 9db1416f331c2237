"""Typed settings of a search, built once from its config at the program's edge.

A config file (``configs/cifar.py``) is an ``ml_collections.ConfigDict`` with one section per
dataclass here; ``SearchSettings.from_config(config)`` turns it into frozen dataclasses, and
nothing below the entry points reads a ConfigDict. Every default lives here, in the
dataclass: a field a config (or a workdir stored by an older version) does not set takes
its default, and a field the dataclass does not know is refused by name. Ranges are checked
on construction, so a bad value fails before anything is stored or trained.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from blockqnn_jax import nsc
from blockqnn_jax.results import RewardConfig

COMPUTE_DTYPES = ('auto', 'float32', 'bfloat16')
TRAIN_LOOPS = ('auto', 'scan', 'steps')
PRNG_IMPLS = ('rbg', 'unsafe_rbg', 'threefry2x32')
EXECUTOR_KINDS = ('local', 'ray')
# What ``data.load_splits`` reads (``data.readers`` takes this list as its own).
DATA_SOURCES = ('tfds', 'cifar_batches', 'npz', 'image_folder', 'digits')


class SettingsError(ValueError):
  """A config field is unknown, of the wrong type, or out of range."""


class ConfigMismatch(RuntimeError):
  """A workdir holds a run (a search, a retraining) with other settings."""


def _check(condition: bool, field: str, message: str, value: Any) -> None:
  if not condition:
    raise SettingsError(f'{field} {message}, got {value!r}')


def _one_of(value: Any, choices: tuple[str, ...], field: str) -> None:
  _check(value in choices, field, f'must be one of {", ".join(map(repr, choices))}', value)


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
    flat_optimizer: Adam on all parameters as one flat vector (``optax.flatten``): the
      same update up to rounding (a few ulp after training), 0.1-0.3 s less compile per
      candidate on a 2-core CPU. False: per parameter, bit for bit the earlier candidates.
    xla_cpu_fusion_emitters: on CPU, compile with XLA:CPU's newer fusion emitters (its
      default). False (here): its classic emitters, which compiled a candidate's steps
      22-44% faster and ran them as fast or faster (benchmarks/compile_share.py), with
      results equal up to rounding. Ignored off CPU, and where XLA no longer knows the
      option.
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
  flat_optimizer: bool = True
  xla_cpu_fusion_emitters: bool = False

  def __post_init__(self):
    for name in ('epochs', 'batch_size', 'lr_decay_epochs', 'eval_batch_size'):
      _check(int(getattr(self, name)) >= 1, f'train.{name}', 'must be >= 1',
             getattr(self, name))
    _check(self.learning_rate > 0, 'train.learning_rate', 'must be > 0', self.learning_rate)
    _check(self.lr_decay > 0, 'train.lr_decay', 'must be > 0', self.lr_decay)
    _check(self.weight_decay >= 0, 'train.weight_decay', 'must be >= 0', self.weight_decay)
    _one_of(self.compute_dtype, COMPUTE_DTYPES, 'train.compute_dtype')
    _one_of(self.loop, TRAIN_LOOPS, 'train.loop')
    _one_of(self.prng_impl, PRNG_IMPLS, 'train.prng_impl')


@dataclasses.dataclass(frozen=True)
class NetworkSettings:
  """The network a block is stacked into (``architecture.spec_for``).

  Attributes:
    kind: 'cifar' (stride-1 stem, stages at F, 2F, 4F) or 'imagenet' (stride-2 stem and
      pooling, stages at F, 2F, 4F, 8F).
    num_blocks: N, blocks per stage. N = 2 for the search network is [reconstructed].
    features: F, the first stage's width; 32 as in reimplementations [consistent].
    num_classes: classifier outputs when the data does not say (it usually does).
    image_size: image side when the data does not say (streamed data is resized to it).
    scan_blocks: blocks 2..N of a stage as one scanned body (fewer ops to compile).
  """

  kind: str = 'cifar'
  num_blocks: int = 2
  features: int = 32
  num_classes: int = 100
  image_size: int = 32
  scan_blocks: bool = False

  def __post_init__(self):
    _one_of(self.kind, ('cifar', 'imagenet'), 'network.kind')
    for name in ('num_blocks', 'features', 'num_classes', 'image_size'):
      _check(int(getattr(self, name)) >= 1, f'network.{name}', 'must be >= 1',
             getattr(self, name))


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Where the images come from (``data.load_splits``, or streamed).

  Attributes:
    source: 'tfds', 'cifar_batches', 'npz', 'image_folder' or 'digits'.
    name: the TFDS name; for other sources a label.
    path: TFDS data_dir, or the file / folder the source reads.
    validation_size: held out of the training split for the reward (a count >= 1, or a
      fraction in (0, 1)); the test split is never used by the search. 5,000 of CIFAR-100's
      50,000 [reconstructed]. The default data is CIFAR-100 from TFDS: the paper searched on
      CIFAR-100 [paper].
    max_train: train on at most this many images (0 = all).
    stream: decode batches on host threads instead of holding the data on the device
      (ImageNet-sized data).
    decode_threads: host threads decoding streamed images.
    download: let TFDS download a dataset it does not find.
    holdout_seed: seeds which images are held out for validation; -1 (default): the
      search's own ``seed``. Searches compared on one dataset (several seeds, one shared
      ``search.eval_cache``) fix it, so all of them validate on the same images.
  """

  source: str = 'tfds'
  name: str = 'cifar100'
  path: str = ''
  validation_size: float = 5000
  max_train: int = 0
  stream: bool = False
  decode_threads: int = 8
  download: bool = False
  holdout_seed: int = -1

  def holdout(self, seed: int) -> int:
    """The hold-out's seed for a search of ``seed``."""
    return seed if self.holdout_seed < 0 else self.holdout_seed

  def __post_init__(self):
    _one_of(self.source, DATA_SOURCES, 'data.source')
    _check(self.validation_size > 0, 'data.validation_size',
           'must be > 0 (the reward is measured on it)', self.validation_size)
    _check(self.max_train >= 0, 'data.max_train', 'must be >= 0 (0 = all)', self.max_train)
    _check(self.decode_threads >= 1, 'data.decode_threads', 'must be >= 1',
           self.decode_threads)


# -- the agent --------------------------------------------------------------------------------

# BlockQNN's ε schedule: (ε, iterations at it), 178 iterations of 64 blocks [reconstructed:
# consistent across reimplementations and the best recollection of the paper].
PAPER_EPSILON_SCHEDULE = ((1.0, 95), (0.9, 7), (0.8, 7), (0.7, 7), (0.6, 10), (0.5, 10),
                          (0.4, 10), (0.3, 10), (0.2, 10), (0.1, 12))


@dataclasses.dataclass(frozen=True)
class EpsilonSchedule:
  """Piecewise-constant ε: ``phases`` is a sequence of (ε, number of iterations).

  The default is BlockQNN's: 95 iterations at ε=1 then 7, 7, 7, 10, 10, 10, 10, 10, 12 at
  0.9 .. 0.1 — 178 iterations in all (11,392 blocks at 64 per iteration).
  """

  phases: tuple[tuple[float, int], ...] = PAPER_EPSILON_SCHEDULE

  def __post_init__(self):
    phases = tuple((float(e), int(n)) for e, n in self.phases)
    if not phases:
      raise ValueError('an ε schedule needs at least one phase')
    for e, n in phases:
      if not 0.0 <= e <= 1.0 or n < 0:
        raise ValueError(f'bad ε phase ({e}, {n}): ε must be in [0, 1], iterations >= 0')
    object.__setattr__(self, 'phases', phases)

  @property
  def num_iterations(self) -> int:
    return sum(n for _, n in self.phases)

  def scaled(self, num_iterations: int) -> 'EpsilonSchedule':
    """The same phase proportions over ``num_iterations`` (largest-remainder rounding)."""
    total = self.num_iterations
    exact = [n * num_iterations / total for _, n in self.phases]
    counts = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in order[:num_iterations - sum(counts)]:
      counts[i] += 1
    return EpsilonSchedule(tuple((e, c) for (e, _), c in zip(self.phases, counts)))


@dataclasses.dataclass(frozen=True)
class QLearningConfig:
  """Hyper-parameters of the agent (hashable: pass it as a static argument).

  Attributes:
    alpha: learning rate α, 0.01 as in MetaQNN [consistent].
    gamma: discount γ, 1.0 [consistent].
    q_init: the constant Q starts at, MetaQNN's 0.5 [reconstructed].
    reward_shaping: BlockQNN's ``r_t = R / T_block`` on every transition [consistent];
      False gives MetaQNN's reward on the last transition only.
    replay_size: (block, reward) pairs replayed after each iteration, MetaQNN's 128
      [reconstructed: the paper replays, how many is not known here].
    memory_capacity: most pairs the replay memory keeps; the oldest are overwritten
      once it is full. The default holds a whole paper-scale search (11,392 blocks).
    monotone: beyond the paper (False is the paper's update): never lower a Q value,
      ``Q ← max(Q, (1-α)·Q + α·target)``. With α = 1, γ = 1 and reward shaping, each
      Q(s_t, a_t) then keeps the best shaped return seen through it, so the greedy block is
      the best block found so far (without shaping only the last step tells blocks apart,
      and the greedy block is a random splice ending like the best one).
  """

  alpha: float = 0.01
  gamma: float = 1.0
  q_init: float = 0.5
  reward_shaping: bool = True
  replay_size: int = 128
  memory_capacity: int = 16384
  monotone: bool = False


STRATEGIES = ('qlearning', 'random', 'evolution', 'local_search')
EXPLORATIONS = ('epsilon', 'mutation')
SCHEDULE_UNITS = ('blocks', 'iterations')


@dataclasses.dataclass(frozen=True)
class AgentSettings(QLearningConfig):
  """The Q-learning agent: the paper's hyper-parameters (``QLearningConfig``'s fields) and,
  beyond the paper, what makes it learn within a few hundred candidates. Every field beyond
  the paper is off by default, so the defaults are the paper's agent bit for bit;
  ``FAST_AGENT`` turns them on (the cpu and gpu presets), ``benchmarks/nb201.py`` has an
  ablation of each. ``strategies.QLearner`` takes this value as it is.

  Attributes (beyond ``QLearningConfig``'s):
    budget_sized: stretch the ε schedule's phases over the search's budget of distinct
      blocks, so a short search gets a short random phase however its iterations are cut.
    schedule_unit: with ``budget_sized``, what the stretched schedule counts: 'blocks'
      (distinct blocks told, as MetaQNN counts) or 'iterations' (asks, over
      ``ceil(budget / n)`` of them: the paper's schedule merely shortened).
    exploration: 'epsilon' (the paper: every step ε-greedy on its own) or 'mutation' (with
      probability ε a random block, otherwise the greedy block with one-layer mutations,
      as evolution and local search explore).
    mutation_rate: the mean number of mutations per draw (Poisson, capped at
      ``max_mutations``); 0: as few mutations as give an untried block (the first draw the
      greedy block itself, the rest split into ``max_mutations`` levels of 1, 2, ...).
    max_mutations: most layers changed (that many mutation passes are computed).
    avoid_repeats: do not propose a block already told or already in the same ask
      (compared canonically): redraw up to ``max_resamples`` times, then take a uniform
      random block.
    max_resamples: redraws per proposal.
    restart: with 'mutation' exploration and ``avoid_repeats``, at a local optimum (the
      greedy block and every one-mutation draw of it already told) reset Q and the replay
      memory and propose random blocks, as local search restarts.
    tried_capacity: most told blocks remembered for ``avoid_repeats`` and the budget count.
  """

  budget_sized: bool = False
  schedule_unit: str = 'blocks'
  exploration: str = 'epsilon'
  mutation_rate: float = 0.0
  max_mutations: int = 3
  avoid_repeats: bool = False
  max_resamples: int = 0
  restart: bool = False
  tried_capacity: int = 16384

  def __post_init__(self):
    _check(0 < self.alpha <= 1, 'agent.alpha', 'must be in (0, 1]', self.alpha)
    _check(0 <= self.gamma <= 1, 'agent.gamma', 'must be in [0, 1]', self.gamma)
    _check(self.replay_size >= 0, 'agent.replay_size', 'must be >= 0', self.replay_size)
    _check(self.memory_capacity >= 1, 'agent.memory_capacity', 'must be >= 1',
           self.memory_capacity)
    _one_of(self.exploration, EXPLORATIONS, 'agent.exploration')
    _one_of(self.schedule_unit, SCHEDULE_UNITS, 'agent.schedule_unit')
    _check(self.max_mutations >= 1, 'agent.max_mutations', 'must be >= 1', self.max_mutations)
    for name in ('mutation_rate', 'max_resamples', 'tried_capacity'):
      _check(getattr(self, name) >= 0, f'agent.{name}', 'must be >= 0', getattr(self, name))

  @property
  def qlearning(self) -> QLearningConfig:
    """The update's hyper-parameters alone (what ``qlearning.learn`` reads)."""
    return QLearningConfig(**{f.name: getattr(self, f.name)
                              for f in dataclasses.fields(QLearningConfig)})

  @property
  def is_paper(self) -> bool:
    """No field beyond the paper is on: the asks are exactly ``qlearning.sample_blocks``."""
    return (not self.budget_sized and self.exploration == 'epsilon'
            and not self.avoid_repeats)


# The fast agent, beyond the paper (tuned on NAS-Bench-201, benchmarks/nb201.py): the first
# 10% of the budget uniform random (FAST_SCHEDULE, stretched over the budget); then the
# greedy block with one layer changed, never a block already told (up to 16 redraws), a
# restart once nothing within one layer of it is new; α = 1 with the monotone update and
# reward shaping, so the greedy block is the best found since the last restart; Q from 0.
FAST_AGENT = AgentSettings(alpha=1.0, q_init=0.0, reward_shaping=True, replay_size=0,
                           monotone=True, budget_sized=True, exploration='mutation',
                           mutation_rate=0.0, max_mutations=1, avoid_repeats=True,
                           max_resamples=16, restart=True)
FAST_SCHEDULE = ((1.0, 1), (0.0, 9))


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """The search loop: how many blocks, at which ε, how asynchronously.

  Attributes:
    blocks_per_iteration: blocks sampled (and learned from) per iteration.
    epsilon_schedule: ``((ε, iterations), ...)``; BlockQNN's 178 iterations of 64 blocks.
    max_staleness: S; iteration j may be sampled once iteration j - S - 1 is learned, so
      workers are not idle while an iteration's slowest candidate finishes; 0 = the paper's
      strict iterations.
    failed_reward: the reward the agent learns for a failed candidate.
    strategy: how blocks are proposed: 'qlearning' (the paper's agent, ``agent``), 'random'
      (uniform legal blocks: the paper's baseline), 'evolution' (aging evolution), or
      'local_search' (one-layer neighbours of the incumbent). The ε schedule sets every
      strategy's length; the ε column records 1 for random and 0 for evolution and local
      search (they exploit a population or an incumbent).
    population, tournament: aging evolution's P and S.
    stop_after_failures: stop the search (with the reason, non-zero exit) when this many
      candidates in a row failed for the same reason that is not a fact about the block
      (out of memory, an error, a lost worker: see ``results.PERMANENT_FAILURES``), instead
      of teaching the agent reward 0 for hours; 0 never stops.
    budget: distinct candidates to evaluate (trained, or read from ``eval_cache``): the
      search stops after the iteration in which it has that many, and budget-sized agents
      stretch their schedule over it. 0 (default): the schedule's iterations × blocks per
      iteration, and the search runs the schedule to its end.
    eval_cache: a file of evaluations shared with other searches (``eval_cache``): a block
      any of them trained at this fidelity on this data is read from it, not trained again,
      and the training seed of a block is derived from the block alone, so every search
      sharing the file reads what it would have trained. '' (default): none; each block's
      seed is derived from the search's seed and the block.
  """

  blocks_per_iteration: int = 64
  epsilon_schedule: tuple[tuple[float, int], ...] = PAPER_EPSILON_SCHEDULE
  max_staleness: int = 0
  failed_reward: float = 0.0
  strategy: str = 'qlearning'
  population: int = 10
  tournament: int = 3
  stop_after_failures: int = 10
  budget: int = 0
  eval_cache: str = ''

  def __post_init__(self):
    schedule = tuple((float(e), int(n)) for e, n in self.epsilon_schedule)
    object.__setattr__(self, 'epsilon_schedule', schedule)
    _check(self.blocks_per_iteration >= 1, 'search.blocks_per_iteration', 'must be >= 1',
           self.blocks_per_iteration)
    _check(self.max_staleness >= 0, 'search.max_staleness', 'must be >= 0',
           self.max_staleness)
    _check(self.stop_after_failures >= 0, 'search.stop_after_failures', 'must be >= 0',
           self.stop_after_failures)
    _check(self.budget >= 0, 'search.budget', 'must be >= 0 (0: the schedule decides)',
           self.budget)
    _one_of(self.strategy, STRATEGIES, 'search.strategy')
    _check(1 <= self.tournament <= self.population, 'search.tournament',
           f'must be in [1, population={self.population}]', self.tournament)
    _check(bool(schedule), 'search.epsilon_schedule', 'must not be empty', schedule)
    for e, n in schedule:
      _check(0.0 <= e <= 1.0, 'search.epsilon_schedule', 'needs every ε in [0, 1]', schedule)
      _check(n >= 1, 'search.epsilon_schedule', 'needs every phase >= 1 iteration', schedule)

  @property
  def schedule(self) -> EpsilonSchedule:
    return EpsilonSchedule(self.epsilon_schedule)

  @property
  def distinct_budget(self) -> int:
    """Distinct candidates the search is sized for (``budget``, else the schedule's)."""
    return self.budget or self.schedule.num_iterations * self.blocks_per_iteration


@dataclasses.dataclass(frozen=True)
class RaySettings:
  """Worker actors of a Ray cluster (``ray_executor.RayExecutor``).

  Attributes:
    address: '' starts Ray on this machine; 'auto' joins ``ray start``'s cluster.
    num_workers: 0 = one per GPU (or per ``cpus_per_worker`` CPUs), growing with nodes.
    cpus_per_worker: Ray CPUs of one worker.
    gpus_per_worker: -1 = 1 when the cluster has GPUs, else 0; 0.5 shares one GPU by two.
    max_attempts: a candidate whose worker dies is retried up to this many times.
    jobs_per_worker: candidates handed to a worker at once (one training, one compiling).
    cpu_devices_per_worker: CPU-only workers get this many fake devices each.
  """

  address: str = ''
  num_workers: int = 0
  cpus_per_worker: float = 1.0
  gpus_per_worker: float = -1.0
  max_attempts: int = 3
  jobs_per_worker: int = 2
  cpu_devices_per_worker: int = 1

  def __post_init__(self):
    _check(self.num_workers >= 0, 'executor.ray.num_workers', 'must be >= 0',
           self.num_workers)
    _check(self.max_attempts >= 1, 'executor.ray.max_attempts', 'must be >= 1',
           self.max_attempts)
    _check(self.jobs_per_worker >= 1, 'executor.ray.jobs_per_worker', 'must be >= 1',
           self.jobs_per_worker)


@dataclasses.dataclass(frozen=True)
class ExecutorSettings:
  """Where candidates train. Changing it never changes what is searched, so a search may
  resume elsewhere.

  Attributes:
    kind: 'local' (this machine's devices) or 'ray' (worker actors of a Ray cluster).
    devices_per_candidate: > 1 trains each candidate data-parallel over a device group.
    compile_ahead: compile a group's next candidate while it trains the current one.
    workers_per_device: > 1 runs that many workers on each device group (each with its own
      copy of the data), so more host cores compile while the device trains: for GPUs on
      which a candidate compiles for longer than it trains.
    ray: the Ray executor's settings.
  """

  kind: str = 'local'
  devices_per_candidate: int = 1
  compile_ahead: bool = True
  workers_per_device: int = 1
  ray: RaySettings = RaySettings()

  def __post_init__(self):
    _one_of(self.kind, EXECUTOR_KINDS, 'executor.kind')
    _check(self.devices_per_candidate >= 1, 'executor.devices_per_candidate', 'must be >= 1',
           self.devices_per_candidate)
    _check(self.workers_per_device >= 1, 'executor.workers_per_device', 'must be >= 1',
           self.workers_per_device)


class FromConfig:
  """What a program's whole settings share: built once from its config, stored as JSON."""

  @classmethod
  def from_config(cls, config: Any):
    """From a ConfigDict (or nested dict / JSON text); raises ``SettingsError``."""
    if isinstance(config, str):
      config = json.loads(config)
    return build(cls, _as_dict(config), '')

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def default_config(cls):
    """Every field at its default, as an ``ml_collections.ConfigDict``: what a config file
    starts from, so that a preset states only what it changes and no default is written
    twice (command-line overrides reach every field)."""
    import ml_collections  # pylint: disable=import-outside-toplevel
    return ml_collections.ConfigDict(cls().to_dict())

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True, default=str)


@dataclasses.dataclass(frozen=True)
class SearchSettings(FromConfig):
  """Everything a search is: one frozen value per config section."""

  seed: int = 0
  space: nsc.Grammar = nsc.Grammar()
  agent: AgentSettings = AgentSettings()
  search: LoopSettings = LoopSettings()
  network: NetworkSettings = NetworkSettings()
  data: DataSettings = DataSettings()
  train: TrainConfig = TrainConfig()
  reward: RewardConfig = RewardConfig()
  executor: ExecutorSettings = ExecutorSettings()
  preset: str = ''



def _as_dict(config: Any) -> dict[str, Any]:
  if hasattr(config, 'to_dict'):
    return config.to_dict()
  return dict(config)


def _tupled(value: Any) -> Any:
  """Lists (as JSON and ConfigDicts give them) become tuples, as the dataclasses hold them."""
  if isinstance(value, (list, tuple)):
    return tuple(_tupled(v) for v in value)
  return value


def build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
  """``cls`` from a mapping: nested dataclass fields from nested mappings, defaults for what
  is missing, ``SettingsError`` naming a field the dataclass does not know."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise SettingsError(f'unknown config field{"s" if len(unknown) > 1 else ""} '
                        f'{", ".join(prefix + k for k in unknown)} (known: '
                        f'{", ".join(sorted(fields))})')
  kwargs = {}
  for name, value in values.items():
    default = fields[name].default
    if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
      kwargs[name] = build(type(default), value, f'{prefix}{name}.')
    else:
      kwargs[name] = _tupled(value)
  try:
    return cls(**kwargs)
  except SettingsError:
    raise
  except (TypeError, ValueError) as e:
    raise SettingsError(f'{prefix.rstrip(".") or cls.__name__}: {e}') from None


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Dotted keys of a nested mapping."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def refuse_changes(where: str, old: Mapping[str, Any] | None, new: Mapping[str, Any], *,
                   ignore: tuple[str, ...] = (), allow_change: bool = False,
                   allow_flag: str = '--allow_config_change') -> list[str]:
  """Compares what a workdir recorded (``old``, None for a new workdir) with what a run now
  has (``new``): nested dicts such as ``to_dict()`` of the stored settings read back, so a
  field the workdir predates compares as its default. The one check the search and the
  retraining both make before they resume.

  Args:
    where: the workdir (or file), for the message.
    old, new: the records.
    ignore: dotted prefixes that may change between runs.
    allow_change: return the differences instead of raising.
    allow_flag: the flag that allows a change, for the message.

  Returns:
    The differences, ``'field: old -> new'`` (empty when none).

  Raises:
    ConfigMismatch: they differ and ``allow_change`` is False (the first fields named).
  """
  if old is None:
    return []
  a, b = flatten(old), flatten(new)
  changed = [f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k) and not k.startswith(ignore)]
  if changed and not allow_change:
    raise ConfigMismatch(f'{where} holds a run with a different config '
                         f'({", ".join(changed[:6])}); use a new --workdir, or pass '
                         f'{allow_flag} to continue it with this config')
  return changed


def differences(old: SearchSettings, new: SearchSettings, *,
                ignore: tuple[str, ...] = ()) -> list[str]:
  """Dotted fields whose values differ, except those starting with a prefix in ``ignore``."""
  a, b = flatten(old.to_dict()), flatten(new.to_dict())
  return sorted(k for k in set(a) | set(b)
                if a.get(k) != b.get(k) and not k.startswith(ignore))


# -- the final retraining (``training.final``) -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class FinalTrainConfig:
  """How the final network is trained (``training.final``). Hashable: its compiled programs
  are cached by it.

  The defaults are a standard long CIFAR schedule, not the paper's exact one (which it does
  not fully give) [reconstructed]: SGD with Nesterov momentum 0.9, lr 0.1 warmed up linearly
  over 5 epochs then cosine-decayed to 0, L2 weight decay 5e-4 on conv and dense kernels
  only, batch 128, 300 epochs, pad-4 crop + flip; bf16 compute on GPU/TPU.

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
      than 'threefry2x32' on CPU, see ``TrainConfig.prng_impl``).
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
      _check(int(getattr(self, name)) >= 1, f'train.{name}', 'must be positive',
             getattr(self, name))
    _check(0 <= self.warmup_epochs < self.epochs, 'train.warmup_epochs',
           f'must be in [0, epochs={self.epochs})', self.warmup_epochs)
    _check(0 <= self.label_smoothing < 1, 'train.label_smoothing', 'must be in [0, 1)',
           self.label_smoothing)
    _one_of(self.compute_dtype, COMPUTE_DTYPES, 'train.compute_dtype')
    _one_of(self.prng_impl, PRNG_IMPLS, 'train.prng_impl')


@dataclasses.dataclass(frozen=True)
class FinalNetworkSettings(NetworkSettings):
  """The final network: the search's network stacked deeper (N = 4 per stage).

  ``num_classes`` and ``image_size`` are unused: the data always says them here. F = 32 is
  [reconstructed]: the paper gives the depth, not the width of its CIFAR networks;
  reimplementations use 32-64.
  """

  num_blocks: int = 4


@dataclasses.dataclass(frozen=True)
class FinalDataSettings(DataSettings):
  """The final network's data: by default all of CIFAR-10's training split, no hold-out.

  Unlike a search, retraining needs no validation split (0: none; the test split gives the
  final number), and holds its data in memory (``stream`` must stay off; ``decode_threads``
  is unused).
  """

  name: str = 'cifar10'
  validation_size: float = 0

  def __post_init__(self):
    # Not DataSettings' checks: those refuse validation_size 0, which is the default here.
    _one_of(self.source, DATA_SOURCES, 'data.source')
    _check(self.validation_size >= 0, 'data.validation_size', 'must be >= 0 (0 = none)',
           self.validation_size)
    _check(self.max_train >= 0, 'data.max_train', 'must be >= 0 (0 = all)', self.max_train)
    _check(not self.stream, 'data.stream',
           'must be off: the final network trains on data held in memory', self.stream)


@dataclasses.dataclass(frozen=True)
class FinalSettings(FromConfig):
  """Everything a final retraining is (``configs/cifar_final.py``), one value per section.

  Attributes:
    seed: seeds initialisation, shuffling, augmentation and the validation hold-out.
    block: NSC text of the block to retrain ('' to take it from ``search_workdir``); by
      default the paper's residual example block.
    search_workdir: a search's workdir whose ``rank``-th best distinct block is retrained.
    rank: 1 = the best block.
    allow_config_change: continue a workdir whose stored settings differ.
    network: the network the block is stacked into.
    data: the images.
    train: the training schedule.
    preset: the config preset's name (a label).
  """

  seed: int = 0
  block: str = nsc.RESIDUAL_BLOCK.to_text()
  search_workdir: str = ''
  rank: int = 1
  allow_config_change: bool = False
  network: FinalNetworkSettings = FinalNetworkSettings()
  data: FinalDataSettings = FinalDataSettings()
  train: FinalTrainConfig = FinalTrainConfig()
  preset: str = ''

