"""Which block a retraining trains: the config's, or the best of a search's report or store."""

from __future__ import annotations

import os
from pathlib import Path
import re

from blockqnn_jax.nsc import canonical
from blockqnn_jax.nsc import grammar as nsc
from blockqnn_jax.report import analysis
from blockqnn_jax.report.page import REPORT_DIR
from blockqnn_jax.settings.final import FinalSettings
from blockqnn_jax.storage import store as store_lib
from blockqnn_jax.strategies import confirm

TOP_BLOCKS_FILE = os.path.join(REPORT_DIR, 'top_blocks.txt')
# A layer of NSC text, ``index,type,kernel,pred1,pred2``, as it appears inside a report line.
_NSC_LAYER = re.compile(r'(?<![\d.])\d+,\d+,\d+,\d+,\d+(?![\d.])')


class BlockNotFound(ValueError):
  """No block to retrain: none set, or a search workdir without usable results."""


def _distinct(texts: list[str], where: str) -> list[str]:
  """Parses NSC texts, keeping the first of each canonical form, in order."""
  seen, out = set(), []
  for text in texts:
    try:
      block = nsc.Block.parse(text)
      key = canonical.canonical_key(block)
    except nsc.NSCError as e:
      raise BlockNotFound(f'{where}: invalid block {text!r} ({e})') from e
    if key not in seen:
      seen.add(key)
      out.append(block.to_text())
  return out


def top_blocks_from_report(path: str | Path) -> list[str]:
  """The distinct blocks of a search report's ``top_blocks.txt``, best first.

  Each line that holds NSC layers (``index,type,kernel,pred1,pred2`` groups, whatever else
  the line says: rank, reward...) gives one block; other lines (headers, ``#`` comments) are
  skipped.
  """
  texts = []
  for line in Path(path).read_text().splitlines():
    if line.lstrip().startswith('#'):
      continue
    layers = _NSC_LAYER.findall(line)
    if layers:
      texts.append(' '.join(layers))
  return _distinct(texts, str(path))


def top_blocks_from_store(search_workdir: str | Path) -> list[str]:
  """The distinct blocks of a search's results store, best first, ranked as the report's
  ``analysis.top_blocks`` ranks them (ok rows with a reward, one per canonical key, the best
  reward first, the earlier row on ties). The store is opened read-only.

  Raises:
    FileNotFoundError: no store in ``search_workdir``.
    store.StoreError: the file there is not a search store.
  """
  with store_lib.ResultsStore.open_read_only(search_workdir) as results_store:
    rows = results_store.candidates()
  return [row.nsc for row in analysis.top_blocks(rows, len(rows))]


def resolve_block(settings: FinalSettings) -> tuple[nsc.Block, str]:
  """The block to retrain and where it came from.

  ``settings.block`` (NSC text) when it is non-empty; otherwise, with ``search_workdir`` set,
  rank 1 is the block the search kept (``confirm.kept_block``: the confirm rule's incumbent,
  or the best single reward of a search without the rule), read from its results store; a
  ``rank`` > 1 (or a workdir holding only a report) is the ``rank``-th distinct block by
  best single reward of ``<search_workdir>/report/top_blocks.txt`` or, without that file,
  of the store.

  Returns:
    ``(block, source)``: the validated block, and 'config', or the report / database path
    and rank it was read from.

  Raises:
    BlockNotFound: neither field set, both set, or the search workdir has no such block.
    nsc.NSCError: the block text is invalid.
  """
  text = settings.block.strip()
  search_workdir = settings.search_workdir.strip()
  if text and search_workdir:
    raise BlockNotFound(f'both block ({text!r}) and search_workdir ({search_workdir!r}) are '
                        "set: pass --config.block='' to retrain the search's block, or drop "
                        'search_workdir')
  if text:
    block = nsc.Block.parse(text)
    source = 'config'
  elif search_workdir:
    rank = int(settings.rank)
    if rank < 1:
      raise BlockNotFound(f'rank must be >= 1, got {rank}')
    report = Path(search_workdir) / TOP_BLOCKS_FILE
    database = Path(search_workdir) / store_lib.DB_NAME
    if rank == 1 and database.is_file():
      try:
        with store_lib.ResultsStore.open_read_only(search_workdir) as results_store:
          kept = confirm.kept_block(results_store)
      except store_lib.StoreError as e:
        raise BlockNotFound(f'{database}: cannot read the search results ({e})') from e
      if kept is None:
        raise BlockNotFound(f'{database} has no successful block yet')
      path, texts = database, [kept.block]
    elif report.is_file():
      path, texts = report, top_blocks_from_report(report)
    else:
      path = Path(search_workdir) / store_lib.DB_NAME
      try:
        texts = top_blocks_from_store(search_workdir)
      except FileNotFoundError:
        raise BlockNotFound(f'search_workdir {search_workdir!r} has neither {TOP_BLOCKS_FILE} '
                            f'nor {store_lib.DB_NAME}') from None
      except store_lib.StoreError as e:
        raise BlockNotFound(f'{path}: cannot read the search results ({e})') from e
    if len(texts) < rank:
      raise BlockNotFound(f'{path} has {len(texts)} distinct successful blocks; rank {rank} '
                          'asked for')
    try:
      block = nsc.Block.parse(texts[rank - 1])
    except nsc.NSCError as e:
      raise BlockNotFound(f'{path}: invalid block {texts[rank - 1]!r} ({e})') from e
    source = f'{path} (rank {rank})' if path != database or rank > 1 else \
        f'{path} (rank 1, the kept block: {kept.describe()})'
  else:
    raise BlockNotFound('no block: set config.block (NSC text) or config.search_workdir')
  # Structure only: the search's space (kernels, layers) may be larger than the default one.
  nsc.validate_structure(block)
  return block, source
