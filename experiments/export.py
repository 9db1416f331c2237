r"""Writes a found network as one standalone Flax or PyTorch file, with its trained weights.

  python -m experiments.export --workdir=workdirs/smoke --format=flax --out=exported/flax
  python -m experiments.export --workdir=workdirs/final --format=pytorch --out=exported/torch
  python -m experiments.export --block='1,1,3,0,0 2,7,0,0,0' \
      --config=configs/cifar_final.py:smoke --format=pytorch --out=exported/one_conv

The block: ``--block``, else that of ``--workdir``: a search's kept block (as the report
names it) or a retraining's block. The network around it: ``--config`` (a search or a
retraining config file), else the workdir's own settings; the images' shape and classes
come from the data those settings name. The weights: a retraining workdir's latest
checkpoint (``experiments.train``), written beside the module in the form it loads.

Bad input (an invalid NSC, a workdir with no finished candidate or no checkpoint, a
checkpoint of another block) ends in one line on stderr, exit status 2, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from blockqnn_jax.export import writer
from blockqnn_jax.data import search_data
from blockqnn_jax.export import weights
from blockqnn_jax.models import architecture, cost, networks
from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.settings.final import FinalSettings
from blockqnn_jax.settings.search import SearchSettings
from blockqnn_jax.storage import store as store_lib
from blockqnn_jax.storage import stored_config
from blockqnn_jax.strategies import confirm as confirm_lib
from blockqnn_jax.training.final import workdir as workdir_lib
from experiments import user_errors

_WORKDIR = flags.DEFINE_string('workdir', None, 'A search workdir (its kept block) or a '
                               "retraining workdir (its block and trained weights).")
_BLOCK = flags.DEFINE_string('block', None, 'NSC text of the block to export.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'The network around the block: a search or retraining config '
    '(file[:preset]); default: the workdir\'s own.')
_FORMAT = flags.DEFINE_enum('format', 'flax', sorted(writer.FORMATS), 'What to write.')
_OUT = flags.DEFINE_string('out', None, 'The folder to write network.py (and its weights) to.',
                           required=True)


def _settings_of(config) -> SearchSettings | FinalSettings:
  """A config of either kind as its typed settings (a retraining config names no search)."""
  return SearchSettings.from_config(config) if 'search' in config else (
      FinalSettings.from_config(config))


def _image_data(settings: SearchSettings | FinalSettings):
  """The shape of the images, the number of classes and the per-channel pixel mean and std
  (None for streamed data) of the data the settings name."""
  if isinstance(settings, FinalSettings):
    splits = workdir_lib.load_data(settings)
  else:
    splits = search_data.load_search_data(settings.data, settings.network,
                                          settings.data.holdout(settings.seed))
  stats = splits.channel_stats() if hasattr(splits, 'channel_stats') else None
  return tuple(splits.image_shape), splits.num_classes, stats


def _from_search(workdir: Path) -> tuple[nsc.Block, SearchSettings, str]:
  with store_lib.ResultsStore.open_read_only(workdir) as store:
    settings = stored_config.stored_settings(store)
    kept = confirm_lib.kept_block(store)
  if kept is None:
    raise writer.ExportError(f'{workdir} has no finished candidate yet; export when its '
                             'search has trained one, or pass --block')
  return (nsc.Block.parse(kept.block), settings,
          f'the kept block of the search in {workdir}: {kept.describe()}')


def _from_retraining(workdir: Path) -> tuple[nsc.Block, FinalSettings, str, dict[str, Any]]:
  record = json.loads((workdir / workdir_lib.CONFIG_FILE).read_text())
  block = nsc.Block.parse(record['block'])
  try:
    restored = workdir_lib.restore_checkpoint(workdir)
  except FileNotFoundError as e:
    raise writer.ExportError(f'{workdir} has no checkpoint yet (experiments.train writes '
                             'one per epoch); pass --block and --config for the network '
                             'alone') from e
  state = restored['state']
  variables = {'params': state['params'], 'batch_stats': state.get('batch_stats', {})}
  source = f'retrained in {workdir}, checkpoint of epoch {restored["epoch"]}'
  final_file = workdir / workdir_lib.FINAL_FILE
  if final_file.is_file():
    result = json.loads(final_file.read_text())
    if result.get('complete') and result.get('test_accuracy') is not None:
      source += f' (test accuracy {result["test_accuracy"]:.4f})'
  return block, FinalSettings.from_config(record['config']), source, variables


def _check_fits(model: networks.BlockNet, spec, variables) -> None:
  """Refuses variables of another network (another block, width or depth)."""
  images = jnp.zeros((1, spec.image_size, spec.image_size, spec.in_channels))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  wanted = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes)
  want = {k: v.shape for k, v in weights.flat_variables(wanted).items()}
  have = {k: v.shape for k, v in weights.flat_variables(variables).items()}
  if want != have:
    differ = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
    raise writer.ExportError(
        f'the checkpoint does not fit the network of block {spec.block.to_text()}: '
        f'{len(differ)} variables differ, e.g. {differ[0]}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  block = settings = variables = None
  source = ''
  workdir = Path(_WORKDIR.value) if _WORKDIR.value else None
  if workdir is not None:
    if (workdir / store_lib.DB_NAME).is_file():
      block, settings, source = _from_search(workdir)
    elif (workdir / workdir_lib.CONFIG_FILE).is_file():
      block, settings, source, variables = _from_retraining(workdir)
    else:
      raise writer.ExportError(f'--workdir={workdir} holds neither a search '
                               f'({store_lib.DB_NAME}) nor a retraining '
                               f'({workdir_lib.CONFIG_FILE})')
  if _BLOCK.value:
    chosen = nsc.validate_structure(nsc.Block.parse(_BLOCK.value))
    if variables is not None and (canonical.canonical_key(chosen)
                                  != canonical.canonical_key(block)):
      raise writer.ExportError(f'the checkpoint in {workdir} is of block {block.to_text()}, '
                               f'not --block={_BLOCK.value}')
    block, source = chosen, source if variables is not None else 'the --block flag'
  if block is None:
    raise writer.ExportError('nothing to export: pass --workdir or --block')
  if _CONFIG.value is not None:
    if variables is not None:
      raise writer.ExportError('a retraining\'s weights fit the network of its own config: '
                               'drop --config')
    settings = _settings_of(_CONFIG.value)
  if settings is None:
    raise writer.ExportError('--block needs --config for the network around it, e.g. '
                             '--config=configs/cifar_final.py')
  image_shape, num_classes, stats = _image_data(settings)
  net = settings.network
  spec = architecture.spec_for(block, net.kind, net.num_blocks, net.features, num_classes,
                               image_shape)
  model = networks.build(spec)
  if variables is not None:
    _check_fits(model, spec, variables)
  written = writer.write(spec, _OUT.value, _FORMAT.value, variables,
                         bn_momentum=model.bn_momentum, bn_epsilon=model.bn_epsilon,
                         source=source, normalisation=stats)
  print(f'block {block.to_text()}: {cost.network_params(spec):,} parameters, '
        f'{cost.network_flops(spec) / 1e6:,.2f} MFLOPs per image')
  for path in written:
    print(f'wrote {path}')


if __name__ == '__main__':
  user_errors.run(main)
