"""Export of a found network: the standalone Flax and PyTorch files count the parameters ``cost``
counts and, with the converted weights, give the library network's logits, in a fresh
interpreter where blockqnn_jax cannot be imported; the command's bad input ends in one line,
exit status 2 and nothing written."""

import functools
import json
import os
from pathlib import Path
import subprocess
import sys

import jax
import numpy as np
import pytest

from blockqnn_jax.export import writer
from blockqnn_jax.models import architecture, cost, networks
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.search import loop as search_lib
from blockqnn_jax.settings.final import FinalSettings
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.training.final import driver
from blockqnn_jax.training.final import workdir as workdir_lib
from configs import cifar, cifar_final
from tests.test_search import ScoringExecutor

ROOT = Path(__file__).resolve().parents[1]

# Between them every layer type of the grammar: conv 1, 3 and 5; max and average pooling at
# 1 and 3; identity; add (with and without projections: operands of the input's width, which
# differs from F in a stage's first block, and of a concat's 2F); concat; two and four leaves.
BLOCKS = {
    'every_type': ('1,1,3,0,0 2,5,0,0,1 3,2,3,1,0 4,3,3,0,0 5,6,0,3,4 6,4,0,2,0 7,1,5,5,0 '
                   '8,7,0,0,0'),
    'wide_add': '1,1,1,0,0 2,6,0,0,1 3,1,3,0,0 4,5,0,2,3 5,2,1,4,0 6,3,1,2,0 7,7,0,0,0',
    'four_leaves': '1,1,1,0,0 2,2,3,0,0 3,3,3,0,0 4,4,0,0,0 5,7,0,0,0',
}
# (kind, N, F, image size, channels, classes, scan): the CIFAR network with its scanned
# layout unstacked, and the ImageNet one (stride-2 stem, stem pooling, odd resolutions).
NETWORKS = {
    'cifar': ('cifar', 2, 4, 12, 3, 10, True),
    'imagenet': ('imagenet', 1, 4, 19, 1, 7, False),
}

# Run in a fresh interpreter: blockqnn_jax is made unimportable, each exported folder's
# network.py imported on its own, its parameters counted and its logits on the saved batch
# compared with those the library gave.
_CHECK = r'''
import importlib.util, json, sys
sys.modules['blockqnn_jax'] = None  # the exported file must not need the package
import numpy as np
fmt, folders = sys.argv[1], sys.argv[2:]
out = {}
for folder in folders:
  spec = importlib.util.spec_from_file_location(f'm{len(out)}', f'{folder}/network.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  images = np.load(f'{folder}/images.npy')
  if fmt == 'flax':
    import jax
    net = module.Network()
    variables = module.load_variables()
    count = sum(x.size for x in jax.tree_util.tree_leaves(
        jax.eval_shape(net.init, jax.random.key(0), images)['params']))
    logits = np.asarray(jax.jit(net.apply)(variables, images))
  else:
    import torch
    net = module.Network()
    count = sum(p.numel() for p in net.parameters())
    net.load_state_dict(module.load_weights())
    with torch.no_grad():
      logits = net.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  diff = float(np.abs(logits - np.load(f'{folder}/logits.npy')).max())
  if hasattr(module, 'normalise'):  # pixels as the network reads them, as training did
    pixels = np.load(f'{folder}/pixels.npy')
    normalised = np.asarray(module.normalise(pixels if fmt == 'flax' else
                                             pixels.transpose(0, 3, 1, 2)))
    if fmt != 'flax':
      normalised = normalised.transpose(0, 2, 3, 1)
    diff = max(diff, float(np.abs(normalised - np.load(f'{folder}/normalised.npy')).max()))
  out[folder] = dict(params=int(count), max_diff=diff, imports=sorted(
      m for m, loaded in sys.modules.items() if m.startswith('blockqnn') and loaded))
print(json.dumps(out))
'''


def _trained_like(model, images):
  """Random variables of the model's shapes (positive variances): any misplaced or
  mis-laid-out one changes the logits, as it would a trained network's."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
  rng = np.random.default_rng(1)

  def draw(path, x):
    value = 0.3 * rng.standard_normal(x.shape, np.float32)
    return np.abs(value) + 0.5 if path[-1].key == 'var' else value
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """The blocks in the networks, exported as both formats with their weights and a batch."""
  root = tmp_path_factory.mktemp('exported')
  cases = {}
  pairs = [('every_type', 'cifar'), ('wide_add', 'cifar'), ('every_type', 'imagenet'),
           ('four_leaves', 'imagenet')]
  for name, net_name in pairs:
    text, net = BLOCKS[name], NETWORKS[net_name]
    kind, n, f, size, channels, classes, scan = net
    make = architecture.NETWORK_KINDS[kind]
    spec = make(nsc.parse(text), n, f, classes, size, channels)
    model = networks.build(spec, scan_blocks=scan)
    images = jax.random.normal(jax.random.key(2), (3, size, size, channels))
    variables = _trained_like(model, images)
    logits = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, images))
    pixels = np.arange(2 * size * size * channels, dtype=np.uint8).reshape(2, size, size,
                                                                           channels)
    mean = np.linspace(100, 130, channels, dtype=np.float32)
    std = np.linspace(50, 70, channels, dtype=np.float32)
    for fmt in writer.FORMATS:
      folder = root / fmt / f'{name}_{net_name}'
      writer.write(spec, folder, fmt, variables, source='a test', normalisation=(mean, std))
      np.save(folder / 'images.npy', np.asarray(images))
      np.save(folder / 'logits.npy', logits)
      np.save(folder / 'pixels.npy', pixels)
      np.save(folder / 'normalised.npy', (pixels - mean) / std)
    cases[f'{name}_{net_name}'] = cost.network_params(spec)
  return root, cases


def _check(fmt, folders):
  """``_CHECK``'s figures of each exported folder, by the folder's name."""
  out = subprocess.run([sys.executable, '-c', _CHECK, fmt, *map(str, folders)],
                       capture_output=True, text=True, timeout=600, cwd=folders[0],
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ''})
  assert out.returncode == 0, out.stderr[-3000:]
  return {Path(k).name: v for k, v in json.loads(out.stdout.splitlines()[-1]).items()}


@pytest.mark.slow
@pytest.mark.parametrize('fmt, tolerance', [('flax', 1e-5), ('pytorch', 1e-4)])
def test_the_file_is_the_library_network(fmt, tolerance, exported):
  if fmt == 'pytorch':
    pytest.importorskip('torch', reason='PyTorch is the optional [export] extra: '
                        'pip install -e ".[export]"')
  root, cases = exported
  results = _check(fmt, [root / fmt / c for c in cases])
  for case, params in cases.items():
    assert results[case]['imports'] == []
    assert results[case]['params'] == params, case
    assert results[case]['max_diff'] <= tolerance, case


@pytest.mark.slow
def test_the_files_say_what_they_hold(exported):
  root, _ = exported
  text = (root / 'pytorch' / 'every_type_cifar' / 'network.py').read_text()
  assert f"BLOCK = '{BLOCKS['every_type']}'" in text and 'state_dict.npz' in text
  assert 'import jax' not in text and 'blockqnn' not in text.split('"""', 2)[2]
  text = (root / 'flax' / 'every_type_cifar' / 'network.py').read_text()
  assert 'import torch' not in text and 'variables.npz' in text
  assert "x7 = PCC(f, 5, name='layer7')(x5, train)" in text  # every layer written out
  assert max(len(line) for line in text.splitlines()) <= 100


def _export(*flags, cwd=ROOT):
  return subprocess.run([sys.executable, '-m', 'experiments.export', *flags],
                        capture_output=True, text=True, timeout=600, cwd=cwd,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


@pytest.fixture(scope='module')
def search_workdir(tmp_path_factory):
  """A finished smoke search (synthetic rewards) and an empty one."""
  root = tmp_path_factory.mktemp('searches')
  config = cifar.get_config('smoke')
  config.space.max_index = 4
  search_lib.run_search(SearchSettings.from_config(config), root / 'done', ScoringExecutor(),
                        progress=False)
  search_lib.run_search(SearchSettings.from_config(config), root / 'empty', ScoringExecutor(),
                        progress=False, max_iterations=0)
  return root


@pytest.mark.slow
def test_the_command_exports_a_search_s_kept_block(search_workdir, tmp_path):
  out = _export(f'--workdir={search_workdir / "done"}', '--format=pytorch',
                f'--out={tmp_path / "x"}')
  assert out.returncode == 0, out.stderr[-2000:]
  text = (tmp_path / 'x' / 'network.py').read_text()
  assert 'the kept block of the search in' in text and 'Weights: none' in text
  assert sorted(p.name for p in (tmp_path / 'x').iterdir()) == ['network.py']


@pytest.mark.slow
@pytest.mark.parametrize('case', ['invalid_block', 'no_candidate', 'not_a_workdir',
                                  'block_without_config'])
def test_bad_input_is_one_line_and_writes_nothing(case, search_workdir, tmp_path):
  flags, named = {
      'invalid_block': (['--block=1,1,3,0,0 2,5,0,0,4 3,7,0,0,0',
                         '--config=configs/cifar.py:smoke'], 'invalid block'),
      'no_candidate': ([f'--workdir={search_workdir / "empty"}'], 'no finished candidate'),
      'not_a_workdir': ([f'--workdir={tmp_path}'], 'holds neither a search'),
      'block_without_config': (['--block=1,1,3,0,0 2,7,0,0,0'], '--block needs --config'),
  }[case]
  out = _export(*flags, f'--out={tmp_path / "out"}')
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and named in lines[0], out.stderr[-2000:]
  assert not (tmp_path / 'out').exists()


@pytest.fixture(scope='module')
def retrained(tmp_path_factory):
  """A retraining workdir of one epoch at F = 4 on 240 digits, and its trained variables."""
  workdir = tmp_path_factory.mktemp('final')
  config = cifar_final.get_config('smoke')
  config.block = BLOCKS['every_type']
  config.network.features = 4
  config.data.max_train = 300
  config.data.validation_size = 60
  config.train.update(epochs=1, batch_size=60, eval_batch_size=60, warmup_epochs=0.0)
  settings = FinalSettings.from_config(config)
  driver.train_and_evaluate(settings, workdir)
  state = workdir_lib.restore_checkpoint(workdir)['state']
  return workdir, {'params': state['params'], 'batch_stats': state['batch_stats']}, settings


@pytest.mark.slow
def test_a_retraining_exports_with_its_trained_weights(retrained, tmp_path):
  workdir, variables, settings = retrained
  out = _export(f'--workdir={workdir}', '--format=flax', f'--out={tmp_path}')
  assert out.returncode == 0, out.stderr[-2000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['network.py', 'variables.npz']
  assert 'retrained in' in (tmp_path / 'network.py').read_text()
  # The library's network with the checkpoint's variables, on 8 x 8 digits-shaped images.
  spec = architecture.cifar_spec(nsc.parse(BLOCKS['every_type']), settings.network.num_blocks,
                                 4, 10, image_size=8, in_channels=1)
  images = np.asarray(jax.random.normal(jax.random.key(3), (5, 8, 8, 1)))
  np.save(tmp_path / 'images.npy', images)
  np.save(tmp_path / 'logits.npy', np.asarray(
      networks.build(spec).apply(variables, images, train=False)))
  splits = workdir_lib.load_data(settings)
  mean, std = splits.channel_stats()
  pixels = splits.test_images[:5]
  np.save(tmp_path / 'pixels.npy', pixels)
  np.save(tmp_path / 'normalised.npy', (pixels.astype(np.float32) - mean) / std)
  result = _check('flax', [tmp_path])[tmp_path.name]
  assert result['params'] == cost.network_params(spec) and result['max_diff'] <= 1e-5


@pytest.mark.slow
def test_a_checkpoint_of_another_block_is_refused(retrained, tmp_path):
  workdir, _, _ = retrained
  out = _export(f'--workdir={workdir}', '--block=1,1,3,0,0 2,7,0,0,0', f'--out={tmp_path / "x"}')
  assert out.returncode == 2 and 'is of block' in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / 'x').exists()
