"""What a measurement needs besides the library: alternated timing, the process's resident memory, the commit.

Kept apart from :mod:`common` (which imports Lightning and the experiment app, and re-exports these) so that
``gpu.py``, which must run on a machine with only torch (and transformers), times, measures memory and names the
commit the same way the other scripts do.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent


def alternation(names: list[Any], reps: int, swap: bool = False) -> Iterator[tuple[int, Any]]:
    """``(repetition, name)`` in the order to measure them: every name once per repetition, in turn,
    so drift and a shared machine's bursts hit all alike (timing them one after the other would not);
    ``swap`` reverses the order on odd repetitions, so that no one always runs first."""
    for rep in range(reps):
        order = list(names)
        yield from ((rep, k) for k in (order[::-1] if swap and rep % 2 else order))


def alternated(measures: dict[Any, Callable[[], Any]], reps: int, swap: bool = False) -> dict[Any, list[Any]]:
    """Each of ``measures`` called in :func:`alternation`; their results per name, in repetition order."""
    out: dict[Any, list[Any]] = {k: [] for k in measures}
    for _, k in alternation(list(measures), reps, swap):
        out[k].append(measures[k]())
    return out


def rss_mib(field: str = "VmRSS") -> float:
    """A memory line of ``/proc/self/status`` in MiB (``VmRSS``: resident now; ``VmHWM``: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS, so it measures what follows (Linux)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def make_resident(model: Any) -> None:
    """Read every parameter once, so the model's pages are resident before a peak-memory baseline is taken.

    ``from_pretrained`` maps safetensors lazily: without this the weights become resident while the
    measured call first reads them, and "peak above the loaded model" counts the model itself.
    """
    for p in model.parameters():
        float(p.detach().sum())


def commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
