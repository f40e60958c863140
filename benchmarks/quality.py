"""Accuracy at a sparsity: one-shot, gradual and short-budget regimes (DESIGN.md §6).

    python benchmarks/quality.py --regime one_shot --model mlp --methods magnitude,obs-kfac --sparsities 0.9,0.95
    python benchmarks/quality.py --regime gradual --model mlp --sparsities 0.95,0.98,0.99 --seeds 0,1,2

Every cell is cached in ``benchmarks/.cache/cells/`` (delete it to recompute), so an interrupted
suite resumes where it stopped. Prints a Markdown table of test accuracy (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import methods

REGIMES = {
    # one round on the trained dense model, no fine-tuning
    "one_shot": dict(epochs=None),
    # from scratch: 15 epochs, cubic rounds at the end of epochs 0-9, then fine-tuning (DESIGN.md §5)
    "gradual": dict(epochs=15, end_epoch=9),
    # from scratch: rounds in epochs 0-2 of 5
    "short": dict(epochs=5, end_epoch=2),
}


def cell(regime: str, model: str, method: str, target: float, seed: int) -> dict[str, Any]:
    """One (regime, model, method, target, seed) result, computed once and cached."""
    key = f"{regime}-{model}-{method.replace('/', '@')}-{target}-s{seed}"
    return common.cell(key, lambda: _measure(regime, model, method, target, seed))


def _measure(regime: str, model: str, method: str, target: float, seed: int) -> dict[str, Any]:
    base, kwargs = methods.split_pattern(method, model)
    if regime == "one_shot":
        callback = methods.make(base, target, schedule="one_shot", **kwargs)
        acc, net = common.one_shot(model, seed, callback)
        dense_acc = common.dense(model, seed)[1]
    else:
        spec = REGIMES[regime]
        callback = methods.make(base, target, schedule="cubic", start_epoch=0, end_epoch=spec["end_epoch"], **kwargs)
        acc, net = common.train_with(model, seed, spec["epochs"], [callback])
        dense_acc = common.dense(model, seed, epochs=spec["epochs"])[1]
    history = getattr(callback, "history", ())
    return {
        "regime": regime,
        "model": model,
        "method": method,
        "target": target,
        "seed": seed,
        "acc": acc,
        "dense_acc": dense_acc,
        "sparsity": common.sparsity_of(net),
        "rounds": [
            {k: r[k] for k in ("round", "sparsity", "predicted_loss_increase", "actual_loss_increase", "seconds")}
            for r in history
        ],
    }


def run(
    regime: str, model: str, method_names: list[str], targets: list[float], seeds: list[int], log: bool = True
) -> list[dict[str, Any]]:
    rows = []
    for seed in seeds:
        for target in targets:
            for method in method_names:
                r = cell(regime, model, method, target, seed)
                rows.append(r)
                if log:
                    print(
                        f"  {regime:8s} {model:6s} {method:15s} {target:.2f} seed {seed}: acc {r['acc']:.4f} "
                        f"sparsity {r['sparsity']:.4f} ({r['seconds']:.0f}s)",
                        flush=True,
                    )
    return rows


def table(rows: list[dict[str, Any]], methods_order: list[str] | None = None) -> str:
    """Methods x targets, test accuracy in % (mean ± std over seeds), with the dense baseline row."""
    targets = sorted({r["target"] for r in rows})
    names = methods_order or sorted({r["method"] for r in rows})
    dense = {t: [r["dense_acc"] for r in rows if r["target"] == t and r["method"] == names[0]] for t in targets}
    body = [["dense (same seeds)", *(common.fmt(dense[t]) for t in targets)]]
    for name in names:
        cells = [common.fmt([r["acc"] for r in rows if r["method"] == name and r["target"] == t]) for t in targets]
        if any(c != "-" for c in cells):
            body.append([name, *cells])
    return common.md_table(["method", *(f"{t:.0%}" for t in targets)], body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regime", choices=list(REGIMES), default="one_shot")
    p.add_argument("--model", choices=list(common.MODELS), default="mlp")
    p.add_argument("--methods", default=",".join(methods.METHODS))
    p.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95,0.98")
    p.add_argument("--seeds", default="0")
    a = p.parse_args()
    names = a.methods.split(",")
    rows = run(
        a.regime, a.model, names, [float(s) for s in a.sparsities.split(",")], [int(s) for s in a.seeds.split(",")]
    )
    print(f"\n{a.regime}, {a.model}: test accuracy (%)\n")
    print(table(rows, names))


if __name__ == "__main__":
    main()
