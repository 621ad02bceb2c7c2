"""The library's shape, checked (issue 11): files and functions short enough to read in one sitting, no module
reaching into another's private names, no module changing another's tables as a side effect of being imported.

Each check lists every offender (file:line and what is wrong), so one failing run says all there is to fix.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY_FILES = sorted((ROOT / "gpt2lite").rglob("*.py"))
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 60  # from the def line to the last line, docstring included


def parsed_files():
    """(path relative to the repository, its syntax tree) for every library file."""
    return [(str(path.relative_to(ROOT)), ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
            for path in LIBRARY_FILES]


def is_private(name: str) -> bool:
    """_name is private to its module; __dunder__ names are not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imported_names(tree: ast.Module) -> set:
    """The names imports bind anywhere in a module: modules, and other modules' classes and functions."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names if alias.name != "*")
    return names


def root_name(node: ast.expr):
    """The name a dotted, called or indexed expression starts from (`a` in `a.b[k].c(...)`), or None."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def private_name_uses(tree: ast.Module, file: str) -> list:
    """`from x import _y`, `import x._y`, and `x._y` (or `x.z._y`) where x is a name an import bound."""
    imported, found = imported_names(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            found += [f"{file}:{node.lineno} from {module} import {alias.name}"
                      for alias in node.names if is_private(alias.name)]
            if any(is_private(part) for part in (node.module or "").split(".")):
                found.append(f"{file}:{node.lineno} from {module} import ... (a private module)")
        elif isinstance(node, ast.Import):
            found += [f"{file}:{node.lineno} import {alias.name}" for alias in node.names
                      if any(is_private(part) for part in alias.name.split("."))]
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            chain = node.value
            while isinstance(chain, ast.Attribute):
                chain = chain.value
            if isinstance(chain, ast.Name) and chain.id in imported:  # not self._x, obj._x, f()._x
                found.append(f"{file}:{node.lineno} {ast.unparse(node)}")
    return found


def module_level_statements(body: list):
    """The statements that run when a module is imported (inside top-level if/try blocks too)."""
    for statement in body:
        if isinstance(statement, (ast.If, ast.Try)):
            yield from module_level_statements(statement.body + statement.orelse + getattr(statement, "finalbody", []))
        else:
            yield statement


def import_time_side_effects(tree: ast.Module, file: str) -> list:
    """Module-level statements that assign into, delete from, or call something reached through an imported
    name: `architectures.ARCHITECTURES["neo"] = ...`, `REGISTRY.update(...)`, `register(...)`. Binding a
    module-level name (`logger = logging.getLogger(__name__)`) is not one."""
    imported, found = imported_names(tree), []
    for statement in module_level_statements(tree.body):
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call):
            touched = [statement.value.func]
        elif isinstance(statement, (ast.Assign, ast.Delete)):
            touched = [target for target in statement.targets if not isinstance(target, ast.Name)]
        elif isinstance(statement, (ast.AugAssign, ast.AnnAssign)):
            touched = [statement.target] if not isinstance(statement.target, ast.Name) else []
        else:
            continue
        if any(root_name(node) in imported for node in touched):
            found.append(f"{file}:{statement.lineno} {ast.unparse(statement)[:100]}")
    return found


def failure(title: str, offenders: list) -> str:
    return f"{len(offenders)} {title}:\n  " + "\n  ".join(offenders)


def test_the_checks_see_the_library():
    assert len(LIBRARY_FILES) > 40 and ROOT / "gpt2lite" / "model" / "gpt2.py" in LIBRARY_FILES  # not vacuous


def test_no_file_over_300_lines():
    offenders = []
    for path in LIBRARY_FILES:
        n_lines = len(path.read_text(encoding="utf-8").splitlines())
        if n_lines > MAX_FILE_LINES:
            offenders.append(f"{path.relative_to(ROOT)}: {n_lines} lines")
    assert not offenders, failure(f"files over {MAX_FILE_LINES} lines (one concept per file: split one out)", offenders)


def test_no_function_over_60_lines():
    offenders = []
    for file, tree in parsed_files():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    offenders.append(f"{file}:{node.lineno} {node.name}(): {length} lines")
    assert not offenders, failure(f"functions over {MAX_FUNCTION_LINES} lines (def to last line)", offenders)


def test_no_private_name_used_across_modules():
    offenders = [use for file, tree in parsed_files() for use in private_name_uses(tree, file)]
    assert not offenders, failure("uses of another module's private (_underscore) names: make the name public and "
                                  "document it, or move the code that needs it into its module", offenders)


def test_no_module_changes_another_when_imported():
    offenders = [effect for file, tree in parsed_files() for effect in import_time_side_effects(tree, file)]
    assert not offenders, failure("module-level statements that change another module's state on import (build "
                                  "each table once, in the module that owns it)", offenders)


# The checks themselves: each finds what it is meant to, and nothing that is allowed.

@pytest.mark.parametrize("source, expected", [
    ("from .hf import _shards", ["from .hf import _shards"]),
    ("from ._impl import f", ["from ._impl import ... (a private module)"]),
    ("import torch._dynamo", ["import torch._dynamo"]),
    ("from . import hf\nhf._load_file('x')", ["hf._load_file"]),
    ("import gpt2lite.hub.pretrained\ngpt2lite.hub.pretrained._shards.x", ["gpt2lite.hub.pretrained._shards"]),
    ("from .hf import Reader\nReader._cache", ["Reader._cache"]),
    ("from .hf import resolve\nclass A:\n    def f(self, obj):\n        return self._x, obj._y, resolve.__doc__", []),
])
def test_the_private_name_check(source, expected):
    assert [use.split(" ", 1)[1] for use in private_name_uses(ast.parse(source), "probe.py")] == expected


@pytest.mark.parametrize("source, n_expected", [
    ("from .architectures import ARCHITECTURES\nARCHITECTURES['neo'] = 1", 1),
    ("from . import architectures\narchitectures.ARCHITECTURES.update(neo=1)", 1),
    ("from . import architectures\nif True:\n    architectures.TABLE['neo'] += 1", 1),
    ("from .architectures import register\nregister('neo')", 1),
    ("import logging\nlogger = logging.getLogger(__name__)\nTABLE = {}\nTABLE['a'] = 1\nTABLE.update(b=2)", 0),
    ("from . import architectures\ndef later():\n    architectures.ARCHITECTURES['neo'] = 1", 0),
])
def test_the_import_side_effect_check(source, n_expected):
    assert len(import_time_side_effects(ast.parse(source), "probe.py")) == n_expected
