"""Search strategies behind one ask/tell interface, on any ``SearchSpace``.

A strategy is a frozen, hashable dataclass of settings; everything it learns lives in its
*state*, a pytree of arrays (a ``flax.struct`` dataclass), so a search can save the state
with ``np.savez(**state_arrays(state))`` and resume exactly with ``restore_state``. Three
pure functions make a strategy:

  state = strategy.init(space, key, budget)
  state, proposals = strategy.ask(space, state, key, n, iteration)
  state = strategy.tell(space, state, proposals, rewards, key)

``proposals`` is a ``qlearning.Trajectories`` (``states`` ``(n, T+1)`` int32 state ids, start
state first, padded past the terminal; ``lengths`` ``(n,)`` layers including the terminal),
exactly what the search loop stores; ``rewards`` is ``(n,)`` float32, one per proposal,
repeats included (a repeat's reward is its stored one). ``iteration`` is the 0-based number
of the ask (only the Q-learner reads it, for its ε schedule). ``budget`` (optional) is the
number of distinct blocks the search will train; only budget-sized strategies read it.
Always continue from the state ``ask`` and ``tell`` return: ``ask`` may move the state
(local search advances through a neighbourhood, the fast Q-learner restarts), and the same
(state, key, n, iteration) always gives the same proposals and state, so a resumed search
re-asks an interrupted iteration and gets what it asked before. All functions jit; the
strategy is a static argument.

One job per module: ``qlearning`` (BlockQNN's Q-learning functions over a Q array),
``interface`` (the protocol), ``paths`` (legal paths, random paths, neighbours, mutations),
``tried`` (block hashes and the tried set), ``random_search``, ``evolution``,
``local_search``, ``qlearner`` (the paper's and the fast agent as strategies), ``registry``
(by name), ``state`` (save and restore) and ``confirm`` (the incumbent/challenger rule: which
block earns another evaluation, which one is kept; no JAX). Import each name from its module.

The strategies (``make_strategy(name)``; ``registry.FACTORIES`` maps names to them):

* ``qlearning`` / ``qlearning_paper`` — BlockQNN's agent, exactly ``qlearning.sample_blocks``
  then ``qlearning.learn`` (the pinned digests of ``tests/test_pinned.py`` hold it to them).
* ``qlearning_fast`` — the same agent with ingredients that go beyond the paper, tuned for
  budgets of a few hundred blocks (``fast_qlearner``; see ``QLearner`` for each field).
* ``random`` — a uniform legal action at every step (the paper's ε = 1 agent): uniform over
  the cells of NAS-Bench-201; on NSC, uniform per step (uniform over whole blocks would make
  nearly every block as long as the grammar allows).
* ``evolution`` — aging evolution (Real et al. 2019): tournament of S out of the last P
  blocks told, mutate one layer of the winner, the oldest dies.
* ``local_search`` — (White, Nolen, Savani 2020) the one-layer neighbours of the incumbent in
  random order; move to the first better one; at a local optimum restart from a random block.

One-layer neighbours of a block with L layers before its terminal: replace layer i (1 <= i <=
L) by another legal layer at index i; drop the last layer (L >= 2); or append a layer at
index L + 1 (when L + 1 < T). On NAS-Bench-201 that is "change one edge's op". A state fixes
its own predecessors by index, so a neighbour keeps every other layer as it is. (This reads
the space as both ``build_space`` and ``build_nb201_space`` make it: states numbered index
by index, and every state at index i + 1 an action of every non-terminal state at i.)

Legal blocks: on NSC spaces every strategy except the paper's agent proposes only blocks that
pass ``nsc.validate`` — in particular no add/concat of two predecessors that are the same
tensor up to identity-like layers (identity, 1x1 pooling), which the space's per-layer states
cannot exclude by themselves. The paper's agent samples what it always sampled, and that
includes such blocks (44% of ε = 1 samples at T = 23, 32% at T = 11); ``path_valid`` is the
check a search loop can apply to them.
"""
