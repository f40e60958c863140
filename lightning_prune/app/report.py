"""``lightning-prune-report DIR``: a sweep's results as a Markdown table and an accuracy-vs-sparsity plot.

Reads every ``results.json`` under ``DIR`` (one per run, written by ``lightning-prune``), averages
over seeds, and writes ``report.md`` and ``report.png`` next to them (or to ``--out``). Jobs of the
sweep that crashed (a job folder without ``results.json``) or never ran (fewer job folders than the
sweep's combinations in ``multirun.yaml``) are listed, never skipped silently.

Every number is the reported metric (default ``test_acc``) at the end of its run: after training,
the last round and the fine-tuning that follows it (``mode=train``), or right after the round
(``mode=oneshot``). The dense baseline is measured the same way, so it compares like with like:
the ``pruner=none`` runs (the same training, no pruning), or for one-shot runs the checkpoints
before their round. A folder without either has no baseline line, and the report says so: the
validation accuracy logged before the first round is of a model trained for a fraction of the
budget, on another split, and would sit below every pruned model.
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


WORDS = {"acc": "accuracy", "ppl": "perplexity", "loss": "loss"}


def describe(key: str) -> str:
    """``"test_acc"`` -> ``"test accuracy"``: the split and the quantity a results.json key holds."""
    split, _, what = key.partition("_")
    return f"{split} {WORDS.get(what, what)}" if what else key


def moment(results: Sequence[dict[str, Any]]) -> str:
    """When the reported numbers were measured, from the runs' modes."""
    modes = {r.get("mode", "train") for r in results}
    if modes == {"oneshot"}:
        return "right after the one-shot round (no fine-tuning)"
    if modes == {"train"}:
        return "at the end of training (after the last round and the fine-tuning that follows it)"
    return "at the end of each run (mode=train: after training; mode=oneshot: right after the round)"


def baseline(results: Sequence[dict[str, Any]], key: str = "test_acc") -> tuple[list[float], str] | None:
    """The dense model's ``key`` on the same split at the same moment as the pruned runs', and its label.

    ``pruner=none`` runs of the sweep, else (one-shot runs only) the checkpoints before their round;
    ``None`` when the folder holds neither.
    """
    dense = [
        float(r[key]) for r in results if r["method"] == "dense" and r.get("mode", "train") == "train" and key in r
    ]
    dense = [v for v in dense if not math.isnan(v)]
    if dense:
        runs = f"{len(dense)} run{'s' * (len(dense) > 1)}"
        return dense, f"dense (pruner=none, {runs}): {describe(key)} at the end of the same training"
    if results and all(r.get("mode") == "oneshot" for r in results):
        before = [float(r["before"][key]) for r in results if key in r.get("before", {})]
        before = [v for v in before if not math.isnan(v)]
        if before:
            return before, f"dense: {describe(key)} of the same checkpoints before the one-shot round"
    return None


def no_baseline(results: Sequence[dict[str, Any]]) -> str:
    """Why there is no dense line, how to get one, and the only dense number there is, labelled."""
    text = (
        "none, no `pruner=none` run in this folder (add one with the sweep's other overrides: "
        "`lightning-prune pruner=none ... hydra.run.dir=DIR/dense`)"
    )
    for q, word in WORDS.items():
        key = f"dense_val_{q}"
        early = [(float(r[key]), r["rounds"][0]["when"]) for r in results if key in r and r.get("rounds")]
        early = [(v, w) for v, w in early if not math.isnan(v)]
        if early:
            whens = ", ".join(sorted({w for _, w in early}))
            mean = _format(statistics.mean(v for v, _ in early), f"val_{q}")
            return (
                f"{text}. Not comparable, so not drawn: the dense val {word} logged before the first round "
                f"({whens}) was {mean}, of a model trained for a fraction of the budget, on the validation split"
            )
    return text


def _format(value: float, key: str) -> str:
    return f"{value:.2%}" if key.endswith("acc") else f"{value:.2f}"


def _cell(values: Sequence[float], key: str = "test_acc") -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return _format(values[0], key)
    return f"{_format(statistics.mean(values), key)} ± {_format(statistics.stdev(values), key)}"


def table(results: Sequence[dict[str, Any]], key: str = "test_acc") -> str:
    """Rows: methods (``dense``: ``pruner=none`` runs, at 0%); columns: target sparsity; cells: mean ± std
    over seeds of ``key``."""
    cells: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        cells[r["method"]][round(float(r["target"]), 4)].append(float(r.get(key, math.nan)))
    targets = sorted({t for row in cells.values() for t in row})
    header = "| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |"
    lines = [header, "|---|" + "---|" * len(targets)]
    for method in sorted(cells):
        lines.append(f"| {method} | " + " | ".join(_cell(cells[method].get(t, []), key) for t in targets) + " |")
    return "\n".join(lines)


def caption(results: Sequence[dict[str, Any]], key: str = "test_acc") -> str:
    """What every number of the table and the plot is: split, moment, and the dense baseline."""
    found = baseline(results, key)
    dense = (
        f"Dense baseline: {found[1]}: {_format(statistics.mean(found[0]), key)}."
        if found
        else f"Dense baseline: {no_baseline(results)}."
    )
    return f"Each number: {describe(key)} {moment(results)}, mean ± std over seeds. {dense}"


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
    found = baseline(results, key)
    if found:
        ax.axhline(statistics.mean(found[0]), color="gray", linestyle="--", label=found[1].replace(": ", ":\n", 1))
    else:
        ax.text(0.02, 0.02, "no dense baseline: no pruner=none run in this folder", transform=ax.transAxes, fontsize=8)
    when = moment(results)
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"{describe(key)}, {when.split(' (')[0]}")
    ax.set_title(title or f"{describe(key)} vs sparsity", fontsize=11)
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
    root = Path(args.root)
    if not root.is_dir():
        parser.exit(2, f"lightning-prune-report: {str(root)!r} is not a folder: pass the folder of a sweep\n")
    issues = problems(root)
    files = sorted(root.rglob("results.json"))
    results = [json.loads(f.read_text()) for f in files]
    issues += [
        f"not a pruning run: {f.relative_to(root)} (mode=eval)" for f, r in zip(files, results) if "method" not in r
    ]
    results = [r for r in results if "method" in r]
    if not results:
        failed = f" ({len(issues)} problems, first: {issues[0]})" if issues else ""
        parser.exit(1, f"lightning-prune-report: no results.json of a pruning run under {str(root)!r}{failed}\n")
    out = Path(args.out or root)
    out.mkdir(parents=True, exist_ok=True)
    md = table(results, args.metric)
    about = caption(results, args.metric)
    notes = "".join(f"\n* {line}" for line in issues)
    (out / "report.md").write_text(
        f"# {describe(args.metric)} by method and target sparsity\n\n{about}\n\n{md}\n"
        + (f"\nNot in the table:{notes}\n" if issues else "")
    )
    plot(results, out / "report.png", args.metric)
    print(f"{about}\n\n{md}")
    for line in issues:
        print(f"WARNING: {line}")
    print(f"\nwrote {out / 'report.md'} and {out / 'report.png'} ({len(results)} runs, {len(issues)} problems)")


if __name__ == "__main__":
    main()
