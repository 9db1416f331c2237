"""Blocks the benchmarks time, in one place (no flags: any benchmark may import this)."""

# Small to large: one conv, the residual block, the Inception-like block, a deep mixed block.
BLOCKS = (
    '1,1,3,0,0 2,7,0,0,0',
    '1,4,0,0,0 2,1,3,1,0 3,1,3,2,0 4,5,0,1,3 5,7,0,0,0',
    '1,1,1,0,0 2,1,3,0,0 3,1,5,0,0 4,2,3,0,0 5,1,1,4,0 6,7,0,0,0',
    '1,1,3,0,0 2,1,1,1,0 3,3,3,0,0 4,1,5,3,0 5,6,0,2,4 6,1,3,5,0 7,5,0,1,6 8,2,3,7,0 '
    '9,1,3,8,0 10,7,0,0,0',
)


def data_source(spec: str) -> tuple[str, str | None]:
  """A benchmark's ``--data`` value, ``'SOURCE'`` or ``'SOURCE:PATH'`` (e.g.
  ``'npz:data/cifar10-exact-subset.npz'``), as ``(source, path or None)``."""
  source, _, path = spec.partition(':')
  return source, path or None
