"""A search's settings, one frozen value per config section (``SearchSettings``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.agent import (
  FAST_AGENT,
  FAST_CONFIRM,
  PAPER_EPSILON_SCHEDULE,
  STRATEGIES,
  AgentSettings,
  Confirm,
  EpsilonSchedule,
)
from blockqnn_jax.settings.base import (
  COMPUTE_DTYPES,
  DATA_SOURCES,
  EXECUTOR_KINDS,
  PRNG_IMPLS,
  TRAIN_LOOPS,
  FromConfig,
  SettingsError,
  check,
  one_of,
)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """``reward = accuracy − μ·log(FLOPs / reference) − ρ·log(density)`` [reconstructed].

  FLOPs are the block's own forward FLOPs per image at the first stage (width F, full
  resolution), normalised by those of a reference block: one 3×3 convolution F → F at the
  same size. Blocks cheaper than the reference get no bonus (the ratio is floored at 1), so
  the FLOPs term is a pure penalty. With the defaults a typical block of a few 3×3 convs
  (ratio ~5-20) loses 1.6-3 points for FLOPs and ~1 point per unit of log-density: a few
  accuracy points, as the paper intends. μ = ρ = 0 gives plain accuracy.
  """

  mu: float = 0.01
  rho: float = 0.02


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
    loop: how the training steps run. 'scan': each epoch is one XLA program, a ``lax.scan``
      over its steps; 'steps': one compiled step per batch driven from
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
      check(int(getattr(self, name)) >= 1, f'train.{name}', 'must be >= 1',
            getattr(self, name))
    check(self.learning_rate > 0, 'train.learning_rate', 'must be > 0', self.learning_rate)
    check(self.lr_decay > 0, 'train.lr_decay', 'must be > 0', self.lr_decay)
    check(self.weight_decay >= 0, 'train.weight_decay', 'must be >= 0', self.weight_decay)
    one_of(self.compute_dtype, COMPUTE_DTYPES, 'train.compute_dtype')
    one_of(self.loop, TRAIN_LOOPS, 'train.loop')
    one_of(self.prng_impl, PRNG_IMPLS, 'train.prng_impl')


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
    one_of(self.kind, ('cifar', 'imagenet'), 'network.kind')
    for name in ('num_blocks', 'features', 'num_classes', 'image_size'):
      check(int(getattr(self, name)) >= 1, f'network.{name}', 'must be >= 1',
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
    one_of(self.source, DATA_SOURCES, 'data.source')
    check(self.validation_size > 0, 'data.validation_size',
          'must be > 0 (the reward is measured on it)', self.validation_size)
    check(self.max_train >= 0, 'data.max_train', 'must be >= 0 (0 = all)', self.max_train)
    check(self.decode_threads >= 1, 'data.decode_threads', 'must be >= 1',
          self.decode_threads)


@dataclasses.dataclass(frozen=True)
class EarlyStop:
  """Stopping the losers at rungs (successive halving decided against earlier iterations).

  A candidate is scored on the held-out split after each rung's epoch (its reward at that
  epoch) and stops there when that score is below the rung's line: the value the best
  ``promote`` fraction of the earlier iterations' candidates reached at the same rung
  (``strategies.rungs``). A stopped candidate is a result, not a failure: its reward is its
  score at the rung where it stopped, what the strategy learns from it; it is never the kept
  block. Beyond the paper (which trains every candidate to ``train.epochs``).

  Attributes:
    rungs: the epochs (steps, in a ``Study``) at which candidates are judged, increasing,
      each before the last epoch; () (default): off.
    promote: the fraction of a rung's candidates that go on, in (0, 1]; 1 scores the rungs
      (and records them) without stopping anything.
    min_history: a rung stops nothing until this many candidates of earlier iterations
      reached it.
    window: the line of a rung is taken from the last ``window`` candidates (in the order
      they were proposed) that reached it, so it follows a strategy whose proposals get
      better; 0 (default): from every earlier candidate.
  """

  rungs: tuple[int, ...] = ()
  promote: float = 0.5
  min_history: int = 8
  window: int = 0

  def __post_init__(self):
    rungs = tuple(int(r) for r in self.rungs)
    object.__setattr__(self, 'rungs', rungs)
    check(all(r >= 1 for r in rungs) and list(rungs) == sorted(set(rungs)),
          'search.early_stop.rungs', 'must be increasing epochs >= 1', rungs)
    check(0.0 < self.promote <= 1.0, 'search.early_stop.promote', 'must be in (0, 1]',
          self.promote)
    check(self.min_history >= 1, 'search.early_stop.min_history', 'must be >= 1',
          self.min_history)
    check(self.window == 0 or self.window >= self.min_history, 'search.early_stop.window',
          'must be 0 (every earlier candidate) or >= min_history', self.window)

  @property
  def active(self) -> bool:
    """Whether candidates are scored at rungs at all."""
    return bool(self.rungs)


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
    confirm: most evaluations of one block under the incumbent/challenger rule
      (``confirm.Confirm``): a new block that looks at least as good as the kept one is
      trained again from other seeds before the strategy learns from it (the mean of its
      evaluations) and before it is kept; every evaluation counts against ``budget``. 1
      (default, the paper): never train a block twice, keep the best single reward.
      ``FAST_CONFIRM`` in the smoke and gpu presets, where it pays on NAS-Bench-201 with
      noise (``benchmarks.nb201 --noise=1``); 1 in the cpu preset, whose one-epoch reward
      is biased more than it is noisy (``benchmarks.cpu_comparison``).
    early_stop: rungs at which losing candidates stop training (``EarlyStop``; off by
      default, as in the paper). Re-evaluations of the confirm rule train to the end.
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
  confirm: int = 1
  early_stop: EarlyStop = EarlyStop()

  def __post_init__(self):
    check(self.confirm >= 1, 'search.confirm', 'must be >= 1 (1: off)', self.confirm)
    schedule = tuple((float(e), int(n)) for e, n in self.epsilon_schedule)
    object.__setattr__(self, 'epsilon_schedule', schedule)
    check(self.blocks_per_iteration >= 1, 'search.blocks_per_iteration', 'must be >= 1',
          self.blocks_per_iteration)
    check(self.max_staleness >= 0, 'search.max_staleness', 'must be >= 0',
          self.max_staleness)
    check(self.stop_after_failures >= 0, 'search.stop_after_failures', 'must be >= 0',
          self.stop_after_failures)
    check(self.budget >= 0, 'search.budget', 'must be >= 0 (0: the schedule decides)',
          self.budget)
    one_of(self.strategy, STRATEGIES, 'search.strategy')
    check(1 <= self.tournament <= self.population, 'search.tournament',
          f'must be in [1, population={self.population}]', self.tournament)
    check(bool(schedule), 'search.epsilon_schedule', 'must not be empty', schedule)
    for e, n in schedule:
      check(0.0 <= e <= 1.0, 'search.epsilon_schedule', 'needs every ε in [0, 1]', schedule)
      check(n >= 1, 'search.epsilon_schedule', 'needs every phase >= 1 iteration', schedule)

  @property
  def schedule(self) -> EpsilonSchedule:
    return EpsilonSchedule(self.epsilon_schedule)

  @property
  def confirm_rule(self) -> Confirm:
    """The incumbent/challenger rule of ``confirm``."""
    return Confirm(max_evaluations=self.confirm)

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
    check(self.num_workers >= 0, 'executor.ray.num_workers', 'must be >= 0',
          self.num_workers)
    check(self.max_attempts >= 1, 'executor.ray.max_attempts', 'must be >= 1',
          self.max_attempts)
    check(self.jobs_per_worker >= 1, 'executor.ray.jobs_per_worker', 'must be >= 1',
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
    one_of(self.kind, EXECUTOR_KINDS, 'executor.kind')
    check(self.devices_per_candidate >= 1, 'executor.devices_per_candidate', 'must be >= 1',
          self.devices_per_candidate)
    check(self.workers_per_device >= 1, 'executor.workers_per_device', 'must be >= 1',
          self.workers_per_device)


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

  def __post_init__(self):
    rungs = self.search.early_stop.rungs
    if rungs and self.preset != 'study':  # a study's steps are its trainer's, not epochs
      check(rungs[-1] < self.train.epochs, 'search.early_stop.rungs',
            f'must end before the last epoch (train.epochs = {self.train.epochs})', rungs)

  @classmethod
  def for_study(cls, strategy: str, budget: int, grammar: nsc.Grammar, seed: int = 0,
                blocks_per_iteration: int = 4, max_staleness: int = 0,
                confirm: int | None = None, early_stop: EarlyStop | None = None
                ) -> 'SearchSettings':
    """What ``study.Study.create`` runs: the paper's search on ``grammar`` with the strategy
    (by its ``Study`` name) and budget, and a schedule long enough to offer the budget four
    times; ``confirm`` None is the strategy's default (``FAST_CONFIRM`` for the fast agent,
    1 for the others); ``early_stop`` None: off."""
    if budget < 1:
      raise SettingsError(f'budget must be >= 1, got {budget}')
    iterations = max(10, -(-4 * budget // blocks_per_iteration))
    search = dict(blocks_per_iteration=blocks_per_iteration, budget=budget,
                  max_staleness=max_staleness)
    agent: dict[str, Any] = {}
    if strategy == 'qlearning_fast':
      agent = dataclasses.asdict(FAST_AGENT)
      first = max(1, iterations // 10)
      search.update(strategy='qlearning', epsilon_schedule=((1.0, first),
                                                            (0.0, iterations - first)),
                    confirm=FAST_CONFIRM)
    elif strategy in ('qlearning', 'qlearning_paper'):
      agent = dict(budget_sized=True)  # the paper's agent, its schedule over the budget
      scaled = EpsilonSchedule().scaled(max(iterations, 10))
      search.update(strategy='qlearning', epsilon_schedule=tuple(
          (e, n) for e, n in scaled.phases if n))
    elif strategy in STRATEGIES:
      search.update(strategy=strategy, epsilon_schedule=((1.0, iterations),))
    else:
      raise SettingsError(
          f"unknown strategy {strategy!r}: use 'qlearning_fast', 'qlearning' "
          "('qlearning_paper'), 'random', 'evolution' or 'local_search'")
    if confirm is not None:
      search['confirm'] = confirm
    if early_stop is not None:
      search['early_stop'] = dataclasses.asdict(early_stop)
    return cls.from_config(dict(seed=seed, space=dataclasses.asdict(grammar), agent=agent,
                                search=search, preset='study'))
