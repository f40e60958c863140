"""Structured pruning (``pattern="channels"``): one-shot accuracy on Fashion-MNIST, and what ``shrink()`` buys.

    python benchmarks/structured.py            # the plan below (cells cached in benchmarks/.cache/cells)
    python benchmarks/structured.py --quick    # one seed, fewer cells, few timing runs: a smoke run, not published
    python benchmarks/structured.py --gradual  # only the gradual section (its own RESULTS.md block)

* **one-shot**: one ``prune()`` round with ``pattern="channels"`` on the trained dense models of the
  other one-shot tables (8 epochs, ``common.dense``), the first 32 training batches of curvature,
  ``scope="global"``, the callbacks' defaults otherwise (OBD: ``curvature="fisher"``, whose
  ``fisher_type="auto"`` is the exact GGN for 10 classes; OBS: ``hessian="layerwise"``). ``target``
  is the fraction of *structures* (hidden neurons, Conv output channels) removed, over all families
  together. Each cell also shrinks the pruned model (``lightning_prune.shrink``) and checks its
  outputs. The fine-tune column trains the pruned model one more epoch with the same pruner as a
  callback (its round is done, so it only keeps the masks frozen).
* **speed-up**: CPU latency of the dense and the shrunk model in one process, calls alternated
  (dense, shrunk, dense, ...), medians; eval mode, ``no_grad``, a fixed number of threads. MLP and
  LeNet-5 (trained, magnitude, global), and the language model of ``benchmarks/lm.py`` (its
  architecture with random weights, ``MagnitudePruning(pattern="channels", scope="layer")``).
* **gradual** (``--gradual``, run on its own): quality.py's short regime (5 epochs from scratch,
  cubic rounds after epochs 0-2) on the MLP.

Writes the tables between the ``<!-- structured:start -->`` markers of ``benchmarks/RESULTS.md``
(``--gradual``: ``<!-- structured-gradual:start -->``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import lm
import quality
import torch

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning, prune, shrink

# name -> (callback class, keyword arguments): the callbacks' defaults besides the pattern
METHODS: dict[str, tuple[type, dict[str, Any]]] = {
    "magnitude": (MagnitudePruning, {}),
    "OBD fisher": (OBDPruning, {"curvature": "fisher"}),
    "OBS layerwise": (OBSPruning, {"hessian": "layerwise"}),
    # not in the brief's defaults: the same L1 criterion with each family pruned to the target (no global ranking)
    "magnitude, scope=layer": (MagnitudePruning, {"scope": "layer"}),
}
TARGETS = [0.5, 0.75]
PLANS: dict[str, dict[str, Any]] = {
    "full": {
        # LeNet-5 cells take 4-6 minutes each on 2 busy cores (OBD's exact GGN, OBS's re-captures): one seed
        "one_shot": [("mlp", list(METHODS), [0, 1, 2]), ("lenet5", list(METHODS), [0])],
        "finetune_seeds": [0],
        "latency": ["mlp", "lenet5", "lm"],
        "reps": 30,
        # --gradual, ~10 minutes
        "gradual": [("mlp", ["magnitude", "magnitude, scope=layer", "OBD fisher", "OBS layerwise"], [0, 1, 2])],
    },
    "quick": {
        "one_shot": [("mlp", ["magnitude", "OBS layerwise"], [0])],
        "finetune_seeds": [],
        "latency": ["mlp", "lm"],
        "reps": 5,
        "gradual": [],
    },
}
LM = lm.PLANS["full"]  # the language model of lm.py's tables (random weights here: latency only)
LM_VOCAB = LM["data"]["vocab_size"]
LM_BATCH, LM_TOKENS = 8, 256
IMAGE_BATCH = 256
GRADUAL = "short"


def make(method: str, target: float, **schedule: Any):
    cls, kwargs = METHODS[method]
    schedule = schedule or {"schedule": "one_shot"}
    return cls(target, pattern="channels", verbose=0, **kwargs, **schedule)


def example_images(seed: int = 0) -> torch.Tensor:
    x = torch.cat([b[0] for b, _ in zip(common.data(seed).test_dataloader(), range(4))])
    return x[:IMAGE_BATCH]


def record(net: torch.nn.Module, seed: int) -> dict[str, Any]:
    """Accuracy, weight sparsity and the shrunk model's size (shrink checks its outputs).

    The check's tolerance is relative to the logits: shrink's default ``atol=1e-5`` is absolute,
    and float32 rounding (the matmuls shrink to fewer columns) exceeds it on logits of tens, as
    after the fine-tune."""
    x = example_images(seed)
    with torch.no_grad():
        scale = float(net.eval()(x).abs().max())
    s = shrink(net, example_inputs=x, atol=1e-5 * max(1.0, scale))
    return {
        "acc": common.test_accuracy(net, seed),
        "sparsity": common.sparsity_of(net),
        "params_before": s.params_before,
        "params_after": s.params_after,
        "removed": s.removed,
        "max_abs_diff": s.max_abs_diff,
    }


def cell(model: str, method: str, target: float, seed: int, finetune: bool = False) -> dict[str, Any]:
    """One-shot structured pruning of the cached dense model (and, with ``finetune``, one more
    epoch with the masks frozen), computed once and cached."""
    return common.cell(
        f"structured-one_shot-{model}-{method.replace(' ', '_')}-{target}-s{seed}",
        lambda: _measure(model, method, target, seed, finetune),
        reuse=lambda r: not finetune or "ft_acc" in r,
    )


def _measure(model: str, method: str, target: float, seed: int, finetune: bool) -> dict[str, Any]:
    net = common.dense_net(model, seed)
    pruner = make(method, target)
    rec = prune(net, common.data(seed).train_dataloader(), pruner, num_batches=min(32, pruner.window_length))
    r = {
        "model": model,
        "method": method,
        "target": target,
        "seed": seed,
        "dense_acc": common.dense(model, seed)[1],
        "structures_pruned": rec["structures_pruned"],
        "structures_total": rec["structures_total"],
        "round_seconds": rec["seconds"],
        **record(net, seed),
    }
    if finetune:
        ft_start = time.perf_counter()
        common.trainer(max_epochs=1, limit_val_batches=0, callbacks=[pruner]).fit(net, common.data(seed))
        after = record(net, seed)
        r.update(
            ft_acc=after["acc"],
            ft_sparsity=after["sparsity"],
            ft_params_after=after["params_after"],
            ft_seconds=time.perf_counter() - ft_start,
        )
    return r


def gradual_cell(model: str, method: str, target: float, seed: int) -> dict[str, Any]:
    """quality.py's short regime with ``pattern="channels"`` (cached)."""
    name = f"structured-{GRADUAL}-{model}-{method.replace(' ', '_')}-{target}-s{seed}"
    return common.cell(name, lambda: _measure_gradual(model, method, target, seed))


def _measure_gradual(model: str, method: str, target: float, seed: int) -> dict[str, Any]:
    spec = quality.REGIMES[GRADUAL]
    pruner = make(method, target, schedule="cubic", start_epoch=0, end_epoch=spec["end_epoch"])
    acc, net = common.train_with(model, seed, spec["epochs"], [pruner])
    s = shrink(net, example_inputs=example_images(seed))
    return {
        "model": model,
        "method": method,
        "target": target,
        "seed": seed,
        "acc": acc,
        "dense_acc": common.dense(model, seed, epochs=spec["epochs"])[1],
        "sparsity": common.sparsity_of(net),
        "params_after": s.params_after,
        "removed": s.removed,
    }


def one_shot_table(model: str, names: list[str], seeds: list[int], ft_seeds: list[int]) -> tuple[str, str]:
    """Methods x targets: accuracy (%), after the fine-tune, weight sparsity, parameters after shrink;
    and the structures each family lost (seed 0)."""
    rows = {}
    for seed in seeds:
        for target in TARGETS:
            for name in names:
                r = cell(model, name, target, seed, finetune=seed in ft_seeds)
                rows[name, target, seed] = r
                ft = f" -> {r['ft_acc']:.4f} after 1 epoch" if "ft_acc" in r else ""
                print(
                    f"  one-shot {model} {name:14s} {target:.2f} seed {seed}: {r['acc']:.4f}{ft}, sparsity "
                    f"{r['sparsity']:.3f}, params {r['params_after']} ({r['seconds']:.0f}s)",
                    flush=True,
                )
    first = rows[names[0], TARGETS[0], seeds[0]]
    dense_accs = [rows[names[0], TARGETS[0], s]["dense_acc"] for s in seeds]
    ft_seeds = [s for s in ft_seeds if s in seeds]
    ft_label = "+ 1 epoch, masks frozen" + (f" (seeds {ft_seeds})" if ft_seeds else "")
    header = ["method", "structures removed", "test acc (%)", ft_label, "weight sparsity", "parameters after shrink"]
    dense = f"0 of {first['structures_total']}"
    body = [["dense", dense, common.fmt(dense_accs), "", "0%", f"{first['params_before']:,}"]]
    for target in TARGETS:
        for name in names:
            rs = [rows[name, target, s] for s in seeds]
            fts = [r["ft_acc"] for r in rs if "ft_acc" in r]
            params = sorted({r["params_after"] for r in rs})
            p = f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,}-{params[-1]:,}"
            body.append(
                [
                    name,
                    f"{target:.0%} ({rs[0]['structures_pruned']})",
                    common.fmt([r["acc"] for r in rs]),
                    common.fmt(fts),
                    f"{100 * statistics.mean(r['sparsity'] for r in rs):.1f}%",
                    p,
                ]
            )
    sizes = family_sizes(model)
    families = list(sizes)
    fam = [
        [name, f"{target:.0%}", *(rows[name, target, seeds[0]]["removed"].get(f, 0) for f in families)]
        for target in TARGETS
        for name in names
    ]
    return (
        common.md_table(header, body),
        common.md_table(["method", "target", *(f"`{f}` ({sizes[f]})" for f in families)], fam),
    )


def family_sizes(model: str) -> dict[str, int]:
    from lightning_prune.models.graph import discover

    return {f.name: f.size for f in discover(common.build(model, 0))[0]}


# ---------------------------------------------------------------------------------------------- latency
def timed_call(model: torch.nn.Module, inputs: Any, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return (time.perf_counter() - start) / calls


@torch.no_grad()
def latency(dense: torch.nn.Module, small: torch.nn.Module, inputs: Any, reps: int, calls: int) -> tuple[float, float]:
    """Median seconds per forward of each, the two measured alternately ``reps`` times (first one, then the other)."""
    dense.eval(), small.eval()
    for m in (dense, small):  # warm-up
        timed_call(m, inputs, calls)
    times = common.alternated(
        {"dense": lambda: timed_call(dense, inputs, calls), "small": lambda: timed_call(small, inputs, calls)},
        reps,
        swap=True,
    )
    return statistics.median(times["dense"]), statistics.median(times["small"])


def lm_batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, LM_VOCAB, (LM_BATCH, LM_TOKENS), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def speed_cell(model: str, target: float, reps: int) -> dict[str, Any]:
    """Parameters and latency, dense vs shrunk (not cached: timings belong to this run)."""
    if model == "lm":
        from lightning_prune.app.models import CausalLM

        torch.manual_seed(0)
        dense = CausalLM(vocab_size=LM_VOCAB, **LM["model"]).model.eval()
        batches = lm_batches(4)
        pruned = copy.deepcopy(dense)
        prune(
            pruned, batches, MagnitudePruning(target, pattern="channels", scope="layer", schedule="one_shot", verbose=0)
        )
        inputs: Any = {"input_ids": batches[0]["input_ids"]}
        calls = 1
    else:
        dense = common.dense_net(model, 0).eval()
        pruned = common.dense_net(model, 0)
        prune(pruned, common.data(0).train_dataloader(), make("magnitude", target), num_batches=8)
        inputs = example_images(0)
        calls = 20 if model == "mlp" else 5
    s = shrink(pruned, example_inputs=inputs)
    t_dense, t_small = latency(dense, s.model, inputs, reps, calls)
    return {
        "model": model,
        "target": target,
        "params_before": s.params_before,
        "params_after": s.params_after,
        "removed": s.removed,
        "max_abs_diff": s.max_abs_diff,
        "dense_ms": 1e3 * t_dense,
        "shrunk_ms": 1e3 * t_small,
    }


def speed_table(models: list[str], reps: int) -> str:
    names = {
        "mlp": f"MLP 784-300-100-10, batch {IMAGE_BATCH}",
        "lenet5": f"LeNet-5, batch {IMAGE_BATCH}",
        "lm": f"LM (lm.py, random weights), {LM_BATCH} x {LM_TOKENS} tokens",
    }
    body = []
    for model in models:
        for target in TARGETS:
            r = speed_cell(model, target, reps)
            print(
                f"  latency {model} {target:.2f}: {r['params_before']} -> {r['params_after']} params, "
                f"{r['dense_ms']:.3f} / {r['shrunk_ms']:.3f} ms (diff {r['max_abs_diff']:.1e})",
                flush=True,
            )
            body.append(
                [
                    names[model],
                    f"{target:.0%}",
                    f"{r['params_before']:,} -> {r['params_after']:,} ({r['params_after'] / r['params_before']:.0%})",
                    f"{r['dense_ms']:.2f}",
                    f"{r['shrunk_ms']:.2f}",
                    f"{r['dense_ms'] / r['shrunk_ms']:.2f}x",
                ]
            )
    header = ["model", "structures removed", "parameters dense -> shrunk", "dense ms", "shrunk ms"]
    return common.md_table([*header, "speed-up dense/shrunk"], body)


def gradual_table(model: str, names: list[str], seeds: list[int]) -> str:
    dense = []
    for seed in seeds:
        for target in TARGETS:
            for name in names:
                r = gradual_cell(model, name, target, seed)
                print(f"  {GRADUAL} {model} {name} {target:.2f} seed {seed}: {r['acc']:.4f} ({r['seconds']:.0f}s)")
                if name == names[0] and target == TARGETS[0]:
                    dense.append(r["dense_acc"])
    body = [[f"dense ({quality.REGIMES[GRADUAL]['epochs']} epochs)", 0, common.fmt(dense), "0%", ""]]
    for target in TARGETS:
        for name in names:
            rs = [gradual_cell(model, name, target, s) for s in seeds]
            sparsity = 100 * statistics.mean(r["sparsity"] for r in rs)
            accs = common.fmt([r["acc"] for r in rs])
            body.append([name, f"{target:.0%}", accs, f"{sparsity:.1f}%", f"{rs[0]['params_after']:,}"])
    header = ["method", "structures removed", "test acc (%)", "weight sparsity", "parameters after shrink"]
    return common.md_table(header, body)


def gradual(plan: dict[str, Any], start: float) -> None:
    """The gradual section, published in its own block: it trains from scratch and shares no cell with the rest."""
    spec = quality.REGIMES[GRADUAL]
    parts = [
        f"### Gradual structured, {model}: from scratch, {spec['epochs']} epochs, cubic rounds after epochs "
        f"0-{spec['end_epoch']}, then training with frozen masks\n\n"
        f"Test accuracy (%), seeds {seeds}; `target` = the fraction of structures removed (global), the callbacks' "
        f"defaults otherwise.\n\n{gradual_table(model, names, seeds)}"
        for model, names, seeds in plan["gradual"]
    ]
    body = (
        f"`python benchmarks/structured.py --gradual` at `{common.commit()}`, {(time.time() - start) / 60:.0f} minutes "
        f"on {common.machine()}. Every shrunk model's outputs were checked against the masked model's.\n\n"
        + "\n\n".join(parts)
    )
    print(body)
    if plan is PLANS["full"]:
        common.write_block("structured-gradual", body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the latency measurements")
    p.add_argument("--gradual", action="store_true", help="only the gradual section (short regime), own block")
    a = p.parse_args()
    plan = PLANS["quick" if a.quick else "full"]
    start = time.time()
    if a.gradual:
        gradual(plan, start)
        return
    parts = []
    for model, names, seeds in plan["one_shot"]:
        table, families = one_shot_table(model, names, seeds, plan["finetune_seeds"])
        parts.append(
            f"### One-shot structured, {model}: one round on the trained dense model\n\n"
            f"Test accuracy (%), seeds {seeds}; `target` = the fraction of structures removed "
            f"({' + '.join(f'{n}' for n in family_sizes(model).values())} candidates, global). Weight sparsity is over "
            "all Linear/Conv weights; the parameters are the shrunk model's (all parameters, biases included).\n\n"
            f"{table}\n\nStructures removed per family (seed {seeds[0]}):\n\n{families}"
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    speed = speed_table(plan["latency"], plan["reps"])
    torch.set_num_threads(threads)
    parts.append(
        f"### Speed-up of the shrunk model (CPU, {a.threads} thread{'s' if a.threads > 1 else ''})\n\n"
        f"`shrink()` of a magnitude-pruned model (MLP/LeNet-5: the trained seed-0 models, global; LM: scope='layer', "
        f"every MLP and attention block loses the same fraction of neurons/heads), forward latency in eval mode under "
        f"`no_grad`, median of {plan['reps']} alternated measurements each. Parameters: the whole model (the LM's "
        "embeddings and untied head, 2 x 4096 x 192, do not shrink).\n\n" + speed
    )
    body = (
        '## Structured pruning (`pattern="channels"`) and `shrink()`\n\n'
        f"`python benchmarks/structured.py{' --quick' if a.quick else ''}` at `{common.commit()}`, "
        f"{(time.time() - start) / 60:.0f} minutes on {common.machine()} (cells cached in `benchmarks/.cache/cells`; "
        "the dense models are the one-shot tables' 8-epoch models). Every shrunk model's outputs were checked against "
        "the masked model's (`shrink(example_inputs=...)`).\n\n" + "\n\n".join(parts)
    )
    print(body)
    if not a.quick:  # a smoke run is not published
        common.write_block("structured", body)


if __name__ == "__main__":
    main()
