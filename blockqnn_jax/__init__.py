"""BlockQNN in JAX/Flax. Folders of one kind, each module imported by its own path.

Layers, each importing only those below it (``.importlinter`` holds CI to it):

* ``nsc``: the block's code, its canonical form and the state/action space (pure);
* ``settings``: every setting once, checked at the edge (no JAX);
* ``storage``: records, the results store, the shared evaluation cache, the workdir lock
  (no JAX);
* ``strategies``: the Q-learning agent and every ask/tell strategy, the confirm rule (pure);
* ``models``: a block as a Flax module, the stacked network and its costs;
* ``data``: datasets in memory or streamed, augmentation on the device;
* ``report`` (no JAX) and ``export``: what a search found, as pages and as standalone files;
* ``training``: the one engine, candidates and the final retraining;
* ``executors``: where candidates train (this process or a Ray cluster);
* ``search``: the ``Study`` (``blockqnn_jax.search.study.Study``) and the search loop.
"""
