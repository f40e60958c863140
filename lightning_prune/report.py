"""``lightning-prune-report DIR``: a sweep's results as a Markdown table and an accuracy-vs-sparsity plot.

Reads every ``results.json`` under ``DIR`` (one per run, written by ``lightning-prune``), averages
over seeds, and writes ``report.md`` and ``report.png`` next to them (or to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def collect(root: str | Path) -> list[dict[str, Any]]:
    files = sorted(Path(root).rglob("results.json"))
    if not files:
        raise FileNotFoundError(f"no results.json under {root}: run `lightning-prune -m ...` first")
    return [json.loads(f.read_text()) for f in files]


def _cell(values: Sequence[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2%}"
    return f"{statistics.mean(values):.2%} ± {statistics.stdev(values):.2%}"


def table(results: Sequence[dict[str, Any]], key: str = "test_acc") -> str:
    """Rows: methods; columns: target sparsity; cells: mean ± std over seeds of ``key``."""
    cells: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        cells[r["method"]][round(float(r["target"]), 4)].append(float(r.get(key, math.nan)))
    targets = sorted({t for row in cells.values() for t in row})
    header = "| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |"
    lines = [header, "|---|" + "---|" * len(targets)]
    for method in sorted(cells):
        lines.append(f"| {method} | " + " | ".join(_cell(cells[method].get(t, [])) for t in targets) + " |")
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], path: str | Path, key: str = "test_acc", title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        series[r["method"]][float(r["sparsity"])].append(float(r.get(key, math.nan)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted(series):
        xs = sorted(series[method])
        ax.plot(xs, [statistics.mean(series[method][x]) for x in xs], marker="o", label=method)
    ax.set_xlabel("sparsity")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(title or f"{key.replace('_', ' ')} vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-prune-report", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a sweep directory (e.g. multirun/2026-01-01/12-00-00)")
    parser.add_argument("--out", help="output directory (default: ROOT)")
    parser.add_argument("--metric", default="test_acc", help="results.json key to report (default test_acc)")
    args = parser.parse_args(argv)
    results = collect(args.root)
    out = Path(args.out or args.root)
    out.mkdir(parents=True, exist_ok=True)
    md = table(results, args.metric)
    (out / "report.md").write_text(f"# {args.metric} by method and target sparsity\n\n{md}\n")
    plot(results, out / "report.png", args.metric)
    print(md)
    print(f"\nwrote {out / 'report.md'} and {out / 'report.png'} ({len(results)} runs)")


if __name__ == "__main__":
    main()
