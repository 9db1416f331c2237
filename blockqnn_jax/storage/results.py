"""One candidate record: what evaluating a block produced, as the search stores and reports it.

No JAX here: the store, the report and retraining read candidates without importing it.

* ``EvalResult`` is what the executor returns for one block (status 'ok' or 'failed', the
  reward and its parts, timings).
* ``Candidate`` is a row of the store's ``candidates`` table: an ``EvalResult`` plus where
  the search sampled it (iteration, position, ε, whether its result was reused). The table's
  columns are these fields (``COLUMNS``), so the schema follows from this module.
* ``RewardConfig`` / ``compute_reward``: the BlockQNN reward.
* ``Diverged`` / ``describe_failure``: one-line failure reasons.
"""

from __future__ import annotations

import dataclasses
import json
import math
import traceback
from typing import Any, Mapping

from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.search import RewardConfig

NAN = float('nan')


def compute_reward(accuracy: float, block_flops: float, reference_flops: float,
                   density: float, config: RewardConfig) -> float:
  """The BlockQNN reward (see ``RewardConfig``)."""
  flops_ratio = max(block_flops / reference_flops, 1.0)
  return accuracy - config.mu * math.log(flops_ratio) - config.rho * math.log(density)


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """What evaluating one candidate produced; ``status`` is 'ok' or 'failed'.

  ``block`` is the NSC text (the ``nsc`` column of the store). Times are wall-clock
  seconds: ``compile_s`` (its programs; 0 when cached), ``train_s`` (training, data already
  on the device), ``eval_s`` (validation), ``total_s`` (everything, including placing data
  and building the model).

  Under early stopping (``search.early_stop``) ``rungs`` holds the scores (rewards) at the
  rungs it reached (``encode_scores``), and ``stopped_at`` the rung at which it stopped:
  then ``val_accuracy`` and ``reward`` are those of that rung; 0 when it trained to the end.
  """

  block: str
  canonical_key: str
  status: str
  failure_reason: str = ''
  val_accuracy: float = NAN
  reward: float = NAN
  final_loss: float = NAN
  flops: int = 0
  density: float = NAN
  params: int = 0
  compile_s: float = 0.0
  train_s: float = 0.0
  eval_s: float = 0.0
  total_s: float = 0.0
  images_per_s: float = 0.0
  device: str = ''
  compile_cached: bool = False
  stopped_at: int = 0
  rungs: str = ''

  @property
  def ok(self) -> bool:
    """Whether the candidate trained and has a usable reward."""
    return self.status == 'ok' and math.isfinite(self.reward)

  @property
  def reusable(self) -> bool:
    """Whether this result stands for every later sample of the same block: a success, or
    a failure that is a fact about the block (not ``TRANSIENT_FAILURES``)."""
    return self.ok or not is_transient_failure(self.failure_reason)

  @property
  def stopped(self) -> bool:
    """Whether it stopped at a rung (a result, with the rung's reward; never kept)."""
    return self.stopped_at > 0

  @property
  def rung_scores(self) -> dict[int, float]:
    """Its score at each rung it reached: step -> reward."""
    return decode_scores(self.rungs)

  @property
  def nsc(self) -> str:
    """The block's NSC text (the store's column name for ``block``)."""
    return self.block

  def parse_block(self) -> nsc.Block:
    """The NSC text parsed (form only: the search's grammar may differ from the default)."""
    return nsc.Block.parse(self.block)

  @classmethod
  def failed(cls, block: str, reason: str, *, canonical_key: str = '', device: str = '',
             **fields) -> 'EvalResult':
    return cls(block=block, canonical_key=canonical_key, status='failed',
               failure_reason=reason, device=device, **fields)


def encode_scores(scores: Mapping[int, float]) -> str:
  """Rung scores as the text a result keeps (``EvalResult.rungs``): ``[[step, score], ...]``
  by step ('' for none)."""
  if not scores:
    return ''
  return json.dumps([[int(s), float(v) if math.isfinite(v) else None]
                     for s, v in sorted(scores.items())])


def decode_scores(text: str) -> dict[int, float]:
  """Inverse of ``encode_scores``."""
  if not text:
    return {}
  return {int(s): (NAN if v is None else float(v)) for s, v in json.loads(text)}


def encode_result(result: EvalResult) -> str:
  """A result as JSON text (non-finite numbers as null): how the store's evaluations and the
  shared evaluation cache keep one."""
  values = dataclasses.asdict(result)
  return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                     for k, v in values.items()})


def decode_result(text: str) -> EvalResult:
  """Inverse of ``encode_result``; fields it does not know are dropped, missing ones take
  their defaults (text written by another version still reads)."""
  values = json.loads(text)
  defaults = {f.name: f.default for f in dataclasses.fields(EvalResult)}
  values = {k: (defaults[k] if v is None else v) for k, v in values.items() if k in defaults}
  return EvalResult(**values)


@dataclasses.dataclass(frozen=True)
class Candidate(EvalResult):
  """A recorded candidate: its result plus where the search sampled it.

  ``cached``: the result was reused from an earlier identical block (same canonical key),
  not trained for this row. ``shared``: the result came from the evaluation cache shared
  with other searches (``eval_cache``): another search (or an earlier one) trained it; it
  counts as this search's distinct candidate all the same. ``id`` orders rows by when they
  were recorded.
  """

  iteration: int = 0
  position: int = 0
  epsilon: float = NAN
  cached: bool = False
  shared: bool = False
  id: int = 0
  created_at: float = 0.0

  @property
  def result(self) -> EvalResult:
    """The evaluation alone (to reuse for an identical block)."""
    return EvalResult(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EvalResult)})

  @classmethod
  def of(cls, result: EvalResult, *, iteration: int, position: int, epsilon: float,
         cached: bool, shared: bool = False, **fields) -> 'Candidate':
    values = {f.name: getattr(result, f.name) for f in dataclasses.fields(EvalResult)}
    return cls(**values, iteration=iteration, position=position, epsilon=float(epsilon),
               cached=bool(cached), shared=bool(shared), **fields)


# -- the table's columns ---------------------------------------------------------------------

# field name -> column name, where they differ.
_COLUMN_NAMES = {'block': 'nsc'}
_SQL_TYPES = {int: 'INTEGER', float: 'REAL', str: 'TEXT', bool: 'INTEGER'}
# Columns every store has had; the others may be missing from an older workdir's table.
REQUIRED = ('id', 'iteration', 'position', 'epsilon', 'nsc', 'canonical_key', 'cached',
            'status')


@dataclasses.dataclass(frozen=True)
class Column:
  field: str
  name: str
  sql_type: str
  default: Any


def _columns() -> tuple[Column, ...]:
  types = {'int': int, 'float': float, 'str': str, 'bool': bool}
  out = []
  for f in dataclasses.fields(Candidate):
    if f.name == 'id':
      continue
    out.append(Column(f.name, _COLUMN_NAMES.get(f.name, f.name), _SQL_TYPES[types[f.type]],
                      f.default))
  return tuple(out)


COLUMNS: tuple[Column, ...] = _columns()  # every column of ``candidates`` but ``id``


def to_row(candidate: Candidate) -> dict[str, Any]:
  """Column name -> value, with non-finite floats as NULL and bools as 0/1."""
  out = {}
  for c in COLUMNS:
    value = getattr(candidate, c.field)
    if isinstance(value, bool):
      value = int(value)
    elif isinstance(value, float) and not math.isfinite(value):
      value = None
    out[c.name] = value
  return out


def from_row(row: Mapping[str, Any]) -> Candidate:
  """A ``Candidate`` from a row (column name -> value); NULL numbers read back as their
  defaults (NaN or 0), columns the row lacks as defaults, unknown columns are ignored."""
  values = {}
  for c in (Column('id', 'id', 'INTEGER', 0),) + COLUMNS:
    if c.name not in row:
      continue
    value = row[c.name]
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
      value = c.default
    elif c.sql_type == 'INTEGER' and isinstance(c.default, bool):
      value = bool(value)
    values[c.field] = value
  return Candidate(**values)


# -- failures --------------------------------------------------------------------------------


class Diverged(RuntimeError):
  """A candidate's training loss became non-finite or exploded."""


# Failures that depend on where and when a candidate ran, not on its block: the block is
# trained again when next sampled, and on resume, instead of reusing the failure. Out of
# memory counts as transient: it depends on the batch size, the device and what else shared
# it, not only on the block. Every other failure (an invalid block, divergence, an error the
# block's own program raised) is a fact about the block and is reused like a success.
TRANSIENT_FAILURES = ('worker lost', 'no worker could start', 'error: worker call failed',
                      'timeout', 'interrupted', 'out of memory')


def is_transient_failure(reason: str) -> bool:
  """Whether a failure reason says nothing about the block (see ``TRANSIENT_FAILURES``)."""
  return reason.startswith(TRANSIENT_FAILURES)


def failure_kind(reason: str) -> str:
  """The kind of a failure reason: the text before its first colon ('out of memory',
  'worker lost (worker-1 on host)' -> 'worker lost', 'error', ...)."""
  return reason.split(':', 1)[0].split(' (', 1)[0].strip()


def describe_failure(error: BaseException) -> str:
  """A one-line reason, classifying invalid blocks, divergence and out-of-memory."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  if isinstance(error, nsc.NSCError):
    return f'invalid block: {error}'
  if isinstance(error, Diverged):
    return text
  if 'RESOURCE_EXHAUSTED' in str(error) or isinstance(error, MemoryError) or \
      'out of memory' in str(error).lower():
    return f'out of memory: {text[:300]}'
  where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
  place = f' (at {where.filename.rsplit("/", 1)[-1]}:{where.lineno})' if where else ''
  return f'error: {type(error).__name__}: {text[:300]}{place}'


class SearchFailed(RuntimeError):
  """Candidates keep failing for a reason that is not about the blocks (the data, the
  devices, the settings): stopping says so instead of teaching the agent reward 0."""


class FailureWatch:
  """Counts trained candidates that failed in a row; ``check`` raises ``SearchFailed`` once
  the last ``limit`` failed for one kind of reason. A run of identical failures is the
  signature of the settings, the data or the devices, not of the blocks (invalid blocks,
  the one kind that is only about a block, do not count)."""

  def __init__(self, limit: int):
    self.limit = limit
    self.reasons: list[str] = []

  def see(self, result: EvalResult) -> None:
    if result.ok:
      self.reasons = []
    elif not result.failure_reason.startswith('invalid block'):
      self.reasons.append(result.failure_reason)

  def check(self) -> None:
    if not self.limit or len(self.reasons) < self.limit:
      return
    recent = self.reasons[-self.limit:]
    kinds = {failure_kind(r) for r in recent}
    if len(kinds) == 1:
      raise SearchFailed(
          f'the last {len(recent)} candidates trained all failed ({kinds.pop()}): that is the '
          f'settings, the data or the devices, not the blocks. The last said: {recent[-1]}')
