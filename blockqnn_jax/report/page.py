"""The report's files: read a search's store, write summary.md, top_blocks.txt/json and the PNGs.

``write_report`` is the one entry point (``experiments/report.py`` and the notebook call it);
``load_candidates`` / ``load_meta`` read a store for anyone who wants the rows themselves.
The store is opened read-only (``store.ResultsStore.open_read_only``), so a report can be
made while the search is still writing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path
import re
from typing import Sequence

from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.report import analysis, figures
from blockqnn_jax.storage import store as store_lib
from blockqnn_jax.storage.results import Candidate
from blockqnn_jax.strategies import confirm

REPORT_DIR = 'report'


# -- reading the store -----------------------------------------------------------------------


def _read(path: str | Path):
  """The candidates and the meta table of a store, its database path, every block's
  evaluations (``confirm.Evidence``), the kept block (``confirm.Kept``) and the further
  evaluations' rows, in one open.

  Raises:
    FileNotFoundError: no database there.
    ValueError: the file is not a search store, or its candidates cannot be read.
  """
  with store_lib.ResultsStore.open_read_only(path) as results_store:  # StoreError: a ValueError
    evidence, _ = confirm.store_evidence(results_store)
    return (results_store.candidates(), results_store.meta(), results_store.path, evidence,
            confirm.kept_block(results_store), results_store.evaluations())


def load_candidates(path: str | Path) -> list[Candidate]:
  """Every candidate of a search, ordered by (iteration, position).

  Args:
    path: the ``search.sqlite`` file, or the workdir holding it.

  Raises:
    FileNotFoundError: if there is no database.
    ValueError: if the database has no ``candidates`` table or it lacks a required column.
  """
  return _read(path)[0]


def load_meta(path: str | Path) -> dict[str, str]:
  """The ``meta`` table of a search (its config JSON...) as a dict; empty if it has none."""
  return _read(path)[1]


# -- the page --------------------------------------------------------------------------------


def _missing(value) -> bool:
  return value is None or (isinstance(value, float) and not math.isfinite(value))


def _fmt(value, spec: str = '.4f', none: str = '–') -> str:
  return none if _missing(value) else format(value, spec)


def _duration(seconds: float | None) -> str:
  if _missing(seconds):
    return '–'
  if seconds < 120:
    return f'{seconds:.0f} s'
  if seconds < 2 * 3600:
    return f'{seconds / 60:.1f} min'
  return f'{seconds / 3600:.2f} h'


def _one_line(text: str, limit: int = 160) -> str:
  """A failure reason fit for a Markdown cell: one line, no pipes or backticks, bounded."""
  line = ' '.join(text.split()).replace('|', '/').replace('`', "'")
  return line if len(line) <= limit else line[:limit - 1] + '…'


def _json_value(value):
  """A missing number (NaN) as None, so that ``top_blocks.json`` is standard JSON (null)."""
  return None if _missing(value) else value


def top_block_records(rows: Sequence[Candidate], k: int,
                      evidence: confirm.Evidence | None = None,
                      kept: confirm.Kept | None = None) -> list[dict]:
  """The top-k as JSON-ready dicts (the content of ``top_blocks.json``); with the store's
  ``evidence``, each block's number of evaluations and mean reward, and which is ``kept``."""
  samples = collections.Counter(r.canonical_key for r in rows)
  out = []
  for rank, r in enumerate(analysis.top_blocks(rows, k), start=1):
    block = r.parse_block()
    out.append(dict(
        rank=rank, nsc=r.nsc, canonical_key=r.canonical_key, reward=r.reward,
        val_accuracy=_json_value(r.val_accuracy), flops=r.flops, params=r.params,
        # An older store may lack the density; it follows from the block alone.
        density=r.density if math.isfinite(r.density) else block.density(),
        layers=[list(layer.as_tuple()) for layer in block.layers],
        iteration=r.iteration, epsilon=r.epsilon, times_sampled=samples[r.canonical_key]))
    if evidence is not None and r.canonical_key in evidence:
      out[-1].update(evaluations=evidence.count(r.canonical_key),
                     mean_reward=evidence.mean(r.canonical_key))
    out[-1]['kept'] = kept is not None and kept.canonical_key == r.canonical_key
  return out


def _evaluation_lines(evidence: confirm.Evidence, rows: Sequence[Candidate],
                      kept: confirm.Kept | None, rewards: dict[str, list[float]]) -> list[str]:
  """The section listing every block evaluated more than once, best mean first."""
  repeated = [k for k in evidence.keys() if evidence.made(k) > 1]
  if not repeated:
    return []
  text = {r.canonical_key: r.nsc for r in rows if not r.cached}
  lines = ['', '## Blocks evaluated more than once', '',
           f'Seed noise of one evaluation (pooled): {_fmt(evidence.noise_std)}. The kept block '
           'is marked ★.', '', '| | mean reward | ± s.e. | evaluations | rewards | NSC |',
           '|---|---:|---:|---:|---|---|']
  for key in sorted(repeated, key=lambda k: -evidence.mean(k) if k in evidence else 0):
    mark = '★' if kept is not None and kept.canonical_key == key else ''
    values = ', '.join(f'{v:.4f}' for v in rewards.get(key, []))
    failed = evidence.failed.get(key, 0)
    values += f' ({failed} failed)' if failed else ''
    lines.append(f'| {mark} | {_fmt(evidence.mean(key) if key in evidence else None)} | '
                 f'{_fmt(evidence.standard_error(key))} | {evidence.made(key)} | {values} | '
                 f'`{text.get(key, key)}` |')
  return lines


def _top_block_lines(top: Sequence[dict]) -> list[str]:
  """The summary's table of the top blocks (from ``top_block_records``) and their drawings."""
  lines = ['', f'## Top {len(top)} blocks', '']
  if not top:
    return lines + ['No candidate has succeeded yet.']
  lines += ['Ranked by best single reward; a block evaluated several times shows its mean '
            'and count (★: the kept block).', '',
            '| # | reward | mean (evals) | val acc | MFLOPs | params | density | sampled '
            '| found (it, ε) | NSC |', '|---:|---:|---:|---:|---:|---:|---:|---:|---|---|']
  for t in top:
    mflops = None if t['flops'] is None else t['flops'] / 1e6
    mean = (f'{t["mean_reward"]:.4f} ({t["evaluations"]})' if 'mean_reward' in t else '–')
    star = ' ★' if t.get('kept') else ''
    lines.append(
        f'| {t["rank"]}{star} | {t["reward"]:.4f} | {mean} | {_fmt(t["val_accuracy"])} | '
        f'{_fmt(mflops, ",.1f")} | {_fmt(t["params"], ",")} | {_fmt(t["density"], ".2f")} | '
        f'{t["times_sampled"]} | {t["iteration"]}, {t["epsilon"]:g} | `{t["nsc"]}` |')
  blocks = [f'![#{t["rank"]}](block_{t["rank"]}.png)' for t in top]
  return lines + ['', ' '.join(blocks)]


def render_summary(summary: analysis.Summary, top: Sequence[dict], images: dict[str, str],
                   source: str = '', config: str | None = None,
                   kept: confirm.Kept | None = None,
                   evaluations: Sequence[str] = ()) -> str:
  """The Markdown page of ``summary.md``.

  Args:
    summary: from ``analysis.summarize``.
    top: from ``top_block_records``.
    images: section title -> image path relative to the page.
    source: the database path, shown in the header.
    config: the run's config JSON, shown folded, if known.
    kept: the block the search hands over, with its evidence.
    evaluations: the lines of the blocks evaluated more than once (``_evaluation_lines``).
  """
  s = summary
  lines = ['# BlockQNN search report', '']
  if source:
    lines += [f'Source: `{source}`', '']
  lines += ['| | |', '|---|---|',
            f'| Candidates | {s.candidates:,} in {s.iterations:,} iterations |',
            f'| Distinct blocks | {s.distinct_blocks:,} |',
            f'| Cache hit rate | {s.cache_hit_rate:.1%} ({s.cached:,} rewards reused from '
            f'identical earlier blocks) |',
            f'| Failures | {s.failed:,} ({s.failed / max(s.candidates, 1):.1%}) |',
            *([f'| Stopped at a rung | {s.stopped:,} (search.early_stop: their reward is '
               f'the rung\'s, and none is ranked) |'] if s.stopped else []),
            f'| Wall time | {_duration(s.wall_s)} (training time summed over trained '
            f'candidates: {_duration(s.compute_s)}) |',
            f'| Candidates per hour | {_fmt(s.candidates_per_hour, ",.1f")} |']
  for e in s.by_epsilon:
    if e is s.by_epsilon[0] or e is s.by_epsilon[-1]:
      which = 'exploration' if e is s.by_epsilon[0] else 'lowest ε'
      if len(s.by_epsilon) == 1:
        which = 'only ε'
      lines.append(f'| Mean reward at ε={e.epsilon:g} ({which}) | {_fmt(e.mean_reward)} '
                   f'(n={e.ok:,}; max {_fmt(e.max_reward)}) |')
  if s.best is not None:
    lines.append(f'| Best reward | {s.best.reward:.4f} (accuracy '
                 f'{_fmt(s.best.val_accuracy)}, iteration {s.best.iteration}) |')
  if kept is not None:
    se = '' if math.isnan(kept.standard_error) else f' ± {kept.standard_error:.4f}'
    lines.append(f'| Kept block ({kept.rule}) | `{kept.block}`: mean reward '
                 f'{kept.reward:.4f}{se} over {kept.evaluations} evaluation'
                 f'{"s" if kept.evaluations != 1 else ""} |')
  pair = s.exploration_vs_exploitation()
  if pair and pair[0].mean_reward is not None and pair[1].mean_reward is not None:
    gain = pair[1].mean_reward - pair[0].mean_reward
    verdict = ('the agent exploits what it learned' if gain > 0
               else 'no gain over random exploration')
    lines += ['', f'Mean reward {"rose" if gain > 0 else "fell"} by {abs(gain):.4f} from '
              f'ε={pair[0].epsilon:g} to ε={pair[1].epsilon:g}: {verdict}.']
  if s.failure_reasons:
    lines += ['', '## Failures by reason', '', '| count | reason |', '|---:|---|']
    lines += [f'| {n:,} | {_one_line(reason)} |' for reason, n in s.failure_reasons]
  for title, image in images.items():
    lines += ['', f'## {title}', '', f'![{title}]({image})']
  lines += list(evaluations)
  lines += _top_block_lines(top)
  if config:
    try:
      config = json.dumps(json.loads(config), indent=2, sort_keys=True)
    except (TypeError, ValueError):
      pass  # show it as stored
    lines += ['', '<details><summary>Run config</summary>', '', '```json', config, '```', '',
              '</details>']
  return '\n'.join(lines) + '\n'


def _json_text(value) -> str:
  """Indented JSON with each list of integers (an NSC layer) kept on one line."""
  text = json.dumps(value, indent=2)
  return re.sub(r'\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]',
                lambda m: '[' + re.sub(r'\s+', ' ', m.group(1)) + ']', text) + '\n'


def write_report(workdir: str | Path, out_dir: str | Path | None = None,
                 top_k: int = 5) -> Path:
  """Writes the report of the search in ``workdir``; returns the path of ``summary.md``.

  Args:
    workdir: the search's workdir (holding ``search.sqlite``), or the database file.
    out_dir: where to write; default ``WORKDIR/report``.
    top_k: how many of the best distinct blocks to list and draw.

  Raises:
    FileNotFoundError: if the workdir or its database does not exist.
    ValueError: if the database is not a search store or holds no candidates.
  """
  rows, meta, db, evidence, kept, further = _read(workdir)
  if not rows:
    raise ValueError(f'the search database {db} holds no candidates yet')
  out = Path(out_dir) if out_dir is not None else db.parent / REPORT_DIR
  out.mkdir(parents=True, exist_ok=True)
  top = top_block_records(rows, top_k, evidence, kept)
  rewards: dict[str, list[float]] = {}
  for row in rows:
    if not row.cached and row.ok:
      rewards.setdefault(row.canonical_key, []).append(row.reward)
  for e in further:
    if e.result.ok:
      rewards.setdefault(e.canonical_key, []).append(e.result.reward)
  images = {
      'Reward per iteration': figures.plot_reward_per_iteration(
          rows, out / 'reward_per_iteration.png'),
      'Reward by ε': figures.plot_reward_by_epsilon(rows, out / 'reward_by_epsilon.png'),
      'Accuracy vs FLOPs': figures.plot_accuracy_vs_flops(
          rows, out / 'accuracy_vs_flops.png', top_k),
  }
  for t in top:
    figures.draw_block(
        nsc.Block.parse(t['nsc']), out / f'block_{t["rank"]}.png',
        title=f'#{t["rank"]}  reward {t["reward"]:.4f}  acc {_fmt(t["val_accuracy"])}')
  (out / 'top_blocks.txt').write_text(''.join(t['nsc'] + '\n' for t in top))
  (out / 'top_blocks.json').write_text(_json_text(top))
  page = render_summary(analysis.summarize(rows), top, {k: v.name for k, v in images.items()},
                        source=str(db), config=meta.get('config'), kept=kept,
                        evaluations=_evaluation_lines(evidence, rows, kept, rewards))
  if kept is not None:
    (out / 'kept_block.json').write_text(_json_text(dataclasses.asdict(kept)))
  summary_path = out / 'summary.md'
  summary_path.write_text(page)
  return summary_path
