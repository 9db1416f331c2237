"""One side of ``benchmarks.compile_share``: times candidates with whichever revision of
``blockqnn_jax`` is first on ``PYTHONPATH``, and prints one JSON line per candidate.

Run by ``benchmarks/compile_share.py`` in a fresh process per revision and round; it uses only
the interface every revision since 59371a5 has (``load_splits``, ``SearchSettings.from_config``,
``DeviceGroup.place``, ``CandidateTrainer.evaluate``), from the modules of its layout.

  python benchmarks/compile_share_driver.py '{"data": "npz:PATH", ...}'
"""

from __future__ import annotations

import json
import sys


def main(spec: dict) -> None:
  import jax
  import ml_collections

  import blockqnn_jax
  from blockqnn_jax.training import candidate as candidate_lib
  try:  # the layout since the house move
    from blockqnn_jax.data.readers import load_splits
    from blockqnn_jax.nsc import grammar as nsc
    from blockqnn_jax.settings.search import SearchSettings
    from blockqnn_jax.training.devices import DeviceGroup
  except ImportError:  # revisions before it
    from blockqnn_jax import nsc
    from blockqnn_jax.data import load_splits
    from blockqnn_jax.settings import SearchSettings
    DeviceGroup = candidate_lib.DeviceGroup  # pylint: disable=invalid-name

  source, _, path = spec['data'].partition(':')
  splits = load_splits(source, path=path or None,
                       validation_size=spec['validation_size'],
                       max_train=spec['max_train'])
  config = ml_collections.ConfigDict()
  config.train = dict(epochs=spec['epochs'], batch_size=spec['batch_size'],
                      eval_batch_size=spec['eval_batch_size'], loop=spec['loop'])
  config.reward = dict(mu=0.01, rho=0.02)
  config.network = dict(num_blocks=spec['num_blocks'], features=spec['features'],
                        num_classes=splits.num_classes,
                        image_size=splits.image_shape[0])
  s = SearchSettings.from_config(config)
  group = DeviceGroup.place(splits, jax.local_devices()[:1])
  trainer = candidate_lib.CandidateTrainer(group, s.train, s.reward, s.network)
  grammar = nsc.Grammar(max_index=23)
  print(json.dumps({'module': blockqnn_jax.__file__}), flush=True)
  for role, blocks in (('warmup', spec['warmup']), ('block', spec['blocks'])):
    for text in blocks:
      r = trainer.evaluate(nsc.parse(text, grammar))
      if not r.ok:
        raise RuntimeError(f'{text}: {r.failure_reason}')
      print(json.dumps(dict(role=role, block=text, layers=len(nsc.parse(text).body),
                            compile_s=r.compile_s, train_s=r.train_s, eval_s=r.eval_s,
                            total_s=r.total_s, val_accuracy=r.val_accuracy)), flush=True)


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))
