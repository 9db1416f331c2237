"""benchmarks.early_stop's report: the rung tau, the candidates per hour and the kept block,
read from two small stores written here (the searches themselves are results/early_stop)."""

import json
from pathlib import Path
import subprocess
import sys

import pytest
from scipy import stats

from blockqnn_jax.storage import results
from blockqnn_jax.storage import store as store_lib

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = [f'1,1,{k},0,0 2,{t},3,0,0 3,7,0,0,0' for k in (1, 3) for t in (1, 2, 3)]


def _write(workdir: Path, variant: str) -> list[results.EvalResult]:
  """Six candidates of ``variant``: every one scored at rungs 1-3 and trained to 4 epochs
  ('full'), or the last three stopped at rung 1 ('stop'); each second of training an epoch."""
  out = []
  with store_lib.ResultsStore(workdir) as store:
    for i, block in enumerate(BLOCKS):
      final = 0.3 + 0.02 * i
      rungs = {1: final - 0.1 + 0.03 * (i % 2), 2: final - 0.05, 3: 0.5 - 0.02 * i}
      stopped = variant == 'stop' and i >= 3
      if stopped:
        rungs = {1: rungs[1]}
      validations = len(rungs) + (0 if stopped else 1)
      result = results.EvalResult(
          block=block, canonical_key=f'key{i}', status='ok', val_accuracy=final,
          reward=rungs[1] if stopped else final, train_s=1.0 if stopped else 4.0,
          eval_s=0.1 * validations, total_s=(1.0 if stopped else 4.0) + 0.1 * validations + 0.5,
          stopped_at=1 if stopped else 0, rungs=results.encode_scores(rungs))
      store.record(i // 2, i % 2, 1.0, result, cached=False)
      out.append(result)
  return out


def test_the_report_reads_tau_rates_and_kept_blocks_from_the_stores(tmp_path):
  full = _write(tmp_path / 'full_seed0', 'full')
  _write(tmp_path / 'stop_seed0', 'stop')
  done = subprocess.run([sys.executable, '-m', 'benchmarks.early_stop', '--es_report_only',
                         f'--es_root={tmp_path}', '--es_seeds=0'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  data = json.loads((tmp_path / 'early_stop.json').read_text())
  for step in (1, 2, 3):
    tau = stats.kendalltau([r.rung_scores[step] for r in full], [r.reward for r in full])
    assert data['kendall_tau'][str(step)]['tau_per_seed']['0'] == pytest.approx(tau.statistic)
  assert data['kendall_tau']['2']['tau_pooled'] == pytest.approx(1.0)  # a shift of the final
  # The rung-3 scores fall as the final rises: the final's top 5 are rung 3's worst.
  assert data['kendall_tau']['3']['top5_kept']['0'] == {'third': 1, 'half': 2}
  runs = data['searches']
  assert (runs['full_seed0']['epochs_per_candidate'], runs['stop_seed0']['epochs_per_candidate']
          ) == (4.0, 2.5)
  assert runs['stop_seed0']['stopped'] == 3 and runs['full_seed0']['stopped'] == 0
  # Six candidates in their summed seconds: full 6 x (4 + 4 x 0.1 + 0.5), stop 3 x 4.9 +
  # 3 x (1 + 0.1 + 0.5).
  assert runs['full_seed0']['candidates_per_hour'] == pytest.approx(3600 * 6 / 29.4)
  assert runs['stop_seed0']['candidates_per_hour'] == pytest.approx(3600 * 6 / 19.5)
  assert data['summary']['stop']['candidates_per_hour_ratio'] == [pytest.approx(29.4 / 19.5)]
  # At pooled prices (1 s an epoch, 0.1 s a validation, 0.5 s the rest): full 4 epochs and
  # one validation (its rungs are measurement only), stop (4.9 + 1.6) / 2.
  p = data['prices']
  assert p['epoch_s'] == pytest.approx(1.0) and p['validation_s'] == pytest.approx(0.1)
  assert runs['full_seed0']['priced_candidates_per_hour'] == pytest.approx(3600 / 4.6)
  assert runs['stop_seed0']['priced_candidates_per_hour'] == pytest.approx(3600 / 3.25)
  # The kept block is the best trained to the end: stop's best three were stopped.
  assert runs['full_seed0']['kept'] == BLOCKS[5] and runs['stop_seed0']['kept'] == BLOCKS[2]
  assert list(data['summary']) == ['stop']  # no 'window' searches here
  text = (tmp_path / 'early_stop.md').read_text()
  assert '| stop_seed0 | 6 | 3 | 2.50 | 20 |' in text and '1.51×' in text


def test_a_rule_replayed_stops_keeps_and_prices_as_worked_out_by_hand():
  from types import SimpleNamespace
  from benchmarks import early_stop
  from blockqnn_jax.settings.search import EarlyStop
  assert early_stop.early_stop_of('window') == EarlyStop(rungs=(1, 2), promote=0.25, window=8)
  # (iteration, rung 1, rung 2, final) of candidates A-F, the better half going on.
  rows = [SimpleNamespace(block=name, iteration=it, position=i, rung_scores={1: r1, 2: r2},
                          reward=final)
          for i, (name, it, r1, r2, final) in enumerate([
              ('A', 0, 0.5, 0.55, 0.6), ('B', 0, 0.3, 0.35, 0.4), ('C', 1, 0.45, 0.99, 0.9),
              ('D', 1, 0.6, 0.7, 0.5), ('E', 2, 0.35, 0.2, 0.7), ('F', 2, 0.55, 0.6, 0.65)])]
  got = early_stop.replay(rows[::-1], EarlyStop(rungs=(1, 2), promote=0.5, min_history=2))
  # Iteration 1 against A, B: rung 1's line 0.5 stops C; D passes both lines (0.5, 0.55).
  # Iteration 2 against A-D: rung 1's line 0.5 (second of .6 .5 .45 .3) stops E; rung 2's
  # is the second of .7 .55 .35 (C stopped at rung 1: its .99 is no score of the rule's),
  # 0.55, which F's 0.6 passes.
  assert got == dict(candidates=6, stopped=2, epochs_per_candidate=(4 * 4 + 1 + 1) / 6,
                     kept='F', kept_rank=3)  # F's 0.65 below C's 0.9 and E's 0.7
