r"""A cold candidate's time outside training, this tree against an earlier revision, in one run.

Checks the base revision out into a temporary git worktree, then alternates fresh processes
of the base and of this tree (``--rounds`` each, base first), each timing the same blocks
(``benchmarks.evaluate``'s four, small to large) with ``benchmarks/compile_share_driver.py``
at the same sizes. Every process first trains ``--warmup`` other blocks, as any candidate of
a search but the first is preceded by others: what every candidate shares is then compiled,
and each measured block is still cold (none of its own programs exists). It prints, per
block, the seconds outside training (compile + evaluation + everything else, i.e. total −
train) for both, their ratio, and each side's validation accuracy (equal accuracies: the
same network was trained).

  mkdir -p data && cp ../shared/data/cifar10-exact-subset.npz data/
  python -m benchmarks.compile_share --base=59371a5 --data=npz:data/cifar10-exact-subset.npz
  # both training loops:
  python -m benchmarks.compile_share --base=59371a5 --loops=steps,scan

Defaults are the cpu preset of 59371a5 (F = 8, N = 1, one epoch of batch 64 on 1,000 of the
2,000 images read, 1,000 held out).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys
import tempfile

from absl import app, flags

from benchmarks.fixtures import BLOCKS, data_source

# Blocks of the cpu space that are none of BLOCKS: they warm what candidates share.
WARMUP = ('1,1,1,0,0 2,7,0,0,0', '1,2,3,0,0 2,1,3,1,0 3,7,0,0,0',
          '1,1,3,0,0 2,3,3,0,0 3,6,0,1,2 4,7,0,0,0')

_BASE = flags.DEFINE_string('base', '59371a5', 'The revision to compare with.')
_DATA = flags.DEFINE_string('data', 'npz:data/cifar10-exact-subset.npz', "'SOURCE:PATH'.")
_MAX_TRAIN = flags.DEFINE_integer('max_train', 2000, 'Images read (validation included).')
_VALIDATION = flags.DEFINE_integer('validation_size', 1000, 'Held out of them.')
_EPOCHS = flags.DEFINE_integer('epochs', 1, 'Epochs per candidate.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Batch size.')
_EVAL_BATCH = flags.DEFINE_integer('eval_batch_size', 500, 'Validation batch size.')
_FEATURES = flags.DEFINE_integer('features', 8, 'F.')
_NUM_BLOCKS = flags.DEFINE_integer('num_blocks', 1, 'N.')
_LOOPS = flags.DEFINE_list('loops', ['steps'], "train.loop values ('steps', 'scan').")
_WARMUP = flags.DEFINE_integer('warmup', len(WARMUP), f'Blocks trained first (at most '
                               f'{len(WARMUP)}).')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Processes per revision (alternating).')

DRIVER = Path(__file__).with_name('compile_share_driver.py')


def _run(root: Path, spec: dict) -> list[dict]:
  env = dict(os.environ, PYTHONPATH=str(root))
  out = subprocess.run([sys.executable, str(DRIVER), json.dumps(spec)], cwd=root, env=env,
                       capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f'driver failed in {root}:\n{out.stderr[-3000:]}')
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]
  module = Path(rows[0]['module']).resolve()
  if root.resolve() not in module.parents:  # the revision, not the installed package
    raise RuntimeError(f'{root} imported blockqnn_jax from {module}')
  return [r for r in rows[1:] if r['role'] == 'block']


def _outside(r: dict) -> float:
  return r['total_s'] - r['train_s']


def main(argv):
  del argv
  head = Path(__file__).resolve().parents[1]
  data = _DATA.value
  source, path = data_source(data)
  if path and not Path(path).is_absolute():
    data = f'{source}:{(Path.cwd() / path).resolve()}'
  with tempfile.TemporaryDirectory() as tmp:
    base = Path(tmp) / 'base'
    subprocess.run(['git', '-C', str(head), 'worktree', 'add', '--detach', str(base),
                    _BASE.value], check=True, capture_output=True)
    try:
      for loop in _LOOPS.value:
        spec = dict(data=data, max_train=_MAX_TRAIN.value,
                    validation_size=_VALIDATION.value, epochs=_EPOCHS.value,
                    batch_size=_BATCH.value, eval_batch_size=_EVAL_BATCH.value,
                    features=_FEATURES.value, num_blocks=_NUM_BLOCKS.value, loop=loop,
                    warmup=list(WARMUP[:_WARMUP.value]), blocks=list(BLOCKS))
        runs = {'base': [], 'head': []}
        for _ in range(_ROUNDS.value):
          runs['base'].append(_run(base, spec))
          runs['head'].append(_run(head, spec))
        _table(loop, runs)
    finally:
      subprocess.run(['git', '-C', str(head), 'worktree', 'remove', '--force', str(base)],
                     check=False, capture_output=True)


def _table(loop: str, runs: dict[str, list[list[dict]]]) -> None:
  print(f'\ntrain.loop={loop}: seconds outside training of a cold candidate (mean of '
        f'{len(runs["head"])} processes each; compile / eval / other), base {_BASE.value} '
        'vs this tree')
  print(f'{"layers":>6} {"base s":>7} {"(compile":>9} {"eval":>5} {"other)":>7} '
        f'{"head s":>7} {"(compile":>9} {"eval":>5} {"other)":>7} {"ratio":>6} '
        f'{"base acc":>9} {"head acc":>9}')
  ratios = []
  for i, block in enumerate(BLOCKS):
    cols = []
    for side in ('base', 'head'):
      rows = [run[i] for run in runs[side]]
      mean = lambda f: sum(f(r) for r in rows) / len(rows)
      cols.append((mean(_outside), mean(lambda r: r['compile_s']), mean(lambda r: r['eval_s']),
                   mean(lambda r: r['total_s'] - r['train_s'] - r['compile_s'] - r['eval_s']),
                   rows[0]['val_accuracy']))
    (b, bc, be, bo, bacc), (h, hc, he, ho, hacc) = cols
    ratios.append(h / b)
    print(f'{runs["head"][0][i]["layers"]:>6} {b:>7.2f} {bc:>9.2f} {be:>5.2f} {bo:>7.2f} '
          f'{h:>7.2f} {hc:>9.2f} {he:>5.2f} {ho:>7.2f} {h / b:>5.2f}x {bacc:>9.3f} '
          f'{hacc:>9.3f}')
  print(f'ratio head/base outside training: {min(ratios):.2f}x - {max(ratios):.2f}x '
        f'(target <= 0.50x)')


if __name__ == '__main__':
  app.run(main)
