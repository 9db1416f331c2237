"""The devices one candidate runs on: a one-axis ('data') mesh, and the data placed there."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from blockqnn_jax.data import splits as splits_lib


@dataclasses.dataclass
class DeviceMesh:
  """The devices one candidate runs on, as a one-axis ('data') mesh."""

  devices: tuple[jax.Device, ...]
  mesh: Mesh

  @classmethod
  def of(cls, devices: Sequence[jax.Device]) -> 'DeviceMesh':
    devices = tuple(devices)
    return cls(devices, Mesh(np.asarray(devices), ('data',)))

  @property
  def name(self) -> str:
    return ','.join(f'{d.platform}:{d.id}' for d in self.devices)

  @property
  def platform(self) -> str:
    return self.devices[0].platform

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batched(self) -> NamedSharding:
    """Batches split over the devices."""
    return NamedSharding(self.mesh, P('data'))

  @property
  def batch_sharding(self) -> NamedSharding | None:
    return self.batched if len(self.devices) > 1 else None

  def abstract(self, shape, dtype, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding or self.replicated)


@dataclasses.dataclass
class DeviceGroup(DeviceMesh):
  """The devices one candidate runs on, with the data already placed there."""

  train_images: jax.Array
  train_labels: jax.Array
  val_images: jax.Array
  val_labels: jax.Array
  mean: jax.Array
  std: jax.Array
  num_classes: int

  @classmethod
  def place(cls, splits: splits_lib.ImageSplits, devices: Sequence[jax.Device]) -> 'DeviceGroup':
    """Copies the train and validation splits to ``devices`` (replicated on each)."""
    on = DeviceMesh.of(devices)
    put = lambda a: jax.device_put(a, on.replicated)
    mean, std = splits.channel_stats()
    return cls(on.devices, on.mesh, put(splits.train_images), put(splits.train_labels),
               put(splits.val_images), put(splits.val_labels),
               put(np.asarray(mean, np.float32)), put(np.asarray(std, np.float32)),
               splits.num_classes)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train_images.shape[1:])
