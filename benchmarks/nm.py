"""N:M (2:4, 4:8) quality on Fashion-MNIST: one-shot and gradual, magnitude vs OBD vs OBS, and the ramp rule.

Gradual cells use quality.py's short regime (5 epochs from scratch, cubic rounds after epochs 0-2,
then fine-tuning): its 15-epoch regime costs about 9 minutes a cell on 2 CPU cores.

    python benchmarks/nm.py            # the plan below (cells cached in benchmarks/.cache/cells)
    python benchmarks/nm.py --quick    # one seed, fewer cells

Methods are ``benchmarks/methods.py`` names with a pattern suffix (``obs-layerwise/2:4``; a
``-groups`` suffix selects the groups ramp). Layers whose input dimension is not a multiple of M
stay dense: LeNet-5's two convolutions (25 and 150 inputs) under both patterns, and under 4:8 the
MLP's 300- and 100-input layers and LeNet-5's 84-input layer (the tables' notes give the share of
weights pruned). The 50% unstructured column is the same budget without the pattern. Writes the
tables between the ``<!-- nm:start -->`` markers of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import quality

CRITERIA = ["magnitude", "obd-fisher", "obs-layerwise", "obs-fisher", "obs-kfac"]
PLANS = {
    "full": {
        "one_shot": [("mlp", CRITERIA, [0, 1, 2]), ("lenet5", CRITERIA, [0])],
        # the short regime (5 epochs, rounds after epochs 0-2): 15-epoch cells take ~9 minutes each here
        "gradual": [("mlp", ["magnitude", "obs-layerwise", "obs-kfac"], [0])],
        "ramp": [("mlp", ["magnitude", "obs-layerwise"], [0, 1])],
    },
    "quick": {
        "one_shot": [("mlp", ["magnitude", "obs-layerwise"], [0])],
        "gradual": [("mlp", ["magnitude", "obs-layerwise"], [0])],
        "ramp": [],
    },
}
PATTERNS = ["2:4", "4:8"]
GRADUAL = "short"  # the training regime of the gradual tables (benchmarks/quality.py REGIMES)


def pattern_table(regime: str, model: str, names: list[str], seeds: list[int], log: bool = True) -> str:
    """Methods x (50% unstructured, 2:4, 4:8): test accuracy (%), mean ± std over seeds."""
    cols = ["unstructured", *PATTERNS]
    cells: dict[tuple[str, str], list[float]] = {}
    dense: list[float] = []
    for seed in seeds:
        for name in names:
            for col in cols:
                method = name if col == "unstructured" else f"{name}/{col}"
                r = quality.cell(regime, model, method, 0.5, seed)
                if log:
                    print(
                        f"  {regime} {model} {method:22s} seed {seed}: {r['acc']:.4f} ({r['seconds']:.0f}s)", flush=True
                    )
                cells.setdefault((name, col), []).append(r["acc"])
                if name == names[0] and col == "unstructured":
                    dense.append(r["dense_acc"])
    body = [["dense", common.fmt(dense), "", ""]]
    body += [[name, *(common.fmt(cells[(name, c)]) for c in cols)] for name in names]
    return common.md_table(["method", "50% unstructured", *PATTERNS], body)


def ramp_table(model: str, names: list[str], seeds: list[int]) -> str:
    """Gradual 2:4, capped vs groups ramp."""
    body = [
        [
            name,
            *(
                common.fmt([quality.cell(GRADUAL, model, f"{name}/{sfx}", 0.5, s)["acc"] for s in seeds])
                for sfx in ("2:4", "2:4-groups")
            ),
        ]
        for name in names
    ]
    return common.md_table(["method", "capped (default)", "groups"], body)


def pruned_share(model: str, m: int) -> float:
    """Fraction of the default targets' weights an N:M pattern with group size ``m`` prunes."""
    targets = common.targets(common.build(model, 0))
    total = sum(t.param.numel() for t in targets)
    return sum(t.param.numel() for t in targets if t.shape2d[1] % m == 0) / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    plan = PLANS["quick" if a.quick else "full"]
    start = time.time()
    parts = []
    for model, names, seeds in plan["one_shot"]:
        parts.append(
            f"### One-shot 2:4 and 4:8, {model}: one round on the trained dense model, no fine-tuning\n\n"
            f"Test accuracy (%), seeds {seeds}.\n\n{pattern_table('one_shot', model, names, seeds)}"
        )
    spec = quality.REGIMES[GRADUAL]
    for model, names, seeds in plan["gradual"]:
        parts.append(
            f"### Gradual 2:4 and 4:8, {model}: from scratch, {spec['epochs']} epochs, cubic rounds after epochs "
            f"0-{spec['end_epoch']} (capped ramp), then fine-tuning with frozen masks\n\n"
            f"Test accuracy (%), seeds {seeds}; dense: {spec['epochs']} epochs.\n\n"
            f"{pattern_table(GRADUAL, model, names, seeds)}"
        )
    for model, names, seeds in plan["ramp"]:
        parts.append(
            f"### How gradual rounds reach 2:4 ({model}): the ramp rule\n\n"
            "`capped`: each round prunes the lowest scores with at most N zeros per group; `groups`: each round "
            f"completes whole groups (cheapest first). The schedule above; test accuracy (%), seeds {seeds}.\n\n"
            f"{ramp_table(model, names, seeds)}"
        )
    shares = ", ".join(
        f"{model} {m}-groups {100 * pruned_share(model, m):.0f}%" for model in ("mlp", "lenet5") for m in (4, 8)
    )
    body = (
        "## N:M semi-structured sparsity (2:4, 4:8)\n\n"
        f"`python benchmarks/nm.py{' --quick' if a.quick else ''}` at `{common.commit()}`, "
        f"{(time.time() - start) / 60:.0f} minutes on {common.machine()} (cells cached in `benchmarks/.cache/cells`). "
        "Layers whose input dimension is not a multiple of M stay dense; share of the target weights under the "
        f"pattern: {shares}. Pattern rows are exactly 50% sparse on those layers.\n\n" + "\n\n".join(parts)
    )
    print(body)
    common.write_block("nm", body)


if __name__ == "__main__":
    main()
