"""On-device augmentation and normalisation of a batch: pure, jittable JAX functions.

The train step applies these to each batch it takes from ``ImageSplits`` (or a stream), so the
host never makes float copies: pixels stay uint8 ``(B, H, W, C)`` through cropping and
flipping, and only ``normalize`` turns them into float32. ``mean`` and ``std`` are per channel
in pixel units (0..255), e.g. ``ImageSplits.mean`` / ``ImageSplits.std``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def normalize(images: jnp.ndarray, mean: Any, std: Any) -> jnp.ndarray:
  """``(images - mean) / std`` in float32.

  Args:
    images: ``(..., C)`` pixels, any dtype (uint8 0..255 normally).
    mean: ``(C,)`` per-channel mean in pixel units.
    std: ``(C,)`` per-channel std in pixel units.

  Returns:
    float32, the shape of ``images``.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def random_crop(key: jax.Array, images: jnp.ndarray, pad: int,
                mode: str = 'reflect') -> jnp.ndarray:
  """Pads each image by ``pad`` pixels on every side and crops a random ``H x W`` window.

  Args:
    key: PRNG key.
    images: ``(B, H, W, C)``, any dtype.
    pad: padding in pixels (static); 0 returns ``images``.
    mode: ``'reflect'`` (mirror, edge not repeated) or ``'constant'`` (pixel value 0).

  Returns:
    ``(B, H, W, C)``, the dtype of ``images``; image b is the window of its padded copy at
    offset ``(dy_b, dx_b)``, each uniform in ``0 .. 2 * pad``.
  """
  if pad == 0:
    return images
  b, h, w, c = images.shape
  if mode not in ('reflect', 'constant'):
    raise ValueError(f"padding mode must be 'reflect' or 'constant', got {mode!r}")
  if mode == 'reflect' and pad >= min(h, w):
    raise ValueError(f'reflect padding of {pad} needs images larger than {pad} pixels, '
                     f'got {h}x{w}')
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
  offsets = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)
  crop = lambda image, off: jax.lax.dynamic_slice(image, (off[0], off[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jnp.ndarray) -> jnp.ndarray:
  """Mirrors each image left-right with probability 1/2.

  Args:
    key: PRNG key.
    images: ``(B, H, W, C)``.

  Returns:
    ``(B, H, W, C)``, same dtype.
  """
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def crop_and_flip(key: jax.Array, images: jnp.ndarray, *, pad: int = 4, flip: bool = True,
                  mode: str = 'reflect') -> jnp.ndarray:
  """The standard CIFAR augmentation of a batch, on its pixels: random crop, then flip.

  It depends on no network, so a search compiles it once for all its candidates
  (``training.engine.epoch_batches``); ``normalize`` then runs inside each network's step.

  Args:
    key: PRNG key; the same key gives the same crops and flips.
    images: ``(B, H, W, C)``, any dtype (uint8 normally: 4x less traffic than floats).
    pad: random-crop padding in pixels (static; 0: no crop).
    flip: random horizontal flip (static).
    mode: crop padding, ``'reflect'`` or ``'constant'`` (zero pixels).

  Returns:
    ``(B, H, W, C)``, the dtype of ``images``.
  """
  crop_key, flip_key = jax.random.split(key)
  images = random_crop(crop_key, images, pad, mode)
  if flip:
    images = random_flip(flip_key, images)
  return images


def augment(key: jax.Array, images: jnp.ndarray, mean: Any, std: Any, *, pad: int = 4,
            flip: bool = True, mode: str = 'reflect') -> jnp.ndarray:
  """``crop_and_flip`` then ``normalize``: the augmented float batch; pure and jittable.

  ``pad``, ``flip`` and ``mode`` are static (Python values), so under ``jit`` mark them
  static or close over them. With ``pad=0, flip=False`` this is ``normalize``.

  Args:
    key: PRNG key; the same key gives the same crops and flips.
    images: ``(B, H, W, C)`` uint8 (cropping and flipping run on uint8).
    mean: ``(C,)`` per-channel mean in pixel units (e.g. ``ImageSplits.mean``).
    std: ``(C,)`` per-channel std in pixel units.
    pad, flip, mode: as ``crop_and_flip``.

  Returns:
    ``(B, H, W, C)`` float32, normalised.
  """
  return normalize(crop_and_flip(key, images, pad=pad, flip=flip, mode=mode), mean, std)
