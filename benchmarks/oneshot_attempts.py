"""One-shot at 90% (issue 19): three more attempts on top of ``OBSPruning``'s defaults, measured.

    python benchmarks/oneshot_attempts.py            # seeds 0,1,2 (~8 minutes on 2 cores)

The same dense MLPs and 32 calibration batches as ``extreme.py``; no fine-tuning on training data
beyond the calibration batches. Rows:

* ``defaults``: ``OBSPruning(target, schedule="one_shot")`` through ``prune()`` (extreme.py's cell);
* ``4 steps in the round``: the same pruner run 4 times at 1/4, 2/4, 3/4 and all of the target
  (``run_round``), each step re-capturing the curvature at the weights the step before left, as
  oBERT recomputes its inverse inside one round (90% only: each step costs a whole round);
* ``bias correction``: after the defaults, each layer's bias is set so its mean output on the
  calibration batches is the dense layer's (as quantisation's bias correction does), layer by
  layer from the input;
* ``calibration distillation``: after the defaults, 4 passes of Adam (lr 1e-4) over the 32
  calibration batches on the KL divergence to the dense model's outputs, masks frozen: a global
  reconstruction with no label and no data beyond the calibration set.

Cells are cached in ``benchmarks/.cache/cells`` (``attempt-*``); the table goes between the
``<!-- oneshot-attempts:start -->`` markers of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import extreme
import torch
from quality import fmt

from lightning_prune import OBSPruning, prune
from lightning_prune.calibration import Calibration, no_progress
from lightning_prune.distributed import default_collectives
from lightning_prune.round import run_round

SPARSITIES = [0.9, 0.98]
ATTEMPTS = ["defaults", "4 steps in the round", "bias correction", "calibration distillation"]
STEPS, PASSES, LR = 4, 4, 1e-4


def _batches(seed: int) -> list[Any]:
    return list(itertools.islice(iter(common.data(seed).train_dataloader()), 32))


def _linears(net: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in net.modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def _input_mean(net: torch.nn.Module, layer: torch.nn.Module, batches: list[Any]) -> torch.Tensor:
    total, count = 0.0, 0

    def hook(module, args, output) -> None:
        nonlocal total, count
        x = args[0].flatten(1).double()
        total, count = total + x.sum(0), count + len(x)

    handle = layer.register_forward_hook(hook)
    net.eval()
    for x, _ in batches:
        net(x)
    handle.remove()
    return total / count


@torch.no_grad()
def bias_correct(net: torch.nn.Module, dense: torch.nn.Module, batches: list[Any]) -> None:
    """Each layer's mean output on ``batches`` set to the dense layer's, from the input layer on."""
    for layer, ref in zip(_linears(net), _linears(dense)):
        want = ref.weight.double() @ _input_mean(dense, ref, batches) + ref.bias.double()
        have = layer.weight.double() @ _input_mean(net, layer, batches) + layer.bias.double()
        layer.bias += (want - have).to(layer.bias.dtype)


def distill(net: torch.nn.Module, dense: torch.nn.Module, batches: list[Any], pruner: OBSPruning) -> None:
    """``PASSES`` passes of Adam over ``batches`` on KL(dense || net), ``pruner``'s masks frozen as a
    fit would freeze them (gradients before each step, weights after)."""
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    net.eval()
    dense.eval()
    with torch.no_grad():
        targets = [dense(x) for x, _ in batches]
    for _ in range(PASSES):
        for (x, _), t in zip(batches, targets):
            loss = common.distill_loss(net(x), t)
            opt.zero_grad()
            loss.backward()
            pruner.freeze_grads_()
            opt.step()
            pruner.freeze_weights_()


def stepped(seed: int, target: float) -> torch.nn.Module:
    """``STEPS`` rounds of one pruner inside one ``prune()``-like call, statistics re-captured each step."""
    net = common.dense_net("mlp", seed)
    pruner = OBSPruning(target, schedule="one_shot", verbose=0)
    pruner.bind(net)
    calib = Calibration(net, None, training_step=True, output_loss=True, progress=no_progress)
    batches = _batches(seed)
    for k in range(1, STEPS + 1):
        run_round(pruner, calib, batches, target * k / STEPS, comm=default_collectives())
    return net


def cell(attempt: str, target: float, seed: int) -> dict[str, Any]:
    if attempt == "defaults":
        r = extreme.cell("mlp", "obs-layerwise", target, seed)
        return {**r, "attempt": attempt, "seconds": r["round_seconds"]}
    name = f"attempt-{attempt.replace(' ', '-')}-{target}-s{seed}"
    return common.cell(name, lambda: _measure(attempt, target, seed))


def _measure(attempt: str, target: float, seed: int) -> dict[str, Any]:
    """``seconds``: the pruning (and any correction) alone, not the test evaluation."""
    start = time.perf_counter()
    if attempt == "4 steps in the round":
        net = stepped(seed, target)
    else:
        net, dense, batches = common.dense_net("mlp", seed), common.dense_net("mlp", seed), _batches(seed)
        pruner = OBSPruning(target, schedule="one_shot", verbose=0)
        prune(net, batches, pruner)
        if attempt == "bias correction":
            bias_correct(net, dense, batches)
        else:
            distill(net, dense, batches, pruner)
    seconds = time.perf_counter() - start
    return {
        "attempt": attempt,
        "target": target,
        "seed": seed,
        "acc": common.test_accuracy(net, seed),
        "dense_acc": common.dense("mlp", seed)[1],
        "sparsity": common.sparsity_of(net),
        "seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    start = time.time()
    rows = []
    for seed in seeds:
        for t in SPARSITIES:
            for attempt in ATTEMPTS:
                if attempt == "4 steps in the round" and t != 0.9:
                    continue
                r = cell(attempt, t, seed)
                rows.append(r)
                print(f"  {attempt:26s} {t:.2f} seed {seed}: {r['acc']:.4f} ({r['seconds']:.0f}s)", flush=True)
    dense = fmt([r["dense_acc"] for r in rows if r["attempt"] == "defaults" and r["target"] == SPARSITIES[0]])
    lines = [
        "| attempt | " + " | ".join(f"{t:.0%}" for t in SPARSITIES) + " | seconds (90%) |",
        "|---|" + "---|" * (len(SPARSITIES) + 1),
        f"| dense | {' | '.join([dense] * len(SPARSITIES))} | |",
    ]
    for attempt in ATTEMPTS:
        got = [r for r in rows if r["attempt"] == attempt]
        cells = [fmt([r["acc"] for r in got if r["target"] == t]) for t in SPARSITIES]
        secs = [r["seconds"] for r in got if r["target"] == 0.9]
        lines.append(f"| {attempt} | " + " | ".join(cells) + f" | {sum(secs) / len(secs):.0f} |")
    commits = ", ".join(f"`{c}`" for c in sorted({r["commit"] for r in rows}))
    body = (
        "## One-shot: three more attempts on top of the defaults (design measurements)\n\n"
        f"`python benchmarks/oneshot_attempts.py --seeds {a.seeds}` at `{common.commit()}`, cells computed at "
        f"{commits}, {(time.time() - start) / 60:.0f} minutes on {common.machine()} (cells cached). MLP, the "
        "dense models and 32 calibration batches of `extreme.py`; test accuracy (%), mean ± std over seeds "
        f"{seeds}; *seconds*: the pruning (and correction) at 90%. What each row does: the script's docstring.\n\n"
        + "\n".join(lines)
    )
    print("\n" + body)
    common.write_block("oneshot-attempts", body)


if __name__ == "__main__":
    main()
