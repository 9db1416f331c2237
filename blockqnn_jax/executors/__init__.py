"""Where candidates train: one interface, a local and a Ray implementation.

* ``interface``: ``Executor`` (submit prepared blocks, collect ``EvalResult``s);
* ``local``: this process's devices; ``ray_cluster``: one Ray task per candidate;
* ``factory``: ``make_executor``, the one the settings name.
"""
