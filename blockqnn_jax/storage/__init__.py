"""What a search keeps on disk, free of JAX.

* ``results``: the records (``EvalResult``, ``Candidate``) and the reward they give;
* ``store``: the SQLite results store of one workdir (candidates, evaluations, meta);
* ``eval_cache``: the evaluation cache several searches share;
* ``stored_config``: a workdir's settings, compared with a resumed run's;
* ``workdir_lock``: one search per workdir.
"""
