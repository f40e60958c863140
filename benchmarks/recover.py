"""Fine-tuning to recover: how many epochs each method needs to get back to dense - 1 point.

    python benchmarks/recover.py                 # seeds 0,1,2 (cells cached in benchmarks/.cache/cells)
    python benchmarks/recover.py --seeds 0       # one seed

The converged dense MLP of the one-shot tables (8 epochs, ``common.dense``) is pruned one-shot to
90%, 95% and 98% with each method (``prune()`` on the first 32 training batches, the methods of
``benchmarks/methods.py``), then fine-tuned for 5 epochs with the masks frozen (the same pruner as
a callback; Adam, the dense model's lr). Test accuracy is measured after the pruning and at
fractions of the first epoch (1/16, 1/8, 1/4, 1/2), then after every epoch, so that "a third of
magnitude's fine-tuning" can be read off when magnitude needs less than an epoch. The table gives
the epochs to reach dense - 1 point (">5" if never) and the accuracy after 1, 2 and 5 epochs; the
plot, accuracy against fine-tuning epochs.

Writes the table between the ``<!-- recover:start -->`` markers of ``benchmarks/RESULTS.md`` and
``benchmarks/recover_mlp.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import methods
import torch
from lightning.pytorch.callbacks import Callback

from lightning_prune import prune

METHODS = ["magnitude", "obd-fisher", "obs-kfac", "obs-layerwise"]
SPARSITIES = [0.9, 0.95, 0.98]
EPOCHS = 5
MODEL = "mlp"


@torch.no_grad()
def accuracy(net: torch.nn.Module, seed: int) -> float:
    was = net.training
    net.eval()
    right = total = 0
    for x, y in common.data(seed).test_dataloader():
        right += int((net(x).argmax(-1) == y).sum())
        total += int(y.numel())
    net.train(was)
    return right / total


FRACTIONS = [1 / 16, 1 / 8, 1 / 4, 1 / 2]  # of the first epoch, then whole epochs


class Checkpoints(Callback):
    """Test accuracy at fractions of the first epoch and at the end of every epoch: ``(epochs, acc)``."""

    def __init__(self, seed: int) -> None:
        self.seed, self.points = seed, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            steps = trainer.num_training_batches
            for f in FRACTIONS:
                if batch_idx + 1 == round(f * steps):
                    self.points.append((f, accuracy(pl_module, self.seed)))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.points.append((trainer.current_epoch + 1.0, accuracy(pl_module, self.seed)))


def cell(method: str, target: float, seed: int) -> dict[str, Any]:
    return common.cell(f"recover-{MODEL}-{method}-{target}-s{seed}", lambda: _measure(method, target, seed))


def _measure(method: str, target: float, seed: int) -> dict[str, Any]:
    """One-shot to ``target``, then ``EPOCHS`` of fine-tuning with the masks frozen, test accuracy
    at each checkpoint."""
    net = common.dense_net(MODEL, seed)
    pruner = methods.make(method, target, schedule="one_shot")
    prune(net, common.data(seed).train_dataloader(), pruner, num_batches=min(32, pruner.window_length))
    points = [(0.0, accuracy(net, seed))]
    every = Checkpoints(seed)
    common.trainer(max_epochs=EPOCHS, limit_val_batches=0, callbacks=[pruner, every]).fit(net, common.data(seed))
    points += every.points
    return {
        "method": method,
        "target": target,
        "seed": seed,
        "dense_acc": common.dense(MODEL, seed)[1],
        "points": points,
        "sparsity": common.sparsity_of(net),
    }


def epochs_to(points: list[list[float]], goal: float) -> float | None:
    return next((e for e, a in points if a >= goal), None)


def at(r: dict[str, Any], epochs: float) -> float:
    return next(a for e, a in r["points"] if e == epochs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = {}
    for seed in seeds:
        for target in SPARSITIES:
            for m in METHODS:
                r = rows[m, target, seed] = cell(m, target, seed)
                curve = " ".join(f"{e:g}:{x:.4f}" for e, x in r["points"])
                print(f"  {m:14s} {target:.2f} seed {seed}: {curve}", flush=True)
    dense = [rows[METHODS[0], SPARSITIES[0], s]["dense_acc"] for s in seeds]
    table = []
    for target in SPARSITIES:
        for m in METHODS:
            rs = [rows[m, target, s] for s in seeds]
            reach = [epochs_to(r["points"], r["dense_acc"] - 0.01) for r in rs]
            reach_s = ", ".join(f"{e:g}" if e is not None else f">{EPOCHS}" for e in reach)
            accs = [common.fmt([at(r, e) for r in rs]) for e in (0.0, 1.0, 2.0, float(EPOCHS))]
            table.append([f"{target:.0%}", m, *accs, reach_s])
    header = ["sparsity", "method", "one-shot", "+1 epoch", "+2 epochs", f"+{EPOCHS} epochs"]
    header.append("epochs to dense - 1 (per seed; resolution 1/16 in the first epoch)")
    plot(rows, seeds)
    commits = ", ".join(f"`{c}`" for c in sorted({r["commit"] for r in rows.values()}))
    compute = sum(r["seconds"] for r in rows.values()) / 60
    body = (
        "## Fine-tuning to recover (MLP, one-shot then frozen-mask fine-tuning)\n\n"
        f"`python benchmarks/recover.py --seeds {a.seeds}` at `{common.commit()}`: cells computed at {commits}, "
        f"{compute:.0f} minutes of compute on {common.machine()} (cells cached). "
        f"The converged dense MLP (8 epochs, test accuracy {common.fmt(dense)}) pruned one-shot (`prune()`, 32 "
        f"batches), then {EPOCHS} epochs of Adam with the masks frozen; test accuracy (%), seeds {seeds}. Goal: "
        "dense - 1 point.\n\n" + common.md_table(header, table) + "\n\n"
        "![accuracy against fine-tuning epochs](recover_mlp.png)"
    )
    print(body)
    common.write_block("recover", body)


def plot(rows: dict, seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SPARSITIES), figsize=(4.2 * len(SPARSITIES), 3.4), sharey=False)
    for ax, target in zip(axes, SPARSITIES):
        for m in METHODS:
            xs = [e for e, _ in rows[m, target, seeds[0]]["points"]]
            accs = [[100 * a for _, a in rows[m, target, s]["points"]] for s in seeds]
            ax.plot(xs, [statistics.mean(c) for c in zip(*accs)], marker="o", markersize=3, label=m)
        goal = 100 * statistics.mean(rows[METHODS[0], target, s]["dense_acc"] for s in seeds) - 1
        ax.axhline(goal, color="gray", linestyle="--", linewidth=1, label="dense - 1")
        ax.set_title(f"{target:.0%} sparse")
        ax.set_xscale("symlog", linthresh=1 / 16, linscale=0.5)
        ticks = [0, *FRACTIONS, *range(1, EPOCHS + 1)]
        ax.set_xticks(ticks, ["0", "1/16", "", "1/4", "", "1", "2", "", "", "5"][: len(ticks)])
        ax.set_xlim(0, EPOCHS * 1.05)
        ax.set_xlabel("fine-tuning epochs (symlog)")
        ax.set_ylim(bottom=max(0, ax.get_ylim()[0]), top=goal + 3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(common.ROOT / "recover_mlp.png", dpi=110)


if __name__ == "__main__":
    main()
