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
from typing import Dict, List, Optional

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


def docstring_corpus(max_examples: Optional[int] = 2000, max_source_chars: int = 2000) -> Dict[str, list]:
    """Summarization examples {"train", "validation", "test"} of {"source", "target", "name"} dicts.

    The split is fixed by a hash of each example's qualified name (80 / 10 / 10). max_examples: stop after
    this many examples in all (files are read in sorted order, so the first ones are always the same).
    """
    splits: Dict[str, list] = {"train": [], "validation": [], "test": []}
    total = 0
    for path in _stdlib_files():
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        module = os.path.splitext(os.path.basename(path))[0]
        for node in ast.walk(tree):  # the module itself first
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            docstring = ast.get_docstring(node)
            parts = _split_docstring(docstring) if docstring else None
            if parts is None:
                continue
            name = f"{module}.{getattr(node, 'name', '')}".rstrip(".")
            source = (_signature(node) + "\n" + parts[1]).strip()[:max_source_chars]
            bucket = int(hashlib.sha256(f"{path}:{name}".encode()).hexdigest(), 16) % 10
            split = "test" if bucket == 0 else "validation" if bucket == 1 else "train"
            splits[split].append({"source": source, "target": parts[0], "name": name})
            total += 1
            if max_examples is not None and total >= max_examples:
                return splits
    return splits
