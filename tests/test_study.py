"""The ask/tell study: any trainer, the search's store, resume after kill -9, one-line errors
for bad input with nothing stored, and the README's example run as written."""

import hashlib
import json
import math
import os
from pathlib import Path
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.report import compare
from blockqnn_jax.search.study import Study, StudyError
from blockqnn_jax.settings.base import ConfigMismatch
from blockqnn_jax.settings.search import EarlyStop, SearchSettings
from blockqnn_jax.storage import store as store_lib

ROOT = Path(__file__).resolve().parents[1]
GRAMMAR = nsc.Grammar(max_index=5, conv_kernels=(1, 3))


def score(block) -> float:
  """A deterministic stand-in objective of the canonical block, in [0, 1)."""
  key = canonical.canonical_key(block)
  return int(hashlib.sha256(key.encode()).hexdigest()[:6], 16) / 16**6


def _open(workdir, **kwargs):
  """A study of GRAMMAR; without the confirm rule unless asked (its tests are below)."""
  kwargs.setdefault('budget', 16)
  kwargs.setdefault('confirm', 1)
  return Study.create(workdir, grammar=GRAMMAR, blocks_per_iteration=4, **kwargs)


def _run(study, order=None):
  """Asks everything it can, then tells in ``order`` ('reverse' or as asked), to the end."""
  while not study.done:
    asked = []
    while (trial := study.ask()) is not None:
      if not trial.known:
        asked.append(trial)
    if not asked:
      break
    for trial in (asked[::-1] if order == 'reverse' else asked):
      study.tell(trial, score(trial.block), val_accuracy=0.5)


def _rows(workdir):
  with store_lib.ResultsStore.open_read_only(workdir) as store:
    rows = sorted((c.iteration, c.position, c.nsc, c.reward, c.cached, c.status)
                  for c in store.candidates())
    rows += [(e.iteration, -1 - e.replicate, e.canonical_key, e.result.reward, e.seed)
             for e in store.evaluations()]
    agent = store.load_agent()
  return rows, agent


def noisy_score(block, seed: int) -> float:
  """``score`` plus seed noise of 0.05: a block trained again scores differently."""
  return score(block) + 0.05 * float(np.random.default_rng(seed).standard_normal())


def _run_noisy(study, stop_after=None):
  """Tells every trial ``noisy_score`` until done (or after ``stop_after`` tells; 'again':
  when the first re-evaluation is out)."""
  told = 0
  while (trial := study.ask()) is not None:
    if not trial.known:
      if told == stop_after or (stop_after == 'again' and trial.reevaluation):
        return told
      study.tell(trial, noisy_score(trial.block, trial.seed))
      told += 1
  return told


@pytest.mark.slow
@pytest.mark.parametrize('strategy', ['qlearning_fast', 'qlearning', 'random', 'evolution',
                                      'local_search'])
def test_a_study_runs_to_its_budget_and_reports_like_a_search(strategy, tmp_path):
  with _open(tmp_path, strategy=strategy) as study:
    _run(study)
    summary = study.summary()
    assert study.done and study.ask() is None
  assert 16 <= summary['trained'] < 16 + 4
  rows, (iterations, _) = _rows(tmp_path)
  assert iterations == summary['iterations_done'] >= 4
  told = [r for r in rows if not r[4]]
  assert all(r[3] == pytest.approx(score(nsc.Block.parse(r[2]))) for r in told)
  assert len({canonical.canonical_key(nsc.Block.parse(r[2])) for r in told}) == len(told)
  curve = compare.load_curve(tmp_path)  # what experiments.report draws
  assert curve.trained == summary['trained']
  assert curve.best[-1] == pytest.approx(max(r[3] for r in told))


@pytest.mark.slow
def test_trials_told_in_any_order_give_the_same_study(tmp_path):
  for name, order in (('asked', None), ('reverse', 'reverse')):
    with _open(tmp_path / name, max_staleness=1) as study:
      _run(study, order)
  assert _rows(tmp_path / 'asked')[0] == _rows(tmp_path / 'reverse')[0]


@pytest.mark.slow
def test_several_trials_are_out_at_once_and_ask_waits_for_a_tell(tmp_path):
  with _open(tmp_path, max_staleness=1) as study:
    out = list(iter(study.ask, None))
    fresh = [t for t in out if not t.known]
    # The current iteration and one ahead (staleness 1); a copy of a block that is out
    # waits for its result instead of being handed out.
    assert {t.iteration for t in out} == {0, 1} and 6 <= len(out) <= 8
    assert study.outstanding == fresh and len({t.id for t in out}) == len(out)
    assert study.ask() is None and not study.done  # nothing more until iteration 0 is told
    later = [t for t in fresh if t.iteration == 1]
    for t in later[::-1]:  # any order: iteration 1 first
      study.tell(t, score(t.block))
    assert study.ask() is None
    for t in fresh:
      if t.iteration == 0:
        study.tell(t, score(t.block))
    # Iterations 0 and 1 are both complete now: both are learned, and 2 and 3 proposed.
    assert {t.iteration for t in iter(study.ask, None)} == {2, 3}


def test_a_repeat_is_known_at_once_and_never_handed_out_for_training(tmp_path):
  with _open(tmp_path, strategy='random', budget=40) as study:
    seen, repeats = set(), []
    while not study.done:
      batch = []
      while (trial := study.ask()) is not None:
        batch.append(trial)
      if not batch:
        break
      for t in batch:
        if t.known:
          repeats.append(t)
          assert t.canonical_key in seen and t.reward == pytest.approx(score(t.block))
          with pytest.raises(StudyError, match='repeat'):
            study.tell(t, 0.5)
        else:
          assert t.canonical_key not in seen
          seen.add(t.canonical_key)
          study.tell(t, score(t.block))
  assert repeats  # a 5-layer random space repeats within a few dozen blocks


@pytest.mark.parametrize('bad, message', [
    (dict(reward=float('nan')), 'finite number'), (dict(reward='0.5'), 'finite number'),
    (dict(reward=math.inf), 'finite number'), (dict(reward=True), 'finite number'),
    (dict(), 'neither'), (dict(reward=0.5, failed='oom'), 'both'),
    (dict(failed=''), 'say why'), (dict(reward=0.5, loss=1.0), 'unknown metric loss'),
])
def test_bad_tells_are_one_line_errors_and_store_nothing(bad, message, tmp_path):
  with _open(tmp_path) as study:
    trial = next(t for t in iter(study.ask, None) if not t.known)
    before = study.store.count()
    with pytest.raises(StudyError, match=message) as raised:
      study.tell(trial, **bad)
    assert '\n' not in str(raised.value)
    assert study.store.count() == before
    study.tell(trial, 0.5)  # the trial is still out, and can be told properly
    with pytest.raises(StudyError, match='told already'):
      study.tell(trial, 0.5)
    with pytest.raises(StudyError, match='unknown trial id 9999'):
      study.tell(9999, 0.5)
    assert study.store.count() == before + 1


def test_a_failed_trial_is_recorded_with_its_reason(tmp_path):
  with _open(tmp_path) as study:
    trial = next(t for t in iter(study.ask, None) if not t.known)
    result = study.tell(trial, failed='out of memory: my cluster said so')
    assert result.status == 'failed'
    row = study.store.iteration_rows(trial.iteration)[trial.position]
    assert row.failure_reason.startswith('out of memory')


@pytest.mark.slow
def test_reopened_with_other_settings_is_refused_and_one_at_a_time(tmp_path):
  _open(tmp_path).close()
  with pytest.raises(ConfigMismatch, match='search.budget'):
    _open(tmp_path, budget=30)
  with _open(tmp_path):  # a second process is refused while this one holds the study
    other = subprocess.run(
        [sys.executable, '-c', 'import sys; from blockqnn_jax.nsc import grammar as nsc; '
         'from blockqnn_jax.search.study import Study; '
         'Study.create(sys.argv[1], grammar=nsc.Grammar(max_index=5, conv_kernels=(1, 3)), '
         'blocks_per_iteration=4, budget=16)', str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert other.returncode != 0 and 'WorkdirBusy' in other.stderr


def test_a_study_reopened_hands_out_again_what_was_never_told(tmp_path):
  with _open(tmp_path) as study:
    asked = [t for t in iter(study.ask, None) if not t.known]
    study.tell(asked[0], score(asked[0].block))  # the rest: the worker died
  with _open(tmp_path) as study:
    again = [t for t in iter(study.ask, None) if not t.known]
    assert [t.id for t in again] == [t.id for t in asked[1:]]
    assert [t.block for t in again] == [t.block for t in asked[1:]]
    assert [t.seed for t in again] == [t.seed for t in asked[1:]]


_KILLED = textwrap.dedent('''
    import hashlib, sys, time
    from blockqnn_jax.nsc import canonical, grammar as nsc
    from blockqnn_jax.search.study import Study
    def score(block):
      key = canonical.canonical_key(block)
      return int(hashlib.sha256(key.encode()).hexdigest()[:6], 16) / 16**6
    def noise(seed):  # seed noise, so that the confirm rule re-evaluates
      return (int(hashlib.sha256(str(seed).encode()).hexdigest()[:6], 16) / 16**6 - 0.5) / 10
    study = Study.create(sys.argv[1], grammar=nsc.Grammar(max_index=5, conv_kernels=(1, 3)),
                         blocks_per_iteration=4, budget=24, strategy=sys.argv[2])
    print('ready', flush=True)
    while (trial := study.ask()) is not None:
      if not trial.known:
        time.sleep(0.05)
        study.tell(trial, score(trial.block) + noise(trial.seed))
    study.close()
''')


@pytest.mark.slow
@pytest.mark.parametrize('strategy', ['qlearning_fast', 'evolution'])
def test_a_study_killed_at_any_moment_resumes_exactly(strategy, tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  run = lambda w: subprocess.run([sys.executable, '-c', _KILLED, str(w), strategy], env=env,
                                 capture_output=True, text=True, timeout=600)
  done = run(tmp_path / 'whole')
  assert done.returncode == 0, done.stderr[-2000:]
  rng = np.random.default_rng(0)
  for kill in range(2):
    proc = subprocess.Popen([sys.executable, '-c', _KILLED, str(tmp_path / 'killed'), strategy],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'ready'
    time.sleep(float(rng.uniform(0.1, 0.6)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  resumed = run(tmp_path / 'killed')
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  whole, killed = _rows(tmp_path / 'whole'), _rows(tmp_path / 'killed')
  assert whole[0] == killed[0]
  assert whole[1][0] == killed[1][0]
  for name, array in whole[1][1].items():
    np.testing.assert_array_equal(array, killed[1][1][name], err_msg=name)


# -- the confirm rule: re-evaluations and the kept block ----------------------------------------

@pytest.mark.slow
def test_the_confirm_rule_hands_out_reevaluations_and_keeps_what_the_evidence_supports(
    tmp_path):
  with _open(tmp_path, strategy='qlearning_fast', budget=24, confirm=3) as study:
    trials = []
    while (trial := study.ask()) is not None:
      if not trial.known:
        trials.append(trial)
        study.tell(trial, noisy_score(trial.block, trial.seed))
    summary, kept = study.summary(), study.kept()
  again = [t for t in trials if t.reevaluation]
  assert again and all(t.id < 0 and t.position == -1 for t in again)
  first = {t.canonical_key: t for t in trials if not t.reevaluation}
  for t in again:  # the same block, trained from another seed
    assert t.canonical_key in first and t.seed != first[t.canonical_key].seed
    assert 1 <= t.replicate <= 2
  # Every training counts against the budget.
  assert summary['trainings'] == len(trials) == summary['trained'] + len(again)
  assert 24 <= summary['trainings'] <= 24 + 2 and summary['reevaluations'] == len(again)
  # The kept block's reward is the mean of its evaluations, with their count.
  own = [noisy_score(t.block, t.seed) for t in trials if t.canonical_key == kept.canonical_key]
  assert kept.rule == 'confirmed' and kept.evaluations == len(own) >= 2
  assert kept.reward == pytest.approx(np.mean(own))
  assert kept == summary['kept'] and math.isfinite(kept.standard_error)
  # A reopened study reads the same kept block from its store.
  with _open(tmp_path, strategy='qlearning_fast', budget=24, confirm=3) as study:
    assert study.kept() == kept and study.done


@pytest.mark.slow
def test_the_report_and_the_retraining_take_the_kept_block(tmp_path):
  from blockqnn_jax.report import page  # pylint: disable=import-outside-toplevel
  from blockqnn_jax.settings.final import FinalSettings  # pylint: disable=import-outside-toplevel
  from blockqnn_jax.training.final import block_choice  # pylint: disable=import-outside-toplevel
  from configs import cifar_final  # pylint: disable=import-outside-toplevel
  with _open(tmp_path, strategy='qlearning_fast', budget=24, confirm=3) as study:
    _run_noisy(study)
    kept = study.kept()
    best = study.summary()['best']
  assert kept.evaluations >= 2
  summary = page.write_report(tmp_path)
  text = summary.read_text()
  assert f'| Kept block (confirmed) | `{kept.block}`: mean reward {kept.reward:.4f}' in text
  assert '## Blocks evaluated more than once' in text
  starred = [line for line in text.splitlines() if line.startswith('| ★ |')]
  assert len(starred) == 1 and kept.block in starred[0]
  assert json.loads((summary.parent / 'kept_block.json').read_text())['evaluations'] == \
      kept.evaluations
  top = json.loads((summary.parent / 'top_blocks.json').read_text())
  assert top[0]['nsc'] == best.nsc and sum(t['kept'] for t in top) <= 1
  config = cifar_final.get_config('smoke')
  config.block, config.search_workdir = '', str(tmp_path)
  block, source = block_choice.resolve_block(FinalSettings.from_config(config))
  assert block.to_text() == kept.block and 'kept block' in source


def test_without_the_rule_the_kept_block_is_the_best_single_reward(tmp_path):
  with _open(tmp_path, strategy='qlearning_fast', budget=16, confirm=1) as study:
    _run_noisy(study)
    kept, best = study.kept(), study.summary()['best']
  assert kept.rule == 'best single reward' and kept.evaluations == 1
  assert (kept.canonical_key, kept.reward) == (best.canonical_key, best.reward)


@pytest.mark.slow
@pytest.mark.parametrize('stops', [(3,), (7, 4), ('again', 'again', 5, 'again')])
def test_interrupted_during_confirmation_a_study_resumes_exactly(stops, tmp_path):
  with _open(tmp_path / 'whole', strategy='qlearning_fast', budget=24, confirm=3) as study:
    _run_noisy(study)
  for stop in stops:  # closed with a trial out (a kill loses nothing more: tells are stored)
    with _open(tmp_path / 'cut', strategy='qlearning_fast', budget=24, confirm=3) as study:
      _run_noisy(study, stop_after=stop)
  with _open(tmp_path / 'cut', strategy='qlearning_fast', budget=24, confirm=3) as study:
    _run_noisy(study)
  whole, cut = _rows(tmp_path / 'whole'), _rows(tmp_path / 'cut')
  assert any(row[1] < 0 for row in whole[0])  # it re-evaluated
  assert whole[0] == cut[0] and whole[1][0] == cut[1][0]
  for name, array in whole[1][1].items():
    np.testing.assert_array_equal(array, cut[1][1][name], err_msg=name)


def _readme_examples() -> list[str]:
  """The python blocks of the README's own-trainer section: the study, then early stopping."""
  text = (ROOT / 'README.md').read_text()
  section = text.split('\n## Your own trainer\n', 1)[1].split('\n## ', 1)[0]
  return re.findall(r'```python\n(.*?)```', section, re.S)


@pytest.mark.slow
def test_the_readme_example_runs_as_written_from_an_empty_folder(tmp_path):
  code = _readme_examples()[0]
  assert 10 <= len(code.strip().splitlines()) <= 20
  done = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                        text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'kept:' in done.stdout and 'evaluation' in done.stdout
  workdirs = [p for p in tmp_path.iterdir() if (p / store_lib.DB_NAME).is_file()]
  assert len(workdirs) == 1
  assert compare.load_curve(workdirs[0]).trained >= 10
  json.dumps(done.stdout)


@pytest.mark.slow
def test_the_readme_early_stopping_example_runs_as_written_and_stops_losers(tmp_path):
  code = _readme_examples()[1]
  assert 'study.report(' in code and 'stopped=True' in code
  done = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert done.returncode == 0, done.stderr[-3000:]
  stopped = int(re.search(r'stopped: (\d+)', done.stdout).group(1))
  (workdir,) = [p for p in tmp_path.iterdir() if (p / store_lib.DB_NAME).is_file()]
  with store_lib.ResultsStore.open_read_only(workdir) as store:
    rows = [c for c in store.candidates() if not c.cached]
  assert 0 < stopped == sum(c.stopped for c in rows) < len(rows)
  # A stopped trial's reward is its score at the rung it stopped at, stored with the rungs.
  for c in rows:
    assert c.rung_scores and (not c.stopped or c.reward == c.rung_scores[c.stopped_at])
  kept = re.search(r'kept: (.*?)  reward', done.stdout).group(1)
  assert [c.stopped for c in rows if c.nsc == kept] == [False]


# -- early stopping at rungs: report, should_stop, stopped trials ------------------------------

EARLY = EarlyStop(rungs=(1, 2), promote=0.5, min_history=4)


def curve(block, step: int) -> float:
  """A stand-in learning curve: rises to ``score`` at step 4."""
  return score(block) * (0.5 + step / 8)


def _run_stopping(study, stop_after=None):
  """Trains every trial for 4 steps, reporting each and stopping it where told to, until done
  (or, after ``stop_after`` tells, reports one more trial's first step and returns)."""
  told = 0
  while (trial := study.ask()) is not None:
    if trial.known:
      continue
    if told == stop_after:
      study.report(trial, 1, curve(trial.block, 1))  # then the worker dies
      return
    for step in range(1, 5):
      study.report(trial, step, curve(trial.block, step))
      if study.should_stop(trial):
        study.tell(trial, stopped=True, val_accuracy=0.5)
        break
    else:  # its accuracy 0.01 above its reward: the block's cost terms
      study.tell(trial, curve(trial.block, 4), val_accuracy=curve(trial.block, 4) + 0.01)
    told += 1


def _expected_stop(candidate, earlier) -> int:
  """Where a candidate must stop, worked out from the earlier iterations' rung scores."""
  for rung in EARLY.rungs:
    scores = sorted((e.rung_scores[rung] for e in earlier if rung in e.rung_scores),
                    reverse=True)
    if len(scores) >= EARLY.min_history and curve(candidate.parse_block(), rung) < scores[
        math.ceil(EARLY.promote * len(scores)) - 1]:
      return rung
  return 0


def test_a_trial_below_the_line_of_earlier_iterations_stops_and_is_never_kept(tmp_path):
  with _open(tmp_path, strategy='qlearning_fast', budget=24, early_stop=EARLY) as study:
    _run_stopping(study)
    summary = study.summary()
    kept = study.kept()
  with store_lib.ResultsStore.open_read_only(tmp_path) as store:
    trained = [c for c in store.candidates() if not c.cached]
    best = store.best()
  stopped = [c for c in trained if c.stopped]
  assert stopped and summary['stopped'] == len(stopped) and len(trained) == 24
  for c in trained:
    earlier = [e for e in trained if e.iteration < c.iteration]
    assert c.stopped_at == _expected_stop(c, earlier), c
    block = c.parse_block()
    reached = [r for r in EARLY.rungs if not c.stopped or r <= c.stopped_at]
    assert c.rung_scores == {r: curve(block, r) for r in reached}
    assert c.reward == (curve(block, c.stopped_at) if c.stopped else curve(block, 4))
  assert not any(c.stopped for c in trained if c.iteration == 0)  # no history yet
  assert not best.stopped and best.reward == max(c.reward for c in trained if not c.stopped)
  assert kept.canonical_key == best.canonical_key


def test_a_study_with_early_stopping_resumes_exactly(tmp_path):
  with _open(tmp_path / 'whole', strategy='qlearning_fast', early_stop=EARLY) as study:
    _run_stopping(study)
  for stop_after in (5, 11):
    with _open(tmp_path / 'cut', strategy='qlearning_fast', early_stop=EARLY) as study:
      _run_stopping(study, stop_after=stop_after)
  with _open(tmp_path / 'cut', strategy='qlearning_fast', early_stop=EARLY) as study:
    _run_stopping(study)
  rows = lambda w: [(c.iteration, c.position, c.stopped_at, c.rungs, c.reward)
                    for c in store_lib.ResultsStore.open_read_only(w).candidates()]
  assert rows(tmp_path / 'whole') == rows(tmp_path / 'cut')
  assert _rows(tmp_path / 'whole')[0] == _rows(tmp_path / 'cut')[0]


def test_bad_reports_and_stops_are_one_line_errors_and_store_nothing(tmp_path):
  with _open(tmp_path, early_stop=EARLY) as study:
    trial = study.ask()
    with pytest.raises(StudyError, match='integer >= 1'):
      study.report(trial, 0, 0.5)
    with pytest.raises(StudyError, match='must be a number'):
      study.report(trial, 1, 'high')
    with pytest.raises(StudyError, match='not below the line'):
      study.tell(trial, stopped=True)  # nothing reported: nothing to stop on
    with pytest.raises(StudyError, match='alone'):
      study.tell(trial, 0.5, stopped=True)
    assert not study.should_stop(trial)  # iteration 0 has no history: every line is -inf
    assert study.store.count() == 0 and study.store.reports(trial.id) == {}


def test_a_result_from_the_shared_cache_is_stopped_where_this_study_would_stop_it(tmp_path):
  from blockqnn_jax.storage import eval_cache
  measured = EarlyStop(rungs=(1, 2), promote=1.0)  # scored at the rungs, nothing stopped
  cache_path = tmp_path / 'cache.sqlite'

  def settings(early_stop):
    s = SearchSettings.for_study('random', 16, GRAMMAR, blocks_per_iteration=4, confirm=1,
                                 early_stop=early_stop)
    return SearchSettings.from_config({**s.to_dict(), 'search': {
        **s.to_dict()['search'], 'eval_cache': str(cache_path)}})

  with eval_cache.EvalCache(cache_path, 'fid') as cache:
    with Study(settings(measured), tmp_path / 'first', eval_cache=cache) as study:
      _run_stopping(study)  # every trial reported at 1..4, none stopped, all in the cache
    with Study(settings(EARLY), tmp_path / 'second', eval_cache=cache) as study:
      _run_stopping(study)
  with store_lib.ResultsStore.open_read_only(tmp_path / 'second') as store:
    shared = [c for c in store.candidates() if c.shared]
    everything = [c for c in store.candidates() if not c.cached]
  assert shared and any(c.stopped for c in shared)
  for c in shared:
    earlier = [e for e in everything if e.iteration < c.iteration]
    assert c.stopped_at == _expected_stop(c, earlier)
    if c.stopped:
      assert c.reward == curve(c.parse_block(), c.stopped_at)
      assert c.val_accuracy == pytest.approx(c.reward + 0.01)  # the block's cost terms kept
