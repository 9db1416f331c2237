"""The command line: ``python -m benchmarks.device_check``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from absl import app, flags

from benchmarks import evaluate as evaluate_bench  # noqa: F401 (its flags: --data, ...)
from benchmarks.device_check.plan import DEFAULT_DATA, plan_for
from benchmarks.device_check.runner import run

# -- the command line ------------------------------------------------------------------------

_OUT = flags.DEFINE_string('out', 'device_check.json', 'Where the JSON report goes.')
_TINY = flags.DEFINE_bool('tiny', False, 'Toy size on the CPU (under 5 minutes).')
_SMALLEST = flags.DEFINE_bool('smallest', False, "The test suite's form: every section once, "
                              'on the smallest network and data (seconds, no time boxes).')
_TIME_LIMIT = flags.DEFINE_float('time_limit_s', None, 'Stretch or shrink every time box to '
                                 'this wall time (default: 480 for the GPU, 300 for --tiny).')
# benchmarks.evaluate's flags (its BLOCKS come from there) that mean the same here.
_OVERRIDES = ('epochs', 'batch_size', 'features', 'num_blocks', 'validation_size', 'max_train',
              'scan_blocks')
_NOT_HERE = ('loops', 'compute_dtype', 'compare_compile_ahead', 'stream', 'decode_threads')


def main(argv):
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  unused = [f'--{n}' for n in _NOT_HERE if FLAGS[n].present]
  if unused:
    raise app.UsageError(f'{", ".join(unused)}: benchmarks.evaluate only; this check '
                         'compares loops and dtypes itself')
  size = 'smallest' if _SMALLEST.value else 'tiny' if _TINY.value else 'full'
  plan = plan_for(size, _TIME_LIMIT.value)
  plan = dataclasses.replace(plan, **{n: FLAGS[n].value for n in _OVERRIDES
                                      if FLAGS[n].present})
  try:
    run(plan, FLAGS.data, _OUT.value, watchdog=True)
  except FileNotFoundError as e:  # the data was not carried: say so in the report too
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps({'complete': False, 'error': str(e)}, indent=2))
    raise SystemExit(str(e)) from None
  print(f'\nreport: {_OUT.value}')


if __name__ == '__main__':
  flags.FLAGS.set_default('data', DEFAULT_DATA)
  app.run(main)
