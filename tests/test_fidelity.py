"""benchmarks.fidelity: the space's distinct blocks, the rank figures, and a run on a handful
of blocks (the real CIFAR-10 subset; skipped where ../shared is absent)."""

import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from benchmarks import fidelity
from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import grammar as nsc

ROOT = Path(__file__).resolve().parents[1]


def test_canonical_blocks_are_every_distinct_legal_block_once():
  grammar = nsc.Grammar(max_index=3, conv_kernels=(1, 3), max_pool_kernels=(3,),
                        avg_pool_kernels=(3,))
  blocks = fidelity.canonical_blocks(grammar)
  keys = [canonical.canonical_key(b) for b in blocks]
  assert len(set(keys)) == len(keys) > 10
  for b in blocks:
    nsc.validate(b, grammar)
  # Equivalent forms of one block appear once: conv3 then add(input, conv3) in either order.
  assert canonical.canonical_key(nsc.parse('1,1,3,0,0 2,5,0,0,1 3,7,0,0,0')) in keys
  one_layer = {canonical.canonical_key(nsc.parse(f'1,{t},{k},0,0 2,7,0,0,0'))
               for t, k in ((1, 1), (1, 3), (2, 3), (3, 3), (4, 0))}
  assert one_layer <= set(keys)


def test_summary_figures_are_what_they_say():
  rng = np.random.default_rng(0)
  truth = rng.normal(size=30)
  rewards = np.stack([truth + 0.1 * rng.normal(size=30), truth + 0.1 * rng.normal(size=30)], 1)
  s = fidelity.summarize('x', '1:1:1', rewards, rewards, np.full(30, 2.0), truth, truth)
  assert s['seed_noise'] == pytest.approx(
      np.sqrt(np.mean((rewards[:, 0] - rewards[:, 1]) ** 2) / 2))
  assert s['spread_over_blocks'] == pytest.approx(rewards.mean(1).std(ddof=1))
  assert s['kendall_tau'] == pytest.approx(np.mean(
      [stats.kendalltau(rewards[:, i], truth).statistic for i in (0, 1)]))
  assert s['two_seed_mean']['spearman_rho'] == pytest.approx(
      stats.spearmanr(rewards.mean(1), truth).statistic)
  assert s['kendall_tau'] > 0.8 and s['seconds_per_candidate'] == 2.0
  assert fidelity._top_overlap(truth, truth) == 5
  assert fidelity._top_overlap(-truth, truth) == 0


@pytest.mark.slow
def test_a_run_on_a_handful_of_blocks_writes_its_figures(shared_data, tmp_path):
  npz = shared_data / 'cifar10-exact-subset.npz'
  # The searches' data cut to 1,800 training images, so that the preset (all of them, the
  # 1,000 of its hold-out held out) trains on 800.
  with np.load(npz) as full:
    small_npz = tmp_path / 'subset.npz'
    np.savez(small_npz, x_train=full['x_train_subset'][:1800],
             y_train=full['y_train_subset'][:1800], x_test=full['x_test_subset'],
             y_test=full['y_test_subset'])
  command = [sys.executable, '-m', 'benchmarks.fidelity', f'--data={small_npz}',
             '--num_blocks=3', '--max_index=4', '--fidelities=preset,small=1500:1:4',
             '--high=2500:1:4',
             f'--high_data=npz:{npz}', f'--cache={tmp_path / "cache.sqlite"}',
             f'--out={tmp_path}']
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads((tmp_path / 'fidelity.json').read_text())
  assert (tmp_path / 'fidelity.png').stat().st_size > 10_000
  assert [f['name'] for f in report['fidelities']] == ['preset', 'small']
  assert len({b['canonical_key'] for b in report['blocks']}) == 3
  # Drawn from the cpu space cut to 4 layer indices: a terminal at index 4 at the latest.
  assert all(len(nsc.parse(b['nsc']).layers) <= 4 for b in report['blocks'])
  rows = report['blocks']
  high = [b['high_reward'] for b in rows]
  # Each fidelity's τ is the mean over its two seeds of τ against the high fidelity; the
  # preset's is also at top level.
  for summary in report['fidelities']:
    assert summary['kendall_tau'] == pytest.approx(np.mean([stats.kendalltau(
        [b[summary['name']][i] for b in rows], high).statistic for i in (0, 1)]))
  assert report['kendall_tau'] == report['fidelities'][0]['kendall_tau']
  assert report['high']['test_images'] == 1017 and report['high']['train_images'] == 2500
  # Run again: everything comes from the cache, nothing is trained.
  again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0 and '0 to train' in again.stdout
  assert 'trained,' not in again.stdout
