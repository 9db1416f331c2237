r"""Writes the report of a search: plots, the top blocks and a summary page.

  python -m experiments.report --workdir=workdirs/smoke
  python -m experiments.report --workdir=workdirs/cifar100 --top_k=10 --out=/tmp/report
  python -m experiments.report --compare=workdirs/q_seed0,workdirs/random_seed0 --out=/tmp/cmp

Reads WORKDIR/search.sqlite read-only, so it can run while the search is still going; writes
WORKDIR/report/ (or --out): summary.md, the PNGs, top_blocks.txt and top_blocks.json. A
wrong --workdir (missing, or not a search's) ends in one line on stderr and exit status 2.
With --compare, several searches go on one figure instead (``report.compare``): best reward
and top-10 mean reward against distinct candidates trained, one colour per strategy, and
comparison.md with the figures at their common budget.
"""

from __future__ import annotations

import sys

from absl import flags

from blockqnn_jax.report import page
from experiments import user_errors

_WORKDIR = flags.DEFINE_string('workdir', None, 'The search workdir (holding search.sqlite).')
_COMPARE = flags.DEFINE_list('compare', [], 'Search workdirs to draw on one figure (with '
                             '--out, default: the first one\'s report/).')
_TOP_K = flags.DEFINE_integer('top_k', 5, 'How many of the best distinct blocks to list.',
                              lower_bound=0)
_OUT = flags.DEFINE_string('out', None, 'Where to write the report (default WORKDIR/report).')


def main(argv):
  del argv
  if _COMPARE.value:
    from blockqnn_jax.report import compare  # pylint: disable=import-outside-toplevel
    out = _OUT.value or f'{_COMPARE.value[0]}/{page.REPORT_DIR}'
    png, md = compare.compare_searches(_COMPARE.value, out)
    print(md.read_text())
    print(f'comparison written: {png}')
    return
  if not _WORKDIR.value:
    print('error: pass --workdir=WORKDIR (or --compare=W1,W2,...)', file=sys.stderr)
    sys.exit(user_errors.EXIT_STATUS)
  summary = page.write_report(_WORKDIR.value, out_dir=_OUT.value, top_k=_TOP_K.value)
  print(f'report written: {summary}')


if __name__ == '__main__':
  # ValueError too: write_report raises it for a workdir that holds no candidates yet.
  user_errors.run(main, extra=(ValueError,))
