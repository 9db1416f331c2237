"""A candidate prepared once: validated, canonical, its network and its costs.

On its way from the agent to a reward a block needs its validity, its canonical form (the
key results and compiled programs are shared under), the network it is stacked into and
that network's costs. ``PreparedBlock.prepare`` works all of them out once into one frozen
value that training, the compile cache and the record read. Pure Python: no JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from blockqnn_jax.models import architecture, cost
from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings import search
from blockqnn_jax.settings.search import NetworkSettings
from blockqnn_jax.storage import results


def reward_cost_terms(block: nsc.Block, spec: architecture.NetworkSpec) -> tuple[int, int]:
  """(block FLOPs, reference FLOPs) at the first stage, as ``results.RewardConfig`` defines
  them: the block at width F and full resolution against one 3×3 conv F → F there."""
  stage = spec.shape.stages[0]
  f = spec.features
  flops = cost.block_flops(block, f, f, stage.height, stage.width)
  reference = 2 * 9 * f * f * stage.height * stage.width
  return flops, reference


@dataclasses.dataclass(frozen=True)
class PreparedBlock:
  """A block ready to train.

  Attributes:
    block: the block as sampled (its NSC text is what the record shows).
    canonical: its canonical form: equivalent blocks have the same one, so they build the
      same network and share compiled programs.
    key: the canonical key (``canonical.canonical_key``).
    spec: the network of the canonical block, shaped by the data.
    flops, reference_flops: the reward's FLOPs term (``reward_cost_terms``).
    density: the block's density (``nsc.Block.density``).
    params: trainable parameters of the whole network.
  """

  block: nsc.Block
  canonical: nsc.Block
  key: str
  spec: architecture.NetworkSpec
  flops: int
  reference_flops: int
  density: float
  params: int

  @classmethod
  def prepare(cls, block: nsc.Block, network: NetworkSettings, image_shape: Sequence[int],
              num_classes: int, grammar: nsc.Grammar | None = None) -> 'PreparedBlock':
    """Validates ``block`` (against ``grammar``, or structurally) and works out the rest.

    Raises:
      nsc.NSCError: the block is invalid.
    """
    if grammar is not None:
      nsc.validate(block, grammar)
    else:
      nsc.validate_structure(block)
    canonical_block = canonical.canonical_block(block)
    spec = architecture.spec_for(canonical_block, network.kind, network.num_blocks,
                                 network.features, num_classes, image_shape)
    flops, reference = reward_cost_terms(canonical_block, spec)
    # The key is the canonical block's text (canonical.canonical_key): not computed twice.
    return cls(block, canonical_block, canonical_block.to_text(), spec, int(flops),
               int(reference), float(block.density()), int(cost.network_params(spec)))

  def reward(self, accuracy: float, config: search.RewardConfig) -> float:
    return results.compute_reward(accuracy, self.flops, self.reference_flops, self.density,
                                  config)

  def result_fields(self) -> dict:
    """The record's fields this value knows (block, key and costs)."""
    return dict(block=self.block.to_text(), canonical_key=self.key, flops=self.flops,
                density=self.density, params=self.params)
