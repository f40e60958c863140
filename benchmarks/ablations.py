"""The measurements behind OBS design choices (Fashion-MNIST MLP).

    python benchmarks/ablations.py [--seeds 0]

1. Cross-layer allocation for layer-wise OBS (``scope="global"``): which loss-unit score shares the
   removals among layers and rows: ``allocation="fisher"`` (OBD's 1/2 F w^2), ``"obs"``
   (G_ii-weighted layer-wise saliency) or ``"kfac"``, against uniform per-layer sparsity
   (``scope="layer"``); one-shot at 80/90/95%.
2. Recomputing the Fisher/K-FAC curvature within a round (``recompute_steps``) at 90/95%.
3. Optimizer state after an OBS weight update: reset the Adam moments of the weights the update
   moved (``optimizer_state="reset"``) or keep them; gradual to 98/99%.
4. Peers' failure modes, measured on the same model: Lightning ``ModelPruning`` fed the cumulative
   schedule directly (its amount compounds), and its masks after a checkpoint resume.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import methods
import quality
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_prune import MagnitudePruning, OBSPruning

ALLOCATIONS = {
    "fisher (default)": dict(allocation="fisher"),
    "obs": dict(allocation="obs"),
    "kfac": dict(allocation="kfac"),
    "uniform (scope=layer)": dict(scope="layer"),
}


def allocation(seeds: list[int], targets=(0.8, 0.9, 0.95)) -> str:
    lines = ["| allocation | " + " | ".join(f"{t:.0%}" for t in targets) + " |", "|---|" + "---|" * len(targets)]
    for name, kw in ALLOCATIONS.items():
        cells = []
        for t in targets:
            accs = [common.one_shot("mlp", s, OBSPruning(t, schedule="one_shot", verbose=0, **kw))[0] for s in seeds]
            cells.append(quality.fmt(accs))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def recompute(seeds: list[int], steps=(1, 4, 16), targets=(0.9, 0.95)) -> str:
    """Summing single-weight updates is not OBS: recomputing curvature inside a round (M-FAC/oBERT)."""
    lines = [
        "| hessian | recompute_steps | " + " | ".join(f"{t:.0%}" for t in targets) + " |",
        "|---|---|" + "---|" * len(targets),
    ]
    for hessian in ("kfac", "fisher"):
        for n in steps if hessian == "kfac" else steps[:2]:
            cells = []
            for t in targets:
                accs = [
                    common.one_shot(
                        "mlp", s, OBSPruning(t, hessian=hessian, recompute_steps=n, schedule="one_shot", verbose=0)
                    )[0]
                    for s in seeds
                ]
                cells.append(quality.fmt(accs))
            lines.append(f"| {hessian} | {n} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def optimizer_state(seeds: list[int], targets=(0.98, 0.99)) -> str:
    lines = [
        "| optimizer_state | " + " | ".join(f"gradual {t:.0%}" for t in targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for policy in ("reset", "keep"):
        cells = []
        for t in targets:
            accs = [
                common.train_with("mlp", s, 15, [OBSPruning(t, end_epoch=9, optimizer_state=policy, verbose=0)])[0]
                for s in seeds
            ]
            cells.append(quality.fmt(accs))
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def peers(seed: int = 0) -> str:
    """ModelPruning's compounding amount and lost masks on resume, next to ours."""
    out = []
    naive = methods.LightningModelPruning(0.9, naive=True, end_epoch=4)
    _, net = common.train_with("mlp", seed, 6, [naive])
    out.append(
        (
            "ModelPruning fed the cumulative cubic schedule to 90% (naive `amount`)",
            f"final sparsity {common.sparsity_of(net):.3f}",
        )
    )
    ours = MagnitudePruning(0.9, end_epoch=4, verbose=0)
    _, net = common.train_with("mlp", seed, 6, [ours])
    out.append(("MagnitudePruning, same schedule", f"final sparsity {common.sparsity_of(net):.3f}"))
    for name, make in (
        ("ModelPruning", lambda: methods.LightningModelPruning(0.9, end_epoch=4)),
        ("MagnitudePruning", lambda: MagnitudePruning(0.9, end_epoch=4, verbose=0)),
    ):
        with tempfile.TemporaryDirectory() as d:
            ckpt = ModelCheckpoint(dirpath=d, filename="{epoch}", save_top_k=-1)
            common.train_with("mlp", seed, 3, [make(), ckpt], enable_checkpointing=True)
            _, net = common.train_with(
                "mlp", seed, 6, [make()], enable_checkpointing=False, ckpt_path=f"{d}/epoch=2.ckpt"
            )
        out.append(
            (
                f"{name}: 3 epochs, checkpoint, resume to epoch 6 (target 90%)",
                f"final sparsity {common.sparsity_of(net):.3f}",
            )
        )
    return "\n".join(["| run | result |", "|---|---|", *[f"| {a} | {b} |" for a, b in out]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    md = [
        "### OBS allocation across layers (one-shot, layer-wise OBS, test accuracy %)",
        "",
        allocation(seeds),
        "",
        "### Curvature recomputation inside one round (one-shot, test accuracy %)",
        "",
        recompute(seeds),
        "",
        "### Optimizer state after OBS updates (Adam, gradual 15 epochs, test accuracy %)",
        "",
        optimizer_state(seeds),
        "",
        "### Peers' failure modes, measured",
        "",
        peers(seeds[0]),
        "",
    ]
    text = "\n".join(md)
    print("\n" + text)
    (common.CACHE / "ablations.md").write_text(text)
    (common.CACHE / "ablations.json").write_text(json.dumps({"seeds": seeds}))


if __name__ == "__main__":
    main()
