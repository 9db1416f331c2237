"""Scoring a candidate, whatever its data: what the on-device and the streamed trainer share.

``CandidateScorer`` prepares the block once, compiles or fetches its programs, trains
(the subclass's ``_train``), checks divergence (``engine.check_divergence``), validates,
computes the reward and returns one ``EvalResult``; a failure is a failed result.
``RungWatch`` is the early stopping both trainers run after each epoch: at a rung it
validates (the candidate's one evaluation program) and stops a candidate below the line.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np

from blockqnn_jax.models import networks
from blockqnn_jax.models.prepare import PreparedBlock
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.search import NetworkSettings, RewardConfig, TrainConfig
from blockqnn_jax.storage import results
from blockqnn_jax.storage.results import EvalResult
from blockqnn_jax.strategies.rungs import StopLines
from blockqnn_jax.training import engine
from blockqnn_jax.training.compile_cache import CompileCache
from blockqnn_jax.training.devices import DeviceMesh


@dataclasses.dataclass(frozen=True)
class Trained:
  """What a trainer's ``train`` hands back to the shared scoring."""

  epoch_loss: np.ndarray  # (epochs run,) mean training loss per epoch
  accuracy: float  # validation accuracy (at the rung where it stopped, if it did)
  val_loss: float
  train_s: float
  eval_s: float
  images_per_s: float
  rungs: dict[int, float] = dataclasses.field(default_factory=dict)  # epoch -> reward
  stopped_at: int = 0  # the rung at which it stopped; 0: trained to the end


class RungWatch:
  """Early stopping after each epoch (``engine.step_loop``'s ``on_epoch``): at a rung of
  ``lines`` it validates the state, scores it as the reward, and stops the training when the
  score is below the rung's line (``StopLines``).

  Args:
    lines: the trial's rungs and lines; None: no rungs (nothing validated, nothing stops).
    validate: ``state -> (accuracy, loss)`` on the held-out split.
    reward: ``accuracy -> reward`` of the candidate's block.
    num_classes: for the divergence check, run before validating at a rung (and after
      every epoch with ``check_every_epoch``, which reads the losses each epoch).
  """

  def __init__(self, lines: StopLines | None, validate: Callable[[Any], tuple[float, float]],
               reward: Callable[[float], float], num_classes: int,
               check_every_epoch: bool = False):
    self.lines = lines
    self.validate = validate
    self.reward = reward
    self.num_classes = num_classes
    self.check_every_epoch = check_every_epoch
    self.scores: dict[int, float] = {}
    self.stopped: tuple[int, float, float] | None = None  # (epoch, accuracy, loss)
    self.eval_s = 0.0

  def __call__(self, epoch_loss: list, state: engine.TrainState) -> bool:
    epoch = len(epoch_loss)
    at_rung = self.lines is not None and epoch in self.lines.rungs
    if not (at_rung or self.check_every_epoch):
      return False
    engine.check_divergence([float(x) for x in epoch_loss], 0.0, self.num_classes)
    if not at_rung:
      return False
    start = time.perf_counter()
    accuracy, loss = self.validate(state)
    self.eval_s += time.perf_counter() - start
    self.scores[epoch] = score = self.reward(accuracy)
    if self.lines.stops(epoch, score):
      self.stopped = (epoch, accuracy, loss)
      return True
    return False

  @property
  def stopped_at(self) -> int:
    return self.stopped[0] if self.stopped is not None else 0


class CandidateScorer:
  """Scores candidates on one device group: the part every kind of data shares.

  A subclass provides ``image_shape``, ``num_classes``, ``_compile(prepared)`` and
  ``_train(prepared, compiled, seed, lines) -> Trained`` (which stops at ``lines`` with a
  ``RungWatch``); ``evaluate`` does the rest.
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

  def _train(self, prepared: PreparedBlock, compiled: Any, seed: int,
             lines: StopLines | None) -> Trained:
    raise NotImplementedError

  def _watch(self, prepared: PreparedBlock, lines: StopLines | None,
             validate: Callable[[Any], tuple[float, float]], check_every_epoch: bool = False
             ) -> RungWatch:
    """The ``RungWatch`` of a training of ``prepared``, scoring with its reward."""
    return RungWatch(lines, validate,
                     lambda accuracy: prepared.reward(accuracy, self.reward_config),
                     self.num_classes, check_every_epoch)

  def evaluate(self, block: nsc.Block | PreparedBlock, seed: int = 0,
               compiled: tuple[Any, bool] | None = None,
               lines: StopLines | None = None) -> EvalResult:
    """Trains and validates ``block``; a failure comes back as a failed result, not raised.

    ``block`` may come prepared (``prepare``), and ``compiled`` is what ``compile(block)``
    returned, when the caller prepared and compiled ahead. ``lines``: the trial's early
    stopping (``search.early_stop``): it is scored at their rungs and stops below a line.
    """
    start = time.perf_counter()
    raw = block.block if isinstance(block, PreparedBlock) else block
    base = dict(block=raw.to_text() if isinstance(raw, nsc.Block) else str(raw),
                canonical_key='', device=self.group.name)
    try:
      prepared = block if isinstance(block, PreparedBlock) else self.prepare(block)
      base.update(prepared.result_fields())
      programs, cached = compiled if compiled is not None else self.compile(prepared)
      trained = self._train(prepared, programs, seed, lines)
      engine.check_divergence(trained.epoch_loss, trained.val_loss, self.num_classes)
      return EvalResult(
          **base, status='ok', val_accuracy=trained.accuracy,
          reward=prepared.reward(trained.accuracy, self.reward_config),
          final_loss=float(trained.epoch_loss[-1]),
          compile_s=0.0 if cached else programs.compile_s, train_s=trained.train_s,
          eval_s=trained.eval_s, total_s=time.perf_counter() - start,
          images_per_s=trained.images_per_s, compile_cached=cached,
          stopped_at=trained.stopped_at, rungs=results.encode_scores(trained.rungs))
    except Exception as e:  # a failed candidate is a result; the search goes on
      return EvalResult(**base, status='failed', failure_reason=results.describe_failure(e),
                        total_s=time.perf_counter() - start)
