"""The one training engine: train state, train step, epoch loop, padded evaluation.

Everything that trains a network here — a search candidate held on the device, a streamed
candidate, the final retraining — calls these functions; they differ only in what they plug
in (the optimiser and its schedule, how the epoch keys are drawn, how batches arrive).
All functions are pure and jittable; the model and optimiser are closed over or passed as
static arguments by the caller.

Images are uint8 ``(B, H, W, C)`` on the device, so no input pipeline runs on the host. A step
is two halves: ``augment_batch`` (crop and flip; the same for every network) and ``fit_step``
(normalise, forward, backward, update; the network's own). ``epoch_batches`` makes a whole
epoch's augmented batches in one program that a search compiles once for all its candidates,
and ``fit_epoch`` scans the network's step over them. The epoch's batch order and per-step
keys come from one epoch key (``epoch_plan``), which is what makes the scanned epoch and the
per-step loop train the same network, and a resumed run draw what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from blockqnn_jax.data import augmentation
from blockqnn_jax.storage import results as results_lib

JAX_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def resolve_dtype(compute_dtype: str, platform: str) -> Any:
  """The computation dtype: 'auto' is bfloat16 off CPU, float32 on CPU."""
  if compute_dtype == 'auto':
    return jnp.float32 if platform == 'cpu' else jnp.bfloat16
  if compute_dtype not in JAX_DTYPES:
    raise ValueError(f"compute_dtype must be 'auto', 'float32' or 'bfloat16', got "
                     f'{compute_dtype!r}')
  return JAX_DTYPES[compute_dtype]


def resolve_loop(loop: str, platform: str) -> str:
  """'auto' is 'steps' on CPU (XLA:CPU runs a scanned step 9-20x slower than the same step
  dispatched alone, benchmarks/evaluate.py) and 'scan' on GPU/TPU."""
  if loop == 'auto':
    return 'steps' if platform == 'cpu' else 'scan'
  if loop not in ('scan', 'steps'):
    raise ValueError(f"train.loop must be 'auto', 'scan' or 'steps', got {loop!r}")
  return loop


def compiler_options(platform: str, xla_cpu_fusion_emitters: bool) -> dict[str, Any]:
  """The XLA options a candidate's programs compile with (``TrainConfig``'s field)."""
  if platform == 'cpu' and not xla_cpu_fusion_emitters:
    return {'xla_cpu_use_fusion_emitters': False}
  return {}


_unknown_options: set[str] = set()


def compile_lowered(lowered, options: dict[str, Any]):
  """``lowered.compile`` with ``options``; without those this XLA no longer knows (once
  logged), so a newer jaxlib still compiles, only slower."""
  options = {k: v for k, v in options.items() if k not in _unknown_options}
  if not options:
    return lowered.compile()
  try:
    return lowered.compile(compiler_options=options)
  except Exception as e:  # jax raises JaxRuntimeError (INVALID_ARGUMENT) for an unknown one
    unknown = [k for k in options if k in str(e) and 'No such compile option' in str(e)]
    if not unknown:
      raise
    logging.warning('XLA does not know the compile option(s) %s; compiling without',
                    unknown)
    _unknown_options.update(unknown)
    return compile_lowered(lowered, options)


def steps_per_epoch(batch_size: int, num_train: int) -> int:
  """Full batches per epoch (the remainder is left out of that epoch's shuffle)."""
  steps = num_train // batch_size
  if steps == 0:
    raise ValueError(f'batch_size {batch_size} exceeds the {num_train} training images')
  return steps


# -- the optimiser ---------------------------------------------------------------------------


def kernels_only(params: Any) -> Any:
  """A mask of the conv and dense kernels (not BatchNorm scales, not biases)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def make_optimizer(kind: str, schedule: optax.Schedule, *, b1: float = 0.9,
                   b2: float = 0.999, momentum: float = 0.9, nesterov: bool = False,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
  """The optimisers of this project.

  * 'adam': Adam, or AdamW with decoupled ``weight_decay`` (candidates, as in the paper);
  * 'sgd': SGD with (Nesterov) momentum and an L2 penalty on conv and dense kernels added
    to the gradient before momentum (the final network): decaying BatchNorm scales and
    biases only fights the normalisation.
  """
  if kind == 'adam':
    if weight_decay:
      return optax.adamw(schedule, b1, b2, weight_decay=weight_decay)
    return optax.adam(schedule, b1, b2)
  if kind == 'sgd':
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=kernels_only),
                       optax.sgd(schedule, momentum=momentum, nesterov=nesterov))
  raise ValueError(f"optimizer must be 'adam' or 'sgd', got {kind!r}")


# -- state and step --------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree (what a checkpoint saves).

  Attributes:
    step: ``()`` int32, optimiser steps taken.
    params: the model's ``params`` collection (float32).
    batch_stats: the model's BatchNorm running averages.
    opt_state: the optimiser's state.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def init_variables(key: jax.Array, model, image_shape: tuple[int, ...]) -> dict[str, Any]:
  """The model's ``params`` and ``batch_stats`` at step 0, without running the network on an
  input (``lazy_init``: only the initialisers run; the values are ``model.init``'s)."""
  return model.lazy_init(key, jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32),
                         train=False)


def init_state(key: jax.Array, model, tx: optax.GradientTransformation,
               image_shape: tuple[int, ...]) -> TrainState:
  """Initialises parameters, BatchNorm statistics and optimiser state (step 0)."""
  variables = init_variables(key, model, image_shape)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables['batch_stats'], opt_state=tx.init(params))


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What a step does to its batch and loss.

  Attributes:
    augment: random crop (reflect padding of ``crop_padding`` pixels) and horizontal flip.
    crop_padding: the crop's padding.
    label_smoothing: mass spread uniformly over the classes (0: plain cross-entropy).
  """

  augment: bool = True
  crop_padding: int = 4
  label_smoothing: float = 0.0


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Per-example cross-entropy ``(B,)`` of float32 logits ``(B, K)``, int labels ``(B,)``."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def augment_batch(key: jax.Array, images: jax.Array, options: StepOptions) -> jax.Array:
  """A batch's pixels as a step trains on them: randomly cropped and flipped when
  ``options.augment``, else unchanged (uint8 in, uint8 out)."""
  if not options.augment:
    return images
  return augmentation.crop_and_flip(key, images, pad=options.crop_padding)


def fit_step(state: TrainState, pixels: jax.Array, labels: jax.Array, mean: jax.Array,
             std: jax.Array, *, model, tx: optax.GradientTransformation,
             options: StepOptions) -> tuple[TrainState, tuple[jax.Array, jax.Array]]:
  """One optimiser step on one batch whose augmentation is done (``augment_batch``).

  Args:
    state: the current state.
    pixels: ``(B, H, W, C)`` uint8 batch, already cropped and flipped (normalised here).
    labels: ``(B,)`` int32.
    mean, std: ``(C,)`` per-channel train statistics, pixel units.
    model: the network.
    tx: the optimiser.
    options: the loss options (``label_smoothing``).

  Returns:
    ``(new state, (loss, accuracy))``: the batch's mean cross-entropy (without any L2
    term) and accuracy, ``()`` float32, measured before the update.
  """
  x = augmentation.normalize(pixels, mean, std)

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, x,
                                  train=True, mutable=['batch_stats'])
    loss = cross_entropy(logits, labels, options.label_smoothing).mean()
    return loss, (updates['batch_stats'], logits)

  (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)
  return new_state, (loss, (logits.argmax(-1) == labels).mean())


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array,
               mean: jax.Array, std: jax.Array, *, model, tx: optax.GradientTransformation,
               options: StepOptions) -> tuple[TrainState, tuple[jax.Array, jax.Array]]:
  """``augment_batch`` with ``key`` then ``fit_step``: one step on a raw uint8 batch."""
  return fit_step(state, augment_batch(key, images, options), labels, mean, std, model=model,
                  tx=tx, options=options)


# -- the epoch -------------------------------------------------------------------------------


def epoch_plan(key: jax.Array, num_train: int, batch_size: int
               ) -> tuple[jax.Array, jax.Array]:
  """An epoch's batches: ``(order (steps, batch_size) int32, step_keys (steps,))`` from one
  epoch key (a fresh permutation; the remainder is dropped, a different one each epoch)."""
  steps = steps_per_epoch(batch_size, num_train)
  perm_key, step_key = jax.random.split(key)
  order = jax.random.permutation(perm_key, num_train)[:steps * batch_size]
  return order.reshape(steps, batch_size), jax.random.split(step_key, steps)


def epoch_batches(key: jax.Array, images: jax.Array, labels: jax.Array, *, batch_size: int,
                  options: StepOptions, batch_sharding=None) -> tuple[jax.Array, jax.Array]:
  """An epoch's training batches, shuffled and augmented, from one epoch key.

  It reads no network, so a search compiles it once for every candidate (per data shape,
  batch and options); each candidate's own program is then only its steps (``fit_step``).
  Batch ``i`` is gathered by ``epoch_plan``'s order and augmented with its ``i``-th step key
  under ``lax.map`` (a loop: the RBG generator does not draw under ``vmap`` what it draws
  one call at a time), so the batches are exactly those a step gathering and augmenting its
  own batch would make.

  Args:
    key: the epoch's key.
    images: ``(N, H, W, C)`` uint8, the whole training split on the device.
    labels: ``(N,)`` int32.
    batch_size: images per step.
    options: the augmentation.
    batch_sharding: where a batch lives when the candidate spans several devices.

  Returns:
    ``(pixels (steps, B, H, W, C) uint8, labels (steps, B) int32)``.
  """
  order, step_keys = epoch_plan(key, images.shape[0], batch_size)

  def one(xs):
    index, step_key = xs
    batch = images[index]
    if batch_sharding is not None:
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return augment_batch(step_key, batch, options), labels[index]

  return jax.lax.map(one, (order, step_keys))


def step_loop(state: TrainState, batches: Iterable[tuple], step: Callable,
              steps_per_epoch: int,
              on_epoch: Callable[[list, TrainState], bool | None] | None = None
              ) -> tuple[TrainState, list]:
  """The one Python loop of compiled steps: ``state, loss = step(state, *args)`` for every
  ``args`` of ``batches``, dispatched without waiting for the device.

  Args:
    state: the state before the first step.
    batches: the steps' arguments after the state, in order (a generator may make each
      epoch's batches when it gets there).
    step: a compiled step returning ``(state, loss)``.
    steps_per_epoch: steps per epoch: each epoch's losses are averaged.
    on_epoch: called with the epochs' mean losses so far and the state after each epoch (a
      check that reads them waits for the device there; none waits only at the end); a
      true return stops the loop there (early stopping), leaving the rest of ``batches``
      unread.

  Returns:
    ``(state, epoch means)``: the means are ``()`` arrays, one per epoch run.
  """
  epoch_loss, losses = [], []
  for args in batches:
    state, loss = step(state, *args)
    losses.append(loss)
    if len(losses) == steps_per_epoch:
      epoch_loss.append(jnp.mean(jnp.stack(losses)))
      losses = []
      if on_epoch is not None and on_epoch(epoch_loss, state):
        break
  return state, epoch_loss


def fit_epoch(state: TrainState, pixels: jax.Array, labels: jax.Array, mean: jax.Array,
              std: jax.Array, *, step: Callable
              ) -> tuple[TrainState, tuple[jax.Array, jax.Array]]:
  """One epoch of prepared batches (``epoch_batches``) as one ``lax.scan`` of ``step``.

  Args:
    state: the state before the epoch.
    pixels: ``(steps, B, H, W, C)`` uint8 augmented batches.
    labels: ``(steps, B)`` int32.
    mean, std: ``(C,)`` per-channel train statistics.
    step: ``(state, pixels, labels, mean, std) -> (state, (loss, accuracy))``, e.g.
      ``fit_step`` with its model, optimiser and options bound.

  Returns:
    ``(state, (loss, accuracy))``: means over the epoch's batches, ``()`` float32.
  """

  def body(state, xs):
    return step(state, *xs, mean, std)

  state, (loss, accuracy) = jax.lax.scan(body, state, (pixels, labels))
  return state, (loss.mean(), accuracy.mean())


def train_epoch(state: TrainState, key: jax.Array, images: jax.Array, labels: jax.Array,
                mean: jax.Array, std: jax.Array, *, step: Callable, batch_size: int,
                options: StepOptions, batch_sharding=None
                ) -> tuple[TrainState, tuple[jax.Array, jax.Array]]:
  """``epoch_batches`` then ``fit_epoch``: one epoch of the whole split in one program.

  Args:
    state: the state before the epoch.
    key: the epoch's key (``epoch_plan``).
    images: ``(N, H, W, C)`` uint8, the whole training split on the device.
    labels: ``(N,)`` int32.
    mean, std: ``(C,)`` per-channel train statistics.
    step: as ``fit_epoch``'s.
    batch_size: images per step.
    options: the augmentation.
    batch_sharding: where a batch lives when the model spans several devices.

  Returns:
    ``(state, (loss, accuracy))``: means over the epoch's batches, ``()`` float32.
  """
  pixels, batch_labels = epoch_batches(key, images, labels, batch_size=batch_size,
                                       options=options, batch_sharding=batch_sharding)
  return fit_epoch(state, pixels, batch_labels, mean, std, step=step)


# -- divergence ------------------------------------------------------------------------------

# A training loss this many times chance level (ln K) has exploded, whether or not it is
# still finite: a learning rate of 1e30 gives losses near 1e30 and chance accuracy.
EXPLODED_LOSS_FACTOR = 100.0


def check_divergence(epoch_loss: Sequence[float], val_loss: float, num_classes: int,
                     first_epoch: int = 1) -> None:
  """Raises ``results.Diverged`` when a loss is not finite or has exploded past
  ``EXPLODED_LOSS_FACTOR`` times chance level: the one divergence check of every training
  (candidates on the device or streamed, the final network). ``epoch_loss[i]`` is the mean
  training loss of epoch ``first_epoch + i``."""
  limit = EXPLODED_LOSS_FACTOR * math.log(max(num_classes, 2))
  for epoch, loss in enumerate(np.asarray(epoch_loss, np.float64), first_epoch):
    if not math.isfinite(loss):
      raise results_lib.Diverged(f'diverged: training loss is {loss} in epoch {epoch}')
    if loss > limit:
      raise results_lib.Diverged(f'diverged: training loss {loss:.3g} in epoch {epoch} '
                                 f'exceeds {limit:.3g} ({EXPLODED_LOSS_FACTOR:g}x chance level)')
  if not math.isfinite(val_loss):
    raise results_lib.Diverged(f'diverged: validation loss is {val_loss}')


# -- evaluation ------------------------------------------------------------------------------


def eval_sums(params: Any, batch_stats: Any, images: jax.Array, labels: jax.Array,
              weights: jax.Array, mean: jax.Array, std: jax.Array, *, model
              ) -> tuple[jax.Array, jax.Array]:
  """Weighted correct count and summed cross-entropy of one batch, BatchNorm in inference
  mode; ``weights`` is 1 for a real image and 0 for padding."""
  logits = model.apply({'params': params, 'batch_stats': batch_stats},
                       augmentation.normalize(images, mean, std), train=False)
  correct = ((logits.argmax(-1) == labels) * weights).sum()
  return correct, (cross_entropy(logits, labels) * weights).sum()


def pad_to(num: int, batch_size: int) -> tuple[int, int]:
  """``(batch, num_batches)`` covering ``num`` images with equal batches of at most
  ``batch_size`` (the last one padded)."""
  if num == 0:
    raise ValueError('cannot evaluate an empty split')
  batch = min(batch_size, num)
  return batch, -(-num // batch)


def evaluate(params: Any, batch_stats: Any, images: jax.Array, labels: jax.Array,
             mean: jax.Array, std: jax.Array, *, model, batch_size: int
             ) -> tuple[jax.Array, jax.Array]:
  """Accuracy and mean loss over a whole split held on the device, every image once.

  The split is cut into ``ceil(N / batch)`` equal batches under ``lax.map``; the last one is
  padded and the padding masked out, so one program serves any split size.

  Returns:
    ``(accuracy, loss)``, ``()`` float32.
  """
  num = images.shape[0]
  batch, num_batches = pad_to(num, batch_size)
  pad = num_batches * batch - num
  shaped = lambda a: a.reshape((num_batches, batch) + a.shape[1:])
  xs = (shaped(jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))),
        shaped(jnp.pad(labels, (0, pad))),
        shaped(jnp.pad(jnp.ones((num,), jnp.float32), (0, pad))))
  correct, loss = jax.lax.map(
      lambda b: eval_sums(params, batch_stats, *b, mean, std, model=model), xs)
  return correct.sum() / num, loss.sum() / num
