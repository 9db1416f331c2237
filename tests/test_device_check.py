"""The GPU device check (benchmarks/device_check/) runs, so it cannot rot before a GPU is lent.

The smallest form runs every section end to end through the command line on the CPU, in
well under a minute; the others check the time boxes and the failure handling without
compiling anything.
"""

import dataclasses
import json
import math
import os
from pathlib import Path
import subprocess
import sys

import pytest

from benchmarks.device_check import plan as plan_lib
from benchmarks.device_check import runner, tables
from configs import cifar

ROOT = Path(__file__).resolve().parents[1]


def _smallest(**changes) -> plan_lib.Plan:
  # In this process: no persistent cache, which is process-wide state other tests share.
  return dataclasses.replace(plan_lib.plan_for('smallest'), cache_everywhere=False,
                             **changes)


def _positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _fraction(x) -> bool:
  return isinstance(x, (int, float)) and 0.0 <= x <= 1.0


@pytest.mark.slow
def test_smallest_run_writes_every_key_with_sane_values(tmp_path):
  out = tmp_path / 'dc.json'
  # Its own process: the command line is what a GPU session runs, the check switches JAX's
  # persistent cache on and off (process-wide), and XLA's CPU backend may skip its LLVM
  # optimisations there, which halves the compile time this test is made of.
  env = dict(os.environ, XLA_FLAGS='--xla_backend_optimization_level=0',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.device_check', '--smallest', '--data=digits',
       f'--out={out}'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '== loops' in proc.stdout and '== memory' in proc.stdout
  report = json.loads(out.read_text())  # strict JSON: NaN would not parse back as a number

  assert report['complete'] is True
  for key in plan_lib.REPORT_KEYS + ('device', 'jax_version', 'settings', 'timings',
                                     'targets', 'memory_timeline'):
    assert key in report, key
  for key in plan_lib.REPORT_KEYS:
    assert report[key]['status'] == 'ok', (key, report[key])
  assert report['device']['kind'] and report['device']['platform'] == 'cpu'
  assert report['settings']['data']['source'] == 'digits'
  for name in plan_lib.SECTION_KEYS:
    timing = report['timings'][name]
    assert timing['status'] == 'ok' and timing['budget_s'] == 600
    assert 0 < timing['elapsed_s'] <= report['timings']['total_s']
    assert timing['started_at_s'] + timing['elapsed_s'] <= report['timings']['total_s'] + 1

  loops = report['loops']
  assert loops['recommendation'] in ('scan', 'steps')
  assert loops['recommendation_serial_45k'] in ('scan', 'steps')
  assert loops['auto_resolves_to'] == 'steps'  # what the library picks on CPU
  for loop in ('scan', 'steps'):
    assert _positive(loops['per_loop'][loop]['images_per_s'])
  train_s = {l: sum(r['train_s'] for r in loops['rows']
                    if r['loop'] == l and r['block'] in loops['compared_on'])
             for l in ('scan', 'steps')}
  assert loops['compared_on'] and loops['recommendation'] == min(train_s, key=train_s.get)
  assert loops['train_s_ratio_steps_over_scan'] == pytest.approx(
      train_s['steps'] / train_s['scan'])
  assert loops['auto_agrees'] == (loops['recommendation'] == 'steps')

  dtypes = report['dtypes']
  for dtype in ('bfloat16', 'float32'):
    assert _positive(dtypes['per_dtype'][dtype]['images_per_s'])
    assert _fraction(dtypes['per_dtype'][dtype]['val_accuracy'])
  assert _positive(dtypes['speedup_bf16_over_fp32'])
  # bf16 and fp32 trained the same blocks: the speed-up is their training times' ratio.
  dtype_s = {d: sum(r['train_s'] for r in dtypes['rows']
                    if r['dtype'] == d and r['block'] in dtypes['compared_on'])
             for d in ('bfloat16', 'float32')}
  assert dtypes['speedup_bf16_over_fp32'] == pytest.approx(
      dtype_s['float32'] / dtype_s['bfloat16'])

  per_hour = report['candidates_per_hour']
  for key in ('measured_subset', 'projected_45k', 'device_bound_45k',
              'with_persistent_cache_measured_subset', 'with_persistent_cache_projected_45k'):
    assert _positive(per_hour[key]), key
  share = report['compile_share']
  for name in ('without_cache', 'with_cache'):
    for stats in (share[name], share[name]['projected_45k']):
      assert _fraction(stats['compile_share']) and _fraction(stats['outside_train_share'])
  # Read back from the persistent cache, a program costs less than compiling it.
  assert share['with_cache']['mean_compile_s'] < share['without_cache']['mean_compile_s']
  assert share['without_cache']['files_in_cache'] > 0

  # Early stopping: the same block and seed stopped at the rung and trained on, from the
  # trainer's programs; the rung's score does not depend on what comes after it.
  early = report['early_stop']
  assert early['stopped_as_asked'] is True and early['all_warm'] is True
  rows = early['rows']
  assert (rows['stopped_at_1']['stopped_at'], rows['to_the_end_scored']['stopped_at'],
          rows['plain']['stopped_at']) == (1, 0, 0)
  assert rows['stopped_at_1']['rungs'] == rows['to_the_end_scored']['rungs']
  assert rows['plain']['rungs'] == {}
  assert early['epochs_per_candidate'] == 0.5 * 1 + 0.5 * 2
  for scale in ('subset', 'projected_45k'):
    v = early[scale]
    assert _positive(v['candidates_per_hour_plain']) and _positive(v['ratio'])
    assert v['ratio'] == pytest.approx(v['candidates_per_hour_pruned']
                                       / v['candidates_per_hour_plain'])

  ahead = report['compile_ahead']
  assert ahead['candidates_per_hour_ratio'] == pytest.approx(
      ahead['with_compile_ahead']['candidates_per_hour']
      / ahead['without_compile_ahead']['candidates_per_hour'])
  assert ahead['with_compile_ahead']['compile_ahead'] is True
  assert ahead['without_compile_ahead']['compile_ahead'] is False

  memory = report['memory']
  assert memory['peak_bytes_single_candidate'] == 'unavailable'  # the CPU has no counters
  assert set(memory['candidates_per_hour']) == {'1', '2'}
  assert all(_positive(v) for v in memory['candidates_per_hour'].values())
  assert memory['sharing_works'] is True
  assert all(p['total_bytes'] > 0 for p in memory['program_memory'].values())

  targets = report['targets']
  assert targets['min_candidates_per_gpu_hour'] == 300
  assert targets['max_outside_train_share'] == 0.25
  assert targets['serial_projected_45k'] == per_hour['projected_45k']
  assert targets['met_serial'] is (per_hour['projected_45k'] >= 300)
  outside = share['without_cache']['projected_45k']['outside_train_share']
  assert targets['met_outside_train_share'] is (outside <= 0.25)
  assert 'candidates/hour' in tables.format_table(report)
  assert report['settings']['cache_everywhere'] is True


def test_full_plan_fits_eight_minutes():
  plan = plan_lib.plan_for('full')
  assert (plan.epochs, plan.batch_size, plan.features, plan.num_blocks) == (12, 256, 32, 2)
  assert set(dict(plan.budgets)) == set(plan_lib.SECTION_KEYS)
  # 20 s of start-up plus every box ends before the deadline, the watchdog after it.
  assert 20 + sum(b for _, b in plan.budgets) <= plan.deadline_s < plan.hard_deadline_s < 480
  assert max(plan.workers) == 4 and len(set(plan.pool)) >= 2 * max(plan.workers)
  # Early stopping is measured at the gpu preset's rungs.
  gpu = cifar.get_config('gpu')
  assert plan.early_stop == (12, tuple(gpu.search.early_stop.rungs),
                             gpu.search.early_stop.promote)
  shorter = plan_lib.plan_for('full', time_limit_s=240)
  assert shorter.hard_deadline_s == pytest.approx(plan.hard_deadline_s / 2)


def test_a_spent_deadline_skips_every_section_with_a_reason(tmp_path):
  plan = _smallest(deadline_s=0.0)
  report = runner.run(plan, 'digits', tmp_path / 'dc.json')
  for key in plan_lib.REPORT_KEYS:
    assert report[key]['status'] == 'skipped' and report[key]['reason'], key
  assert json.loads((tmp_path / 'dc.json').read_text())['complete'] is True


@pytest.mark.slow
def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
  def broken(check, box):
    raise RuntimeError('out of device memory')

  def fine(check, box):
    return {'compile_ahead': {'status': 'ok'}}

  from benchmarks.device_check import runner
  monkeypatch.setattr(runner, 'SECTIONS', (('dtypes', broken), ('compile_ahead', fine)))
  report = runner.run(_smallest(), 'digits', tmp_path / 'dc.json',
                      sections=['dtypes', 'compile_ahead'])
  assert report['dtypes']['status'] == 'error'
  assert 'out of device memory' in report['dtypes']['error']
  assert report['compile_ahead']['status'] == 'ok'
  assert report['timings']['dtypes']['status'] == 'error'


def test_missing_npz_falls_back_only_at_toy_sizes(tmp_path):
  missing = f'npz:{tmp_path}/absent.npz'
  splits, info = runner.load_data(missing, plan_lib.plan_for('smallest'))
  assert info['source'] == 'digits' and 'absent' in info['note']
  assert splits.image_shape == (8, 8, 1)
  with pytest.raises(FileNotFoundError, match='carry'):
    runner.load_data(missing, plan_lib.plan_for('full'))
