"""Gradual pruning to 99%: what stops it, measured (issue 19).

    python benchmarks/gradual99.py --methods magnitude,obd-fisher,obs-layerwise --more-seeds 1,2   # ~1 h, 2 cores
    python benchmarks/gradual99.py --seeds 0,1,2 --only "baseline;cosine, rounds 0-6"

The regime of the quality tables: the MLP trained from scratch for 15 epochs (Adam, lr 1e-3,
batch 128) with cubic rounds after epochs 0-9, then frozen-mask training to the end. Each row
changes one thing against that setup, for every method alike, and the dense model of the same
setup (same epochs, same learning-rate schedule) is its baseline:

* ``baseline``: as the quality tables;
* ``decay after rounds``: the learning rate stays constant while rounds fire, then decays to 0 over
  the fine-tuning epochs (half a cosine): the usual gradual-magnitude recipe;
* ``rounds every 100 steps``: 43 step-triggered rounds (steps 100, 200, ... 4300, the span of the
  epoch rounds) instead of 10 epoch rounds, each removing less;
* ``rounds 0-4``, ``rounds 0-12``: the rounds over fewer or more epochs (10 or 2 epochs of
  fine-tuning);
* ``128 batches``: 128 curvature batches per round instead of 32;
* ``keep state``: OBS's ``optimizer_state="keep"`` (Adam's moments of moved weights kept);
* ``allocation=obs``, ``allocation=kfac``: layer-wise OBS shares the removals by each row's exact
  error curve, or by K-FAC OBS saliencies, instead of the Fisher scores ``"auto"`` picks inside fit;
  ``rounds every 100 steps, allocation=obs``: the exact error curves with the 43 step rounds;
* ``lr 3e-3``, ``lr 3e-3, decay after rounds``: three times the learning rate (the sparse models
  train to a lower training loss slower than the dense one), constant or decayed after the rounds;
* ``distill from dense``: the training loss is half cross-entropy, half the KL divergence (T = 2)
  to the converged 8-epoch dense model of the one-shot tables, as oBERT's gradual recipe; a
  setting chosen once, not tuned;
* ``cosine``: the learning rate decays to 0 over the 15 epochs (per step, half a cosine);
* ``cosine, rounds 0-6``: that, with the rounds over epochs 0-6 (8 epochs of fine-tuning);
* ``cosine, linear``: that, with the linear schedule instead of the cubic one;
* ``cosine, 128 batches``: that, with 128 curvature batches per round instead of 32;
* ``cosine, keep state``: that, with OBS's ``optimizer_state="keep"``;
* ``cosine, rewarm``: the learning rate is set back to its starting value after each round and
  decays again (half a cosine) until the next round, then to 0 over the fine-tuning epochs.

Two rows change the budget and so do not count for the goal; they say whether the budget or the
masks stop it:

* ``30 epochs``: the baseline's rounds, then 20 epochs of frozen-mask training instead of 5;
* ``45 epochs, rounds 0-29``: three times the whole schedule.

Cells are cached in ``benchmarks/.cache/cells`` (``gradual99-*``); the table goes between the
``<!-- gradual99:start -->`` markers of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import methods
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from quality import fmt

from lightning_prune.targets import resolve_targets

EPOCHS, END = 15, 9
TARGET = 0.99
METHODS = ["magnitude", "obd-fisher", "obs-layerwise", "obs-kfac"]

SHAPES = (
    "baseline",
    "rounds every 100 steps",
    "rounds every 100 steps, allocation=obs",
    "45 epochs, rounds 0-29",
)  # the rows whose masks differ
STEPS = {"start_step": 100, "end_step": 4300, "every_n_steps": 100}  # 430 steps per epoch: epochs 0-9

# name -> (learning-rate rule, pruner keyword arguments; "epochs" sets the run's length);
# "rewarm" restarts the decay at every round, "after" decays over the epochs after the last round
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("constant", {}),
    "decay after rounds": ("after", {}),
    "rounds every 100 steps": ("constant", dict(STEPS)),
    "rounds 0-4": ("constant", {"end_epoch": 4}),
    "rounds 0-12": ("constant", {"end_epoch": 12}),
    "128 batches": ("constant", {"num_batches": 128}),
    "keep state": ("constant", {"optimizer_state": "keep"}),
    "allocation=obs": ("constant", {"allocation": "obs"}),
    "allocation=kfac": ("constant", {"allocation": "kfac"}),
    "rounds every 100 steps, allocation=obs": ("constant", {**STEPS, "allocation": "obs"}),
    "lr 3e-3": ("constant", {"lr": 3e-3}),
    "lr 3e-3, decay after rounds": ("after", {"lr": 3e-3}),
    "distill from dense": ("constant", {"distill": True}),
    "cosine": ("cosine", {}),
    "cosine, rounds 0-6": ("cosine", {"end_epoch": 6}),
    "cosine, linear": ("cosine", {"schedule": "linear"}),
    "cosine, 128 batches": ("cosine", {"num_batches": 128}),
    "cosine, keep state": ("cosine", {"optimizer_state": "keep"}),
    "cosine, rewarm": ("rewarm", {}),
    "30 epochs": ("constant", {"epochs": 30}),
    "45 epochs, rounds 0-29": ("constant", {"epochs": 45, "end_epoch": 29}),
}


# the rows measured over 3 seeds (--more-seeds); the others are seed 0 only
MORE = [
    "baseline",
    "decay after rounds",
    "rounds every 100 steps",
    "rounds every 100 steps, allocation=obs",
    "rounds 0-4",
    "rounds 0-12",
    "128 batches",
    "keep state",
    "lr 3e-3",
    "lr 3e-3, decay after rounds",
    "30 epochs",
    "45 epochs, rounds 0-29",
]


class Distill(Callback):
    """Replaces the module's training loss by ``(1 - ALPHA) * CE + ALPHA * T^2 * KL(teacher || student)``
    at temperature ``T``, the teacher being the cached dense model of ``seed`` (frozen, eval mode)."""

    ALPHA, T = 0.5, 2.0

    def __init__(self, seed: int) -> None:
        self.teacher = common.dense_net("mlp", seed).eval().requires_grad_(False)

    def setup(self, trainer, pl_module, stage: str) -> None:
        teacher, alpha, temp = self.teacher, self.ALPHA, self.T

        def training_step(batch, batch_idx):
            x, y = batch
            logits = pl_module(x)
            with torch.no_grad():
                target = teacher(x)
            loss = (1 - alpha) * F.cross_entropy(logits, y) + alpha * common.distill_loss(logits, target, temp)
            pl_module.log("train/loss", loss)
            return loss

        pl_module.training_step = training_step


class LearningRate(Callback):
    """Sets every parameter group's learning rate before each step from ``rule`` (``"constant"``,
    ``"cosine"``: half a cosine to 0 over the run; ``"after"``: constant to the last round epoch's
    end, then half a cosine to 0; ``"rewarm"``: half a cosine from each round epoch's end to the
    next round, then to 0 over the epochs after the last round)."""

    def __init__(self, rule: str, end_epoch: int) -> None:
        self.rule, self.end_epoch, self.base = rule, end_epoch, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        if self.base is None:
            self.base = [g["lr"] for g in opt.param_groups]
        per_epoch = trainer.num_training_batches
        t = trainer.current_epoch + batch_idx / per_epoch  # epochs done
        left = trainer.max_epochs - (self.end_epoch + 1)  # fine-tuning epochs after the last round
        if self.rule == "constant":
            f = 1.0
        elif self.rule == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * t / trainer.max_epochs))
        elif self.rule == "after":
            f = 0.5 * (1 + math.cos(math.pi * max(0.0, t - self.end_epoch - 1) / left))
        else:  # rewarm: rounds end epochs 0..end_epoch; each interval decays from the base
            if t < self.end_epoch + 1:
                f = 0.5 * (1 + math.cos(math.pi * (t - math.floor(t))))
            else:
                f = 0.5 * (1 + math.cos(math.pi * (t - self.end_epoch - 1) / left))
        for g, base in zip(opt.param_groups, self.base):
            g["lr"] = base * f


def dense(rule: str, seed: int, epochs: int = EPOCHS, lr: float | None = None, distill: bool = False) -> float:
    """The dense MLP trained the same way (epochs, learning rate and its rule, the loss), cached."""
    suffix = ("" if epochs == EPOCHS else f"-e{epochs}") + ("" if lr is None else f"-lr{lr:g}") + "-kd" * distill

    def train() -> dict[str, Any]:
        callbacks: list[Callback] = [LearningRate(rule, END), *([Distill(seed)] if distill else [])]
        return {"acc": common.train_with("mlp", seed, epochs, callbacks, lr=lr)[0]}

    return common.cell(f"gradual99-dense-{rule}-s{seed}{suffix}", train)["acc"]


def effective(variant: str, method: str) -> tuple[str, dict[str, Any]]:
    """The learning-rate rule and the pruner arguments that apply to ``method`` (OBS alone moves
    weights, so only it has optimizer state to keep, and only layer-wise OBS has an allocation
    choice; magnitude reads no curvature batches)."""
    rule, kw = VARIANTS[variant][0], dict(VARIANTS[variant][1])
    if method not in ("obs-layerwise", "obs-kfac"):
        kw.pop("optimizer_state", None)
    if method != "obs-layerwise":
        kw.pop("allocation", None)
    if method == "magnitude":
        kw.pop("num_batches", None)
    return rule, kw


def cell(variant: str, method: str, seed: int) -> dict[str, Any]:
    rule, kw = effective(variant, method)
    first = next(v for v in VARIANTS if effective(v, method) == (rule, kw))
    if first != variant:  # e.g. magnitude has no curvature batches: the same run as ``first``
        return {**cell(first, method, seed), "variant": variant}
    slug = variant.replace(" ", "").replace(",", "+")
    return common.cell(f"gradual99-{slug}-{method}-s{seed}", lambda: _measure(variant, method, seed, rule, kw))


def _measure(variant: str, method: str, seed: int, rule: str, kw: dict[str, Any]) -> dict[str, Any]:
    end, epochs, lr = kw.pop("end_epoch", END), kw.pop("epochs", EPOCHS), kw.pop("lr", None)
    distill = kw.pop("distill", False)
    when = {} if "every_n_steps" in kw else {"start_epoch": 0, "end_epoch": end}
    pruner = methods.make(method, TARGET, schedule=kw.pop("schedule", "cubic"), **when, **kw)
    callbacks = [pruner, LearningRate(rule, end), *([Distill(seed)] if distill else [])]
    acc, net = common.train_with("mlp", seed, epochs, callbacks, lr=lr)
    layers = resolve_targets(net)
    rounds = getattr(pruner, "history", [])
    return {
        "variant": variant,
        "method": method,
        "seed": seed,
        "acc": acc,
        "epochs": epochs,
        "dense_acc": dense("cosine" if rule == "rewarm" else rule, seed, epochs, lr, distill),
        "sparsity": common.sparsity_of(net),
        # per layer: kept weights, output rows with a kept weight (living neurons), inputs still read
        "layers": {
            t.name: [int((t.param != 0).sum()), int((t.param != 0).any(1).sum()), int((t.param != 0).any(0).sum())]
            for t in layers
        },
        "round_seconds": sum(x["seconds"] for x in rounds),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0")
    p.add_argument("--only", default="", help="variants separated by ';' (their names hold commas; default: all)")
    p.add_argument("--more-seeds", default="", help="more seeds for the --more-only rows")
    p.add_argument("--more-only", default=";".join(MORE), help="the rows --more-seeds runs (separated by ';')")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--more-methods", default="magnitude,obd-fisher,obs-layerwise", help="for --more-seeds")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    more = [int(s) for s in a.more_seeds.split(",") if s and int(s) not in seeds]
    more_only = a.more_only.split(";")
    names = [v for v in VARIANTS if not a.only or v in a.only.split(";")]
    ms = a.methods.split(",")
    start = time.time()
    rows = []
    for seed in seeds + more:
        for v in names if seed in seeds else [v for v in names if v in more_only]:
            for m in ms if seed in seeds else [m for m in ms if m in a.more_methods.split(",")]:
                r = cell(v, m, seed)
                rows.append(r)
                print(f"  {v:22s} {m:14s} seed {seed}: {r['acc']:.4f} ({r['seconds']:.0f}s)", flush=True)
    lines = [
        "| change (every method alike) | dense, same training | " + " | ".join(ms) + " |",
        "|---|---|" + "---|" * len(ms),
    ]
    for v in names:
        got = [r for r in rows if r["variant"] == v]
        dense_accs = sorted({(r["seed"], r["dense_acc"]) for r in got})
        n = sorted({r["seed"] for r in got})
        cells = []
        for m in ms:
            accs = [r["acc"] for r in got if r["method"] == m]
            cells.append(fmt(accs) + (f" ({len(accs)} seed{'s' * (len(accs) > 1)})" if len(accs) != len(n) else ""))
        lines.append(f"| {v} (seeds {n}) | {fmt([d for _, d in dense_accs])} | " + " | ".join(cells) + " |")
    # where the 1% of weights went: kept weights and living neurons per layer, first seed
    names_of = next((r["layers"] for r in rows if "layers" in r), {})
    shapes = [
        "| change | method | " + " | ".join(f"{name}: kept, living rows" for name in names_of) + " |",
        "|---|---|" + "---|" * len(names_of),
    ]
    shown = set()  # a method's row once per distinct run (magnitude ignores the allocation, ...)
    for r in rows:
        run = (r["method"], repr(effective(r["variant"], r["method"])))
        if r["seed"] == seeds[0] and r["variant"] in SHAPES and "layers" in r and run not in shown:
            shown.add(run)
            shapes.append(
                f"| {r['variant']} | {r['method']} | "
                + " | ".join(f"{kept}, {alive}" for kept, alive, _ in r["layers"].values())
                + " |"
            )
    commits = ", ".join(f"`{c}`" for c in sorted({r["commit"] for r in rows}))
    body = (
        "## Gradual to 99%: what stops it (MLP, 15 epochs, rounds after epochs 0-9)\n\n"
        f"`python benchmarks/gradual99.py {' '.join(sys.argv[1:])}` at `{common.commit()}`, "
        f"cells computed at {commits}, "
        f"{(time.time() - start) / 60:.0f} minutes on {common.machine()} (cells cached). One change per row, for "
        "every method and for the dense model alike; test accuracy (%) at 99% sparsity, mean ± std over seeds. "
        "Goal: 88.0."
        + (
            " Cells whose commit ends in `@H200` ran on a lent H200 GPU (15 at once), the others on the CPU named here."
            if any(c.endswith("@H200") for c in commits.split(", "))
            else ""
        )
        + "\n\n"
        + "\n".join(lines)
        + f"\n\nWhere the kept weights went (seed {seeds[0]}; *living rows*: output rows with a kept weight):\n\n"
        + "\n".join(shapes)
    )
    print("\n" + body)
    common.write_block("gradual99", body)


if __name__ == "__main__":
    main()
