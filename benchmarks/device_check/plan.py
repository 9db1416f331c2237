"""Plans of a device check: sizes, time boxes, the blocks measured, the targets."""

from __future__ import annotations

import time

# The clock of the whole run starts before the heavy imports: they count against 8 minutes.
_STARTED = time.perf_counter()

import dataclasses

from benchmarks.fixtures import BLOCKS
from configs import cifar

DEFAULT_DATA = 'npz:data/cifar10-exact-subset.npz'
# Also tried when the default is absent: the shared data beside the repository.
FALLBACK_NPZ = ('../shared/data/cifar10-exact-subset.npz',
                'shared/data/cifar10-exact-subset.npz')
PAPER_TRAIN, PAPER_VAL = 45_000, 5_000
TARGET_CANDIDATES_PER_HOUR = 300
TARGET_OUTSIDE_TRAIN_SHARE = 0.25
SECTION_KEYS = {  # section -> the report keys it fills
    'loops': ('loops',),
    'compile_share': ('candidates_per_hour', 'compile_share'),
    'early_stop': ('early_stop',),
    'memory': ('memory',),
    'compile_ahead': ('compile_ahead',),
    'dtypes': ('dtypes',),
}
REPORT_KEYS = ('loops', 'dtypes', 'candidates_per_hour', 'compile_share', 'early_stop',
               'compile_ahead', 'memory')


def _residual(a: int, b: int) -> str:
  return f'1,4,0,0,0 2,1,{a},1,0 3,1,{b},2,0 4,5,0,1,3 5,7,0,0,0'


# Distinct blocks of one size (the paper's residual block with other kernel pairs): every
# one is a new program, as every candidate of a search is, and of comparable cost, so the
# executor runs compare like with like.
POOL = tuple(_residual(a, b) for a, b in
             ((3, 3), (3, 5), (5, 3), (1, 3), (3, 1), (5, 5), (1, 5), (5, 1)))


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one run measures and how long each section may take.

  Attributes:
    size: 'full' (the GPU run), 'tiny' (CPU, < 5 minutes) or 'smallest' (the test).
    epochs, batch_size, features, num_blocks, scan_blocks: the candidates' training and
      network (``TrainConfig`` / ``NetworkSettings``).
    validation_size: held out for the reward (a count >= 1 or a fraction).
    max_train: cap on the training images read (None: all).
    loop_blocks: the blocks of the loops and dtypes sections (NSC text).
    pool: distinct blocks the compile_share and executor sections draw from.
    share_count: candidates of each compile_share pass.
    executor_count: candidates of an executor run (at least two per worker; fewer when
      the time box is short).
    workers: worker counts sharing the one device.
    budgets: seconds per section (the sections run in ``SECTIONS`` order).
    deadline_s: no unit of work starts later than this (seconds from process start).
    hard_deadline_s: a watchdog writes the report and exits then (only from ``main``).
    cache_everywhere: JAX's persistent compilation cache on for the whole run, so repeated
      programs load instead of compiling (the test's smallest form: it checks the code,
      not the figures).
    early_stop: the early_stop section's ``(epochs, rungs, promote)``: the gpu preset's
      (``search.early_stop``) in the full run; at the toy sizes, of as many epochs as rungs
      need (rungs come before the last epoch).
  """

  size: str
  epochs: int
  batch_size: int
  features: int
  num_blocks: int
  validation_size: float
  max_train: int | None
  loop_blocks: tuple[str, ...]
  pool: tuple[str, ...]
  share_count: int
  executor_count: int
  workers: tuple[int, ...]
  budgets: tuple[tuple[str, float], ...]
  deadline_s: float | None
  hard_deadline_s: float | None
  early_stop: tuple[int, tuple[int, ...], float] = (4, (1, 2), 0.5)
  scan_blocks: bool = False
  cache_everywhere: bool = False


def plan_for(size: str, time_limit_s: float | None = None) -> Plan:
  """The plan of ``size``; ``time_limit_s`` stretches or shrinks its time boxes."""
  blocks = BLOCKS
  if size == 'full':  # the candidates of configs/cifar.py:gpu
    gpu = cifar.get_config('gpu')
    plan = Plan(size, epochs=gpu.train.epochs, batch_size=gpu.train.batch_size,
                features=gpu.network.features, num_blocks=gpu.network.num_blocks,
                validation_size=0.1, max_train=None, loop_blocks=(blocks[0], blocks[2]),
                pool=POOL, share_count=3, executor_count=4, workers=(1, 2, 4),
                budgets=(('loops', 80), ('compile_share', 80), ('early_stop', 40),
                         ('memory', 115), ('compile_ahead', 65), ('dtypes', 45)),
                deadline_s=445, hard_deadline_s=465,
                early_stop=(gpu.train.epochs, tuple(gpu.search.early_stop.rungs),
                            gpu.search.early_stop.promote))
    default_limit = 480
  elif size == 'tiny':
    plan = Plan(size, epochs=1, batch_size=32, features=8, num_blocks=1,
                validation_size=0.1, max_train=400, loop_blocks=(blocks[0], blocks[1]),
                pool=POOL[:2], share_count=2, executor_count=2, workers=(1, 2),
                budgets=(('loops', 70), ('compile_share', 50), ('early_stop', 25),
                         ('memory', 65), ('compile_ahead', 45), ('dtypes', 25)),
                deadline_s=255, hard_deadline_s=280)
    default_limit = 300
  elif size == 'smallest':
    plan = Plan(size, epochs=1, batch_size=16, features=4, num_blocks=1,
                validation_size=0.1, max_train=160, loop_blocks=(blocks[0],),
                pool=(blocks[0],), share_count=1, executor_count=2, workers=(1, 2),
                budgets=tuple((name, 600) for name in SECTION_KEYS),
                deadline_s=None, hard_deadline_s=None, cache_everywhere=True,
                early_stop=(2, (1,), 0.5))
    default_limit = None
  else:
    raise ValueError(f"size must be 'full', 'tiny' or 'smallest', got {size!r}")
  if time_limit_s and default_limit:
    factor = time_limit_s / default_limit
    plan = dataclasses.replace(
        plan, budgets=tuple((n, b * factor) for n, b in plan.budgets),
        deadline_s=plan.deadline_s * factor, hard_deadline_s=plan.hard_deadline_s * factor)
  return plan


def since_start() -> float:
  return time.perf_counter() - _STARTED


class TimeBox:
  """A section's time: its own budget, cut short by the run's deadline."""

  def __init__(self, seconds: float, deadline_s: float | None):
    self.budget_s = seconds
    end = since_start() + seconds
    self.end = end if deadline_s is None else min(end, deadline_s)

  def left(self) -> float:
    return self.end - since_start()

  def allows(self, estimate_s: float | None) -> bool:
    """Whether a unit expected to take ``estimate_s`` (None: unknown) fits."""
    return self.left() > (estimate_s or 0.0)


class Skipped(Exception):
  """A section did not fit its time box."""


def spent(box: TimeBox, estimate_s: float | None) -> str:
  return (f'time box spent: {max(box.left(), 0):.0f} s left, a unit takes about '
          f'{estimate_s or 0:.0f} s')
