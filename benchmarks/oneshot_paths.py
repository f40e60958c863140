"""One-shot pruning through ``prune()`` against the one-epoch lr=0 ``fit`` it replaced, cell by cell.

    python benchmarks/oneshot_paths.py            # every one-shot cell of the suite's full plan
    python benchmarks/oneshot_paths.py --quick    # the MLP headline cells, seed 0

Both paths start from the same cached dense model and see the same 32 training batches (the
first epoch of the same seeded loader): the fit captures them during training steps at lr 0, and
``prune()`` in one calibration pass. For each cell it prints the two test accuracies, whether the
masks are identical and the largest weight difference, and writes the table into RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import methods
import torch

from lightning_prune import prune

ROOT = Path(__file__).resolve().parent
OURS = [m for m in methods.METHODS if m != "modelpruning"]
HEADLINE = ["magnitude", "obd-fisher", "obs-layerwise", "obs-kfac"]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98]
PLANS = {
    "quick": [("mlp", HEADLINE, [0.9, 0.95], [0])],
    "full": [
        ("mlp", OURS, SPARSITIES, [0]),
        ("mlp", HEADLINE, [0.9, 0.95], [1, 2]),
        ("lenet5", OURS, SPARSITIES, [0]),
    ],
}


def compare(model: str, method: str, target: float, seed: int) -> dict:
    via_fit, via_prune = common.dense_net(model, seed), common.dense_net(model, seed)
    a, b = methods.make(method, target, schedule="one_shot"), methods.make(method, target, schedule="one_shot")
    common.one_shot_fit(via_fit, seed, a)
    prune(via_prune, common.data(seed).train_dataloader(), b, num_batches=min(32, b.window_length))
    same = all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    params = dict(via_prune.named_parameters())
    diff = max(float((p - params[n]).abs().max()) for n, p in via_fit.named_parameters())
    return {
        "model": model,
        "method": method,
        "target": target,
        "seed": seed,
        "fit": common.test_accuracy(via_fit, seed),
        "prune": common.test_accuracy(via_prune, seed),
        "same_masks": same,
        "max_weight_diff": diff,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | method | sparsity | seed | lr=0 fit | prune() | masks identical | max weight diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['target']:.0%} | {r['seed']} | {100 * r['fit']:.1f} | "
            f"{100 * r['prune']:.1f} | {'yes' if r['same_masks'] else '**no**'} | {r['max_weight_diff']:.1e} |"
        )
    same = sum(r["same_masks"] for r in rows)
    moved = max(abs(r["fit"] - r["prune"]) for r in rows)
    lines += [
        "",
        f"{same} of {len(rows)} cells have identical masks; the largest accuracy change is {100 * moved:.2f} points.",
    ]
    return "\n".join(lines)


def write(md: str, plan: str, minutes: float) -> None:
    block = (
        f"## One-shot through `prune()` vs the lr=0 fit it replaced\n\n"
        f"`python benchmarks/oneshot_paths.py{' --quick' if plan == 'quick' else ''}` at `{common.commit()}`, "
        f"{minutes:.0f} minutes on {common.machine()}. "
        "Same dense model, same 32 training batches; test accuracy (%).\n\n"
        f"{md}"
    )
    common.write_block("oneshot-paths", block)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    plan = "quick" if a.quick else "full"
    start, rows = time.time(), []
    for model, names, targets, seeds in PLANS[plan]:
        for seed in seeds:
            for method in names:
                for target in targets:
                    rows.append(compare(model, method, target, seed))
                    r = rows[-1]
                    print(f"{model} {method} {target} s{seed}: fit {r['fit']:.4f} prune {r['prune']:.4f} "
                          f"same masks {r['same_masks']} diff {r['max_weight_diff']:.1e}", flush=True)  # fmt: skip
    md = table(rows)
    print(md)
    write(md, plan, (time.time() - start) / 60)


if __name__ == "__main__":
    main()
