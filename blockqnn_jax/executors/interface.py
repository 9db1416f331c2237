"""The executor interface the search drives.

An executor evaluates candidates: ``submit(block, seed, lines)`` returns a
``concurrent.futures.Future`` of a ``results.EvalResult`` that never raises (a failing
candidate is a failed result). ``local.LocalExecutor`` runs them on this machine's devices,
``ray_cluster.RayExecutor`` on worker actors of a Ray cluster; ``factory.make_executor``
builds the one ``settings.executor.kind`` names.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
from typing import Iterable

from blockqnn_jax.models.prepare import PreparedBlock
from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.storage.results import EvalResult
from blockqnn_jax.strategies.rungs import StopLines


@dataclasses.dataclass
class Job:
  """One submitted candidate (a block, or one prepared once: ``PreparedBlock``), its early
  stopping (``rungs.StopLines``, or None) and the future its result goes to."""

  block: nsc.Block | PreparedBlock
  seed: int
  lines: StopLines | None = None
  future: concurrent.futures.Future = dataclasses.field(
      default_factory=concurrent.futures.Future)
  attempts: int = 0

  def failed(self, reason: str, device: str = '') -> EvalResult:
    """A failed result for this job, for failures outside the candidate's own training."""
    block = self.block
    if isinstance(block, PreparedBlock):
      return EvalResult.failed(block.block.to_text(), reason, canonical_key=block.key,
                               device=device)
    try:
      key = canonical.canonical_key(block)
    except Exception:  # the block itself may be what is broken
      key = ''
    text = block.to_text() if isinstance(block, nsc.Block) else str(block)
    return EvalResult.failed(text, reason, canonical_key=key, device=device)


class Executor(abc.ABC):
  """Evaluates candidates asynchronously; a context manager that closes itself."""

  @abc.abstractmethod
  def submit(self, block: nsc.Block, seed: int = 0, lines: StopLines | None = None
             ) -> concurrent.futures.Future:
    """Queues ``block``; the future's result is its ``EvalResult``, stopped at a rung of
    ``lines`` where it scores below the line."""

  @abc.abstractmethod
  def utilisation(self) -> float:
    """Fraction of the workers' time spent evaluating candidates."""

  @abc.abstractmethod
  def close(self) -> None:
    """Stops the workers after the queued candidates are done."""

  def map(self, blocks: Iterable[nsc.Block], seeds: Iterable[int] | None = None
          ) -> list[EvalResult]:
    """Submits a batch and waits for all of it."""
    blocks = list(blocks)
    seeds = list(seeds) if seeds is not None else [0] * len(blocks)
    futures = [self.submit(b, s) for b, s in zip(blocks, seeds)]
    return [f.result() for f in futures]

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
