"""The search: the ``Study`` a trainer asks and tells, and the loop that runs it.

* ``study``: ``Study`` (ask/tell over a strategy, the store and the confirm rule);
* ``loop``: ``run_search``, the Study driven by an executor, what ``experiments.search`` runs;
* ``preflight``: the checks that fail a search before anything trains.
"""
