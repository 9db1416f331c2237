"""The Ray executor on a real local Ray cluster: results as from the local executor, a
search through it, and workers killed (SIGKILL) mid-candidate."""

import os
import signal
import time

import numpy as np
import pytest

ray = pytest.importorskip('ray')

from blockqnn_jax.data import readers  # noqa: E402
from blockqnn_jax.executors import factory as executors  # noqa: E402
from blockqnn_jax.nsc import grammar as nsc  # noqa: E402
from blockqnn_jax.search import loop as search_lib  # noqa: E402
from blockqnn_jax.settings.search import SearchSettings  # noqa: E402
from blockqnn_jax.storage import store as store_lib  # noqa: E402
from configs import cifar  # noqa: E402
from tests.test_search import paper_search  # noqa: E402

BLOCKS = [nsc.parse('1,1,3,0,0 2,7,0,0,0'), nsc.parse('1,1,1,0,0 2,4,0,0,0 3,5,0,1,2 4,7,0,0,0')]

# Starts Ray: the suite's slow part.
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def cluster():
  ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
  yield
  ray.shutdown()


@pytest.fixture(scope='module')
def splits():
  return readers.load_splits('digits', validation_size=100, seed=0, max_train=256)


def _config(**ray_options):
  config = paper_search(cifar.get_config('smoke'))
  config.space.max_index = 4
  config.network.features = 4
  config.train.epochs = 1
  config.train.batch_size = 64
  config.train.eval_batch_size = 100
  config.executor.kind = 'ray'
  config.executor.compile_ahead = False  # two cores: one compile at a time
  config.executor.ray.num_workers = 2
  config.executor.ray.jobs_per_worker = 1
  config.executor.ray.update(ray_options)
  return config


def _kill_a_busy_worker(executor, timeout=120):
  """SIGKILLs the process of a worker that holds a candidate; returns its name."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    busy = [w for w in executor.workers() if w['in_flight']]
    if busy:
      os.kill(busy[0]['pid'], signal.SIGKILL)
      return busy[0]['name']
    time.sleep(0.02)
  raise AssertionError('no worker ever held a candidate')


def test_ray_workers_give_the_local_executors_results(cluster, splits):
  config = _config()
  with executors.make_executor(splits, SearchSettings.from_config(config)) as executor:
    remote = executor.map(BLOCKS, seeds=[3, 4])
    assert len({w['pid'] for w in executor.workers()}) == 2
    assert 0 < executor.utilisation() <= 1
  config.executor.kind = 'local'
  with executors.make_executor(splits, SearchSettings.from_config(config)) as executor:
    local = executor.map(BLOCKS, seeds=[3, 4])
  for r, l in zip(remote, local):
    assert r.ok and l.ok, (r.failure_reason, l.failure_reason)
    assert (r.canonical_key, r.flops, r.params) == (l.canonical_key, l.flops, l.params)
    # Same program, same seed, same data: the worker process trains what this one does.
    np.testing.assert_allclose(r.val_accuracy, l.val_accuracy, atol=0.02)
    np.testing.assert_allclose(r.final_loss, l.final_loss, rtol=1e-3)


def test_search_survives_a_killed_worker(cluster, splits, tmp_path):
  config = _config(max_attempts=2)
  config.search.blocks_per_iteration = 3
  config.search.epsilon_schedule = ((1.0, 1), (0.5, 1))
  config.search.max_staleness = 1
  killed = []

  with executors.make_executor(splits, SearchSettings.from_config(config)) as executor:
    def kill_once(iteration, position, result):
      if not killed:
        killed.append(_kill_a_busy_worker(executor))
    summary = search_lib.run_search(SearchSettings.from_config(config), tmp_path, executor,
                                    progress=False, on_recorded=kill_once)
    assert executor.workers_lost == 1 and executor.requeued >= 1
    assert 0 <= summary.worker_idle_fraction < 1

  assert summary.iterations_done == 2 and summary.candidates == 6
  store = store_lib.ResultsStore(tmp_path)
  rows = store.candidates()
  store.close()
  # Nothing lost: the killed worker's candidate was retried elsewhere and trained.
  assert all(c.status == 'ok' for c in rows), [c.failure_reason for c in rows]
  trained = [c.canonical_key for c in rows if not c.cached]
  assert len(trained) == len(set(trained))


def test_candidate_fails_with_its_reason_after_max_attempts(cluster, splits):
  config = _config(max_attempts=1, num_workers=1)
  with executors.make_executor(splits, SearchSettings.from_config(config)) as executor:
    future = executor.submit(BLOCKS[0], seed=0)
    _kill_a_busy_worker(executor)
    result = future.result(timeout=300)
    assert result.status == 'failed'
    assert 'worker lost' in result.failure_reason
    assert 'gave up after 1 attempt' in result.failure_reason
    # The pool replaced the dead worker, and the search would go on with it.
    assert executor.map([BLOCKS[1]])[0].ok


def _wait(condition, timeout=180):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, 'timed out'
    time.sleep(0.1)


def test_workers_follow_nodes_that_join_and_leave(splits):
  """A multi-node cluster on this machine (ray.cluster_utils): the pool grows onto a node
  that joins, and a node lost mid-candidate loses nothing."""
  from ray.cluster_utils import Cluster
  if ray.is_initialized():
    ray.shutdown()
  cluster = Cluster(initialize_head=True, head_node_args={'num_cpus': 1})
  ray.init(address=cluster.address, log_to_driver=False)
  try:
    config = _config(num_workers=0, max_attempts=2)  # 0: one worker per CPU slot
    with executors.make_executor(splits, SearchSettings.from_config(config)) as executor:
      _wait(lambda: executor.num_workers == 1)
      node = cluster.add_node(num_cpus=1)
      _wait(lambda: executor.num_workers == 2)
      futures = [executor.submit(b, seed=1) for b in BLOCKS]
      _wait(lambda: any(w['in_flight'] and w['node_id'] == node.node_id
                        for w in executor.workers()))
      cluster.remove_node(node)
      results = [f.result(timeout=300) for f in futures]
      assert all(r.ok for r in results), [r.failure_reason for r in results]
      assert executor.workers_lost == 1 and executor.num_workers == 1
  finally:
    ray.shutdown()
    cluster.shutdown()
