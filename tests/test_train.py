"""Candidate evaluation: results, failures as results, compile cache, multi-device runs."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from blockqnn_jax.data import readers
from blockqnn_jax.data import splits as splits_lib
from blockqnn_jax.executors import local as local_executor
from blockqnn_jax.models import architecture, cost, prepare
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings import search
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.storage import results
from blockqnn_jax.strategies.rungs import StopLines
from blockqnn_jax.training import candidate as candidate_lib
from blockqnn_jax.training import compile_cache, engine
from blockqnn_jax.training import devices as devices_lib

RESIDUAL = nsc.RESIDUAL_BLOCK
SMALL = nsc.parse('1,1,3,0,0 2,7,0,0,0')


def _easy_splits(num_train=256, num_val=64, size=8, seed=0):
  """Two classes a small network separates in a few epochs: bright vs dark top half."""
  rng = np.random.default_rng(seed)

  def make(n):
    labels = rng.integers(0, 2, n).astype(np.int32)
    images = rng.integers(0, 100, (n, size, size, 3)).astype(np.uint8)
    images[labels == 1, : size // 2] += 120
    return images, labels

  (xt, yt), (xv, yv) = make(num_train), make(num_val)
  empty = np.zeros((0, size, size, 3), np.uint8)
  return splits_lib.ImageSplits(train_images=xt, train_labels=yt, val_images=xv, val_labels=yv,
                                test_images=empty, test_labels=np.zeros((0,), np.int32),
                                num_classes=2, class_names=('dark', 'bright'), name='easy')


def _config(**train):
  config = ml_collections.ConfigDict()
  config.train = dict(epochs=6, batch_size=32, learning_rate=3e-3, lr_decay_epochs=5,
                      augment=False, eval_batch_size=48)
  config.train.update(train)
  config.reward = dict(mu=0.01, rho=0.02)
  config.network = dict(num_blocks=1, features=4, num_classes=2, image_size=8,
                        scan_blocks=False)
  return config


def _evaluate(block, config, splits, **kwargs):
  """Scores one block under a ConfigDict's train, reward and network sections."""
  s = SearchSettings.from_config(config)
  return candidate_lib.evaluate(block, s.train, s.reward, s.network, splits, **kwargs)


def _executor(splits, config, devices, **kwargs):
  return local_executor.LocalExecutor(splits, SearchSettings.from_config(config), devices,
                                      **kwargs)


@pytest.fixture(scope='module')
def splits():
  return _easy_splits()


@pytest.fixture(scope='module')
def trainer(splits):
  s = SearchSettings.from_config(_config())
  group = devices_lib.DeviceGroup.place(splits, jax.local_devices()[:1])
  return candidate_lib.CandidateTrainer(group, s.train, s.reward, s.network)


@pytest.mark.slow
def test_evaluate_reports_everything(trainer):
  result = trainer.evaluate(RESIDUAL)
  assert result.ok, result.failure_reason
  assert 0.0 <= result.val_accuracy <= 1.0
  spec = architecture.cifar_spec(RESIDUAL, num_blocks=1, features=4, num_classes=2,
                                image_size=8)
  assert result.params == cost.network_params(spec)
  assert result.density == pytest.approx(RESIDUAL.density())
  flops, reference = prepare.reward_cost_terms(RESIDUAL, spec)
  assert result.flops == flops
  # Residual block at F=4, 8x8: two 3x3 convs 4->4 = 2 * (2*9*4*4*64) = 2 * reference.
  assert flops == 2 * reference
  expected = (result.val_accuracy - 0.01 * math.log(2.0) - 0.02 * math.log(RESIDUAL.density()))
  assert result.reward == pytest.approx(expected)
  assert result.compile_s > 0 and result.train_s > 0 and result.eval_s > 0
  assert result.total_s >= result.train_s + result.eval_s
  assert np.isfinite(result.final_loss) and result.device == 'cpu:0'


def test_reward_floor_and_plain_accuracy():
  config = search.RewardConfig(mu=0.5, rho=0.0)
  # Cheaper than the reference: no bonus.
  assert results.compute_reward(0.7, 10, 100, 1.0, config) == pytest.approx(0.7)
  assert results.compute_reward(0.7, 1000, 100, 2.0, search.RewardConfig(0, 0)) == 0.7


@pytest.mark.slow
def test_training_learns_the_easy_task(trainer):
  result = trainer.evaluate(RESIDUAL, seed=1)
  assert result.ok and result.val_accuracy > 0.9, result


@pytest.mark.slow
def test_equivalent_block_reuses_the_compiled_programs(trainer):
  swapped = nsc.parse('1,4,0,0,0 2,1,3,1,0 3,1,3,2,0 4,5,0,3,1 5,7,0,0,0')  # add preds swapped
  trainer.evaluate(RESIDUAL)
  result = trainer.evaluate(swapped)
  assert result.ok and result.compile_cached and result.compile_s == 0.0


def test_invalid_block_is_a_failed_result(trainer):
  result = trainer.evaluate(nsc.Block.parse('1,1,3,0,0 2,1,4,1,0 3,7,0,0,0'))
  assert result.status == 'failed'
  assert result.failure_reason.startswith('invalid block: layer 2: kernel 4')


@pytest.mark.slow
def test_divergence_is_a_failed_result(splits):
  # Adam steps of 1e30 overflow float32 within the first epoch.
  result = _evaluate(SMALL, _config(learning_rate=1e30, epochs=1), splits)
  assert result.status == 'failed', result
  assert result.failure_reason.startswith('diverged: training loss is nan in epoch 1')


def test_out_of_memory_is_a_failed_result(trainer, monkeypatch):
  compiled, _ = trainer.compile(RESIDUAL)

  class Exhausted:
    def __call__(self, *args):
      raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.1GiB.')

  monkeypatch.setattr(compiled, 'fit', Exhausted())
  result = trainer.evaluate(RESIDUAL, compiled=(compiled, True))
  assert result.status == 'failed' and result.failure_reason.startswith('out of memory')


@pytest.mark.slow
def test_eight_candidates_on_eight_devices(splits):
  devices = jax.local_devices()
  assert len(devices) == 8
  # Cheap-to-compile blocks: every device compiles its own programs.
  blocks = [nsc.parse(f'1,{t},{k},0,0 2,7,0,0,0') for t, k in
            ((4, 0), (2, 1), (2, 3), (3, 1), (3, 3))]
  blocks += [nsc.parse('1,4,0,0,0 2,4,0,1,0 3,7,0,0,0'), nsc.parse('1,4,0,0,0 2,5,0,0,1 3,7,0,0,0'),
             nsc.parse('1,4,0,0,0 2,6,0,0,1 3,7,0,0,0')]
  with _executor(splits, _config(epochs=1), devices) as executor:
    assert executor.num_workers == 8
    futures = [executor.submit(b, seed=i) for i, b in enumerate(blocks)]
    results = [f.result() for f in futures]
    assert 0.0 < executor.utilisation() <= 1.0
  assert all(r.ok for r in results), [r.failure_reason for r in results]
  assert [r.block for r in results] == [b.to_text() for b in blocks]
  assert len({r.device for r in results}) >= 4  # spread over the devices, not queued on one


@pytest.mark.slow
def test_executor_answers_even_what_it_cannot_evaluate(splits):
  """Not a block at all: a failed result, and the worker thread stays alive for the next."""
  with _executor(splits, _config(epochs=1), jax.local_devices()[:1],
                 compile_ahead=False) as executor:
    bad = executor.submit('1,1,3,0,0 2,7,0,0,0').result(timeout=60)
    assert bad.status == 'failed' and 'AttributeError' in bad.failure_reason
    assert executor.submit(SMALL).result(timeout=300).ok


@pytest.mark.slow
def test_data_parallel_matches_single_device(splits, trainer):
  one = trainer.evaluate(RESIDUAL)
  four = _evaluate(RESIDUAL, _config(), splits, devices=jax.local_devices()[:4])
  assert one.ok and four.ok
  assert four.device == 'cpu:0,cpu:1,cpu:2,cpu:3'
  np.testing.assert_allclose(four.final_loss, one.final_loss, rtol=2e-3)
  assert abs(four.val_accuracy - one.val_accuracy) <= 2 / 64  # at most two images differ


@pytest.mark.slow
def test_persistent_compilation_cache(trainer, tmp_path):
  """A second compile of the same candidate, with a cold in-memory cache, reads the disk."""
  suite_cache = jax.config.jax_compilation_cache_dir  # conftest's, for the tests after
  compile_cache.enable_persistent_compilation_cache(tmp_path)
  try:
    fresh = lambda: candidate_lib.CandidateTrainer(trainer.group, trainer.train_config,
                                                   trainer.reward_config, trainer.network)
    fresh().compile(SMALL)
    written = set(p.name for p in tmp_path.iterdir())
    assert any(name.startswith('jit_fit') for name in written)  # the candidate's own steps
    _, cached_in_memory = fresh().compile(SMALL)
    assert not cached_in_memory
    assert set(p.name for p in tmp_path.iterdir()) == written  # nothing compiled anew
  finally:
    compile_cache.enable_persistent_compilation_cache(suite_cache)


@pytest.mark.slow
@pytest.mark.parametrize('augment', [False, True])
def test_stepwise_loop_trains_what_the_scanned_program_trains(splits, augment):
  """'steps' (CPU's default) and 'scan' (GPU/TPU's): same batches, keys and updates."""
  scan = _evaluate(RESIDUAL, _config(loop='scan', augment=augment), splits, seed=3)
  steps = _evaluate(RESIDUAL, _config(loop='steps', augment=augment), splits, seed=3)
  assert scan.ok and steps.ok
  np.testing.assert_allclose(steps.final_loss, scan.final_loss, rtol=1e-3)
  assert abs(steps.val_accuracy - scan.val_accuracy) <= 1 / 48  # at most one image differs
  other_seed = _evaluate(RESIDUAL, _config(loop='steps', augment=augment), splits,
                                  seed=4)
  assert other_seed.final_loss != steps.final_loss  # the seed does reach the steps


@pytest.mark.slow
@pytest.mark.parametrize('loop', ['steps', 'scan'])
def test_shared_programs_train_what_one_program_per_candidate_trained(splits, loop):
  """Augmentation in a program shared by all candidates and an initialisation op by op
  change no bit of the trained network: against the straightforward formulation (one
  jitted init, each step gathering and augmenting its own batch), which is what every
  candidate compiled for itself before."""
  s = SearchSettings.from_config(_config(loop=loop, augment=True, epochs=2,
                                         flat_optimizer=False, xla_cpu_fusion_emitters=True))
  group = devices_lib.DeviceGroup.place(splits, jax.local_devices()[:1])
  trainer = candidate_lib.CandidateTrainer(group, s.train, s.reward, s.network)
  compiled, _ = trainer.compile(RESIDUAL)
  state, epoch_loss = trainer.train(compiled, seed=5)

  model = trainer.model(trainer.prepare(RESIDUAL))
  steps = trainer.steps_per_epoch
  tx = engine.make_optimizer('adam', optax.exponential_decay(
      s.train.learning_rate, s.train.lr_decay_epochs * steps, s.train.lr_decay,
      staircase=True), b1=s.train.b1, b2=s.train.b2)  # per parameter, not flattened
  options = engine.StepOptions(augment=True)
  key = jax.random.key(5, impl=s.train.prng_impl)

  def init(key):
    init_key, data_key = jax.random.split(key)
    return (engine.init_state(init_key, model, tx, trainer.image_shape),
            jax.random.split(data_key, s.train.epochs))

  @jax.jit
  def one_step(state, order, step_keys, i):
    return engine.train_step(state, group.train_images[order[i]],
                             group.train_labels[order[i]], step_keys[i], group.mean,
                             group.std, model=model, tx=tx, options=options)

  expected, epoch_keys = jax.jit(init)(key)
  losses = []
  if loop == 'scan':  # what the scanned candidate compiled: all epochs in one program
    @jax.jit
    def train_all(key):
      state, epoch_keys = init(key)

      def epoch(state, epoch_key):
        order, step_keys = engine.epoch_plan(epoch_key, len(splits.train_labels),
                                             s.train.batch_size)
        return jax.lax.scan(lambda st, xs: one_step(st, order, step_keys, xs), state,
                            jnp.arange(steps))

      return jax.lax.scan(epoch, state, epoch_keys)

    expected, _ = train_all(key)
  for epoch in range(s.train.epochs if loop == 'steps' else 0):
    order, step_keys = engine.epoch_plan(epoch_keys[epoch], len(splits.train_labels),
                                         s.train.batch_size)
    for i in range(steps):
      expected, (loss, _) = one_step(expected, order, step_keys, i)
      losses.append(loss)
  assert int(state.step) == int(expected.step)
  for got, want in zip(jax.tree.leaves((state.params, state.batch_stats)),
                       jax.tree.leaves((expected.params, expected.batch_stats))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  if loop == 'steps':  # the scanned epoch sums its losses in another order
    # The same reduction as the trainer's: numpy's pairwise float32 sum can differ from
    # XLA's in the last bit, and which of them does depends on the machine's vector width.
    np.testing.assert_array_equal(epoch_loss, np.asarray(
        [jnp.mean(jnp.stack(losses[e * steps:(e + 1) * steps]))
         for e in range(s.train.epochs)]))


@pytest.mark.slow
def test_the_faster_compiling_defaults_train_the_same_networks_up_to_rounding(splits):
  """The flat optimiser and XLA:CPU's classic emitters change results by rounding only:
  per seed, the trained networks' losses differ far less than between seeds."""
  exact = dict(flat_optimizer=False, xla_cpu_fusion_emitters=True)
  fast, slow = [], []
  for seed in range(4):
    fast.append(_evaluate(RESIDUAL, _config(epochs=2, augment=True), splits, seed=seed))
    slow.append(_evaluate(RESIDUAL, _config(epochs=2, augment=True, **exact), splits,
                          seed=seed))
  assert all(r.ok for r in fast + slow)
  fast_loss = np.asarray([r.final_loss for r in fast])
  slow_loss = np.asarray([r.final_loss for r in slow])
  assert np.any(fast_loss != slow_loss)  # the settings are not ignored
  paired = np.abs(fast_loss - slow_loss).max()
  between_seeds = slow_loss.max() - slow_loss.min()
  assert paired < 0.01 * between_seeds, (paired, between_seeds)
  assert max(abs(a.val_accuracy - b.val_accuracy) for a, b in zip(fast, slow)) <= 1 / 48


@pytest.mark.parametrize('weight_decay', [0.0, 1e-4])
@pytest.mark.parametrize('flat', [False, True])
def test_a_candidate_optimiser_state_starts_at_zero(trainer, weight_decay, flat):
  """initial_state writes zeros for the optimiser state instead of running tx.init."""
  s = SearchSettings.from_config(_config(weight_decay=weight_decay, flat_optimizer=flat))
  model = trainer.model(trainer.prepare(RESIDUAL))
  tx = candidate_lib.candidate_optimizer(s.train, 8)
  state, _ = candidate_lib.initial_state(model, tx, trainer.image_shape,
                                         jax.random.key(0, impl='rbg'), 1,
                                         jax.local_devices()[0])
  expected = tx.init(state.params)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(expected)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_bfloat16_compute_path_runs_on_cpu(splits):
  """The GPU/TPU precision (bf16 activations, fp32 parameters), exercised here on CPU: the
  candidate's compiled steps carry bf16 activations (the fp32 ones none), and it trains."""
  result = _evaluate(SMALL, _config(compute_dtype='bfloat16', epochs=2), splits)
  assert result.ok and np.isfinite(result.final_loss), result
  programs = {}
  for dtype in ('bfloat16', 'float32'):
    s = SearchSettings.from_config(_config(compute_dtype=dtype, epochs=2))
    trainer = candidate_lib.CandidateTrainer(
        devices_lib.DeviceGroup.place(splits, jax.local_devices()[:1]), s.train, s.reward,
        s.network)
    assert trainer.dtype == {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}[dtype]
    programs[dtype] = trainer.compile(SMALL)[0].fit.as_text()
  # XLA:CPU runs a bf16 convolution in f32 between converts; what reaches the program is
  # the activations in bf16: dozens of bf16 values in one, none in the other.
  assert programs['bfloat16'].count('bf16[') > 20
  assert 'bf16' not in programs['float32']


@pytest.mark.slow
def test_real_cifar10_pixels_end_to_end(shared_data):
  splits = readers.load_splits('npz', path=str(shared_data / 'cifar10-exact-subset.npz'),
                               validation_size=200, max_train=1200, seed=0)
  config = _config(epochs=1, batch_size=100, augment=True, eval_batch_size=100)
  config.network.num_classes = 10
  config.network.image_size = 32
  result = _evaluate(SMALL, config, splits)
  assert result.ok, result.failure_reason
  assert 0.0 <= result.val_accuracy <= 1.0 and result.params > 0


def test_a_program_compiling_is_waited_for_not_compiled_again(trainer):
  """Two workers asking for the same new block at once: one compiles, the other waits."""
  import concurrent.futures
  fresh = candidate_lib.CandidateTrainer(trainer.group, trainer.train_config,
                                         trainer.reward_config, trainer.network)
  block = nsc.parse('1,1,1,0,0 2,4,0,1,0 3,7,0,0,0')
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    outcomes = list(pool.map(lambda _: fresh.compile(block), range(2)))
  assert fresh.cache.misses == 1 and fresh.cache.hits == 1
  assert outcomes[0][0] is outcomes[1][0]
  assert sorted(cached for _, cached in outcomes) == [False, True]


@pytest.mark.slow
def test_several_workers_share_one_device(splits):
  """executor.workers_per_device: more workers (and compile threads) than devices."""
  from blockqnn_jax.executors import factory as executors
  config = _config(epochs=1)
  config.executor = dict(workers_per_device=2)
  with executors.make_executor(splits, SearchSettings.from_config(config)) as executor:
    assert executor.num_workers == 2 * len(jax.local_devices())
    devices = [t.group.name for t in executor.trainers]
    assert devices.count('cpu:0') == 2
    blocks = [SMALL, nsc.parse('1,2,1,0,0 2,7,0,0,0')]
    outcomes = executor.map(blocks, seeds=[0, 1])
  assert all(r.ok for r in outcomes)
  assert [r.block for r in outcomes] == [b.to_text() for b in blocks]


# -- early stopping at rungs -----------------------------------------------------------------

INF = math.inf


def test_a_candidate_scored_at_rungs_trains_as_without_and_stops_below_a_line(trainer):
  plain = trainer.evaluate(RESIDUAL, seed=1)
  scored = trainer.evaluate(RESIDUAL, seed=1, lines=StopLines((2, 4), (-INF, -INF)))
  assert scored.ok and not scored.stopped and not plain.rungs
  assert sorted(scored.rung_scores) == [2, 4]
  # Scoring at the rungs reads the state and changes nothing of the training.
  assert (scored.val_accuracy, scored.reward, scored.final_loss) == (
      plain.val_accuracy, plain.reward, plain.final_loss)
  # A line above its rung-4 score stops it there, with that score as its reward.
  stopped = trainer.evaluate(RESIDUAL, seed=1, lines=StopLines((2, 4), (-INF, INF)))
  assert stopped.ok and stopped.stopped and stopped.stopped_at == 4
  assert stopped.reward == scored.rung_scores[4]
  assert stopped.rung_scores == scored.rung_scores
  # The reward's cost terms are the block's, whatever the epoch.
  assert stopped.val_accuracy - stopped.reward == pytest.approx(
      plain.val_accuracy - plain.reward)
  # A score equal to the line goes on; one just below stops (and trains 2 epochs, not 6).
  at_line = trainer.evaluate(RESIDUAL, seed=1,
                             lines=StopLines((2, 4), (scored.rung_scores[2], -INF)))
  assert not at_line.stopped and at_line.reward == plain.reward
  above = np.nextafter(scored.rung_scores[2], INF)
  early = trainer.evaluate(RESIDUAL, seed=1, lines=StopLines((2, 4), (above, -INF)))
  assert early.stopped_at == 2 and early.rung_scores == {2: scored.rung_scores[2]}


@pytest.mark.slow
def test_the_scanned_loop_stops_at_the_same_rung_with_the_same_score(splits, trainer):
  lines = StopLines((3,), (INF,))
  steps = trainer.evaluate(SMALL, seed=2, lines=lines)
  s = SearchSettings.from_config(_config(loop='scan'))
  scan = candidate_lib.CandidateTrainer(devices_lib.DeviceGroup.place(
      splits, jax.local_devices()[:1]), s.train, s.reward, s.network).evaluate(
          SMALL, seed=2, lines=lines)
  assert steps.stopped_at == scan.stopped_at == 3
  assert abs(steps.val_accuracy - scan.val_accuracy) <= 1 / 64  # at most one image differs


@pytest.mark.slow
def test_the_executor_hands_a_jobs_lines_to_its_trainer(splits):
  config = _config(epochs=3)
  with _executor(splits, config, jax.local_devices()[:1]) as executor:
    stopped = executor.submit(SMALL, 0, StopLines((1,), (INF,))).result()
    whole = executor.submit(SMALL, 0).result()
  assert stopped.stopped_at == 1 and not whole.stopped and not whole.rungs
