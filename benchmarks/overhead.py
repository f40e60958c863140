"""Epoch-time overhead of each callback against no callback, measured alternately in one process.

    python benchmarks/overhead.py [--reps 5] [--batches 200] [--methods magnitude,modelpruning,obd-fisher]
                                  [--optimizer adam|sgd] [--accelerator cpu|gpu]

For each method a 3-epoch fit on the Fashion-MNIST MLP (batch 128, ``--batches`` per epoch):

* epoch 0 is an *accumulating* epoch: the curvature window covers all its batches
  (``num_batches = --batches``), and the round runs at its end;
* epochs 1-2 are *other* epochs: masks are frozen, nothing is captured.

Fits of all methods and of the no-callback baseline alternate ``--reps`` times; an epoch's time is
its median step time times its steps (robust to a shared machine's bursts), and the table reports
the median over repetitions as a ratio to the baseline's, and the round time as a multiple of a
baseline epoch. Ratios from one run are comparable; absolute times on a shared machine are not.

Note (measured, torch 2.13 CPU, AVX-512): ``Tensor.sqrt`` is ~4.5x slower on exact zeros than on
any other value. Frozen masks zero Adam's ``exp_avg_sq`` for pruned entries (so nothing can revive
them), and Adam takes ``sqrt(exp_avg_sq)`` of the whole tensor every step, so Adam's step gets
slower on CPU as sparsity grows. SGD has no square root; ``--optimizer sgd`` isolates our own cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import methods
import torch
from lightning.pytorch.callbacks import Callback

EPOCHS = 3


class EpochTimer(Callback):
    """Robust epoch time: the median training-step time times the number of steps.

    Each step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward,
    optimizer step and every callback's per-batch work); the median discards the bursts of a
    shared machine that dominate whole-epoch wall times. The round, at epoch end, is excluded.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._steps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._steps.append(time.perf_counter() - self._start)

    @staticmethod
    def _sync(pl_module) -> None:
        # CUDA kernels are asynchronous: without a sync the step time would be the launch time
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(statistics.median(self._steps) * len(self._steps))
        self._steps = []


def one_fit(
    method: str | None, batches: int, seed: int = 0, optimizer: str = "adam", accelerator: str = "cpu"
) -> dict[str, Any]:
    timer = EpochTimer()
    callbacks: list[Callback] = [timer]  # first: its epoch end runs before the round
    pruner = None
    if method is not None and method != "none (again)":
        kwargs = {"schedule": "one_shot", "start_epoch": 0}
        if method.startswith(("obd", "obs")):
            kwargs["num_batches"] = batches
        pruner = methods.make(method, 0.8, **kwargs)
        callbacks.append(pruner)
    common.train_with(
        "mlp", seed, EPOCHS, callbacks, optimizer=optimizer, limit_train_batches=batches, accelerator=accelerator
    )
    round_s = pruner.history[0]["seconds"] if pruner is not None and hasattr(pruner, "history") else float("nan")
    return {"accumulating": timer.times[0], "other": timer.times[1:], "round": round_s}


def measure(
    method_names: list[str], reps: int, batches: int, optimizer: str = "adam", accelerator: str = "cpu"
) -> dict[str, dict[str, float]]:
    method_names = [*method_names, "none (again)"]
    one_fit(None, batches, optimizer=optimizer, accelerator=accelerator)  # warm-up (data, caches, threads)
    fits = common.alternated(
        {
            m: lambda m=m: one_fit(None if m == "none" else m, batches, optimizer=optimizer, accelerator=accelerator)
            for m in ["none", *method_names]
        },
        reps,
    )
    samples = {
        m: {
            "accumulating": [r["accumulating"] for r in rs],
            "other": [t for r in rs for t in r["other"]],
            "round": [r["round"] for r in rs],
        }
        for m, rs in fits.items()
    }
    # epoch 0 of a fit pays warm-up costs: compare it with the baseline's epoch 0, later epochs with later
    base0 = statistics.median(samples["none"]["accumulating"])
    base = statistics.median(samples["none"]["other"])
    out = {}
    for m in method_names:
        s = samples[m]
        out[m] = {
            "accumulating": statistics.median(s["accumulating"]) / base0,
            "other": statistics.median(s["other"]) / base,
            "round": statistics.median(s["round"]) / base
            if m not in ("modelpruning", "none (again)")
            else float("nan"),
        }
    out["_baseline_epoch_s"] = {"accumulating": base0, "other": base, "round": base}
    return out


def table(result: dict[str, dict[str, float]]) -> str:
    rows = []
    for m, r in result.items():
        if m.startswith("_"):
            continue
        acc = "-" if m in ("magnitude", "modelpruning", "obd-hutchinson") else f"{r['accumulating']:.3f}x"
        if m == "none (again)":
            m = "no callback, measured again (noise floor)"
            acc = f"{r['accumulating']:.3f}x"
        rnd = "-" if r["round"] != r["round"] else f"{r['round']:.2f}"
        rows.append([m, acc, f"{r['other']:.3f}x", rnd])
    return common.md_table(["callback", "accumulating epoch", "other epochs", "round (x one epoch)"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="magnitude,modelpruning,obd-fisher,obd-kfac,obd-ekfac,obs-layerwise")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    p.add_argument("--accelerator", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    result = measure(a.methods.split(","), a.reps, a.batches, a.optimizer, a.accelerator)
    where = torch.cuda.get_device_name() if a.accelerator == "gpu" else "CPU"
    print(
        f"\nEpoch time / no-callback epoch time ({where}, {a.optimizer}; median of {a.reps} alternating reps, "
        f"{a.batches} batches):\n"
    )
    print(table(result))


if __name__ == "__main__":
    main()
