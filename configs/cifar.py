"""BlockQNN search on CIFAR: the paper's settings, and smaller presets of the same file.

  --config=configs/cifar.py          the paper's search (reconstructed values marked below)
  --config=configs/cifar.py:smoke    the same program sized for a 2-core CPU
  --config=configs/cifar.py:cpu      the strategies compared on real images, on a 2-core CPU
  --config=configs/cifar.py:gpu      the paper's search network and training on one GPU,
                                     the fast agent sized to 1,000 candidates
  --config.space.max_index=11        any field can be overridden on the command line

Each section mirrors a dataclass of ``blockqnn_jax.settings`` (``space`` is ``nsc.Grammar``),
where the defaults live; ``SearchSettings.from_config(config)`` builds and checks them once.
"""

from __future__ import annotations

import ml_collections

from blockqnn_jax.qlearning import PAPER_EPSILON_SCHEDULE


# The fast agent (beyond the paper; strategies.fast_qlearner, tuned on NAS-Bench-201).
FAST_AGENT = dict(alpha=1.0, q_init=0.0, reward_shaping=True, replay_size=0, monotone=True,
                  budget_sized=True, exploration='mutation', mutation_rate=0.0,
                  max_mutations=1, avoid_repeats=True, max_resamples=16, restart=True)


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config of ``preset``: '' or 'paper' (default), 'smoke', 'cpu' or 'gpu'."""
  preset = preset or 'paper'
  config = ml_collections.ConfigDict()
  config.preset = preset
  config.seed = 0

  # The NSC grammar (nsc.Grammar). T = 23 is the best recollection of the paper
  # [reconstructed]; reimplementations use 10 or 11.
  config.space = ml_collections.ConfigDict(dict(
      max_index=23,
      conv_kernels=(1, 3, 5),
      max_pool_kernels=(1, 3),
      avg_pool_kernels=(1, 3),
      layer_types=(1, 2, 3, 4, 5, 6),
  ))

  # The Q-learning agent (qlearning.QLearningConfig): α, γ and Q's start as in MetaQNN.
  # Beyond the paper (settings.AgentSettings), off here: budget_sized ... restart.
  config.agent = ml_collections.ConfigDict(dict(
      alpha=0.01,
      gamma=1.0,
      q_init=0.5,
      reward_shaping=True,
      replay_size=128,
      memory_capacity=16384,
      budget_sized=False,
      exploration='epsilon',
      mutation_rate=0.0,
      max_mutations=3,
      avoid_repeats=False,
      max_resamples=0,
      monotone=False,
      restart=False,
  ))

  # (ε, iterations at it): BlockQNN's 178 iterations of 64 blocks.
  # max_staleness S: iteration j may be sampled once iteration j - S - 1 is learned, so
  # workers are not idle while an iteration's slowest candidate finishes; 0 = the paper's
  # strict iterations. A different S samples a different (still reproducible) sequence.
  config.search = ml_collections.ConfigDict(dict(
      blocks_per_iteration=64,
      epsilon_schedule=PAPER_EPSILON_SCHEDULE,
      max_staleness=0,
      failed_reward=0.0,
      # 'qlearning' (the paper's agent), 'random', 'evolution' or 'local_search'.
      strategy='qlearning',
      population=10,  # evolution's P
      tournament=3,  # evolution's S
      stop_after_failures=10,  # this many failures in a row for one reason stop the search
      budget=0,  # distinct candidates to evaluate; 0 = iterations x blocks_per_iteration
      # A file of evaluations shared with other searches on the same data and fidelity
      # (each block trained once by any of them; its seed derived from the block): ''=none.
      eval_cache='',
  ))

  # The network a candidate block is stacked into during the search: stem, three stages of
  # N blocks at F, 2F, 4F. N = 2 for the search network is [reconstructed] (the final
  # networks use N = 4); F = 32 as in reimplementations. The paper searched on CIFAR-100.
  config.network = ml_collections.ConfigDict(dict(
      num_blocks=2,
      features=32,
      num_classes=100,
      image_size=32,
      # One scanned body for blocks 2..N of a stage: fewer ops to compile, but on CPU it
      # only breaks even around N = 8 (benchmarks/evaluate.py); worth trying on GPU/TPU.
      scan_blocks=False,
  ))

  # Where the images come from (data.load_splits). The search holds its validation split
  # out of the training data; the test split is never used by the search.
  config.data = ml_collections.ConfigDict(dict(
      source='tfds',
      name='cifar100',
      path='',
      validation_size=5000,
      max_train=0,  # 0 = all
      holdout_seed=-1,  # which images are held out; -1 = the search's seed
  ))

  # Early-stop training of each candidate (train.TrainConfig): 12 epochs of Adam, lr 1e-3
  # multiplied by 0.2 every 5 epochs, batch 256; bf16 compute on GPU/TPU.
  config.train = ml_collections.ConfigDict(dict(
      epochs=12,
      batch_size=256,
      learning_rate=1e-3,
      lr_decay=0.2,
      lr_decay_epochs=5,
      b1=0.9,
      b2=0.999,
      weight_decay=0.0,
      compute_dtype='auto',
      augment=True,
      eval_batch_size=1000,
      prng_impl='rbg',
      # 'scan': all epochs as one XLA program; 'steps': one compiled step per batch from
      # Python. 'auto' = steps on CPU (XLA:CPU ran the scanned step 9-20x slower here,
      # benchmarks/evaluate.py --loops=scan,steps), scan on GPU/TPU.
      loop='auto',
  ))

  # reward = accuracy - mu * log(FLOPs / reference) - rho * log(density) [reconstructed];
  # see results.RewardConfig for the normalisation. mu = rho = 0 is plain accuracy.
  config.reward = ml_collections.ConfigDict(dict(mu=0.01, rho=0.02))

  # Where candidates train (executor.make_executor): 'local' spreads them over this
  # machine's devices; 'ray' over worker actors of a Ray cluster (ray_executor.RayExecutor).
  # Changing this section never changes what is searched, so a search may resume elsewhere.
  config.executor = ml_collections.ConfigDict(dict(
      kind='local',
      devices_per_candidate=1,  # >1: each candidate data-parallel over a device group
      compile_ahead=True,
      workers_per_device=1,  # >1: more workers (compiling on host threads) per device
      ray=dict(
          address='',  # '' starts Ray on this machine; 'auto' joins `ray start`'s cluster
          num_workers=0,  # 0 = one per GPU (or per cpus_per_worker CPUs), growing with nodes
          cpus_per_worker=1.0,
          gpus_per_worker=-1.0,  # -1 = 1 when the cluster has GPUs, else 0; 0.5 shares one
          max_attempts=3,  # a candidate whose worker dies is retried up to this many times
          jobs_per_worker=2,  # one training, one compiling ahead
          cpu_devices_per_worker=1,  # CPU-only workers: fake devices each
      ),
  ))

  if preset == 'smoke':
    config.space.max_index = 6
    config.agent.replay_size = 16
    config.agent.memory_capacity = 1024
    config.search.blocks_per_iteration = 4
    config.search.epsilon_schedule = ((1.0, 3), (0.5, 2), (0.1, 2))
    config.network.num_blocks = 1
    config.network.features = 8
    config.network.num_classes = 10
    # scikit-learn's bundled 8x8 digits: runs offline on any machine. For real images pass
    # --config.data.source=npz --config.data.path=PATH/cifar10-exact-subset.npz
    config.data.source = 'digits'
    config.data.name = ''  # a label only; derived from the source or file name
    config.data.validation_size = 200
    config.data.max_train = 1000  # CPU-sized also when pointed at CIFAR (~150 img/s here)
    config.train.epochs = 3
    config.train.batch_size = 64
    config.train.eval_batch_size = 200
  elif preset == 'cpu':
    # The paper's Q-learning-vs-random comparison at a size a 2-core CPU runs in about 20
    # minutes per search: a small space, 80 proposals on the CIFAR-10 exact subset
    # (--config.data.path=PATH/cifar10-exact-subset.npz), one epoch of a tiny network each.
    # The agent is the fast one (beyond the paper; strategies.fast_qlearner, tuned on
    # NAS-Bench-201): a random phase of 10% of the budget, then the greedy block with one
    # layer changed, never a block already tried, a restart at a local optimum; α = 1 with
    # the monotone update (Q keeps the best reward seen through each step), Q from 0, no
    # replay. --config.search.strategy=random runs the paper's baseline on the same budget.
    config.space.max_index = 5
    config.space.conv_kernels = (1, 3)
    config.agent.update(FAST_AGENT)
    config.search.blocks_per_iteration = 8
    config.search.epsilon_schedule = ((1.0, 1), (0.0, 9))
    config.network.num_blocks = 1
    config.network.features = 8
    config.network.num_classes = 10
    config.data.source = 'npz'
    config.data.name = 'cifar10'
    config.data.validation_size = 1000
    config.data.max_train = 2000
    config.train.epochs = 1
    config.train.batch_size = 64
    config.train.eval_batch_size = 500
  elif preset == 'gpu':
    # One GPU: the paper's search (space, network N = 2 at F = 32, 12 epochs of Adam, batch
    # 256, CIFAR-100 from TFDS, 64 blocks per iteration) with the fast agent (beyond the
    # paper, as in the cpu preset) sized to a budget of 1,000 distinct candidates: a random
    # phase of the first 100, then mutations of the greedy block. The budget ends the
    # search; the schedule only has to offer enough proposals (30 x 64).
    config.agent.update(FAST_AGENT)
    config.search.epsilon_schedule = ((1.0, 3), (0.0, 27))
    config.search.budget = 1000
  elif preset != 'paper':
    raise ValueError(f'unknown preset {preset!r}: use "paper", "smoke", "cpu" or "gpu"')
  return config
