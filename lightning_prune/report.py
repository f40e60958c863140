"""``lightning-prune-report DIR``: a sweep's results as a Markdown table and an accuracy-vs-sparsity plot.

Reads every ``results.json`` under ``DIR`` (one per run, written by ``lightning-prune``), averages
over seeds, and writes ``report.md`` and ``report.png`` next to them (or to ``--out``). Jobs of the
sweep that crashed (a job folder without ``results.json``) or never ran (fewer job folders than the
sweep's combinations in ``multirun.yaml``) are listed, never skipped silently. The plot shows one
line per method with error bars (std over seeds) and the dense baseline: the mean of ``pruner=none``
runs if the sweep has them, else the validation accuracy measured before the first round.
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


def problems(root: str | Path) -> list[str]:
    """Jobs of a Hydra sweep under ``root`` that failed (no results.json) or never started."""
    root = Path(root)
    jobs = sorted(p.parent.parent for p in root.rglob(".hydra/overrides.yaml") if p.parent.parent != root)
    out = []
    for job in jobs:
        if not (job / "results.json").exists():
            overrides = " ".join(_read_yaml(job / ".hydra" / "overrides.yaml") or [])
            out.append(f"failed: {job.relative_to(root)} ({overrides}): no results.json, see its log")
    expected = _sweep_size(root / "multirun.yaml")
    if expected is not None and len(jobs) < expected:
        out.append(f"never ran: {expected - len(jobs)} of the sweep's {expected} jobs (the sweep stopped early)")
    return out


def _read_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else None


def _sweep_size(path: Path) -> int | None:
    """Number of jobs a sweep's task overrides expand to (``a=1,2 b=x,y`` -> 4), or None if unknown."""
    config = _read_yaml(path)
    if not config:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = config.get("hydra", {}).get("overrides", {}).get("task", [])
    size = 1
    for override in OverridesParser.create().parse_overrides(task):
        if override.is_sweep_override():
            size *= len(list(override.sweep_string_iterator()))
    return size


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
        if r["method"] != "dense":
            series[r["method"]][round(float(r["sparsity"]), 4)].append(float(r.get(key, math.nan)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted(series):
        xs = sorted(series[method])
        means = [statistics.mean(series[method][x]) for x in xs]
        stds = [statistics.stdev(series[method][x]) if len(series[method][x]) > 1 else 0.0 for x in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
    dense = [float(r.get(key, math.nan)) for r in results if r["method"] == "dense"]
    label = "dense"
    if not dense:
        dense, label = [float(r.get("dense_val_acc", math.nan)) for r in results], "dense (val, before pruning)"
    dense = [d for d in dense if not math.isnan(d)]
    if dense:
        ax.axhline(statistics.mean(dense), color="gray", linestyle="--", label=label)
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
    issues = problems(args.root)
    out = Path(args.out or args.root)
    out.mkdir(parents=True, exist_ok=True)
    md = table(results, args.metric)
    notes = "".join(f"\n* {line}" for line in issues)
    (out / "report.md").write_text(
        f"# {args.metric} by method and target sparsity\n\n{md}\n" + (f"\nNot in the table:{notes}\n" if issues else "")
    )
    plot(results, out / "report.png", args.metric)
    print(md)
    for line in issues:
        print(f"WARNING: {line}")
    print(f"\nwrote {out / 'report.md'} and {out / 'report.png'} ({len(results)} runs, {len(issues)} problems)")


if __name__ == "__main__":
    main()
