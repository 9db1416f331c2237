"""Runs the sections of a plan and writes the report after each."""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import tempfile
import threading
import traceback
from typing import Any, Sequence

import jax

from benchmarks.device_check.harness import Check, device_memory
from benchmarks.device_check.plan import (
  DEFAULT_DATA,
  FALLBACK_NPZ,
  SECTION_KEYS,
  Plan,
  Skipped,
  TimeBox,
  since_start,
)
from benchmarks.device_check.sections import SECTIONS, targets
from benchmarks.device_check.tables import header, format_table
from benchmarks.fixtures import data_source
from blockqnn_jax.data import readers
from blockqnn_jax.data import splits as splits_lib
from blockqnn_jax.training import compile_cache


def run(plan: Plan, data: str, out: str | os.PathLike | None,
        sections: Sequence[str] | None = None, watchdog: bool = False) -> dict[str, Any]:
  """Runs the check and returns the report (also written to ``out`` after every section)."""
  out = Path(out) if out else None
  previous_cache = jax.config.jax_compilation_cache_dir
  scratch = tempfile.mkdtemp(prefix='device_check_all_') if plan.cache_everywhere else None
  try:
    if scratch:
      compile_cache.enable_persistent_compilation_cache(scratch)
    splits, data_info = load_data(data, plan)
    check = Check(plan, splits, data_info, out)
    if watchdog and plan.hard_deadline_s is not None:
      timer = threading.Timer(max(plan.hard_deadline_s - since_start(), 0), check.abort)
      timer.daemon = True
      timer.start()
    print(header(check), flush=True)
    check.write()
    wanted = set(sections or SECTION_KEYS)
    for name, fn in ((n, f) for n, f in SECTIONS if n in wanted):
      _run_section(check, name, fn, dict(plan.budgets)[name])
    check.report['targets'] = targets(check)
    check.report['timings']['total_s'] = round(since_start(), 2)
    check.report['complete'] = True
    check.write()
    print(format_table(check.report), flush=True)
    return check.report
  finally:
    if scratch:
      compile_cache.enable_persistent_compilation_cache(previous_cache)
      shutil.rmtree(scratch, ignore_errors=True)


def _run_section(check: Check, name: str, fn, budget: float) -> None:
  check.current = name
  start = since_start()
  box = TimeBox(budget, check.plan.deadline_s)
  timing = dict(budget_s=budget, started_at_s=round(start, 2))
  try:
    if box.left() <= 0:
      raise Skipped(f'no time left before the run deadline ({check.plan.deadline_s} s)')
    produced = fn(check, box)
    check.report.update(produced)
    timing['status'] = produced[SECTION_KEYS[name][0]].get('status', 'ok')
  except Skipped as e:
    for key in SECTION_KEYS[name]:
      check.report[key] = {'status': 'skipped', 'reason': str(e)}
    timing['status'] = 'skipped'
  except Exception as e:  # a failing section is a finding; the next one still runs
    for key in SECTION_KEYS[name]:
      check.report[key] = {'status': 'error', 'error': f'{type(e).__name__}: {e}',
                           'traceback': traceback.format_exc(limit=8)[-3000:]}
    timing['status'] = 'error'
  timing['elapsed_s'] = round(since_start() - start, 2)
  check.report['timings'][name] = timing
  check.report['memory_timeline'].append(dict(after=name, at_s=round(since_start(), 1),
                                              device=device_memory(check.device)))
  check.write()
  print(f'[{since_start():6.1f} s] {name}: {timing["status"]} in {timing["elapsed_s"]:.1f} s '
        f'(budget {budget:.0f} s)', flush=True)


def load_data(spec: str, plan: Plan) -> tuple[splits_lib.ImageSplits, dict[str, Any]]:
  """The splits ``spec`` names ('digits' or 'SOURCE:PATH'), and how they were found.

  A missing npz falls back to the shared data beside the repository; failing that, the
  toy sizes fall back to digits, the full size stops (its figures would mean nothing).
  """
  source, path = data_source(spec)
  info = dict(spec=spec, source=source, path=path)
  if source == 'npz' and not Path(path).exists():
    found = next((p for p in FALLBACK_NPZ if Path(p).exists()), None)
    if found and spec == DEFAULT_DATA:
      info.update(path=found, note=f'{path} absent; used {found}')
      path = found
    elif plan.size != 'full':
      info.update(source='digits', path=None, note=f'{path} absent; used digits')
      source, path = 'digits', ''
    else:
      raise FileNotFoundError(
          f'{path} not found. Carry the data: mkdir -p data && cp '
          f'../shared/data/cifar10-exact-subset.npz data/ (and the device tool\'s carry of '
          f'"data"), or pass --data=npz:PATH')
  splits = readers.load_splits(source, path=path or None, validation_size=plan.validation_size,
                               max_train=plan.max_train)
  info['name'] = splits.name
  return splits, info
