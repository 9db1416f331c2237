"""Training networks: one engine, and what plugs into it.

* ``engine``: the one train state, step, epoch loop, padded evaluation and divergence check;
* ``scorer``: what scoring a candidate shares (prepare, compile or fetch, train, validate,
  reward, one ``EvalResult``); ``candidate``: candidates with data on the device;
  ``streamed``: candidates over streamed batches;
* ``devices``: the data placed on a device group; ``compile_cache``: compiled programs kept
  for reuse, in memory and on disk;
* ``final/``: the found block retrained as the final network.
"""
