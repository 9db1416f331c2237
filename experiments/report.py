r"""Writes the report of a search: plots, the top blocks and a summary page.

  python -m experiments.report --workdir=workdirs/smoke
  python -m experiments.report --workdir=workdirs/cifar100 --top_k=10 --out=/tmp/report

Reads WORKDIR/search.sqlite read-only, so it can run while the search is still going; writes
WORKDIR/report/ (or --out): summary.md, the PNGs, top_blocks.txt and top_blocks.json. A
wrong --workdir (missing, or not a search's) ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

from absl import flags

from blockqnn_jax import report
from experiments import user_errors

_WORKDIR = flags.DEFINE_string('workdir', None, 'The search workdir (holding search.sqlite).',
                               required=True)
_TOP_K = flags.DEFINE_integer('top_k', 5, 'How many of the best distinct blocks to list.',
                              lower_bound=0)
_OUT = flags.DEFINE_string('out', None, 'Where to write the report (default WORKDIR/report).')


def main(argv):
  del argv
  summary = report.write_report(_WORKDIR.value, out_dir=_OUT.value, top_k=_TOP_K.value)
  print(f'report written: {summary}')


if __name__ == '__main__':
  # ValueError too: write_report raises it for a workdir that holds no candidates yet.
  user_errors.run(main, extra=(ValueError,))
