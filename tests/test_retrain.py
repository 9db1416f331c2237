"""Retraining the final network: end to end, resume, refused config changes, TensorBoard logs,
and the block taken from a search workdir.

Every training run here uses one tiny network (N = 1, F = 4, one 3x3 conv block) on 300 digits,
so ``train_epoch`` compiles once per process and later runs reuse it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from blockqnn_jax.models import architecture, cost
from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.final import FinalSettings
from blockqnn_jax.storage import store
from blockqnn_jax.storage.results import EvalResult
from blockqnn_jax.training.final import block_choice, driver
from blockqnn_jax.settings.base import ConfigMismatch
from blockqnn_jax.training.final import workdir as workdir_lib
from configs import cifar_final

REPO = Path(__file__).resolve().parents[1]
SMALL = '1,1,3,0,0 2,7,0,0,0'
OTHER = '1,1,1,0,0 2,7,0,0,0'
EPOCHS = 2
NUM_TRAIN, BATCH = 240, 32  # 300 digits minus 60 for validation


def _fake_search(root: Path, lines: list[str] | None = None,
                 rows: list[tuple[str, str, float | None]] | None = None) -> Path:
  """A search workdir with ``report/top_blocks.txt`` lines and/or results-store rows
  ``(nsc, status, reward)`` (None: no reward), recorded in order."""
  root.mkdir(parents=True, exist_ok=True)
  if lines is not None:
    (root / 'report').mkdir(exist_ok=True)
    (root / 'report' / 'top_blocks.txt').write_text('\n'.join(lines) + '\n')
  if rows is not None:
    with store.ResultsStore(root) as results_store:
      for position, (text, status, reward) in enumerate(rows):
        key = canonical.canonical_key(nsc.Block.parse(text))
        result = EvalResult(block=text, canonical_key=key, status=status,
                            reward=math.nan if reward is None else reward)
        results_store.record(0, position, 1.0, result, cached=False)
  return root


def _tiny_config(search_workdir: Path):
  """The smoke preset cut down, its block read from a (fake) search's report."""
  config = cifar_final.get_config('smoke')
  config.block = ''
  config.search_workdir = str(search_workdir)
  config.network.features = 4
  config.data.max_train = 300
  config.data.validation_size = 60
  # checkpoint_every 2: a run cut after epoch 1 must still leave a checkpoint of epoch 1.
  config.train.update(epochs=EPOCHS, batch_size=BATCH, eval_batch_size=64, warmup_epochs=1.0,
                      checkpoint_every_epochs=2)
  return config


def _settings(config) -> FinalSettings:
  """The typed settings of a config, as the entry point builds them."""
  return FinalSettings.from_config(config)


@pytest.fixture(scope='module')
def search_dir(tmp_path_factory) -> Path:
  return _fake_search(tmp_path_factory.mktemp('search'),
                      lines=['rank  reward  nsc', f'1  0.912  {SMALL}', f'2  0.900  {OTHER}'])


@pytest.fixture(scope='module')
def finished(tmp_path_factory, search_dir):
  """One uninterrupted run: (workdir, returned summary, epochs reported to the callback)."""
  workdir = tmp_path_factory.mktemp('finished')
  epochs = []
  summary = driver.train_and_evaluate(_settings(_tiny_config(search_dir)), workdir,
                                      on_epoch_end=lambda e, m: epochs.append(e))
  return workdir, summary, epochs


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
  """Scalar events of every event file in ``logdir``, parsed from the TFRecord framing
  (``uint64 length, uint32 crc, payload, uint32 crc``) with tensorboardX's protos."""
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(logdir.glob('events.out.tfevents.*')):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def _assert_trees_equal(a, b):
  leaves_a, leaves_b = (jax.tree_util.tree_leaves_with_path(t) for t in (a, b))
  assert [path for path, _ in leaves_a] == [path for path, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_runs_end_to_end_and_writes_final_json(finished):
  workdir, summary, epochs = finished
  final = json.loads((workdir / 'final.json').read_text())
  assert final == json.loads(json.dumps(summary.to_dict()))
  assert epochs == [1, 2] and final['complete'] and final['resumed_from_epoch'] == 0
  assert final['epochs'] == EPOCHS and final['steps'] == EPOCHS * (NUM_TRAIN // BATCH)
  for key in ('test_accuracy', 'val_accuracy', 'final_train_accuracy'):
    assert 0.0 <= final[key] <= 1.0, key
  assert np.isfinite(final['test_loss']) and final['num_test'] == 359  # the digits test split
  assert (final['num_train'], final['num_val']) == (NUM_TRAIN, 60)
  # The block came from the search's report, rank 1.
  assert final['block'] == SMALL and 'top_blocks.txt' in final['block_source']
  spec = architecture.spec_for(nsc.Block.parse(SMALL), 'cifar', 1, 4, 10, (8, 8, 1))
  assert final['params'] == cost.network_params(spec)
  assert final['flops'] == cost.network_flops(spec) > 0
  assert final['wall_s'] >= final['train_s'] > 0
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2']


@pytest.mark.slow
def test_tensorboard_has_the_scalars(finished):
  workdir, summary, _ = finished
  scalars = _scalars(workdir / 'tensorboard')
  for tag in ('train/loss', 'train/accuracy', 'train/learning_rate', 'val/accuracy'):
    assert [step for step, _ in scalars[tag]] == [1, 2], tag
  assert scalars['test/final_accuracy'] == [(2, pytest.approx(summary.test_accuracy))]
  lrs = [lr for _, lr in scalars['train/learning_rate']]
  assert lrs[0] > lrs[1] >= 0  # cosine decay after the 1-epoch warm-up


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint(finished, search_dir, tmp_path):
  finished_dir, finished_summary, _ = finished
  config = _tiny_config(search_dir)
  first = driver.train_and_evaluate(_settings(config), tmp_path, max_epochs_this_run=1)
  assert not first.complete and first.epochs == 1
  assert not (tmp_path / 'final.json').exists()
  saved = workdir_lib.restore_checkpoint(tmp_path)
  assert saved['epoch'] == 1 and int(saved['state']['step']) == NUM_TRAIN // BATCH

  epochs = []
  second = driver.train_and_evaluate(_settings(config), tmp_path,
                                     on_epoch_end=lambda e, m: epochs.append(e))
  assert epochs == [2]  # only the missing epoch ran
  assert second.complete and second.resumed_from_epoch == 1
  # Restored state and key equal the saved ones: 1 + 1 epochs end exactly where 2 did.
  _assert_trees_equal(workdir_lib.restore_checkpoint(tmp_path)['state'],
                      workdir_lib.restore_checkpoint(finished_dir)['state'])
  assert second.test_accuracy == finished_summary.test_accuracy
  # A finished workdir trains nothing more: it only re-evaluates.
  again = driver.train_and_evaluate(_settings(config), tmp_path,
                                    on_epoch_end=lambda e, m: epochs.append(e))
  assert epochs == [2] and again.test_accuracy == second.test_accuracy
  assert again.final_train_loss == second.final_train_loss


@pytest.mark.slow
def test_changed_config_on_a_workdir_is_refused(finished, search_dir, tmp_path):
  workdir = finished[0]
  config = _tiny_config(search_dir)
  config.train.learning_rate = 0.2
  with pytest.raises(ConfigMismatch, match=r'train\.learning_rate.*allow_config_change'):
    driver.train_and_evaluate(_settings(config), workdir)
  # A search that moved on (another best block) is a different run too.
  moved = _fake_search(tmp_path / 'moved', lines=[f'1 0.95 {OTHER}'])
  with pytest.raises(ConfigMismatch, match='block'):
    driver.train_and_evaluate(_settings(_tiny_config(moved)), workdir)
  # Bookkeeping keys may change; allow_config_change accepts anything (on a copy of the record).
  copy = tmp_path / 'copy'
  copy.mkdir()
  (copy / 'config.json').write_text((workdir / 'config.json').read_text())
  block = nsc.Block.parse(SMALL)
  config = _tiny_config(search_dir)
  config.train.checkpoint_every_epochs = 1
  workdir_lib.check_workdir_config(copy, _settings(config), block)
  config.train.learning_rate = 0.2
  config.allow_config_change = True
  workdir_lib.check_workdir_config(copy, _settings(config), block)
  assert json.loads((copy / 'config.json').read_text())['config']['train']['learning_rate'] == 0.2


def test_block_from_report_or_database(tmp_path):
  config = cifar_final.get_config('smoke')
  config.block = ''
  report = _fake_search(tmp_path / 'report', lines=[
      '# best blocks', 'rank\treward\tnsc', f'1\t0.93\t{SMALL}', f'2\t0.92\t{SMALL}',
      f'3\t0.91\t{OTHER}'])
  config.search_workdir = str(report)
  assert block_choice.resolve_block(_settings(config))[0].to_text() == SMALL
  config.rank = 2  # the second *distinct* block
  block, source = block_choice.resolve_block(_settings(config))
  assert block.to_text() == OTHER and 'rank 2' in source
  config.rank = 3
  with pytest.raises(block_choice.BlockNotFound, match='2 distinct'):
    block_choice.resolve_block(_settings(config))

  db = _fake_search(tmp_path / 'db', rows=[
      (OTHER, 'failed', 0.99), (SMALL, 'ok', 0.5), (OTHER, 'ok', 0.7), (SMALL, 'ok', None)])
  config.search_workdir, config.rank = str(db), 1
  block, source = block_choice.resolve_block(_settings(config))
  assert block.to_text() == OTHER and source.startswith(str(db / 'search.sqlite'))
  config.rank = 2
  assert block_choice.resolve_block(_settings(config))[0].to_text() == SMALL

  config.search_workdir = str(tmp_path / 'empty')
  with pytest.raises(block_choice.BlockNotFound, match='neither'):
    block_choice.resolve_block(_settings(config))
  config.block = SMALL  # both set: ambiguous
  with pytest.raises(block_choice.BlockNotFound, match='both'):
    block_choice.resolve_block(_settings(config))
  config.search_workdir = ''
  assert block_choice.resolve_block(_settings(config)) == (nsc.Block.parse(SMALL), 'config')


@pytest.mark.slow
def test_a_block_with_a_kernel_outside_the_default_space_is_retrained(tmp_path):
  """A search run with ``--config.space.conv_kernels=1,3,5,7`` finds 7x7 convs; retraining
  checks structure only, so it takes the block from the store and trains it."""
  wide = '1,1,7,0,0 2,7,0,0,0'
  with pytest.raises(nsc.NSCError):  # not in the default grammar's kernels (1, 3, 5)...
    nsc.validate(nsc.Block.parse(wide), nsc.Grammar())
  nsc.validate(nsc.Block.parse(wide), nsc.Grammar(conv_kernels=(1, 3, 5, 7)))  # ...in the search's
  search = _fake_search(tmp_path / 'search', rows=[(SMALL, 'ok', 0.5), (wide, 'ok', 0.8)])
  config = _tiny_config(search)
  block, source = block_choice.resolve_block(_settings(config))
  assert block.to_text() == wide and 'rank 1' in source
  result = driver.train_and_evaluate(_settings(config), tmp_path / 'final',
                                     max_epochs_this_run=1)
  assert result.block == wide and result.epochs == 1 and not result.complete
  spec = architecture.spec_for(block, 'cifar', 1, 4, 10, (8, 8, 1))
  assert result.params == cost.network_params(spec)
  saved = workdir_lib.restore_checkpoint(tmp_path / 'final')
  assert saved['epoch'] == 1 and int(saved['state']['step']) == NUM_TRAIN // BATCH


@pytest.mark.slow
def test_the_cli_continues_an_interrupted_run(search_dir, tmp_path):
  """The entry point resumes what the library started (same config through the flags)."""
  config = _tiny_config(search_dir)
  driver.train_and_evaluate(_settings(config), tmp_path, max_epochs_this_run=1)
  command = [sys.executable, '-m', 'experiments.train', '--config=configs/cifar_final.py:smoke',
             f'--workdir={tmp_path}', '--config.block=', f'--config.search_workdir={search_dir}',
             '--config.network.features=4', '--config.data.max_train=300',
             '--config.data.validation_size=60', f'--config.train.epochs={EPOCHS}',
             f'--config.train.batch_size={BATCH}', '--config.train.eval_batch_size=64',
             '--config.train.warmup_epochs=1.0', '--config.train.checkpoint_every_epochs=2']
  out = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'test accuracy' in out.stdout and 'resumed from the epoch-1 checkpoint' in out.stderr
  final = json.loads((tmp_path / 'final.json').read_text())
  assert final['resumed_from_epoch'] == 1 and final['epochs'] == EPOCHS
