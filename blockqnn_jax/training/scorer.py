"""Scoring a candidate, whatever its data: what the on-device and the streamed trainer share.

``CandidateScorer`` prepares the block once, compiles or fetches its programs, trains
(the subclass's ``_train``), checks divergence (``engine.check_divergence``), validates,
computes the reward and returns one ``EvalResult``; a failure is a failed result.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from blockqnn_jax.models import networks
from blockqnn_jax.models.prepare import PreparedBlock
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.search import NetworkSettings, RewardConfig, TrainConfig
from blockqnn_jax.storage import results
from blockqnn_jax.storage.results import EvalResult
from blockqnn_jax.training import engine
from blockqnn_jax.training.compile_cache import CompileCache
from blockqnn_jax.training.devices import DeviceMesh


@dataclasses.dataclass(frozen=True)
class Trained:
  """What a trainer's ``train`` hands back to the shared scoring."""

  epoch_loss: np.ndarray  # (epochs,) mean training loss per epoch
  accuracy: float  # validation accuracy
  val_loss: float
  train_s: float
  eval_s: float
  images_per_s: float


class CandidateScorer:
  """Scores candidates on one device group: the part every kind of data shares.

  A subclass provides ``image_shape``, ``num_classes``, ``_compile(prepared)`` and
  ``_train(prepared, compiled, seed) -> Trained``; ``evaluate`` does the rest.
  """

  def __init__(self, group: DeviceMesh, train_config: TrainConfig, reward_config: RewardConfig,
               network: NetworkSettings, cache: CompileCache | None = None,
               grammar: nsc.Grammar | None = None):
    self.group = group
    self.train_config = train_config
    self.reward_config = reward_config
    self.network = network
    self.cache = cache if cache is not None else CompileCache()
    self.grammar = grammar
    self.dtype = engine.resolve_dtype(train_config.compute_dtype, group.platform)
    self.loop = engine.resolve_loop(train_config.loop, group.platform)
    self.compiler_options = engine.compiler_options(group.platform,
                                                    train_config.xla_cpu_fusion_emitters)

  image_shape: tuple[int, ...]
  num_classes: int

  def prepare(self, block: nsc.Block) -> PreparedBlock:
    """Validates ``block`` and works out its network and costs for this data."""
    # Without the search's grammar, the default one with room for the block's layers.
    grammar = self.grammar or nsc.Grammar(max_index=max(2, len(block.layers)))
    return PreparedBlock.prepare(block, self.network, self.image_shape, self.num_classes,
                                 grammar)

  def model(self, prepared: PreparedBlock) -> networks.BlockNet:
    return networks.build(prepared.spec, scan_blocks=self.network.scan_blocks,
                          dtype=self.dtype)

  def _cache_key(self, prepared: PreparedBlock) -> tuple:
    return (prepared.key, self.network, self.train_config, str(self.dtype), self.loop,
            self._data_shapes(), tuple(d.id for d in self.group.devices))

  def _data_shapes(self) -> tuple:
    raise NotImplementedError

  def compile(self, block: nsc.Block | PreparedBlock) -> tuple[Any, bool]:
    """Compiles (or fetches) the programs of ``block``'s canonical form: (programs, cached)."""
    prepared = block if isinstance(block, PreparedBlock) else self.prepare(block)
    return self.cache.get_or_compile(self._cache_key(prepared),
                                     lambda: self._compile(prepared))

  def _compile(self, prepared: PreparedBlock) -> Any:
    raise NotImplementedError

  def _train(self, prepared: PreparedBlock, compiled: Any, seed: int) -> Trained:
    raise NotImplementedError

  def evaluate(self, block: nsc.Block | PreparedBlock, seed: int = 0,
               compiled: tuple[Any, bool] | None = None) -> EvalResult:
    """Trains and validates ``block``; a failure comes back as a failed result, not raised.

    ``block`` may come prepared (``prepare``), and ``compiled`` is what ``compile(block)``
    returned, when the caller prepared and compiled ahead.
    """
    start = time.perf_counter()
    raw = block.block if isinstance(block, PreparedBlock) else block
    base = dict(block=raw.to_text() if isinstance(raw, nsc.Block) else str(raw),
                canonical_key='', device=self.group.name)
    try:
      prepared = block if isinstance(block, PreparedBlock) else self.prepare(block)
      base.update(prepared.result_fields())
      programs, cached = compiled if compiled is not None else self.compile(prepared)
      trained = self._train(prepared, programs, seed)
      engine.check_divergence(trained.epoch_loss, trained.val_loss, self.num_classes)
      return EvalResult(
          **base, status='ok', val_accuracy=trained.accuracy,
          reward=prepared.reward(trained.accuracy, self.reward_config),
          final_loss=float(trained.epoch_loss[-1]),
          compile_s=0.0 if cached else programs.compile_s, train_s=trained.train_s,
          eval_s=trained.eval_s, total_s=time.perf_counter() - start,
          images_per_s=trained.images_per_s, compile_cached=cached)
    except Exception as e:  # a failed candidate is a result; the search goes on
      return EvalResult(**base, status='failed', failure_reason=results.describe_failure(e),
                        total_s=time.perf_counter() - start)
