"""What plugs the final network into the one training engine: the optimiser, its schedule,
the step's options, and the programs compiled once per network and training config."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
import optax

from blockqnn_jax.models import networks
from blockqnn_jax.settings.final import FinalTrainConfig
from blockqnn_jax.training import engine


def learning_rate_schedule(config: FinalTrainConfig, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up over ``warmup_epochs`` then cosine decay to 0 at step ``epochs * steps``.

  Args:
    config: the training config.
    steps_per_epoch: optimiser steps per epoch.

  Returns:
    step (int, counted from 0) -> learning rate.
  """
  total = config.epochs * steps_per_epoch
  warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total - 1)
  return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total, 0.0)


def final_optimizer(config: FinalTrainConfig, steps_per_epoch: int
                    ) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum, the warm-up + cosine schedule and L2 decay of the conv and
  dense kernels: ``engine.make_optimizer('sgd', ...)``, whose chain (decay, then SGD) is the
  one every checkpoint's ``opt_state`` was saved with."""
  return engine.make_optimizer('sgd', learning_rate_schedule(config, steps_per_epoch),
                               momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay)


def final_step(model: networks.BlockNet, config: FinalTrainConfig, steps_per_epoch: int
               ) -> tuple[optax.GradientTransformation, engine.StepOptions, Callable]:
  """``engine.fit_step`` with the final network's model, optimiser and options bound.

  Returns:
    ``(tx, options, step)``: the optimiser, the augmentation and loss options, and
    ``step(state, pixels, labels, mean, std) -> (state, (loss, accuracy))`` on batches
    already augmented (``engine.epoch_batches`` with ``options``).
  """
  tx = final_optimizer(config, steps_per_epoch)
  options = engine.StepOptions(augment=config.augment, crop_padding=config.crop_padding,
                               label_smoothing=config.label_smoothing)

  def step(state, pixels, labels, mean, std):
    return engine.fit_step(state, pixels, labels, mean, std, model=model, tx=tx,
                           options=options)

  return tx, options, step


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted programs of one network under one training config.

  Attributes:
    init: ``key -> engine.TrainState`` at step 0.
    epoch: ``(state, epoch_key, images (N, H, W, C) uint8, labels (N,) int32, mean (C,),
      std (C,)) -> (state, metrics)``: one epoch (``engine.train_epoch``); metrics ``loss``
      and ``accuracy`` are means over the epoch's batches (augmented, in training mode),
      ``learning_rate`` that of the epoch's last step, ``()`` float32 each.
    evaluate: ``(params, batch_stats, images, labels, mean, std) -> (accuracy, loss)``,
      ``()`` float32, every image of the split once (``engine.evaluate``).
  """

  init: Callable
  epoch: Callable
  evaluate: Callable


@functools.lru_cache(maxsize=4)
def compile_programs(model: networks.BlockNet, config: FinalTrainConfig,
                     image_shape: tuple[int, int, int], steps_per_epoch: int) -> Programs:
  """The programs of ``model`` trained under ``config``, jitted once per process for each
  (model, config, shape): a second run of the same network (a resume) reuses them.

  Args:
    model: the network (hashable).
    config: the training config (hashable).
    image_shape: ``(H, W, C)`` of an input image.
    steps_per_epoch: optimiser steps per epoch (the schedule's unit).
  """
  tx, options, step = final_step(model, config, steps_per_epoch)
  schedule = learning_rate_schedule(config, steps_per_epoch)

  def init(key):
    return engine.init_state(key, model, tx, image_shape)

  def epoch(state, key, images, labels, mean, std):
    state, (loss, accuracy) = engine.train_epoch(state, key, images, labels, mean, std,
                                                 step=step, batch_size=config.batch_size,
                                                 options=options)
    return state, {'loss': loss, 'accuracy': accuracy,
                   'learning_rate': schedule(state.step - 1)}

  evaluate = functools.partial(engine.evaluate, model=model, batch_size=config.eval_batch_size)
  # No donation: an interrupt between epochs must find the previous state intact to save it.
  return Programs(jax.jit(init), jax.jit(epoch), jax.jit(evaluate))


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
