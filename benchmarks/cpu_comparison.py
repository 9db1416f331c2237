r"""The paper's comparison on the real space: Q-learning against random search, same budget.

Runs ``experiments.search --config=configs/cifar.py:cpu`` once per strategy and seed (each
search in its own workdir, resumable: run the same command again to finish what was cut
short), then draws them on one figure with ``report.compare``: best reward so far and the
mean of the 10 best distinct rewards against distinct candidates trained, and prints the
figures at the common budget with the seed-to-seed spread.

  mkdir -p data && cp ../shared/data/cifar10-exact-subset.npz data/
  python -m benchmarks.cpu_comparison --data=data/cifar10-exact-subset.npz \
      --strategies=qlearning,random --seeds=0,1,2 --workdir=workdirs/compare

``--parallel=2`` runs two searches at a time, each on one host thread (on a 2-core machine
that is what one search uses anyway once compilation and training overlap). Extra
``--override=field=value`` flags go to every search (e.g. ``search.epsilon_schedule``).
"""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys
import time

from absl import app
from absl import flags

from blockqnn_jax.report import compare

_DATA = flags.DEFINE_string('data', 'data/cifar10-exact-subset.npz',
                            'The CIFAR-10 exact subset (.npz).')
_STRATEGIES = flags.DEFINE_list('strategies', ['qlearning', 'random'], 'search.strategy values.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (each a whole search).')
_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/compare', 'Where the searches live.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Searches run at a time.')
_OVERRIDES = flags.DEFINE_multi_string('override', [], 'field=value for every search.')
_CONFIG = flags.DEFINE_string('config', 'configs/cifar.py:cpu', 'The search config.')


def _command(strategy: str, seed: str, workdir: Path) -> list[str]:
  return [sys.executable, '-m', 'experiments.search', f'--config={_CONFIG.value}',
          f'--workdir={workdir}', f'--config.seed={seed}',
          f'--config.search.strategy={strategy}', f'--config.data.path={_DATA.value}',
          '--noprogress', *(f'--config.{o}' for o in _OVERRIDES.value)]


def main(argv):
  del argv
  root = Path(_WORKDIR.value)
  root.mkdir(parents=True, exist_ok=True)
  runs = [(s, seed, root / f'{s}_seed{seed}') for seed in _SEEDS.value for s in _STRATEGIES.value]
  env = dict(os.environ)
  if _PARALLEL.value > 1:  # one host thread each, so parallel searches do not fight
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false '
                        'intra_op_parallelism_threads=1').strip()
  pending, running, seconds = list(runs), [], {}
  while pending or running:
    while pending and len(running) < _PARALLEL.value:
      strategy, seed, workdir = pending.pop(0)
      log = open(root / f'{workdir.name}.log', 'a')  # pylint: disable=consider-using-with
      running.append((workdir, time.perf_counter(), log, subprocess.Popen(
          _command(strategy, seed, workdir), env=env, stdout=log, stderr=subprocess.STDOUT)))
    time.sleep(2)
    for entry in list(running):
      workdir, started, log, process = entry
      if process.poll() is not None:
        running.remove(entry)
        log.close()
        seconds[workdir.name] = time.perf_counter() - started
        print(f'{workdir.name}: exit {process.returncode} after {seconds[workdir.name]:.0f} s',
              flush=True)
        if process.returncode:
          print(f'  see {log.name}')
  done = [w for _, _, w in runs if (w / 'search.sqlite').is_file()]
  png, md = compare.compare_searches(done, root / 'report')
  print(md.read_text())
  print(f'figure: {png}')


if __name__ == '__main__':
  app.run(main)
