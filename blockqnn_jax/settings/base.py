"""Errors, checks and what every settings section shares: built from a config, stored as
JSON, compared with a stored one."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

COMPUTE_DTYPES = ('auto', 'float32', 'bfloat16')
TRAIN_LOOPS = ('auto', 'scan', 'steps')
PRNG_IMPLS = ('rbg', 'unsafe_rbg', 'threefry2x32')
EXECUTOR_KINDS = ('local', 'ray')
# What ``data.load_splits`` reads (``data.readers`` takes this list as its own).
DATA_SOURCES = ('tfds', 'cifar_batches', 'npz', 'image_folder', 'digits')


class SettingsError(ValueError):
  """A config field is unknown, of the wrong type, or out of range."""


class ConfigMismatch(RuntimeError):
  """A workdir holds a run (a search, a retraining) with other settings."""


def check(condition: bool, field: str, message: str, value: Any) -> None:
  if not condition:
    raise SettingsError(f'{field} {message}, got {value!r}')


def one_of(value: Any, choices: tuple[str, ...], field: str) -> None:
  check(value in choices, field, f'must be one of {", ".join(map(repr, choices))}', value)




class FromConfig:
  """What a program's whole settings share: built once from its config, stored as JSON."""

  @classmethod
  def from_config(cls, config: Any):
    """From a ConfigDict (or nested dict / JSON text); raises ``SettingsError``."""
    if isinstance(config, str):
      config = json.loads(config)
    return build(cls, _as_dict(config), '')

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def default_config(cls):
    """Every field at its default, as an ``ml_collections.ConfigDict``: what a config file
    starts from, so that a preset states only what it changes and no default is written
    twice (command-line overrides reach every field)."""
    import ml_collections  # pylint: disable=import-outside-toplevel
    return ml_collections.ConfigDict(cls().to_dict())

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True, default=str)




def _as_dict(config: Any) -> dict[str, Any]:
  if hasattr(config, 'to_dict'):
    return config.to_dict()
  return dict(config)


def _tupled(value: Any) -> Any:
  """Lists (as JSON and ConfigDicts give them) become tuples, as the dataclasses hold them."""
  if isinstance(value, (list, tuple)):
    return tuple(_tupled(v) for v in value)
  return value


def build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
  """``cls`` from a mapping: nested dataclass fields from nested mappings, defaults for what
  is missing, ``SettingsError`` naming a field the dataclass does not know."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise SettingsError(f'unknown config field{"s" if len(unknown) > 1 else ""} '
                        f'{", ".join(prefix + k for k in unknown)} (known: '
                        f'{", ".join(sorted(fields))})')
  kwargs = {}
  for name, value in values.items():
    default = fields[name].default
    if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
      kwargs[name] = build(type(default), value, f'{prefix}{name}.')
    else:
      kwargs[name] = _tupled(value)
  try:
    return cls(**kwargs)
  except SettingsError:
    raise
  except (TypeError, ValueError) as e:
    raise SettingsError(f'{prefix.rstrip(".") or cls.__name__}: {e}') from None


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Dotted keys of a nested mapping."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def refuse_changes(where: str, old: Mapping[str, Any] | None, new: Mapping[str, Any], *,
                   ignore: tuple[str, ...] = (), allow_change: bool = False,
                   allow_flag: str = '--allow_config_change') -> list[str]:
  """Compares what a workdir recorded (``old``, None for a new workdir) with what a run now
  has (``new``): nested dicts such as ``to_dict()`` of the stored settings read back, so a
  field the workdir predates compares as its default. The one check the search and the
  retraining both make before they resume.

  Args:
    where: the workdir (or file), for the message.
    old, new: the records.
    ignore: dotted prefixes that may change between runs.
    allow_change: return the differences instead of raising.
    allow_flag: the flag that allows a change, for the message.

  Returns:
    The differences, ``'field: old -> new'`` (empty when none).

  Raises:
    ConfigMismatch: they differ and ``allow_change`` is False (the first fields named).
  """
  if old is None:
    return []
  a, b = flatten(old), flatten(new)
  changed = [f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k) and not k.startswith(ignore)]
  if changed and not allow_change:
    raise ConfigMismatch(f'{where} holds a run with a different config '
                         f'({", ".join(changed[:6])}); use a new --workdir, or pass '
                         f'{allow_flag} to continue it with this config')
  return changed


def differences(old: FromConfig, new: FromConfig, *,
                ignore: tuple[str, ...] = ()) -> list[str]:
  """Dotted fields of two settings (``SearchSettings``, ``FinalSettings``) whose values
  differ, except those starting with a prefix in ``ignore``."""
  a, b = flatten(old.to_dict()), flatten(new.to_dict())
  return sorted(k for k in set(a) | set(b)
                if a.get(k) != b.get(k) and not k.startswith(ignore))
