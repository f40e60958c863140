"""The size limits of the house, as a test: the numbers cannot drift between closing notes.

No class over 300 lines, no function over 80, no file of the package over 600 (AST spans, as
``tools/code_metrics.py`` prints them); every path ``docs/ARCHITECTURE.md`` names exists.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import lightning_prune

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(lightning_prune.__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("code_metrics", ROOT / "tools" / "code_metrics.py")
metrics = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(metrics)


def test_no_file_of_the_package_is_over_the_limit():
    over = {f: n for f, n in metrics.file_lines(PACKAGE).items() if n > metrics.MAX_FILE_LINES}
    assert not over, f"files over {metrics.MAX_FILE_LINES} lines: {over}"


def test_no_class_is_over_the_limit():
    over = [(n, name) for kind, name, n in metrics.spans(PACKAGE) if kind == "class" and n > metrics.MAX_CLASS_LINES]
    assert not over, f"classes over {metrics.MAX_CLASS_LINES} lines: {over}"


def test_no_function_is_over_the_limit():
    over = [
        (n, name) for kind, name, n in metrics.spans(PACKAGE) if kind == "function" and n > metrics.MAX_FUNCTION_LINES
    ]
    assert not over, f"functions over {metrics.MAX_FUNCTION_LINES} lines: {sorted(over, reverse=True)}"


def test_the_spans_are_measured():
    """The measurement itself: a known function and class are found with their lengths."""
    found = {name: n for _, name, n in metrics.spans(PACKAGE)}
    assert any(name.endswith("presets.py:SparseGPT") for name in found)
    assert all(n >= 1 for n in found.values()) and len(found) > 200


def test_every_path_the_architecture_page_names_exists():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`([\w/]+(?:\.py|/))`", text))
    assert len(named) > 10
    missing = [  # a bare file name is one of some folder's (a row names its folder once)
        p
        for p in sorted(named)
        if not (PACKAGE / p).exists() and not (ROOT / p).exists() and not any(PACKAGE.rglob(p.rstrip("/")))
    ]
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist under lightning_prune/: {missing}"
