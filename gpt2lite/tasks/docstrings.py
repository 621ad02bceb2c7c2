"""An offline summarization corpus built from the Python standard library's docstrings.

Every Python installation carries its standard library's source, so this corpus exists where no dataset
can be downloaded. For each documented function, class or module with a one-line summary and a body, the
target is the summary line and the source is the signature followed by the rest of the docstring:

    source: "def dumps(obj, *, skipkeys=False, ...):\\n Serialize ``obj`` to a JSON formatted ``str``. ..."
    target: "Serialize ``obj`` to a JSON formatted ``str``."

It is a real (if small and technical) summarization task: the summary often restates the body's first
sentence. It is meant for smoke runs and demos, not for comparison with published numbers. Files are
parsed with `ast` (nothing is imported) in sorted order, so the corpus is the same on every run of one
Python version.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from typing import Dict, List, Optional, Sequence

SKIPPED_DIRECTORIES = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip",
                       "turtledemo", "__pycache__", "tkinter", "pydoc_data"}


def _stdlib_files() -> List[str]:
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_DIRECTORIES)
        found.extend(os.path.join(directory, f) for f in sorted(files) if f.endswith(".py"))
    return found


def _signature(node) -> str:
    if isinstance(node, ast.ClassDef):
        return f"class {node.name}:"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return f"def {node.name}({ast.unparse(node.args)}):"
    return ""


def _split_docstring(docstring: str):
    """(summary line, body) when the docstring is a one-line summary, a blank line, then a body."""
    paragraphs = docstring.strip().split("\n\n", 1)
    if len(paragraphs) != 2 or "\n" in paragraphs[0].strip():
        return None
    summary, body = paragraphs[0].strip(), paragraphs[1].strip()
    if not 3 <= len(summary.split()) <= 30 or len(body.split()) < 12:
        return None
    return summary, body


def _parsed(paths):
    """(path, source text, ast tree) of each file that parses; the others are skipped."""
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            yield path, source, ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue


def _documented(tree):
    """(node, docstring) of the module, then of each class and function that has a docstring."""
    for node in ast.walk(tree):  # the module itself first
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node)
            if docstring:
                yield node, docstring


def _split_of(path: str, name: str) -> str:
    """The summarization split of an example, fixed by a hash of its file and qualified name (80/10/10)."""
    bucket = int(hashlib.sha256(f"{path}:{name}".encode()).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def _examples(path: str, tree, max_source_chars: int):
    """(node, split, example) of every summarization example of one parsed file."""
    module = os.path.splitext(os.path.basename(path))[0]
    for node, docstring in _documented(tree):
        parts = _split_docstring(docstring)
        if parts is None:
            continue
        name = f"{module}.{getattr(node, 'name', '')}".rstrip(".")
        source = (_signature(node) + "\n" + parts[1]).strip()[:max_source_chars]
        yield node, _split_of(path, name), {"source": source, "target": parts[0], "name": name}


def docstring_corpus(max_examples: Optional[int] = 2000, max_source_chars: int = 2000) -> Dict[str, list]:
    """Summarization examples {"train", "validation", "test"} of {"source", "target", "name"} dicts.

    The split is fixed by a hash of each example's file and qualified name (80 / 10 / 10). max_examples:
    stop after this many examples in all (files are read in sorted order, so the first ones are always the
    same).
    """
    splits: Dict[str, list] = {"train": [], "validation": [], "test": []}
    total = 0
    for path, _, tree in _parsed(_stdlib_files()):
        for _, split, example in _examples(path, tree, max_source_chars):
            splits[split].append(example)
            total += 1
            if max_examples is not None and total >= max_examples:
                return splits
    return splits


def _package_files(packages: Sequence[str]) -> List[str]:
    """The .py files of installed packages, found without importing them."""
    import importlib.util

    found = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not (spec.submodule_search_locations or spec.origin):
            raise ValueError(f"package {name!r} is not installed (importlib finds no {name!r}); "
                             "name an installed top-level package, e.g. 'json' or 'torch'")
        roots = list(spec.submodule_search_locations or [])
        if not roots and spec.origin.endswith(".py"):
            found.append(spec.origin)
        for root in roots:
            for directory, subdirectories, files in os.walk(root):
                subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_DIRECTORIES)
                found.extend(os.path.join(directory, f) for f in sorted(files) if f.endswith(".py"))
    return found


def _comment_blocks(source: str, skipped_lines: set) -> List[str]:
    """Runs of whole-line comments ('#' removed) of at least four words, outside skipped_lines."""
    blocks, current = [], []
    for number, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith(("#!", "# -*-")) and number not in skipped_lines:
            current.append(stripped.lstrip("#").strip())
            continue
        if len(" ".join(current).split()) >= 4:
            blocks.append("\n".join(current))
        current = []
    if len(" ".join(current).split()) >= 4:
        blocks.append("\n".join(current))
    return blocks


def pretraining_texts(comments: bool = True, packages: Sequence[str] = ()) -> List[str]:
    """Documents to pretrain a small language model on, offline: the standard library's docstrings (each
    after its signature) and comment blocks, plus the docstrings of the named installed packages.

    Never the summarization corpus's evaluation data: every docstring of an example in the validation or
    test split of docstring_corpus (whatever its max_examples) is left out with the comments inside its
    function or class, and so is any docstring anywhere whose first line is a held-out target (the
    standard library repeats some docstrings, e.g. in _pyio and io). Training-split examples stay in, as
    their docstrings (summary line first), not in the summarization template.
    """
    documents, held_out = [], set()  # documents: (first line of a docstring or None, text)
    stdlib = _stdlib_files()
    for path, source, tree in _parsed(stdlib + _package_files(packages)):
        skipped_lines = set()
        if path in stdlib:
            for node, split, example in _examples(path, tree, max_source_chars=2000):
                if split != "train":
                    held_out.add(example["target"])
                    if not isinstance(node, ast.Module):
                        skipped_lines.update(range(node.lineno, node.end_lineno + 1))
        for node, docstring in _documented(tree):
            first_line = docstring.strip().split("\n", 1)[0].strip()
            documents.append((first_line, (_signature(node) + "\n" + docstring).strip()))
        if comments and path in stdlib:
            documents.extend((None, block) for block in _comment_blocks(source, skipped_lines))
    return [text for first_line, text in documents if first_line not in held_out]
