"""The report of a search: what it found and how the agent learned, from its results store.

``write_report(workdir)`` reads ``WORKDIR/search.sqlite`` read-only (the store's
``candidates`` and ``meta`` tables, as ``results.Candidate`` rows) and writes
``WORKDIR/report/``:

* ``reward_per_iteration.png`` — mean, max and best-so-far reward per iteration over every
  candidate as a faint dot, with the ε phases shaded: the paper's picture of Q-learning
  overtaking random exploration once ε drops;
* ``reward_by_epsilon.png`` — the distribution of rewards at each ε, ε descending;
* ``accuracy_vs_flops.png`` — accuracy against FLOPs of every distinct block, coloured by ε,
  the top-k ringed;
* ``block_1.png`` ... — the top-k blocks drawn as DAGs;
* ``top_blocks.txt`` (one NSC per line, best first), ``top_blocks.json`` and ``summary.md``.

One job per module:

* ``analysis`` — the numbers: top blocks, ε phases, the summary (pure);
* ``layout`` — where to draw a block's DAG (pure);
* ``figures`` — the PNGs (matplotlib's Agg canvas, never pyplot);
* ``page`` — reading the store and writing the files.

Importing the report does not import JAX (nor matplotlib, until something is drawn).
"""
