"""The preflight: checks that a search can train a candidate before it starts.

``SearchSettings`` checks each field's own range; what it cannot know is whether the
settings fit the data and the machine. ``run(settings, data)`` checks that, against the
loaded data and the devices the candidates will train on:

* the batch fits the training split, and a validation split is left for the reward;
* ``executor.devices_per_candidate`` divides the devices and the batch;

then trains one small reference block (``REFERENCE_BLOCK``) for ``REFERENCE_BATCHES`` steps
on a slice of the real data, with the search's own training settings (compute dtype, loop,
PRNG, batch size, device group), and validates it. A config that cannot train any candidate
stops here with a ``PreflightError`` that names what is wrong and how to fix it, before a
workdir is made or anything is stored: otherwise every candidate of the search would fail
the same way, each after its own compilation, and the agent would learn reward 0 for hours.

It costs one small compilation and two steps: seconds on a CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from typing import Sequence

import jax

from blockqnn_jax.data import splits as splits_lib
from blockqnn_jax.data import stream
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.storage import results
from blockqnn_jax.storage.results import EvalResult
from blockqnn_jax.training import candidate as candidate_lib
from blockqnn_jax.training import devices as devices_lib
from blockqnn_jax.training import streamed

# One 3x3 convolution: the smallest block that trains, and one every grammar can express.
REFERENCE_BLOCK = '1,1,3,0,0 2,7,0,0,0'
# Training steps of the reference block: the first step compiles and runs, the second shows
# that the state the first one produced can be stepped again (donation, shardings).
REFERENCE_BATCHES = 2

# How to fix a failed reference block, by the kind of its failure (``results.failure_kind``).
_HINTS = {
    'out of memory': ('lower --config.train.batch_size, use more devices per candidate '
                      '(--config.executor.devices_per_candidate) or '
                      '--config.train.compute_dtype=bfloat16'),
    'diverged': 'lower --config.train.learning_rate',
    'invalid block': ('the search network does not fit these images: check '
                      '--config.network.kind, num_blocks and image_size against the data'),
}
_DEFAULT_HINT = 'fix the train, network or data setting it names'


class PreflightError(ValueError):
  """The settings cannot train a candidate on this data and these devices."""


@dataclasses.dataclass(frozen=True)
class Preflight:
  """What a passed preflight measured.

  Attributes:
    reference: the reference block's result (trained on ``REFERENCE_BATCHES`` batches).
    devices: the device group it trained on.
    seconds: the whole preflight, compilation included.
  """

  reference: EvalResult
  devices: str
  seconds: float


def _sizes(data: splits_lib.ImageSplits | stream.OpenStream) -> tuple[int, int]:
  """(training images, validation images) of in-memory splits or a stream."""
  if isinstance(data, stream.OpenStream):
    return len(data.train_indices), len(data.val_indices)
  return len(data.train_labels), len(data.val_labels)


def check_data(settings: SearchSettings,
               data: splits_lib.ImageSplits | stream.OpenStream) -> None:
  """Refuses a batch larger than the training split and an empty validation split."""
  num_train, num_val = _sizes(data)
  d, batch = settings.data, settings.train.batch_size
  where = (f'{data.name or d.source} (data.validation_size={d.validation_size:g} held out'
           f'{f", data.max_train={d.max_train}" if d.max_train else ""})')
  if batch > num_train:
    more = (' or raise --config.data.max_train' if d.max_train else '')
    raise PreflightError(
        f'train.batch_size={batch} is larger than the {num_train} training images of '
        f'{where}: no candidate could take one step; lower --config.train.batch_size to at '
        f'most {num_train}{more}')
  if num_val == 0:
    raise PreflightError(
        f'the validation split of {where} is empty, and the reward is measured on it: raise '
        '--config.data.validation_size')


def _worker_devices(settings: SearchSettings) -> int | None:
  """Devices of one Ray worker, where the settings say it (None where the cluster does)."""
  ray = settings.executor.ray
  if ray.gpus_per_worker >= 1:
    return int(ray.gpus_per_worker)
  if ray.gpus_per_worker > 0:  # a share of one GPU
    return 1
  if ray.gpus_per_worker == 0 or jax.default_backend() == 'cpu':
    return ray.cpu_devices_per_worker  # CPU workers get this many fake devices
  return None


def check_devices(settings: SearchSettings, devices: Sequence[jax.Device],
                  streaming: bool = False) -> None:
  """Refuses a ``devices_per_candidate`` that does not divide the devices or the batch, and
  a Ray executor without Ray."""
  per = settings.executor.devices_per_candidate
  if settings.executor.kind == 'ray':
    if importlib.util.find_spec('ray') is None:  # found without importing it (seconds)
      raise PreflightError('executor.kind=ray needs Ray, which is not installed: pip install '
                           '-e ".[distributed]", or use --config.executor.kind=local')
    count, what = _worker_devices(settings), 'devices of a Ray worker'
  else:
    count, what = len(devices), f'local {devices[0].platform} devices'
  if count is not None and count % per:
    fits = [k for k in range(1, count + 1) if count % k == 0]
    raise PreflightError(
        f'executor.devices_per_candidate={per} does not divide the {count} {what}: use one '
        f'of {", ".join(map(str, fits))} (--config.executor.devices_per_candidate=...)')
  for name in ('batch_size',) + (('eval_batch_size',) if streaming else ()):
    # A candidate's batch is split evenly over its devices (streamed validation batches too).
    size = getattr(settings.train, name)
    if size % per:
      raise PreflightError(
          f'train.{name}={size} cannot be split over executor.devices_per_candidate={per} '
          f'devices: make it a multiple of {per} (--config.train.{name}='
          f'{max(per, size // per * per)})')


def _slice(splits: splits_lib.ImageSplits, num_train: int, num_val: int
           ) -> splits_lib.ImageSplits:
  """The first images of the train and validation splits (no test split)."""
  return splits_lib.ImageSplits(
      splits.train_images[:num_train], splits.train_labels[:num_train],
      splits.val_images[:num_val], splits.val_labels[:num_val],
      splits.test_images[:0], splits.test_labels[:0], splits.num_classes,
      splits.class_names, splits.name)


def train_reference(settings: SearchSettings,
                    data: splits_lib.ImageSplits | stream.OpenStream,
                    devices: Sequence[jax.Device]) -> EvalResult:
  """Trains ``REFERENCE_BLOCK`` for one epoch of ``REFERENCE_BATCHES`` batches on a slice of
  ``data`` with the search's training settings; a failure is a failed result."""
  train = settings.train
  config = dataclasses.replace(train, epochs=1)
  num_train, num_val = REFERENCE_BATCHES * train.batch_size, train.eval_batch_size
  scoring = (config, settings.reward, settings.network)
  block = nsc.Block.parse(REFERENCE_BLOCK)
  try:
    if isinstance(data, stream.OpenStream):
      small = dataclasses.replace(data, train_indices=data.train_indices[:num_train],
                                  val_indices=data.val_indices[:num_val])
      trainer = streamed.StreamingTrainer(small, devices, *scoring)
    else:
      group = devices_lib.DeviceGroup.place(_slice(data, num_train, num_val), devices)
      trainer = candidate_lib.CandidateTrainer(group, *scoring)
  except Exception as e:  # placing the data or sizing the epoch: reported like a failure
    return EvalResult.failed(REFERENCE_BLOCK, results.describe_failure(e),
                             device=','.join(str(d) for d in devices))
  # No grammar: the reference checks the training, not the search space.
  return trainer.evaluate(block, seed=settings.seed)


def run(settings: SearchSettings, data: splits_lib.ImageSplits | stream.OpenStream,
        devices: Sequence[jax.Device] | None = None) -> Preflight:
  """Checks that ``settings`` can train a candidate on ``data`` and ``devices``.

  Args:
    settings: the search's settings.
    data: what ``data_lib.load_search_data`` loaded for them.
    devices: the devices of a local search (default: all local devices). A Ray search's
      reference block trains on this machine's first devices.

  Returns:
    What passed (the reference block's result, for the log).

  Raises:
    PreflightError: naming what does not fit, and how to fix it.
  """
  start = time.perf_counter()
  devices = list(devices or jax.local_devices())
  streaming = isinstance(data, stream.OpenStream)
  check_data(settings, data)
  check_devices(settings, devices, streaming)
  group = devices[:min(settings.executor.devices_per_candidate, len(devices))]
  result = train_reference(settings, data, group)
  if not result.ok:
    reason = result.failure_reason or f'status {result.status}, reward {result.reward}'
    kind = results.failure_kind(reason)
    hint = _HINTS.get(kind, _DEFAULT_HINT)
    raise PreflightError(
        f'the reference block {REFERENCE_BLOCK!r} cannot train with these settings on '
        f'{len(group)} {group[0].platform} device(s) ({reason}): {hint}. No candidate of '
        'the search would train either')
  return Preflight(result, ','.join(f'{d.platform}:{d.id}' for d in group),
                   time.perf_counter() - start)
