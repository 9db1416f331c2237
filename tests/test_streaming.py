"""Streamed candidate evaluation (ImageNet-sized data): held-out validation from the
training split, training on host batches, failures as results, the executor on streams."""

import math
from pathlib import Path
import threading

import jax
import ml_collections
import numpy as np
import pytest

from blockqnn_jax.data import splits
from blockqnn_jax.data import stream as stream_lib
from blockqnn_jax.executors import local as local_executor
from blockqnn_jax.models import architecture
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.strategies.rungs import StopLines
from blockqnn_jax.training import streamed as streaming

SMALL = nsc.parse('1,1,3,0,0 2,7,0,0,0')


def _digits_folder(root: Path, per_class=40, classes=(0, 1, 7)) -> Path:
  """Real 8x8 digits as PNGs of mixed sizes in ``{train,test}/<digit>/``."""
  from PIL import Image
  from sklearn.datasets import load_digits
  digits = load_digits()
  for split, offset in (('train', 0), ('test', per_class)):
    for c in classes:
      folder = root / split / str(c)
      folder.mkdir(parents=True)
      images = digits.images[digits.target == c][offset:offset + per_class]
      for i, image in enumerate(images):
        pixels = np.repeat((image * 255 / 16).astype(np.uint8)[..., None], 3, -1)
        side = 16 + 4 * (i % 3)  # mixed sizes: the stream resizes and crops
        Image.fromarray(pixels).resize((side, side + 4)).save(folder / f'{i:03d}.png')
  return root


@pytest.fixture(scope='module')
def stream(tmp_path_factory):
  root = _digits_folder(tmp_path_factory.mktemp('digits_folder'))
  return stream_lib.StreamData('image_folder', path=str(root), image_size=16,
                               validation_size=30, seed=0, decode_threads=2).open()


def _config(**train):
  config = ml_collections.ConfigDict()
  config.train = dict(dict(epochs=4, batch_size=30, eval_batch_size=16, learning_rate=3e-3),
                      **train)
  config.reward = dict(mu=0.01, rho=0.02)
  config.network = dict(kind='cifar', num_blocks=1, features=8, num_classes=3, image_size=16)
  return config


def _trainer(stream, config, devices=None):
  s = SearchSettings.from_config(config)
  return streaming.StreamingTrainer(stream, devices or jax.local_devices()[:1], s.train,
                                    s.reward, s.network)


def test_validation_is_held_out_of_the_training_split(stream, tmp_path):
  assert stream.num_classes == 3 and stream.image_shape == (16, 16, 3)
  train, val = set(stream.train_indices), set(stream.val_indices)
  assert len(val) == 30 and len(train) == 90 and not train & val  # 120 training images
  again = stream_lib.StreamData('image_folder', path=stream.data.path, image_size=16,
                                validation_size=30, seed=0).open()
  np.testing.assert_array_equal(again.val_indices, stream.val_indices)  # fixed by the seed
  other = stream_lib.StreamData('image_folder', path=stream.data.path, image_size=16,
                                validation_size=30, seed=1).open()
  assert set(other.val_indices) != val
  batches = list(stream.batches('val', 16))
  assert [len(b[1]) for b in batches] == [16, 14]  # every held-out image once, in order
  with pytest.raises(splits.DataError, match='no images|cannot|not found|exist'):
    stream_lib.StreamData('image_folder', path=str(tmp_path / 'missing')).open()


@pytest.mark.slow
def test_a_block_trains_on_streamed_batches(stream):
  config = _config()
  result = _trainer(stream, config).evaluate(SMALL, seed=0)
  assert result.ok, result.failure_reason
  # It learned: three classes start at a loss of ln 3 = 1.10.
  assert result.final_loss < 0.9 and result.val_accuracy > 0.5, result
  assert result.images_per_s > 0 and result.compile_s > 0 and result.train_s > 0
  spec = architecture.spec_for(SMALL, 'cifar', 1, 8, 3, (16, 16, 3))
  from blockqnn_jax.models import cost
  assert result.params == cost.network_params(spec)


@pytest.mark.slow
def test_divergence_in_a_stream_is_a_failed_result(stream):
  # Adam steps of 1e38 overflow float32 within the first epoch (1e30 only reaches 1e29).
  result = _trainer(stream, _config(learning_rate=1e38, epochs=1, batch_size=10)
                    ).evaluate(SMALL)
  assert result.status == 'failed'
  assert result.failure_reason.startswith('diverged: training loss is nan in epoch 1')


@pytest.mark.slow
def test_executor_streams_to_each_group_and_data_parallel(stream):
  config = _config(epochs=1)
  blocks = [SMALL, nsc.parse('1,1,1,0,0 2,4,0,0,0 3,5,0,1,2 4,7,0,0,0')]
  with local_executor.LocalExecutor(stream, SearchSettings.from_config(config),
                                    jax.local_devices()[:2]) as executor:
    results = executor.map(blocks, seeds=[0, 1])
  assert all(r.ok for r in results), [r.failure_reason for r in results]
  one = _trainer(stream, config).evaluate(SMALL, seed=5)
  two = _trainer(stream, config, jax.local_devices()[:2]).evaluate(SMALL, seed=5)
  assert two.ok and two.device == 'cpu:0,cpu:1'
  np.testing.assert_allclose(two.final_loss, one.final_loss, rtol=2e-3)


@pytest.mark.slow
def test_imagenet_through_tfds_streams(tmp_path):
  """The real TFDS code path for ImageNet, on TFDS's mock data."""
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=24):
    opened = stream_lib.StreamData('tfds', name='imagenet2012', image_size=32,
                                   validation_size=8, seed=0, decode_threads=2).open()
    assert opened.num_classes == 1000
    config = _config(epochs=1, batch_size=8, eval_batch_size=8)
    config.network = dict(kind='imagenet', num_blocks=1, features=4, num_classes=1000,
                          image_size=32)
    result = _trainer(opened, config).evaluate(SMALL)
  assert result.ok, result.failure_reason
  assert 0 <= result.val_accuracy <= 1


@pytest.mark.slow
def test_the_imagenet_search_command_streams(stream, tmp_path):
  """configs/imagenet.py:smoke through experiments.search, on a folder of images."""
  import os
  import subprocess
  import sys

  from blockqnn_jax.storage import store as store_lib
  command = [sys.executable, '-m', 'experiments.search', '--config=configs/imagenet.py:smoke',
             f'--workdir={tmp_path}', f'--config.data.path={stream.data.path}',
             '--config.data.validation_size=30', '--config.network.num_classes=3',
             '--config.search.blocks_per_iteration=2', '--config.train.epochs=1',
             '--config.train.batch_size=30', '--max_iterations=1', '--noprogress']
  out = subprocess.run(command, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'candidates 2' in out.stdout and 'streamed' in out.stderr
  store = store_lib.ResultsStore(tmp_path)
  assert store.count("WHERE status = 'ok'") >= 1
  store.close()


@pytest.mark.slow
def test_real_jpegs_stream_from_the_cifar10_tar(shared_data):
  opened = stream_lib.StreamData('image_folder', path=str(shared_data / 'cifar10-jpeg-full.tar'),
                                 image_size=32, validation_size=200, max_train=400, seed=0,
                                 decode_threads=2).open()
  assert opened.num_classes == 10 and len(opened.train_indices) == 400
  config = _config(epochs=1, batch_size=50, eval_batch_size=100)
  config.network = dict(kind='cifar', num_blocks=1, features=8, num_classes=10, image_size=32)
  result = _trainer(opened, config).evaluate(SMALL)
  assert result.ok, result.failure_reason
  assert 0 <= result.val_accuracy <= 1 and result.images_per_s > 0


@pytest.mark.slow
def test_a_streamed_candidate_stops_at_a_rung_and_its_stream_stops_decoding(stream):
  trainer = _trainer(stream, _config(epochs=3))
  scored = trainer.evaluate(SMALL, seed=0, lines=StopLines((1, 2), (-math.inf, -math.inf)))
  threads = threading.active_count()
  stopped = trainer.evaluate(SMALL, seed=0, lines=StopLines((1, 2), (math.inf, -math.inf)))
  assert scored.ok and not scored.stopped and sorted(scored.rung_scores) == [1, 2]
  assert stopped.stopped_at == 1 and stopped.reward == scored.rung_scores[1]
  assert threading.active_count() <= threads  # the stopped stream's decoder has finished
