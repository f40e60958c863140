"""What a benchmark process knows about itself: its resident memory and the code's commit.

Kept apart from :mod:`common` (which imports Lightning and the experiment app) so that ``gpu.py``,
which must run on a machine with only torch (and transformers), measures memory and names the
commit the same way the other scripts do.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent


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


def commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
