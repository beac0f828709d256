"""An offline demo corpus: the docstrings of Python's standard library, one document per module.

Real English prose and code comments, present on every machine with Python, read with `ast` (nothing is
imported or executed): about 590 documents, 460k GPT-2 tokens. It gives the demo and the tests token shards in
the real format without a download; as a data_prep source (data_prep/sources.py: DemoSource) it is `demo`:

    python -m data_prep.fineweb --source demo --out store/data/demo      (100k-token shards by default)
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path


def stdlib_documents(max_docs: int | None = None) -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    n = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if (
            rel.startswith(("site-packages/", "test/", "idlelib/", "lib2to3/tests/"))
            or "/tests/" in rel
        ):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc.strip())
        if parts:
            yield "\n\n".join(parts)
            n += 1
            if max_docs and n >= max_docs:
                return
