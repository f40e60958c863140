"""Package metrics: lines, the largest files, classes and functions (AST spans), and the limits they must keep.

python tools/code_metrics.py [lightning_prune]

``tests/test_code_metrics.py`` asserts the limits below, so the figures a closing note quotes are the
ones this prints at that commit.
"""

from __future__ import annotations

import ast
import pathlib
import sys
from collections.abc import Iterator

MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 600


def files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(root.rglob("*.py"))


def file_lines(root: pathlib.Path) -> dict[str, int]:
    return {str(f.relative_to(root.parent)): len(f.read_text().splitlines()) for f in files(root)}


def spans(root: pathlib.Path) -> Iterator[tuple[str, str, int]]:
    """``(kind, "path:qualified.name", lines)`` for every class and function (methods and nested ones too)."""
    for f in files(root):
        where = f.relative_to(root.parent)

        def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, str, int]]:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    kind = "class" if isinstance(child, ast.ClassDef) else "function"
                    name = f"{prefix}{child.name}"
                    yield kind, f"{where}:{name}", child.end_lineno - child.lineno + 1
                    yield from walk(child, f"{name}.")
                else:
                    yield from walk(child, prefix)

        yield from walk(ast.parse(f.read_text()), "")


def largest(root: pathlib.Path, kind: str, n: int = 5) -> list[tuple[int, str]]:
    return sorted(((lines, name) for k, name, lines in spans(root) if k == kind), reverse=True)[:n]


def main() -> None:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "lightning_prune")
    lines = file_lines(root)
    app = sum(n for f, n in lines.items() if "/app/" in f)
    print(f"package lines {sum(lines.values())} in {len(lines)} files, of which app {app}")
    print(f"largest files (limit {MAX_FILE_LINES})", sorted(((n, f) for f, n in lines.items()), reverse=True)[:5])
    print(f"largest classes (limit {MAX_CLASS_LINES})", largest(root, "class"))
    print(f"largest functions (limit {MAX_FUNCTION_LINES})", largest(root, "function"))


if __name__ == "__main__":
    main()
