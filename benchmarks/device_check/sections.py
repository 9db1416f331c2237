"""The sections of a device check, each in its own time box."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from benchmarks.device_check.harness import Check, device_memory
from benchmarks.device_check.plan import (
  TARGET_CANDIDATES_PER_HOUR,
  TARGET_OUTSIDE_TRAIN_SHARE,
  Skipped,
  TimeBox,
  spent,
)
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.strategies import rungs as rungs_lib
from blockqnn_jax.training import compile_cache

# -- the sections --------------------------------------------------------------------------


def _mean(rows: Sequence[dict[str, Any]], field: str) -> float:
  values = [r[field] for r in rows if r.get('ok')]
  return float(np.mean(values)) if values else float('nan')


def section_loops(check: Check, box: TimeBox) -> dict[str, Any]:
  """Scanned against per-step training for each loop block, in the 'auto' dtype."""
  rows, skipped = [], []
  for block in check.plan.loop_blocks:
    for loop in ('scan', 'steps'):
      if not box.allows(check.estimate()):
        skipped.append(dict(block=block, loop=loop, reason=spent(box, check.estimate())))
        continue
      rows.append(check.evaluate(block, loop, check.auto_dtype))
  if not rows:
    raise Skipped(skipped[0]['reason'])
  per_loop = {}
  for loop in ('scan', 'steps'):
    mine = [r for r in rows if r['loop'] == loop]
    per_loop[loop] = dict(candidates=len(mine), ok=sum(r['ok'] for r in mine),
                          images_per_s=_mean(mine, 'images_per_s'),
                          compile_s=_mean(mine, 'compile_s'), train_s=_mean(mine, 'train_s'),
                          projected_45k_s=_mean(mine, 'projected_45k_s'))
  # Compared only on blocks both loops trained, so a skipped block cannot tip the choice.
  both = [b for b in check.plan.loop_blocks
          if all(check.evaluations.get((b, l, check.auto_dtype), {}).get('ok')
                 for l in ('scan', 'steps'))]
  result = dict(status='ok' if both else 'partial', dtype=check.auto_dtype, rows=rows,
                skipped=skipped, per_loop=per_loop, compared_on=both,
                auto_resolves_to=check.auto_loop)
  if both:
    def total(loop, field):
      return sum(check.evaluations[(b, loop, check.auto_dtype)][field] for b in both)
    # Training time over the same images and blocks: a ratio of sums, so the larger blocks
    # (where the time goes) weigh more than a mean of per-block ratios would let them.
    result['train_s_ratio_steps_over_scan'] = total('steps', 'train_s') / total('scan', 'train_s')
    result['recommendation'] = min(('scan', 'steps'), key=lambda l: total(l, 'train_s'))
    result['recommendation_serial_45k'] = min(('scan', 'steps'),
                                              key=lambda l: total(l, 'projected_45k_s'))
    result['criterion'] = ('recommendation: less training time (more images/s) on the same '
                           'blocks; recommendation_serial_45k: less projected candidate time '
                           'one after the other at 45k, compile included')
    result['auto_agrees'] = result['recommendation'] == check.auto_loop
    check.loop = result['recommendation']
  if skipped:
    result['status'] = 'partial'
  return {'loops': result}


def section_dtypes(check: Check, box: TimeBox) -> dict[str, Any]:
  """bfloat16 against float32 with the loop later sections use (loops' pick)."""
  rows, skipped = [], []
  for block in check.plan.loop_blocks:
    for dtype in ('bfloat16', 'float32'):
      known = (block, check.loop, dtype) in check.evaluations
      if not known and not box.allows(check.estimate()):
        skipped.append(dict(block=block, dtype=dtype, reason=spent(box, check.estimate())))
        continue
      rows.append(check.evaluate(block, check.loop, dtype))
  if not rows:
    raise Skipped(skipped[0]['reason'])
  per_dtype = {}
  for dtype in ('bfloat16', 'float32'):
    mine = [r for r in rows if r['dtype'] == dtype]
    per_dtype[dtype] = dict(candidates=len(mine), ok=sum(r['ok'] for r in mine),
                            images_per_s=_mean(mine, 'images_per_s'),
                            val_accuracy=_mean(mine, 'val_accuracy'),
                            compile_s=_mean(mine, 'compile_s'))
  both = [b for b in check.plan.loop_blocks
          if all(check.evaluations.get((b, check.loop, d), {}).get('ok')
                 for d in ('bfloat16', 'float32'))]
  result = dict(status='ok' if both and not skipped else 'partial', loop=check.loop,
                rows=rows, skipped=skipped, per_dtype=per_dtype, compared_on=both,
                auto_resolves_to=check.auto_dtype)
  if both:
    get = lambda b, d, f: check.evaluations[(b, check.loop, d)][f]
    result['speedup_bf16_over_fp32'] = (sum(get(b, 'float32', 'train_s') for b in both)
                                        / sum(get(b, 'bfloat16', 'train_s') for b in both))
    result['accuracy_bf16_minus_fp32'] = float(np.mean(
        [get(b, 'bfloat16', 'val_accuracy') - get(b, 'float32', 'val_accuracy')
         for b in both]))
  return {'dtypes': result}


def _pass_stats(check: Check, rows: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
  """Candidates/hour and time shares of one serial pass, measured and projected to 45k."""
  ok = [r for r in rows if r['ok']]
  if not ok:
    return dict(candidates=len(rows), ok=0)
  total = sum(r['total_s'] for r in ok)
  compile_s = sum(r['compile_s'] for r in ok)
  train = sum(r['train_s'] for r in ok)
  evals = sum(r['eval_s'] for r in ok)
  projected = sum(r['projected_45k_s'] for r in ok)
  train_45k = train * check.scale['train']
  device_45k = train_45k + evals * check.scale['val']
  return dict(
      candidates=len(rows), ok=len(ok), elapsed_s=elapsed,
      mean_compile_s=compile_s / len(ok), mean_train_s=train / len(ok),
      mean_eval_s=evals / len(ok), mean_total_s=total / len(ok),
      candidates_per_hour=len(rows) / elapsed * 3600,
      compile_share=compile_s / total, outside_train_share=1 - train / total,
      projected_45k=dict(candidate_s=projected / len(ok),
                         candidates_per_hour=3600 * len(ok) / projected,
                         compile_share=compile_s / projected,
                         outside_train_share=1 - train_45k / projected,
                         device_bound_candidates_per_hour=3600 * len(ok) / device_45k))


# What a candidate whose programs come from the persistent cache costs, as a fraction of a
# cold one, for planning only (tracing and lowering still run, then training): about 0.1 on
# a CPU, more on a GPU whose training is a larger part of a candidate.
WARM_FRACTION = 0.3


def section_compile_share(check: Check, box: TimeBox) -> dict[str, Any]:
  """Distinct blocks one after the other, cold then from JAX's persistent cache."""
  blocks = list(check.plan.pool[:check.plan.share_count])
  previous = jax.config.jax_compilation_cache_dir
  directory = tempfile.mkdtemp(prefix='device_check_cache_')
  passes, skipped = {}, []
  try:
    compile_cache.enable_persistent_compilation_cache(directory)
    done = []
    for name in ('cold', 'warm'):
      trainer = check.trainer(check.loop, 'auto')  # a fresh in-memory cache each pass
      rows, start = [], time.perf_counter()
      for seed, block in enumerate(blocks if name == 'cold' else done):
        one = check.estimate() or 0.0
        # A cold candidate starts only if the warm passes of it and of those before it fit
        # too: without a warm pass the section measures nothing with the cache.
        estimate = (one * (1 + WARM_FRACTION * (len(done) + 1)) if name == 'cold'
                    else one * WARM_FRACTION)
        if not box.allows(estimate):
          skipped.append(dict(block=block, passed=name, reason=spent(box, estimate)))
          continue
        rows.append(check.record(trainer.evaluate(nsc.parse(block, check.grammar), seed=seed),
                                 serial_cold=name == 'cold'))
        if name == 'cold':
          done.append(block)
      if name == 'cold' and not rows:
        raise Skipped(skipped[0]['reason'])
      passes[name] = dict(_pass_stats(check, rows, time.perf_counter() - start), rows=rows)
      passes[name]['files_in_cache'] = len(os.listdir(directory))
  finally:
    compile_cache.enable_persistent_compilation_cache(previous)
    shutil.rmtree(directory, ignore_errors=True)
  cold, warm = passes.get('cold', {}), passes.get('warm', {})
  status = 'ok' if cold.get('ok') and warm.get('ok') and not skipped else 'partial'
  common = dict(loop=check.loop, dtype=check.auto_dtype, blocks=blocks, skipped=skipped)
  per_hour = dict(status=status, **common,
                  measured_subset=cold.get('candidates_per_hour'),
                  projected_45k=cold.get('projected_45k', {}).get('candidates_per_hour'),
                  device_bound_45k=cold.get('projected_45k', {}).get(
                      'device_bound_candidates_per_hour'),
                  with_persistent_cache_measured_subset=warm.get('candidates_per_hour'),
                  with_persistent_cache_projected_45k=warm.get('projected_45k', {}).get(
                      'candidates_per_hour'),
                  note='one candidate after the other on one device; cold = every program '
                       'compiled (a fresh search), warm = programs from the persistent '
                       'cache (a resumed search)')
  share = dict(status=status, **common,
               without_cache=dict(cold, note='cold: every program compiled (the '
                                  'cache was on, in a fresh directory, so this includes '
                                  'writing the entries, as a fresh search with it pays)'),
               with_cache=dict(warm, note='warm: every program read back from '
                               'the persistent cache by a fresh trainer'))
  return {'candidates_per_hour': per_hour, 'compile_share': share}


def section_early_stop(check: Check, box: TimeBox) -> dict[str, Any]:
  """Candidates per hour with and without the gpu preset's early stopping.

  One block on one trainer: cold and plain (its programs compiled), then from the trainer's
  cache: plain again, stopped at each rung (a line no score reaches), and trained to the
  end scored at every rung. A search in its steady state stops a ``1 - promote`` share of
  the candidates reaching each rung (``rungs.outcome_shares``), so a candidate costs the
  compile plus those shares of the warm times; without stopping, the compile plus the warm
  plain time. Measured on the subset and projected to 45k (``Check.record``).
  """
  epochs, rungs, promote = check.plan.early_stop
  block = check.plan.loop_blocks[0]
  parsed = nsc.parse(block, check.grammar)
  trainer = check.trainer(check.loop, 'auto', epochs=epochs)
  inf = math.inf
  runs = {'plain': None}
  for k, rung in enumerate(rungs):  # scored at the rungs before, stopped at this one
    runs[f'stopped_at_{rung}'] = rungs_lib.StopLines(
        rungs, (-inf,) * k + (inf,) + (-inf,) * (len(rungs) - k - 1))
  runs['to_the_end_scored'] = rungs_lib.StopLines(rungs, (-inf,) * len(rungs))
  if not box.allows(check.estimate()):
    raise Skipped(spent(box, check.estimate()))
  cold = check.record(trainer.evaluate(parsed, seed=0), serial_cold=epochs == check.plan.epochs)
  if not cold['ok']:
    return {'early_stop': dict(status='error', error=cold['failure_reason'], block=block)}
  rows, skipped = {}, []
  warm_estimate = cold['total_s'] - cold['compile_s']
  for name, lines in runs.items():
    if not box.allows(warm_estimate):
      skipped.append(dict(run=name, reason=spent(box, warm_estimate)))
      continue
    result = trainer.evaluate(parsed, seed=0, lines=lines)
    rows[name] = dict(check.record(result, serial_cold=False), stopped_at=result.stopped_at,
                      rungs=result.rung_scores)
  expected_stop = {f'stopped_at_{r}': r for r in rungs}
  result = dict(status='ok' if not skipped else 'partial', block=block, epochs=epochs,
                rungs=list(rungs), promote=promote, loop=check.loop, cold=cold, rows=rows,
                skipped=skipped,
                stopped_as_asked=all(rows[n]['stopped_at'] == expected_stop.get(n, 0)
                                     for n in rows),
                all_warm=all(r['compile_cached'] for r in rows.values()))
  if skipped or not all(r['ok'] for r in rows.values()):
    return {'early_stop': dict(result, status='partial')}
  shares = rungs_lib.outcome_shares(len(rungs), promote)
  ends = [f'stopped_at_{r}' for r in rungs] + ['to_the_end_scored']
  compile_s = cold['compile_s']
  for scale, field in (('subset', 'total_s'), ('projected_45k', 'projected_45k_s')):
    plain = compile_s + rows['plain'][field]
    pruned = compile_s + sum(share * rows[n][field] for share, n in zip(shares, ends))
    result[scale] = dict(candidate_s_plain=plain, candidate_s_pruned=pruned,
                         candidates_per_hour_plain=3600 / plain,
                         candidates_per_hour_pruned=3600 / pruned,
                         ratio=plain / pruned)
  result.update(
      shares=dict(zip(ends, shares)),
      epochs_per_candidate=sum(share * e for share, e in zip(shares, [*rungs, epochs])),
      rung_scoring_overhead_s=rows['to_the_end_scored']['total_s'] - rows['plain']['total_s'],
      note='steady state: each rung promotes its share; the compile is paid by every '
           'candidate, stopped or not')
  return {'early_stop': result}


def section_compile_ahead(check: Check, box: TimeBox) -> dict[str, Any]:
  """The executor with one worker: compile-ahead on against off, on the same blocks."""
  ahead = check.existing_run(1, True)  # memory's baseline run, when it ran
  count = ahead['candidates'] if ahead else 0
  if not count or check.fit_count(box, 1, count) < count:
    count = check.fit_count(box, 1, check.plan.executor_count, runs=2)
    if not count:
      raise Skipped(spent(box, 2 * 2 * (check.estimate() or 0)))
  runs = {'with_compile_ahead': check.executor_run(1, True, count),
          'without_compile_ahead': check.executor_run(1, False, count)}
  on, off = runs['with_compile_ahead'], runs['without_compile_ahead']
  # What one candidate of look-ahead gives in a long search, from the serial run's parts:
  # compile (c) on a host thread overlaps the rest (r), so a candidate takes max(c, r).
  c = off['mean_compile_s']
  r = off['mean_total_s'] - c
  return {'compile_ahead': dict(
      status='ok', host_cores=os.cpu_count(), loop=check.loop, **runs,
      candidates_per_hour_ratio=on['candidates_per_hour'] / off['candidates_per_hour'],
      steady_state_ratio_model=(c + r) / max(c, r, 1e-9),
      note=f'{count} blocks: the first two compile at once, which a long search does only '
           'once, so the measured ratio runs above the steady state (c + r) / max(c, r) '
           'when there are few blocks. One worker compiles at most one candidate ahead; '
           'several workers sharing the device (memory section) put more of the host '
           'cores to compiling')}


def _plan_worker_runs(check: Check, box: TimeBox) -> dict[int, int]:
  """Blocks per worker count, so that the runs together fit the box: first every run
  shrinks to two blocks per worker, then worker counts go, the middle ones first, so that
  one worker against the most workers is the last comparison standing."""
  counts = {w: max(check.plan.executor_count, check.least_count(w)) for w in check.plan.workers}
  total = lambda: sum(check.run_cost(w, n) for w, n in counts.items())
  for w in sorted(counts, key=lambda w: -counts[w] / w):  # the dearest per worker first
    if total() >= box.left():
      counts[w] = check.least_count(w)
  for w in sorted(counts, key=lambda w: (w == 1, w == max(counts), w)):
    if total() >= box.left() and len(counts) > 1:
      del counts[w]
  return counts


def section_memory(check: Check, box: TimeBox) -> dict[str, Any]:
  """Peak device memory of a candidate, and workers sharing the one device."""
  # Every candidate so far ran alone, so the allocator's high-water mark now is that of
  # one candidate at a time (plus the resident data and any autotuning scratch).
  single = device_memory(check.device)
  start = check.report['memory_timeline'][0]['device']
  peak = above_data = 'unavailable'
  if isinstance(single, dict) and 'peak_bytes_in_use' in single:
    peak = single['peak_bytes_in_use']
    if isinstance(start, dict) and 'bytes_in_use' in start:
      above_data = peak - start['bytes_in_use']
  programs = {f'{b} [{l}, {d}]': r.get('program_memory')
              for (b, l, d), r in check.evaluations.items() if r.get('program_memory')}
  runs, skipped = {}, []
  counts = _plan_worker_runs(check, box)
  # One worker first (the baseline, and compile_ahead's run), then the most workers.
  for workers in sorted(check.plan.workers, key=lambda w: (w != 1, -w)):
    count = check.fit_count(box, workers, counts.get(workers, 0))
    if workers not in counts or not count:
      cost = check.run_cost(workers, check.least_count(workers))
      skipped.append(dict(workers=workers, reason=spent(box, cost)))
      continue
    runs[str(workers)] = check.executor_run(workers, True, count)
  runs = dict(sorted(runs.items(), key=lambda kv: int(kv[0])))
  result = dict(status='ok' if runs and not skipped else 'partial',
                device_memory_single_candidate=single,
                peak_bytes_single_candidate=peak,
                peak_bytes_single_candidate_above_data=above_data,
                program_memory=programs, skipped=skipped, workers_sharing_device=runs,
                loop=check.loop,
                candidates_per_hour={w: r['candidates_per_hour'] for w, r in runs.items()})
  if '1' in runs:
    base = runs['1']['candidates_per_hour']
    result['speedup_over_1_worker'] = {w: r['candidates_per_hour'] / base
                                       for w, r in runs.items()}
  # None: not measured (no run fitted); False: a shared-device run lost or mixed results.
  result['sharing_works'] = None if not runs else all(
      r['ok'] == r['candidates'] and r['results_match_blocks'] for r in runs.values())
  return {'memory': result}


SECTIONS: tuple[tuple[str, Callable[[Check, TimeBox], dict[str, Any]]], ...] = (
    ('loops', section_loops), ('compile_share', section_compile_share),
    ('early_stop', section_early_stop), ('memory', section_memory), ('compile_ahead', section_compile_ahead),
    ('dtypes', section_dtypes))


def targets(check: Check) -> dict[str, Any]:
  """The project targets against what was measured."""
  per_hour, share = check.report['candidates_per_hour'], check.report['compile_share']
  serial = per_hour.get('projected_45k')
  bound = per_hour.get('device_bound_45k')
  outside = share.get('without_cache', {}).get('projected_45k', {}).get('outside_train_share')
  return dict(
      min_candidates_per_gpu_hour=TARGET_CANDIDATES_PER_HOUR,
      max_outside_train_share=TARGET_OUTSIDE_TRAIN_SHARE,
      serial_projected_45k=serial, device_bound_45k=bound,
      outside_train_share_projected_45k=outside,
      met_serial=None if serial is None else serial >= TARGET_CANDIDATES_PER_HOUR,
      reachable_with_overlap=None if bound is None else bound >= TARGET_CANDIDATES_PER_HOUR,
      met_outside_train_share=None if outside is None else
      outside <= TARGET_OUTSIDE_TRAIN_SHARE,
      note='serial: one candidate after the other, compile included; with overlap: the '
           'device-bound rate, if compile and set-up were hidden behind training')
