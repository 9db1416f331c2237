"""NAS-Bench-201 as a second search space for the agent, and its tabular benchmark.

A NAS-Bench-201 cell is a DAG on 4 nodes whose 6 edges each carry one of 5 operations; the
15,625 cells are fully trained, so a search "evaluates" a cell by looking it up.

The space the agent sees (``build_nb201_space``) has the shape ``qlearning`` expects:

* state 0: the start state (step 0);
* steps 1 .. 6: one state per operation of edge ``step - 1`` (state ``1 + 5·(step-1) + op``);
* step 7: the terminal state.

So every path is start → 6 edge ops → terminal (7 transitions), and action ``a`` from any
state at step t < 6 is "edge t gets op a". ``layers`` rows are ``(step, op, 0, 0, 0)``.

Cells are written as op tuples in NAS-Bench-201's string order (edges ``1←0, 2←0, 2←1, 3←0,
3←1, 3←2``); a cell's *code* is that tuple read as a base-5 number, and the table maps codes
to NAS-Bench-201 indices (rows of the CSV).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from blockqnn_jax.nsc.space import SearchSpace

OPS = ('none', 'skip_connect', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3')
NUM_OPS = len(OPS)
NUM_EDGES = 6
NUM_CELLS = NUM_OPS**NUM_EDGES  # 15,625
# Input node of each edge, in string order (the edge's output node is implied by its group).
EDGE_INPUTS = (0, 0, 1, 0, 1, 2)
DATASET_COLUMNS = {
    'cifar10': 'CIFAR10TestAccuracy200Epochs',
    'cifar100': 'CIFAR100TestAccuracy200Epochs',
    'imagenet16': 'ImageNetTestAccuracy200Epochs',
}
ARCH_COLUMN = 'ArchitectureString'
DATASETS = tuple(DATASET_COLUMNS)
# Base-5 place values of the edges: edge 0 is the most significant digit.
_PLACES = NUM_OPS**np.arange(NUM_EDGES - 1, -1, -1)


class NB201Error(ValueError):
  """A malformed NAS-Bench-201 table or cell."""


# -- the space --------------------------------------------------------------------------------

def build_nb201_space() -> SearchSpace:
  """The NAS-Bench-201 cell space as a ``SearchSpace`` (see the module docstring)."""
  steps = np.concatenate([[0], np.repeat(np.arange(1, NUM_EDGES + 1), NUM_OPS),
                          [NUM_EDGES + 1]])
  ops = np.concatenate([[0], np.tile(np.arange(NUM_OPS), NUM_EDGES), [0]])
  layers = np.zeros((steps.size, 5), np.int32)
  layers[:, 0], layers[:, 1] = steps, ops
  is_terminal = steps == NUM_EDGES + 1
  # The first state of step t+1: 1 + 5·t for the op steps, the terminal after step 6.
  action_offset = np.where(steps < NUM_EDGES, 1 + NUM_OPS * steps, steps.size - 1)
  num_actions = np.where(steps < NUM_EDGES, NUM_OPS, np.where(is_terminal, 0, 1))
  return SearchSpace(
      layers=jnp.asarray(layers),
      action_offset=jnp.asarray(action_offset, jnp.int32),
      num_actions=jnp.asarray(num_actions, jnp.int32),
      is_terminal=jnp.asarray(is_terminal),
      max_index=NUM_EDGES + 1,
      max_actions=NUM_OPS,
      step_widths=(NUM_OPS,) * NUM_EDGES + (1,),
      grammar=None,
  )


def decode(states_row: Sequence[int] | np.ndarray) -> tuple[int, ...]:
  """A sampled path (start state first, ``(8,)``) to its 6 op indices.

  Raises:
    NB201Error: if the row is not a start → 6 ops → terminal path of the NB201 space.
  """
  row = np.asarray(states_row, np.int64).reshape(-1)
  if row.size != NUM_EDGES + 2 or row[0] != 0 or row[-1] != 1 + NUM_OPS * NUM_EDGES:
    raise NB201Error(f'not a NAS-Bench-201 path: {row.tolist()}')
  ops = row[1:-1] - 1 - NUM_OPS * np.arange(NUM_EDGES)
  if ((ops < 0) | (ops >= NUM_OPS)).any():
    raise NB201Error(f'not a NAS-Bench-201 path: {row.tolist()}')
  return tuple(int(o) for o in ops)


def encode(ops: Sequence[int]) -> np.ndarray:
  """6 op indices to the agent's path ``(8,)``: start, one state per edge, terminal."""
  ops = _check_ops(ops)
  return np.concatenate([[0], 1 + NUM_OPS * np.arange(NUM_EDGES) + np.asarray(ops),
                         [1 + NUM_OPS * NUM_EDGES]]).astype(np.int32)


def path_codes(states: jnp.ndarray) -> jnp.ndarray:
  """``(..., 8)`` sampled paths to cell codes, in jax (for jitted searches)."""
  ops = states[..., 1:NUM_EDGES + 1] - 1 - NUM_OPS * jnp.arange(NUM_EDGES)
  return (ops * jnp.asarray(_PLACES)).sum(axis=-1)


def cell_code(ops: Sequence[int]) -> int:
  """The base-5 code of a cell (edge 0 most significant)."""
  return int((np.asarray(_check_ops(ops)) * _PLACES).sum())


def code_ops(code: int) -> tuple[int, ...]:
  """Inverse of ``cell_code``."""
  if not 0 <= code < NUM_CELLS:
    raise NB201Error(f'cell code {code} outside [0, {NUM_CELLS})')
  return tuple(int(code // p % NUM_OPS) for p in _PLACES)


def _check_ops(ops: Sequence[int]) -> tuple[int, ...]:
  ops = tuple(int(o) for o in ops)
  if len(ops) != NUM_EDGES or any(not 0 <= o < NUM_OPS for o in ops):
    raise NB201Error(f'a cell is {NUM_EDGES} op indices in [0, {NUM_OPS}), got {ops}')
  return ops


def arch_string(ops: Sequence[int]) -> str:
  """6 op indices to NAS-Bench-201's architecture string."""
  ops = _check_ops(ops)
  names = [f'{OPS[o]}~{i}' for o, i in zip(ops, EDGE_INPUTS)]
  return '|' + '|+|'.join(['|'.join(names[0:1]), '|'.join(names[1:3]),
                           '|'.join(names[3:6])]) + '|'


def parse_arch_string(text: str) -> tuple[int, ...]:
  """NAS-Bench-201's architecture string to 6 op indices.

  Raises:
    NB201Error: if the string is not a well-formed NAS-Bench-201 cell.
  """
  groups = text.strip().split('+')
  ops = []
  try:
    if len(groups) != 3:
      raise ValueError('expected 3 node groups')
    for node, group in enumerate(groups, start=1):
      if not (group.startswith('|') and group.endswith('|')):
        raise ValueError(f'group {group!r} is not delimited by |')
      edges = group[1:-1].split('|')
      if len(edges) != node:
        raise ValueError(f'node {node} needs {node} edges, got {len(edges)}')
      for source, edge in enumerate(edges):
        name, source_text = edge.split('~')
        if int(source_text) != source:
          raise ValueError(f'edge {edge!r} should come from node {source}')
        ops.append(OPS.index(name))
  except ValueError as error:  # split/int/index failures all mean a malformed string
    raise NB201Error(f'unparsable architecture string {text!r}: {error}') from None
  return tuple(ops)


# -- the table --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class NB201Table:
  """Test accuracies (percent) of all 15,625 cells, indexed by NAS-Bench-201 index.

  Attributes:
    accuracies: dataset name → ``(15625,)`` float64 accuracy per NAS-Bench-201 index.
    ops: ``(15625, 6)`` int op indices of each index's cell.
    index_of_code: ``(15625,)`` the NAS-Bench-201 index of each cell code.
  """

  accuracies: dict[str, np.ndarray]
  ops: np.ndarray
  index_of_code: np.ndarray

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'NB201Table':
    """Reads the CSV (columns as in ``DATASET_COLUMNS`` plus ``ArchitectureString``).

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      NB201Error: on missing columns, a row count other than 15,625, unparsable strings or
        accuracies, or cells that are repeated or missing.
    """
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f'NAS-Bench-201 table not found at {path}')
    with path.open(newline='') as f:
      reader = csv.DictReader(f)
      needed = [*DATASET_COLUMNS.values(), ARCH_COLUMN]
      missing = [c for c in needed if c not in (reader.fieldnames or [])]
      if missing:
        raise NB201Error(f'{path}: missing columns {missing}')
      rows = list(reader)
    return cls.from_rows(rows, source=str(path))

  @classmethod
  def from_rows(cls, rows: Sequence[dict[str, str]], source: str = 'table') -> 'NB201Table':
    """Builds the table from CSV-like rows (row i is NAS-Bench-201 index i)."""
    if len(rows) != NUM_CELLS:
      raise NB201Error(f'{source}: expected {NUM_CELLS} rows, got {len(rows)}')
    ops = np.asarray([parse_arch_string(r[ARCH_COLUMN]) for r in rows], np.int64)
    accuracies = {}
    for name, column in DATASET_COLUMNS.items():
      try:
        values = np.asarray([float(r[column]) for r in rows])
      except (TypeError, ValueError) as error:
        raise NB201Error(f'{source}: unparsable {column}: {error}') from None
      if not np.isfinite(values).all():
        raise NB201Error(f'{source}: non-finite values in {column}')
      accuracies[name] = values
    codes = ops @ _PLACES
    index_of_code = np.full(NUM_CELLS, -1, np.int64)
    index_of_code[codes] = np.arange(NUM_CELLS)
    if (index_of_code < 0).any():  # 15,625 rows but some cell twice: another one is absent
      absent = code_ops(int(np.flatnonzero(index_of_code < 0)[0]))
      raise NB201Error(f'{source}: repeated cells; {arch_string(absent)} is missing')
    return cls(accuracies=accuracies, ops=ops, index_of_code=index_of_code)

  def _column(self, dataset: str) -> np.ndarray:
    if dataset not in self.accuracies:
      raise KeyError(f'unknown dataset {dataset!r}; expected one of {DATASETS}')
    return self.accuracies[dataset]

  def index(self, ops: Sequence[int]) -> int:
    """The NAS-Bench-201 index of a cell."""
    return int(self.index_of_code[cell_code(ops)])

  def accuracy(self, ops: Sequence[int], dataset: str = 'cifar10') -> float:
    """Test accuracy (percent) of a cell on ``dataset``."""
    return float(self._column(dataset)[self.index(ops)])

  def by_code(self, dataset: str = 'cifar10') -> np.ndarray:
    """``(15625,)`` accuracies indexed by cell code (what jitted searches look up)."""
    return self._column(dataset)[self.index_of_code]

  def optimum(self, dataset: str = 'cifar10') -> float:
    """The best test accuracy of any cell on ``dataset``."""
    return float(self._column(dataset).max())


class TabularEvaluator:
  """Answers accuracy queries from a table and counts the DISTINCT cells queried.

  The distinct count is a search's budget: asking again about a known cell is free. This is
  the one stateful object of the benchmark (it is the search's record of what it has paid).

  Attributes:
    history: best accuracy so far after each distinct query.
  """

  def __init__(self, table: NB201Table, dataset: str = 'cifar10'):
    self._accuracies = table.by_code(dataset)
    self._seen: dict[int, float] = {}
    self.history: list[float] = []

  @property
  def num_queries(self) -> int:
    return len(self._seen)

  def known(self, ops: Sequence[int]) -> bool:
    return cell_code(ops) in self._seen

  def __call__(self, ops: Sequence[int]) -> float:
    code = cell_code(ops)
    if code not in self._seen:
      self._seen[code] = float(self._accuracies[code])
      self.history.append(max(self.history[-1], self._seen[code]) if self.history
                          else self._seen[code])
    return self._seen[code]
