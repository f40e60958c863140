"""One-shot at extreme sparsity: what each attempt to raise layer-wise OBS bought (issue 19).

    python benchmarks/extreme.py                    # MLP seeds 0,1,2 at 90/95/98%, LeNet-5 seed 0 (~1 h, 2 cores)
    python benchmarks/extreme.py --lenet-seeds 0,1,2   # LeNet-5 over 3 seeds too, as RESULTS.md (+10 minutes)

Every row is one change against the library's defaults (``OBSPruning(target, schedule="one_shot")``
through ``prune()`` on the cached dense model, 32 training batches, no fine-tuning), on the same
dense models and calibration batches, so a row's difference is the change's. Rows that did not
help stay in the table. Cells are cached in ``benchmarks/.cache/cells`` (``extreme-*``); the
table goes between the ``<!-- extreme:start -->`` markers of ``benchmarks/RESULTS.md``, and the
MLP's baselines and defaults between the ``<!-- results:start -->`` markers of the README.
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
from quality import fmt

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning

SPARSITIES = [0.9, 0.95, 0.98]


def _obs(**kw: Any) -> Callable[[float], Any]:
    return lambda t: OBSPruning(t, schedule="one_shot", verbose=0, **kw)


# (name, what it changes, factory); the first rows are the baselines
VARIANTS: list[tuple[str, str, Callable[[float], Any]]] = [
    ("magnitude", "baseline", lambda t: MagnitudePruning(t, schedule="one_shot", verbose=0)),
    (
        "obd-fisher",
        "baseline",
        lambda t: OBDPruning(t, curvature="fisher", fisher_type="empirical", schedule="one_shot", verbose=0),
    ),
    (
        "previous default",
        "blocked solver (the old auto budget's choice for the 784-input layer), own outputs, Fisher allocation",
        _obs(solver="blocked", reconstruct="current", allocation="fisher"),
    ),
    ("obs-layerwise", "defaults: exact solver and error-curve allocation (auto), reconstruct='original'", _obs()),
    (
        "reconstruct=current",
        "later layers fit their own outputs on the pruned inputs (SparseGPT/OBC)",
        _obs(reconstruct="current"),
    ),
    ("allocation=fisher", "OBD's 1/2 F w^2 shares the removals (the previous default)", _obs(allocation="fisher")),
    ("allocation=kfac", "K-FAC OBS saliency shares the removals (K-FAC's cross-row view)", _obs(allocation="kfac")),
    ("solver=blocked", "exact inside 128-column blocks", _obs(solver="blocked")),
    ("solver=fast", "SparseGPT's column sweep", _obs(solver="fast")),
    ("recompute_steps=1", "every layer from the dense inputs (no re-capture)", _obs(recompute_steps=1)),
    ("damp=0.003", "damping 0.003 (default 0.01)", _obs(damp=0.003)),
    ("damp=0.001", "damping 0.001", _obs(damp=0.001)),
    ("damp=0.0003", "damping 0.0003", _obs(damp=0.0003)),
    ("damp=0.0001", "damping 0.0001", _obs(damp=0.0001)),
    ("damp=0.1", "damping 0.1", _obs(damp=0.1)),
    ("obs-kfac", "hessian='kfac', recompute_steps=4", _obs(hessian="kfac")),
    ("obs-kfac, 16 steps", "hessian='kfac', recompute_steps=16", _obs(hessian="kfac", recompute_steps=16)),
]
LENET = [
    "magnitude",
    "obd-fisher",
    "previous default",
    "obs-layerwise",
    "reconstruct=current",
    "allocation=fisher",
    "obs-kfac",
]


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
    dense = fmt([r["dense_acc"] for r in rows if r["method"] == names[0] and r["target"] == SPARSITIES[0]])
    lines = [
        "| change | what it changes | " + " | ".join(f"{t:.0%}" for t in SPARSITIES) + " | round s (95%) |",
        "|---|---|" + "---|" * len(SPARSITIES) + "---|",
        f"| dense | | {' | '.join([dense] * len(SPARSITIES))} | |",
    ]
    for n in names:
        cells = [fmt([r["acc"] for r in rows if r["method"] == n and r["target"] == t]) for t in SPARSITIES]
        secs = [r["round_seconds"] for r in rows if r["method"] == n and r["target"] == 0.95 and r["round_seconds"]]
        lines.append(
            f"| {n} | {what[n]} | " + " | ".join(cells) + f" | {sum(secs) / len(secs):.1f} |"
            if secs
            else f"| {n} | {what[n]} | " + " | ".join(cells) + " | |"
        )
    return "\n".join(lines), rows


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
        "## One-shot at extreme sparsity: what each change bought (design measurements)",
        "",
        f"`python benchmarks/extreme.py --seeds {a.seeds} --lenet-seeds {a.lenet_seeds}` at `{common.commit()}`, "
        f"{(time.time() - start) / 60:.0f} minutes on {common.machine()} (cells cached). One change per row against "
        "`OBSPruning(target, schedule='one_shot')` through `prune()`: the same dense models (8 epochs) and the same "
        "32 calibration batches for every row; no fine-tuning; test accuracy (%), mean ± std over seeds. "
        "*round s*: seconds of the pruning round at 95%.",
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
    lines = [
        f"Fashion-MNIST MLP 784-300-100-10, one-shot (`prune()`, 32 batches, no fine-tuning), test accuracy (%), "
        f"seeds {seeds}, from `python benchmarks/extreme.py` at `{common.commit()}`:",
        "",
        "| method | " + " | ".join(f"{t:.0%} sparse" for t in SPARSITIES) + " |",
        "|---|" + "---|" * len(SPARSITIES),
        "| dense | "
        + " | ".join(
            fmt([r["dense_acc"] for r in mlp if r["method"] == "magnitude" and r["target"] == t]) for t in SPARSITIES
        )
        + " |",
    ]
    for m in HEADLINE:
        cells = [fmt([r["acc"] for r in mlp if r["method"] == m and r["target"] == t]) for t in SPARSITIES]
        lines.append(f"| {label.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
