"""One-shot at 90/95/98%: the library's defaults against the baselines, MLP and LeNet-5 over 3 seeds.

    python benchmarks/extreme.py                      # MLP seeds 0,1,2, LeNet-5 seed 0
    python benchmarks/extreme.py --lenet-seeds 0,1,2  # LeNet-5 over 3 seeds too, as RESULTS.md

``OBSPruning(target, schedule="one_shot")`` (the defaults), ``hessian="kfac"``, OBD with the
empirical Fisher and magnitude, each through ``prune()`` on the cached dense model (8 epochs), 32
training batches, no fine-tuning: the same dense models and calibration batches for every row. The
one-change-per-row design rows that chose the defaults (solver, reconstruct, allocation, damping,
recompute) are a finished study: benchmarks/ARCHIVE.md. Cells are cached in
``benchmarks/.cache/cells`` (``extreme-*``, the names the study used, so its cells are reused); the
table goes between the ``<!-- extreme:start -->`` markers of ``benchmarks/RESULTS.md``, and the MLP
rows between the ``<!-- results:start -->`` markers of the README.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning

SPARSITIES = [0.9, 0.95, 0.98]

# (name, what it is, factory); the first rows are the baselines
VARIANTS: list[tuple[str, str, Callable[[float], Any]]] = [
    ("magnitude", "baseline", lambda t: MagnitudePruning(t, schedule="one_shot", verbose=0)),
    (
        "obd-fisher",
        "baseline",
        lambda t: OBDPruning(t, curvature="fisher", fisher_type="empirical", schedule="one_shot", verbose=0),
    ),
    (
        "obs-layerwise",
        "defaults: exact solver and error-curve allocation (auto), reconstruct='original'",
        lambda t: OBSPruning(t, schedule="one_shot", verbose=0),
    ),
    (
        "obs-kfac",
        "hessian='kfac', recompute_steps=4",
        lambda t: OBSPruning(t, hessian="kfac", schedule="one_shot", verbose=0),
    ),
]
LENET = [n for n, _, _ in VARIANTS]


def cell(model: str, name: str, target: float, seed: int) -> dict[str, Any]:
    slug = name.replace(" ", "").replace(",", "+").replace("=", "-")
    return common.cell(f"extreme-{model}-{slug}-{target}-s{seed}", lambda: _measure(model, name, target, seed))


def _measure(model: str, name: str, target: float, seed: int) -> dict[str, Any]:
    make = next(f for n, _, f in VARIANTS if n == name)
    pruner = make(target)
    acc, net = common.one_shot(model, seed, pruner)
    record = pruner.history[-1] if getattr(pruner, "history", None) else {}
    return {
        "model": model,
        "method": name,
        "target": target,
        "seed": seed,
        "acc": acc,
        "dense_acc": common.dense(model, seed)[1],
        "sparsity": common.sparsity_of(net),
        "round_seconds": record.get("seconds"),
        "solver": record.get("info", {}).get("solver"),
    }


def table(model: str, names: list[str], seeds: list[int]) -> tuple[str, list[dict[str, Any]]]:
    rows = []
    for seed in seeds:
        for t in SPARSITIES:
            for n in names:
                r = cell(model, n, t, seed)
                rows.append(r)
                print(f"  {model} {n:22s} {t:.2f} seed {seed}: {r['acc']:.4f} ({r['seconds']:.0f}s)", flush=True)
    what = {n: w for n, w, _ in VARIANTS}
    dense = common.fmt([r["dense_acc"] for r in rows if r["method"] == names[0] and r["target"] == SPARSITIES[0]])
    body = [["dense", "", *[dense] * len(SPARSITIES), ""]]
    for n in names:
        cells = [common.fmt([r["acc"] for r in rows if r["method"] == n and r["target"] == t]) for t in SPARSITIES]
        secs = [r["round_seconds"] for r in rows if r["method"] == n and r["target"] == 0.95 and r["round_seconds"]]
        body.append([n, what[n], *cells, f"{sum(secs) / len(secs):.1f}" if secs else ""])
    header = ["method", "setting", *(f"{t:.0%}" for t in SPARSITIES), "round s (95%)"]
    return common.md_table(header, body), rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lenet-seeds", default="0")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    lenet_seeds = [int(s) for s in a.lenet_seeds.split(",")] if a.lenet_seeds else []
    start = time.time()
    mlp_md, rows = table("mlp", [n for n, _, _ in VARIANTS], seeds)
    parts = [
        "## One-shot at 90/95/98%: the defaults against the baselines",
        "",
        f"`python benchmarks/extreme.py --seeds {a.seeds} --lenet-seeds {a.lenet_seeds}` at `{common.commit()}`, "
        f"{(time.time() - start) / 60:.0f} minutes on {common.machine()} (cells cached). Every row through "
        "`prune()`: the same dense models (8 epochs) and the same 32 calibration batches; no fine-tuning; test "
        "accuracy (%), mean ± std over seeds. *round s*: seconds of the pruning round at 95%. The design rows "
        "that chose these defaults (one change per row) are a finished study: [ARCHIVE.md](ARCHIVE.md).",
        "",
        f"### MLP 784-300-100-10 (seeds {seeds})",
        "",
        mlp_md,
        "",
    ]
    if lenet_seeds:
        lenet_md, more = table("lenet5", LENET, lenet_seeds)
        rows += more
        parts += [f"### LeNet-5 (seeds {lenet_seeds})", "", lenet_md, ""]
    commits = sorted({r["commit"] for r in rows})
    parts.append(f"Cells computed at {', '.join(f'`{c}`' for c in commits)}.")
    body = "\n".join(parts)
    print("\n" + body)
    common.write_block("extreme", body)
    common.write_block("results", headline(rows, seeds), common.ROOT.parent / "README.md")


HEADLINE = ["magnitude", "obd-fisher", "obs-kfac", "obs-layerwise"]


def headline(rows: list[dict[str, Any]], seeds: list[int]) -> str:
    """The README's results table: the MLP rows a user compares, the library's defaults last."""
    mlp = [r for r in rows if r["model"] == "mlp"]
    label = {
        "magnitude": "MagnitudePruning",
        "obd-fisher": "OBDPruning(curvature='fisher')",
        "obs-kfac": "OBSPruning(hessian='kfac')",
        "obs-layerwise": "OBSPruning (defaults)",
    }
    intro = (
        f"Fashion-MNIST MLP 784-300-100-10, one-shot (`prune()`, 32 batches, no fine-tuning), test accuracy (%), "
        f"seeds {seeds}, from `python benchmarks/extreme.py` at `{common.commit()}`:"
    )

    def column(method: str, key: str = "acc") -> list[str]:
        return [common.fmt([r[key] for r in mlp if r["method"] == method and r["target"] == t]) for t in SPARSITIES]

    body = [["dense", *column("magnitude", "dense_acc")]] + [[label.get(m, m), *column(m)] for m in HEADLINE]
    return intro + "\n\n" + common.md_table(["method", *(f"{t:.0%} sparse" for t in SPARSITIES)], body)


if __name__ == "__main__":
    main()
