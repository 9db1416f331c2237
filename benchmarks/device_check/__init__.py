r"""One prepared device check: what only a GPU shows, measured in one run of at most 8 minutes.

A GPU is lent for 15 minutes in all, machine start included, so everything worth knowing is
measured by one command, ready before the machine is:

  # on the GPU machine, in the repository root ($OUT is where files come back):
  python -m benchmarks.device_check --out=$OUT/device_check.json
  # here, at toy size on the CPU (< 5 minutes; digits when the npz is absent):
  python -m benchmarks.device_check --tiny --out=/tmp/dc.json
  # the test suite's form (tests/test_device_check.py): every section once, under a minute:
  python -m benchmarks.device_check --smallest --data=digits --out=/tmp/dc.json

The data is the lossless CIFAR-10 subset (5,085 train images), carried as a git-ignored file:
``mkdir -p data && cp ../shared/data/cifar10-exact-subset.npz data/``, then the device tool's
``carry`` of ``data``. ``--data=npz:PATH`` (default ``npz:data/cifar10-exact-subset.npz``;
``../shared/data/`` is tried too when the default is absent) or ``--data=digits``.

Settings: the candidates of ``configs/cifar.py:gpu`` (read from it): the search network
(N = 2 blocks per stage, F = 32), the paper's candidate training (12 epochs of Adam, batch
256), so ``candidates_per_hour`` is that preset's; 10% of the subset held out for the reward
(4,577 train / 508 validation images). ``benchmarks.evaluate``'s shape flags
(``--epochs --batch_size --features --num_blocks --validation_size --max_train
--scan_blocks``) override them when given; every value used is written to the JSON.

Sections (printed as a table, and every key written to the JSON with the device kind, the
jax version, each section's time and budget, and the exact settings):

* ``loops``: training images/s of ``train.loop='scan'`` (all epochs one XLA program)
  against ``'steps'`` (one compiled step per batch) for a few blocks, and which one
  ``train.loop='auto'`` should pick on this platform (``recommendation``): the loop that
  trains more images/s, because training is the device's own time and grows tenfold at the
  paper's split while compilation can overlap it (compile-ahead, several workers, 16 cores).
  The loop that minimises the serial candidate time at 45k is recorded beside it.
* ``dtypes``: bfloat16 against float32 with the recommended loop: images/s and validation
  accuracy (one seed on about 500 images: differences under 2-3 points are noise).
* ``candidates_per_hour`` and ``compile_share``: distinct blocks one after the other, cold
  (no program compiled before; JAX's persistent compilation cache on, in a fresh
  directory, as a fresh search with it would run) and then warm (a fresh trainer whose
  programs come from that cache, as a resumed search's do). ``compile_share`` is compile
  time over candidate time, ``outside_train_share`` is everything that is not training
  steps (compile, validation, set-up) over candidate time.
* ``early_stop``: candidates/hour with and without the gpu preset's early stopping
  (``search.early_stop``: rungs at epochs 3 and 6 of 12, a quarter promoted at each). One block
  on one trainer, cold, then from its programs: plain, stopped at each rung, and to the end
  scored at every rung; a steady-state search stops ``1 - promote`` of the candidates at
  each rung (``rungs.outcome_shares``), so a candidate costs its compile plus those shares
  of the warm times. Measured on the subset and projected to 45k, with the ratio.
* ``compile_ahead``: the executor with one worker, compile-ahead on against off, in
  candidates/hour and their ratio, with the host's cores recorded.
* ``memory``: peak device memory (``device.memory_stats()`` where the backend has it, else
  'unavailable'; the compiled programs' own ``memory_analysis`` per block always), and
  candidates/hour with 1, 2 and 4 workers sharing the one GPU: a ``LocalExecutor`` given the
  same device several times places one copy of the data per worker and runs one worker
  thread per copy, so several candidates compile (on host threads) and train (on the one
  device) at once. Candidates are never lost or mixed up by this: each result is checked.

How the figures scale to the paper's 45k / 5k split: compile time does not depend on the
number of images (the data's shapes are part of the program, its size is not part of the
work) and neither do training images/s (the scanned body is the same step; only its trip
count changes), so training time scales by the number of steps,
``(45000 // batch) / (n_train // batch)`` (10.3x here), validation time by
``5000 / n_val``, and the rest stays. Every candidate time is given as measured on the
subset and ``projected_45k`` that way; ``device_bound_45k`` is the rate if compilation and
set-up were hidden completely behind training (the most one GPU can give). Rates with
several workers or compile-ahead are measured on the subset only (their overlap does not
project linearly). The validation accuracies are not comparable to 45k-trained ones.

Project targets (recorded under ``targets`` with whether they are met): at least 300
candidates per GPU-hour at the 12-epoch fidelity on the 45k split, and at most 25% of a
candidate's time outside training steps.

Time budget on one GPU (an H200 with 16 host cores): the sections run in order of what
matters most, each in its own time box (seconds: loops 80, candidates_per_hour and
compile_share 80, early_stop 40, memory 115, compile_ahead 65, dtypes 45: 425 s), after
about 20 s of start-up (imports, the backend, the data to the device). Inside a section a unit of work
(a candidate, an executor run) starts only if it fits in what is left, reckoned from the
mean time of a cold candidate so far: an executor run of n blocks over w workers counts
n candidates over min(w, cores / 4), with no credit for compile-ahead; executor runs
shrink to two blocks per worker, then the middle worker count goes, before the box is
overrun. Nothing new starts past 445 s, so the run ends by about 445 s plus one unit; a
watchdog writes the JSON and exits at 465 s whatever is running, so the whole run stays
under 8 minutes. A skipped unit or section says why; a section that raises records its
error and the next one runs. Expected use of the boxes: a cold candidate costs 10-25 s on
a GPU (compilation dominates; 12 epochs of the subset train in a few seconds), so loops
runs 4 candidates (2 blocks x 2 loops), compile_share 3 cold and 3 warm, early_stop one
cold and four warm trainings of one block (about 30 s), memory executor
runs of 4, 8 and 4 blocks with 1, 4 and 2 workers (two blocks per worker at least: a
worker takes a second one to compile ahead), compile_ahead one run of 4 without
compile-ahead (its run with it is memory's 1-worker run), dtypes 2 float32 candidates (the
bfloat16 ones are loops'): about 390 s at 15 s a candidate. The first compiles also pay
XLA's GPU autotuning, which later sections (like a long search) reuse. ``--time_limit_s``
scales every box and deadline, for a rerun with less device time left.
The JSON is rewritten after every section, so even a killed run leaves what it measured.
"""
