"""What the entry points share: a user's mistake ends in one line on stderr, not a traceback.

A wrong flag, a busy or corrupt workdir, data that is not there: the person at the terminal
needs what is wrong, where, and how to fix it, in one line, and a non-zero exit status
(``EXIT_STATUS``); a traceback of the library's insides only buries that. ``run(main)`` is
``absl.app.run(main)`` with that done for the errors named in ``USER_ERRORS`` and for a
command line that does not parse (an unknown ``--config.`` field, a config file that is not
there). ``--verbose`` prints the traceback too. Any other exception is a bug, and keeps its
traceback.

The errors are named, not imported: the report's entry point must not pay for importing
JAX to know what a ``SearchFailed`` is (an error whose module was never imported cannot
have been raised).
"""

from __future__ import annotations

import ast
import functools
import logging
import sys
import traceback
from typing import Callable

from absl import app, flags

EXIT_STATUS = 2  # 1 is what Python gives an uncaught exception, a bug

_VERBOSE = flags.DEFINE_bool('verbose', False,
                             'On a user error, print the traceback before its one-line message.')

# The exceptions that are a user's mistake (a setting, the data, the workdir), by qualified
# name, each with what to call it and how to fix it when its own message does not say.
USER_ERRORS: dict[str, tuple[str, str]] = {
    'blockqnn_jax.settings.base.SettingsError': (
        'config', 'fix that --config. flag or the config file'),
    'blockqnn_jax.search.preflight.PreflightError': ('preflight', ''),
    'blockqnn_jax.data.splits.DataError': ('data', 'fix the --config.data. flags'),
    'blockqnn_jax.nsc.grammar.NSCError': ('invalid block', "fix the block's NSC text"),
    'blockqnn_jax.search.study.StudyError': ('study', ''),
    'blockqnn_jax.storage.store.StoreError': ('workdir', 'move it away or use another --workdir'),
    'blockqnn_jax.storage.workdir_lock.WorkdirBusy': ('workdir busy', ''),
    'blockqnn_jax.settings.base.ConfigMismatch': ('config', ''),
    'blockqnn_jax.storage.results.SearchFailed': (
        'search stopped', 'fix that and run the same command: the search resumes from its '
        'workdir'),
    'blockqnn_jax.training.final.block_choice.BlockNotFound': ('no block to retrain', ''),
    'blockqnn_jax.export.writer.ExportError': ('export', ''),
    'blockqnn_jax.storage.results.Diverged': (
        'diverged', 'lower --config.train.learning_rate; the run resumes from its last '
        'checkpoint'),
    'builtins.FileNotFoundError': ('not found', 'check the path'),
    'builtins.NotADirectoryError': ('not a directory', ''),
    'builtins.PermissionError': ('permission denied', ''),
}


def _name(cls: type) -> str:
  return f'{cls.__module__}.{cls.__qualname__}'


def user_error_types() -> tuple[type[BaseException], ...]:
  """The classes ``USER_ERRORS`` names (imports their modules: for tests, not for ``run``)."""
  import importlib  # pylint: disable=import-outside-toplevel
  types = []
  for name in USER_ERRORS:
    module, _, attr = name.rpartition('.')
    types.append(getattr(importlib.import_module(module), attr))
  return tuple(types)


def classify(error: BaseException) -> tuple[str, str] | None:
  """(label, hint) of a user error, or None for anything else (a bug)."""
  for cls in type(error).__mro__:
    if _name(cls) in USER_ERRORS:
      return USER_ERRORS[_name(cls)]
  return None


def _flatten(text: str) -> str:
  """One line: the lines of ``text`` joined, indentation and blank lines dropped."""
  return ' '.join(line.strip() for line in text.splitlines() if line.strip())


def one_line(error: BaseException) -> str:
  """The message a user error ends with: ``error: <label>: <message>[; <hint>]``."""
  label, hint = classify(error) or ('error', '')
  message = _flatten(str(error)) or type(error).__name__
  if '--' in message:  # the message names the flag to change already
    hint = ''
  return f'error: {label}: ' + (f'{message.rstrip(".")}; {hint}' if hint else message)


def command_line_error(error: BaseException, argv: list[str]) -> str:
  """The one line for a command line that does not parse.

  absl's own errors (a bad value) and those ml_collections raises while applying a
  ``--config.`` override (an unknown field: a ``KeyError`` text wrapped in an
  ``AttributeError``; a missing config file: an ``OSError``) arrive as several lines, some
  of them a nested traceback; their first and last say what and where.
  """
  text = str(error)
  if isinstance(error, (KeyError, AttributeError)) and text[:1] in '"\'':
    try:  # the repr of a KeyError's text: unquote it
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      pass
    lines = [line.strip() for line in text.splitlines() if line.strip()] or ['?']
    field = lines[0].strip('\'"')
    # The flag that names it: ml_collections' message has only the field's last part.
    named = [a.split('=', 1)[0] for a in argv
             if a.startswith('--config.') and field in a.split('=', 1)[0].split('.')]
    where = f' ({named[0]})' if named else ''
    what = f'no config field {lines[0]}{where}' + ''.join(f'. {l}' for l in lines[1:])
  else:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = lines or [type(error).__name__]
    what = lines[0] if len(lines) == 1 else f'{lines[0]} ... {lines[-1]}'
  what = what.rstrip('.')
  more = ' and configs/*.py for the --config. fields' if '--config' in what else ''
  return f'error: command line: {what}; see --helpshort for the flags{more}'


def _wants_traceback(argv: list[str]) -> bool:
  """Whether the command line asks for ``--verbose`` (read by hand: parsing it failed)."""
  return any(a in ('--verbose', '--verbose=true', '--verbose=1') for a in argv)


def _fail(message: str, show_traceback: bool) -> None:
  if show_traceback:
    traceback.print_exc()
  sys.stdout.flush()  # what the run printed before comes first
  print(message, file=sys.stderr, flush=True)
  sys.exit(EXIT_STATUS)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a command line that does not parse as one line."""
  try:
    rest = flags.FLAGS(argv)
    for name in flags.FLAGS:
      flag = flags.FLAGS[name]
      if type(flag).__module__.startswith('ml_collections'):
        # A config file that failed to load is reported when its value is first read:
        # read it now, while a failure is still the command line's.
        getattr(flag.value, 'keys', None)
    return rest
  except (flags.Error, KeyError, AttributeError, OSError, ValueError) as e:
    # Only parsing runs here: anything it raises is about the command line (the config
    # file it names is loaded and overridden while parsing).
    _fail(command_line_error(e, argv), _wants_traceback(argv))
    raise  # not reached: _fail exits


def guard(main: Callable[[list[str]], object], extra: tuple[type[BaseException], ...] = ()
          ) -> Callable[[list[str]], object]:
  """``main`` with its user errors (and those of the types in ``extra``) turned into one line
  on stderr and exit status ``EXIT_STATUS``."""

  @functools.wraps(main)
  def guarded(argv: list[str]):
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      if classify(e) is None and not isinstance(e, extra):
        raise  # a bug: its traceback is what is needed
      _fail(one_line(e), _VERBOSE.value)

  return guarded


def quiet_jax_info() -> None:
  """Hides JAX's INFO records (its warnings and errors stay): on a machine without a TPU,
  JAX logs that it found no TPU backend, and that its compilation cache was reset, lines a
  user cannot act on. ``logging.getLogger('jax').setLevel(logging.INFO)`` brings them
  back."""
  logger = logging.getLogger('jax')
  if logger.level == logging.NOTSET:  # a level someone set on purpose stays
    logger.setLevel(logging.WARNING)


def run(main: Callable[[list[str]], object],
        extra: tuple[type[BaseException], ...] = ()) -> None:
  """``absl.app.run(main)``, with user errors (``USER_ERRORS`` and ``extra``) and an
  unparsable command line as one line on stderr and exit status ``EXIT_STATUS``;
  ``--verbose`` adds the traceback. JAX's INFO logs are hidden (``quiet_jax_info``)."""
  quiet_jax_info()
  app.run(guard(main, extra), flags_parser=parse_flags)
