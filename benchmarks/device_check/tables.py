"""The printed table of a device check's report."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax

if TYPE_CHECKING:  # annotations only: harness imports this module
  from benchmarks.device_check.harness import Check


# -- the table -------------------------------------------------------------------------------


def _f(x: Any, spec: str = '.1f') -> str:
  if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
    return format(x, spec)
  return '-' if x is None or isinstance(x, float) else str(x)


def header(check: Check) -> str:
  s = check.report['settings']
  d = check.report['device']
  warning = ('' if d['platform'] != 'cpu' or check.plan.size != 'full' else
             'WARNING: no accelerator: these are CPU figures (is the CUDA jaxlib installed?)\n')
  return warning + (f'device check: {d["kind"]} ({d["platform"]}), jax {jax.__version__}, '
          f'{d["host_cores"]} host cores\ndata {s["data"]["name"]}: train {s["n_train"]}, '
          f'val {s["n_val"]}, image {tuple(s["image_shape"])}; {s["epochs"]} epochs, batch '
          f'{s["batch_size"]}, F={s["features"]}, N={s["num_blocks"]}; 45k scale: train '
          f'x{check.scale["train"]:.2f}, val x{check.scale["val"]:.2f}')


def _pct(x: Any) -> str:
  return _f(None if x is None else 100 * x)


def _mib(x: Any) -> str:
  return f'{x / 2**20:.1f} MiB' if isinstance(x, int) else str(x)


def _no_figures(value: dict[str, Any]) -> str | None:
  """Why a section has no figures to show (None when it has)."""
  if value.get('status') in ('skipped', 'error', 'aborted', 'not run'):
    return f'  {value.get("reason") or value.get("error") or value["status"]}'
  return None


def _table_loops(loops: dict[str, Any]) -> list[str]:
  lines = [f'  {"loop":<6} {"blocks":>6} {"img/s":>9} {"compile s":>9} {"train s":>8} '
           f'{"45k cand s":>10}']
  for loop, v in loops['per_loop'].items():
    lines.append(f'  {loop:<6} {v["ok"]:>6} {_f(v["images_per_s"], ".0f"):>9} '
                 f'{_f(v["compile_s"]):>9} {_f(v["train_s"], ".2f"):>8} '
                 f'{_f(v["projected_45k_s"]):>10}')
  lines.append(f'  recommendation for auto: {loops.get("recommendation", "-")} (serial at 45k: '
               f'{loops.get("recommendation_serial_45k", "-")}; auto resolves to '
               f'{loops["auto_resolves_to"]} now)')
  return lines


def _table_dtypes(dtypes: dict[str, Any]) -> list[str]:
  lines = [f'  {"dtype":<9} {"blocks":>6} {"img/s":>9} {"val acc":>8} {"compile s":>9}']
  for dtype, v in dtypes['per_dtype'].items():
    lines.append(f'  {dtype:<9} {v["ok"]:>6} {_f(v["images_per_s"], ".0f"):>9} '
                 f'{_f(v["val_accuracy"], ".3f"):>8} {_f(v["compile_s"]):>9}')
  lines.append(f'  bf16 speed-up {_f(dtypes.get("speedup_bf16_over_fp32"), ".2f")}x, '
               f'accuracy bf16 - fp32 {_f(dtypes.get("accuracy_bf16_minus_fp32"), "+.3f")}')
  return lines


def _table_share(report: dict[str, Any]) -> list[str]:
  per_hour, share = report['candidates_per_hour'], report['compile_share']
  lines = [f'  {"pass":<14} {"cands":>5} {"cand/h":>7} {"45k cand/h":>10} {"compile %":>9} '
           f'{"outside %":>9} {"45k compile %":>13} {"45k outside %":>13}']
  for name in ('without_cache', 'with_cache'):
    v = share[name]
    p = v.get('projected_45k', {})
    lines.append(f'  {name:<14} {v.get("ok", 0):>5} '
                 f'{_f(v.get("candidates_per_hour"), ".0f"):>7} '
                 f'{_f(p.get("candidates_per_hour"), ".0f"):>10} '
                 f'{_pct(v.get("compile_share")):>9} {_pct(v.get("outside_train_share")):>9} '
                 f'{_pct(p.get("compile_share")):>13} {_pct(p.get("outside_train_share")):>13}')
  lines.append(f'  device-bound at 45k: {_f(per_hour.get("device_bound_45k"), ".0f")} '
               'candidates/hour (compile and set-up hidden behind training)')
  return lines


def _table_ahead(ahead: dict[str, Any]) -> list[str]:
  lines = []
  for name in ('with_compile_ahead', 'without_compile_ahead'):
    if name in ahead:
      v = ahead[name]
      lines.append(f'  {name:<22} {v["ok"]}/{v["candidates"]} in {_f(v["elapsed_s"])} s: '
                   f'{_f(v["candidates_per_hour"], ".0f")} candidates/h')
  lines.append(f'  ratio {_f(ahead.get("candidates_per_hour_ratio"), ".2f")}x with '
               f'{ahead["host_cores"]} host cores (steady state, modelled from the serial '
               f'run: {_f(ahead.get("steady_state_ratio_model"), ".2f")}x)')
  return lines


def _table_early_stop(early: dict[str, Any]) -> list[str]:
  lines = [f'  block {early["block"]}: {early["epochs"]} epochs, rungs {early["rungs"]}, '
           f'promote {early["promote"]} ({_f(early.get("epochs_per_candidate"), ".2f")} '
           f'epochs a candidate); stopped as asked: {early["stopped_as_asked"]}']
  for scale in ('subset', 'projected_45k'):
    if scale in early:
      v = early[scale]
      lines.append(f'  {scale}: {_f(v["candidates_per_hour_plain"], ".0f")} candidates/h '
                   f'without, {_f(v["candidates_per_hour_pruned"], ".0f")} with early '
                   f'stopping ({_f(v["ratio"], ".2f")}x)')
  return lines


def _table_memory(memory: dict[str, Any]) -> list[str]:
  lines = [f'  peak device memory, one candidate at a time: '
           f'{_mib(memory["peak_bytes_single_candidate"])} ('
           f'{_mib(memory["peak_bytes_single_candidate_above_data"])} above the resident data)']
  for name, v in memory['program_memory'].items():
    if v.get('total_bytes') is not None:
      lines.append(f'  planned by XLA for {name}: {_mib(v["total_bytes"])} ({v["program"]})')
  for w, v in memory['workers_sharing_device'].items():
    dev = v['device_memory_after']
    peak = _mib(dev.get('peak_bytes_in_use')) if isinstance(dev, dict) else dev
    lines.append(f'  {w} worker(s): {v["ok"]}/{v["candidates"]} in {_f(v["elapsed_s"])} s: '
                 f'{_f(v["candidates_per_hour"], ".0f")} candidates/h, utilisation '
                 f'{_f(v["utilisation"], ".2f")}, peak so far {peak}')
  verdict = {True: 'work', False: 'FAIL (see failures)', None: 'not measured'}
  lines.append(f'  workers sharing one device: {verdict[memory["sharing_works"]]}')
  return lines


def format_table(report: dict[str, Any]) -> str:
  """The report as a readable table (every figure is also in the JSON)."""
  lines = ['']
  parts = (('loops', 'loops', lambda: _table_loops(report['loops'])),
           ('dtypes', 'dtypes', lambda: _table_dtypes(report['dtypes'])),
           ('candidates_per_hour / compile_share', 'compile_share',
            lambda: _table_share(report)),
           ('early_stop', 'early_stop', lambda: _table_early_stop(report['early_stop'])),
           ('compile_ahead', 'compile_ahead', lambda: _table_ahead(report['compile_ahead'])),
           ('memory', 'memory', lambda: _table_memory(report['memory'])))
  for title, key, body in parts:
    value = report[key]
    where = ', '.join(f'{k} {value[k]}' for k in ('loop', 'dtype') if k in value)
    lines.append(f'== {title} ({value.get("status")}{"; " + where if where else ""})')
    try:
      lines.extend([_no_figures(value)] if _no_figures(value) else body())
    except Exception as e:  # the JSON holds the figures; a table must never end the run
      lines.append(f'  (no table for this section: {type(e).__name__}: {e})')
  t = report.get('targets', {})
  if t:
    lines.append(f'== targets: >= {t["min_candidates_per_gpu_hour"]} candidates/GPU-hour at '
                 f'45k: serial {_f(t["serial_projected_45k"], ".0f")} (met: {t["met_serial"]}),'
                 f' device-bound {_f(t["device_bound_45k"], ".0f")} (reachable: '
                 f'{t["reachable_with_overlap"]}); outside train <= '
                 f'{100 * t["max_outside_train_share"]:.0f}%: '
                 f'{_pct(t["outside_train_share_projected_45k"])}% '
                 f'(met: {t["met_outside_train_share"]})')
  timings = report['timings']
  lines.append('== timings: ' + ', '.join(
      f'{k} {v["elapsed_s"]:.0f}/{v["budget_s"]:.0f} s {v["status"]}' if isinstance(v, dict)
      else f'{k} {v:.0f} s' for k, v in timings.items()))
  return '\n'.join(lines)
