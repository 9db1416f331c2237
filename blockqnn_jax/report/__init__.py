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

from blockqnn_jax.report.analysis import EpsilonStats
from blockqnn_jax.report.analysis import Phase
from blockqnn_jax.report.analysis import Summary
from blockqnn_jax.report.analysis import epsilon_phases
from blockqnn_jax.report.analysis import summarize
from blockqnn_jax.report.analysis import top_blocks
from blockqnn_jax.report.figures import draw_block
from blockqnn_jax.report.figures import plot_accuracy_vs_flops
from blockqnn_jax.report.figures import plot_reward_by_epsilon
from blockqnn_jax.report.figures import plot_reward_per_iteration
from blockqnn_jax.report.layout import INPUT
from blockqnn_jax.report.layout import OUTPUT
from blockqnn_jax.report.layout import BlockLayout
from blockqnn_jax.report.layout import block_edges
from blockqnn_jax.report.layout import layout_block
from blockqnn_jax.report.layout import node_label
from blockqnn_jax.report.page import REPORT_DIR
from blockqnn_jax.report.page import load_candidates
from blockqnn_jax.report.page import load_meta
from blockqnn_jax.report.page import render_summary
from blockqnn_jax.report.page import top_block_records
from blockqnn_jax.report.page import write_report

__all__ = [
    'BlockLayout', 'EpsilonStats', 'INPUT', 'OUTPUT', 'Phase', 'REPORT_DIR', 'Summary',
    'block_edges', 'draw_block', 'epsilon_phases', 'layout_block', 'load_candidates',
    'load_meta', 'node_label', 'plot_accuracy_vs_flops', 'plot_reward_by_epsilon',
    'plot_reward_per_iteration', 'render_summary', 'summarize', 'top_block_records',
    'top_blocks', 'write_report',
]
