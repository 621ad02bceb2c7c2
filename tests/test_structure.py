"""The library's shape, checked (issues 11 and 19): files and functions short enough to read in one sitting, no
package reaching into another's private names, no module changing another's tables as a side effect of being
imported, packages in the order of the data flow (a lower stage never imports a higher one) and no import cycle
between modules (the graph is built from the source, function-level imports included).

Each check lists every offender (file:line and what is wrong), so one failing run says all there is to fix.
"""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY_FILES = sorted((ROOT / "gpt2lite").rglob("*.py"))
MAX_FILE_LINES = 400  # nanoGPT's model.py is 330 lines, torchtune's peft/lora.py 320: one concept, by concept
MAX_FUNCTION_LINES = 60  # from the def line to the last line, docstring included

# The stages of the data flow, lowest first: a module imports only from its own stage or lower ones. The leaves
# are the top-level modules every stage uses; the face (gpt2lite/__init__, __main__) sits above everything.
LEAVES = ("gpt2lite.errors", "gpt2lite.dtypes", "gpt2lite.files", "gpt2lite.tokenizer", "gpt2lite.loss",
          "gpt2lite.seed")
STAGES = ("kernels", "model", "quantization", "hub", "peft", "generation", "tasks", "training", "experiment", "estimation", "cli")
FACE = ("gpt2lite", "gpt2lite.__main__")
# The one deliberate exception: the model's from_pretrained / save_pretrained call the hub's loader and writer
# (a function-level import), so that GPT2.from_pretrained(...) works without importing the hub first.
ALLOWED_LATER_IMPORTS = {("gpt2lite.model.gpt2", "PreTrained.from_pretrained", "gpt2lite.hub.pretrained"),
                         ("gpt2lite.model.gpt2", "PreTrained.save_pretrained", "gpt2lite.hub.pretrained")}


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
    return [use for use, _ in private_name_uses_with_owner(tree, file)]


def private_name_uses_with_owner(tree: ast.Module, file: str, module: str = "probe", is_package: bool = False) -> list:
    """private_name_uses, each with the library module that owns the private name (None: not the library's)."""
    imported, found, bound = imported_names(tree), [], {}
    package = module.split(".") if is_package else module.split(".")[:-1]

    def absolute(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package[:len(package) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def owner(dotted: str):
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in MODULES:
                return ".".join(parts[:n])
        return None

    for node in ast.walk(tree):  # what each imported name is: a library module, or a name from one
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{absolute(node)}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = "." * node.level + (node.module or "")
            found += [(f"{file}:{node.lineno} from {source} import {alias.name}", owner(absolute(node)))
                      for alias in node.names if is_private(alias.name)]
            if any(is_private(part) for part in (node.module or "").split(".")):
                found.append((f"{file}:{node.lineno} from {source} import ... (a private module)", owner(absolute(node))))
        elif isinstance(node, ast.Import):
            found += [(f"{file}:{node.lineno} import {alias.name}", owner(alias.name)) for alias in node.names
                      if any(is_private(part) for part in alias.name.split("."))]
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            chain = node.value
            while isinstance(chain, ast.Attribute):
                chain = chain.value
            if isinstance(chain, ast.Name) and chain.id in imported:  # not self._x, obj._x, f()._x
                dotted = ast.unparse(node).replace(chain.id, bound.get(chain.id, chain.id), 1)
                found.append((f"{file}:{node.lineno} {ast.unparse(node)}", owner(dotted)))
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


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path) for path in LIBRARY_FILES}
PACKAGES = {module_name(path) for path in LIBRARY_FILES if path.name == "__init__.py"}


def package_of(module: str) -> str:
    """The package a module belongs to: itself for a package's __init__, else its parent."""
    return module if module in PACKAGES else module.rsplit(".", 1)[0]


def stage_of(module: str) -> int:
    """0 for a leaf, 1 + the index in STAGES for a stage's module, one above the last stage for the face."""
    if module in FACE:
        return len(STAGES) + 1
    if module in LEAVES:
        return 0
    stage = module.split(".")[1]
    assert stage in STAGES, f"{module} is in no stage: put it in one of {STAGES} or add it to LEAVES"
    return 1 + STAGES.index(stage)


def imports(tree: ast.Module, module: str, is_package: bool, modules=MODULES) -> list:
    """[(imported library module, line, enclosing function or "")] of every import in a module, at any depth.
    `from a import b` imports the module a.b where there is one, else a."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{function}.{child.name}" if function else child.name
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, function) for a in child.names if a.name.split(".")[0] == "gpt2lite")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[:len(package) - (child.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                if base.split(".")[0] == "gpt2lite":
                    found.extend((f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base, child.lineno, function)
                                 for a in child.names)
            visit(child, inner)

    visit(tree, "")
    return found


def import_graph():
    """{module: [(imported module, file:line, function)]} of the whole library."""
    graph = {}
    for path in LIBRARY_FILES:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        module, file = module_name(path), str(path.relative_to(ROOT))
        graph[module] = [(target, f"{file}:{line}", function)
                         for target, line, function in imports(tree, module, path.name == "__init__.py")]
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in {t for t, *_ in graph.get(node, [])}:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or any(t == node for t, *_ in graph.get(node, [])):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_checks_see_the_library():
    assert len(LIBRARY_FILES) > 40 and ROOT / "gpt2lite" / "model" / "gpt2.py" in LIBRARY_FILES  # not vacuous
    assert sum(len(edges) for edges in import_graph().values()) > 200


def test_at_most_a_dozen_modules_at_the_top():
    top = sorted(module for module in MODULES if module.count(".") == 1 and module not in PACKAGES)
    assert len(top) <= 12 and set(top) == set(LEAVES) | {"gpt2lite.__main__"}, top


def test_no_package_imports_a_later_stage():
    offenders = [f"{where} {module} imports {target}" + (f" (in {function})" if function else "")
                 for module, edges in import_graph().items() for target, where, function in edges
                 if stage_of(target) > stage_of(module) and (module, function, target) not in ALLOWED_LATER_IMPORTS]
    assert not offenders, failure(f"imports of a later stage (order: leaves < {' < '.join(STAGES)}; move the piece "
                                  "to the stage that needs it, or pass it in)", offenders)


def test_the_model_and_the_training_loop_know_adapters_only_by_their_protocol():
    """Soft-prompt rules stay in peft: the model and the loop read what adapters publish (num_virtual_tokens,
    label_offset, adapter_parameters), never import peft."""
    offenders = [f"{where} {module} imports {target}" for module, edges in import_graph().items()
                 if module.startswith(("gpt2lite.model", "gpt2lite.training")) for target, where, _ in edges
                 if target.startswith("gpt2lite.peft")]
    assert not offenders, failure("imports of peft from the model or the training loop", offenders)


def user_code_subpackages(source: str) -> set:
    """The gpt2lite subpackages a script imports from (gpt2lite itself, the face, is not one)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found.update(name.split(".")[1] for name in names if name.startswith("gpt2lite."))
    return found


def test_the_notebook_and_the_examples_import_from_the_face_and_two_subpackages_at_most():
    import json

    notebook = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text(encoding="utf-8"))
    cells = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    scripts = {"notebooks/quickstart.ipynb": "\n".join(line for cell in cells for line in cell.splitlines()
                                                       if not line.startswith("%"))}
    scripts.update({str(path.relative_to(ROOT)): path.read_text(encoding="utf-8")
                    for path in sorted((ROOT / "examples").glob("*.py"))})
    offenders = [f"{name}: {sorted(found)}" for name, source in scripts.items()
                 if len(found := user_code_subpackages(source)) > 2]
    assert len(scripts) >= 2 and not offenders, failure("user code importing from more than two subpackages "
                                                        "(export what it needs from the face)", offenders)


def test_no_import_cycle_between_modules():
    found = cycles(import_graph())
    assert not found, failure("import cycles (function-level imports included; move the shared piece to the lower "
                              "module)", [" <-> ".join(component) for component in found])


def test_no_package_exports_a_name_equal_to_a_submodule():
    offenders = []
    for path in LIBRARY_FILES:
        if path.name != "__init__.py":
            continue
        package = module_name(path)
        face = importlib.import_module(package)
        exported = getattr(face, "__all__", None)
        if exported is None:
            offenders.append(f"{package} has no __all__")
            continue
        offenders += [f"{package}.{name} is a {type(getattr(face, name)).__name__} and a submodule" for name in exported
                      if f"{package}.{name}" in MODULES  # the subpackage itself (gpt2lite.peft) is fine
                      and getattr(face, name) is not importlib.import_module(f"{package}.{name}")]
    assert not offenders, failure("package faces hiding a submodule, or without __all__", offenders)


def test_no_file_over_400_lines():
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


def test_no_private_name_used_across_packages():
    """A private name may be shared by the modules of one package (gpt2lite.training's files), never between
    packages: from another package only public names are imported."""
    offenders = []
    for path in LIBRARY_FILES:
        tree, file = ast.parse(path.read_text(encoding="utf-8")), str(path.relative_to(ROOT))
        package = package_of(module_name(path))
        offenders += [use for use, owner in private_name_uses_with_owner(tree, file, module_name(path),
                                                                         path.name == "__init__.py")
                      if owner is None or package_of(owner) != package]
    assert not offenders, failure("uses of another package's private (_underscore) names: make the name public and "
                                  "document it, or move the code that needs it into its package", offenders)


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


@pytest.mark.parametrize("source, expected", [
    ("from gpt2lite.training import loop", [("gpt2lite.training.loop", 1, "")]),  # a module by name
    ("from gpt2lite.training.loop import train", [("gpt2lite.training.loop", 1, "")]),
    ("import gpt2lite.hub.pretrained as hub", [("gpt2lite.hub.pretrained", 1, "")]),
    ("def f():\n    from gpt2lite.hub import pretrained", [("gpt2lite.hub.pretrained", 2, "f")]),
    ("class A:\n    def f(self):\n        from . import loss", [("gpt2lite.loss", 3, "A.f")]),  # relative, in a method
    ("import torch\nfrom typing import List", []),
])
def test_the_import_reader(source, expected):
    assert imports(ast.parse(source), "gpt2lite.probe", False) == expected


def test_the_cycle_and_order_checks():
    graph = {"a": [("b", "a.py:1", "")], "b": [("c", "b.py:1", "f")], "c": [("a", "c.py:1", "")], "d": [("a", "", "")]}
    assert cycles(graph) == [["a", "b", "c"]]  # a function-level import closes a cycle too
    assert cycles({"a": [("b", "", "")], "b": []}) == []
    assert stage_of("gpt2lite.errors") < stage_of("gpt2lite.model.gpt2") < stage_of("gpt2lite.hub.weights") \
        < stage_of("gpt2lite.peft.lora.add") < stage_of("gpt2lite.training.loop") < stage_of("gpt2lite")


@pytest.mark.parametrize("source, module, owners", [
    ("from gpt2lite.training.state import _helper", "gpt2lite.training.loop", ["gpt2lite.training.state"]),
    ("from gpt2lite.training import distributed\ndistributed._x", "gpt2lite.training.loop",
     ["gpt2lite.training.distributed"]),
    ("from gpt2lite.hub.weights import CheckpointReader\nCheckpointReader._cache", "gpt2lite.model.gpt2",
     ["gpt2lite.hub.weights"]),
    ("import torch._dynamo", "gpt2lite.model.gpt2", [None]),
])
def test_private_names_belong_to_a_package(source, module, owners):
    uses = private_name_uses_with_owner(ast.parse(source), "probe.py", module)
    assert [owner for _, owner in uses] == owners
    same_package = [owner is not None and package_of(owner) == package_of(module) for _, owner in uses]
    assert same_package == [module.startswith("gpt2lite.training") and owner is not None for owner in owners]
