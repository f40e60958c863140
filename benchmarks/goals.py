"""The quality goals (issue 19), checked against the cached cells of the benchmarks that measure them.

    python benchmarks/goals.py      # rewrites the "## Targets" table of benchmarks/RESULTS.md in place

Each goal names the cells it reads: ``extreme.py`` (one-shot, the library's defaults),
``gradual99.py`` (gradual to 99%) and ``recover.py`` (fine-tuning to recover). A goal whose cells
are missing says "not run"; run the named script first. ``suite.py`` builds its targets table
with :func:`goals` too, next to its speed targets.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

CELLS = common.CACHE / "cells"
SEEDS = (0, 1, 2)


def _load(pattern: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(CELLS.glob(pattern))]


def _mean(rows: list[dict[str, Any]], key: str = "acc") -> tuple[float, float, int] | None:
    vals = [r[key] for r in rows]
    if not vals:
        return None
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def _fmt(m: tuple[float, float, int]) -> str:
    mean, std, n = m
    return f"{100 * mean:.1f} ± {100 * std:.1f} ({n} seeds)" if n > 1 else f"{100 * mean:.1f} (1 seed)"


def _one_shot(model: str, target: float, goal: float, method: str = "obs-layerwise") -> tuple[str, bool | None, str]:
    slug = method.replace(" ", "").replace(",", "+").replace("=", "-")
    rows = [r for r in _load(f"extreme-{model}-{slug}-{target}-s*.json") if r["seed"] in SEEDS]
    name = f"{'MLP' if model == 'mlp' else 'LeNet-5'} one-shot {target:.0%} >= {100 * goal:.1f}% (defaults)"
    m = _mean(rows)
    if m is None:
        return name, None, "not run (benchmarks/extreme.py)"
    dense = _mean(rows, "dense_acc")
    return name, m[0] >= goal, f"{_fmt(m)}, mean {100 * m[0]:.2f}; dense {100 * dense[0]:.1f}"  # type: ignore[index]


def _gradual(goal: float) -> tuple[str, bool | None, str]:
    name = f"gradual 99% (MLP, 15 epochs) >= {100 * goal:.1f}%"
    rows = [
        r
        for r in _load("gradual99-*-s*.json")  # the 15-epoch budget only: longer rows are diagnostics
        if "variant" in r and r["method"].startswith(("obs", "obd")) and r.get("epochs", 15) == 15
    ]
    if not rows:
        return name, None, "not run (benchmarks/gradual99.py)"
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["method"]), []).append(r)
    # the best second-order method and setting measured on the most seeds
    most = max(len(g) for g in groups.values())
    (variant, method), best = max(
        ((k, g) for k, g in groups.items() if len(g) == most), key=lambda kg: statistics.mean(r["acc"] for r in kg[1])
    )
    m, dense = _mean(best), _mean(best, "dense_acc")
    return name, m[0] >= goal, f"{_fmt(m)}, {method} ({variant}); dense {100 * dense[0]:.1f}"  # type: ignore[index]


def _recover() -> tuple[str, bool | None, str]:
    name = "fine-tuning to dense - 1 at 95%: OBS (defaults) needs <= 1/3 of magnitude's epochs"
    rows = _load("recover-mlp-*-0.95-s*.json")
    by = {m: [r for r in rows if r["method"] == m and r["seed"] in SEEDS] for m in ("magnitude", "obs-layerwise")}
    if not all(by.values()):
        return name, None, "not run (benchmarks/recover.py)"

    def epochs(r: dict[str, Any]) -> float:
        return next((e for e, a in r["points"] if a >= r["dense_acc"] - 0.01), float("inf"))

    obs, mag = (statistics.mean(epochs(r) for r in by[m]) for m in ("obs-layerwise", "magnitude"))
    per_seed = ", ".join(f"{epochs(a):g} vs {epochs(b):g}" for a, b in zip(by["obs-layerwise"], by["magnitude"]))
    return name, obs <= mag / 3, f"{obs:.2f} vs {mag:.2f} epochs (per seed: {per_seed})"


def goals() -> list[tuple[str, bool | None, str]]:
    """``(goal, met or None if not run, measured)`` for every quality goal."""
    return [
        _one_shot("mlp", 0.90, 0.880),
        _one_shot("mlp", 0.95, 0.850),
        _one_shot("mlp", 0.98, 0.750),
        _one_shot("lenet5", 0.95, 0.800),
        _gradual(0.880),
        _recover(),
    ]


def rows_md(checks: list[tuple[str, bool | None, str]]) -> list[str]:
    met = {True: "yes", False: "**no**", None: "-"}
    return [f"| {name} | {met[ok]} | {val} |" for name, ok, val in checks]


def main() -> None:
    lines = ["| target | met | measured |", "|---|---|---|", *rows_md(goals())]
    path = common.ROOT / "RESULTS.md"
    text = path.read_text()
    speed = [
        line
        for line in re.search(r"## Targets\n\n(.*?)\n\n", text, flags=re.S).group(1).splitlines()  # type: ignore[union-attr]
        if line.startswith("| epochs without") or line.startswith("| fast OBS")
    ]
    table = "\n".join([*lines, *speed])
    text = re.sub(r"(## Targets\n\n)(.*?)(\n\n)", lambda m: m.group(1) + table + m.group(3), text, count=1, flags=re.S)
    path.write_text(text)
    print(table)


if __name__ == "__main__":
    main()
