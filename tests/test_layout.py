"""The library's layout: every name has one import path, and packages are folders of modules.

A package's ``__init__`` holds only its docstring, and a module is imported only for the names
it defines, so a name can be reached one way (``blockqnn_jax.settings.search.SearchSettings``),
and moving it means updating its callers. The layers between packages are the
``.importlinter`` contract's, which ``scripts/test`` checks.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / 'blockqnn_jax'
# compile_share_driver.py runs against older revisions too, and imports either layout.
CALLERS = [p for d in ('blockqnn_jax', 'experiments', 'benchmarks', 'tests', 'configs')
           for p in sorted((ROOT / d).rglob('*.py')) if p.name != 'compile_share_driver.py']


@functools.cache
def _module_file(module: str) -> Path | None:
  path = ROOT / module.replace('.', '/')
  if (path / '__init__.py').exists():
    return path / '__init__.py'
  return path.with_suffix('.py') if path.with_suffix('.py').exists() else None


def _is_alias(node: ast.Assign) -> bool:
  """``Name = module.Name``: another module's name bound again here (a re-export)."""
  return (len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
          and isinstance(node.value, ast.Attribute) and node.value.attr == node.targets[0].id)


@functools.cache
def _defined(module: str) -> frozenset[str]:
  """Names a module binds at top level other than by importing or aliasing them."""
  names = set()
  for node in ast.parse(_module_file(module).read_text()).body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      if isinstance(node, ast.Assign) and _is_alias(node):
        continue
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
  return frozenset(names)


def _uses_of_library_names(path: Path):
  """``(line, module, name)`` of every library name a file reaches: imported by name
  (``from module import name``) or read from an imported module (``module_alias.name``)."""
  tree = ast.parse(path.read_text())
  modules = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and not node.level and node.module and (
        node.module.split('.')[0] == 'blockqnn_jax'):
      for alias in node.names:
        yield node.lineno, node.module, alias.name
        if _module_file(f'{node.module}.{alias.name}') is not None:
          modules[alias.asname or alias.name] = f'{node.module}.{alias.name}'
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in modules):
      yield node.lineno, modules[node.value.id], node.attr


def test_package_inits_hold_only_their_docstring():
  for init in sorted(LIBRARY.rglob('__init__.py')):
    body = ast.parse(init.read_text()).body
    assert body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), (
        f'{init.relative_to(ROOT)} has no docstring')
    assert len(body) == 1, f'{init.relative_to(ROOT)} defines or imports names'


def test_the_library_has_only_packages_at_its_top():
  assert [p.name for p in LIBRARY.glob('*.py')] == ['__init__.py']


@pytest.mark.parametrize('path', CALLERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_library_name_is_imported_from_the_module_that_defines_it(path):
  for line, module, name in _uses_of_library_names(path):
    assert _module_file(module) is not None, f'{path.name}:{line}: no module {module}'
    if _module_file(f'{module}.{name}') is not None:
      continue  # a module of a package
    assert name in _defined(module), (
        f'{path.relative_to(ROOT)}:{line}: {name} is not defined in {module}; import it from '
        'the module that defines it')
