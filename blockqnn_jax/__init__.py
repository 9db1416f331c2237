"""BlockQNN in JAX/Flax: the NSC grammar, the search space, the Q-learning agent, the block
builder, and the search around them.

``from blockqnn_jax import Study`` is the ask/tell study for a trainer of your own
(``study.Study``); it is loaded on first use, so that the JAX-free modules (``settings``,
``results``, ``store``, ``report``) stay JAX-free when imported.
"""


def __getattr__(name: str):
  if name == 'Study':
    from blockqnn_jax.study import Study  # pylint: disable=import-outside-toplevel
    return Study
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
