"""A language model: one-shot and gradual pruning against llm-compressor's SparseGPT and Wanda.

    python benchmarks/lm.py            # the plan below (dense model and cells cached, resumable)
    python benchmarks/lm.py --quick    # a 2-block model, 60 steps: a smoke run, not published

The model: ``lightning_prune.app.models.CausalLM`` (LLaMA architecture, ``transformers``), 8 blocks,
hidden 192, 5.1M parameters, trained from scratch for ``STEPS`` steps on Python's standard library
(``TextDataModule``: byte-level BPE, 4096 tokens, windows of 128). Perplexity on the test split.

* **one-shot**: 128 calibration windows of the training split, the same for every method. Ours
  (``prune()``) and llm-compressor's (``benchmarks/lm_peer.py`` in its own venv) each run in a fresh
  process on the same saved model, so wall time and peak memory are comparable; the SparseGPT and
  Wanda pairs are timed ``REPS`` times, alternating ours and theirs.
* **gradual**: fine-tuning the dense model for ``FINETUNE`` steps while pruning every
  ``FINETUNE // 10`` steps over the first 60% of them (cubic), then perplexity.

The llm-compressor venv (``benchmarks/.cache/llmc-venv``) is created on first use, as lm_peer.py's
docstring says; without network the peer rows are left out and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch

ROOT = Path(__file__).resolve().parent
CACHE = common.CACHE / "lm"
PEER_VENV = common.CACHE / "llmc-venv"
FIRST_RUN = "c394873"  # cells of the first full run, before cells recorded their commit
PLANS: dict[str, dict[str, Any]] = {
    "full": {
        "model": {"hidden_size": 192, "num_layers": 8, "num_heads": 4, "intermediate_size": 512},
        "data": {"vocab_size": 4096, "seq_len": 128, "batch_size": 16},
        "steps": 1500,
        "calib": 128,
        "sparsities": [0.5, 0.7],
        "reps": 2,
        "finetune": 200,
        "gradual": [0.7, 0.9],
        "structured": [0.5, 0.75],  # of every block's heads (4) and MLP neurons (512)
    },
    "quick": {
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128},
        "data": {"vocab_size": 1024, "seq_len": 64, "batch_size": 8, "max_files": 60},
        "steps": 60,
        "calib": 16,
        "sparsities": [0.5],
        "reps": 1,
        "finetune": 30,
        "gradual": [0.7],
        "structured": [0.5],  # 2 heads per block: 75% would leave none
    },
}
# ours: name -> (callback class, keyword arguments); the target is added per cell
OURS: dict[str, tuple[str, dict[str, Any]]] = {
    "magnitude": ("MagnitudePruning", {"scope": "layer"}),
    "wanda (OBD activations, row)": ("OBDPruning", {"curvature": "activations", "scope": "row"}),
    "OBD fisher (global)": ("OBDPruning", {}),
    "OBS sequential fast (layer)": (
        "OBSPruning",
        {
            "allocation": "reconstruction",
            "scope": "layer",
            "blocks": "auto",
            "solver": "fast",
            "reconstruct": "current",
        },
    ),
    "OBS sequential exact (layer)": (
        "OBSPruning",
        {
            "allocation": "reconstruction",
            "scope": "layer",
            "blocks": "auto",
            "solver": "exact",
            "reconstruct": "current",
        },
    ),
    "OBS global (default)": ("OBSPruning", {}),
    # the lm_head decision: the same criteria with the output head pruned too
    "magnitude + lm_head": ("MagnitudePruning", {"scope": "layer", "head": True}),
    "wanda + lm_head": ("OBDPruning", {"curvature": "activations", "scope": "row", "head": True}),
}
PEERS = {"llm-compressor SparseGPT": "sparsegpt", "llm-compressor Wanda": "wanda"}
# N:M (``--nm``): the same criteria with a pattern, against llm-compressor's mask_structure
SEQUENTIAL = {"allocation": "reconstruction", "scope": "layer", "blocks": "auto", "reconstruct": "current"}
NM_OURS: dict[str, tuple[str, dict[str, Any]]] = {}
NM_PEERS: dict[str, tuple[str, str]] = {}
for _p in ("2:4", "4:8"):
    NM_OURS[f"magnitude {_p}"] = ("MagnitudePruning", {"scope": "layer", "pattern": _p})
    NM_OURS[f"wanda (OBD activations) {_p}"] = (
        "OBDPruning",
        {"curvature": "activations", "scope": "row", "pattern": _p},
    )
    NM_OURS[f"OBS sequential fast {_p}"] = ("OBSPruning", {**SEQUENTIAL, "solver": "fast", "pattern": _p})
    NM_OURS[f"OBS sequential exact {_p}"] = ("OBSPruning", {**SEQUENTIAL, "solver": "exact", "pattern": _p})
    NM_PEERS[f"llm-compressor SparseGPT {_p}"] = ("sparsegpt", _p)
    NM_PEERS[f"llm-compressor Wanda {_p}"] = ("wanda", _p)
FINETUNE_NM = ["magnitude 2:4", "wanda (OBD activations) 2:4", "OBS sequential fast 2:4"]
PAIRS = [
    ("OBS sequential fast (layer)", "llm-compressor SparseGPT"),
    ("wanda (OBD activations, row)", "llm-compressor Wanda"),
]
GRADUAL = {
    "magnitude": ("MagnitudePruning", {"scope": "layer"}),
    "OBS sequential (layer)": (
        "OBSPruning",
        {"allocation": "reconstruction", "scope": "layer", "blocks": "auto", "reconstruct": "current"},
    ),
}


def datamodule(plan: dict[str, Any]):
    from lightning_prune.app.data import TextDataModule

    return TextDataModule(**plan["data"], cache_dir=str(CACHE / "text"))


def dense(plan: dict[str, Any], name: str) -> Path:
    """Train (or reuse) the dense model; save its state dict, a Hugging Face folder, calibration and eval ids."""
    import lightning.pytorch as pl

    from lightning_prune.app.models import CausalLM

    folder = CACHE / f"dense-{name}-{common.fingerprint([plan['model'], plan['data'], plan['steps']])}"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    dm = datamodule(plan)
    lit = CausalLM(**dm.model_args, **plan["model"])
    start = time.perf_counter()
    trainer = common.trainer(max_steps=plan["steps"], max_epochs=-1, limit_val_batches=0)
    trainer.fit(lit, datamodule=dm)
    seconds = time.perf_counter() - start
    torch.save(lit.state_dict(), folder / "lit.pt")
    lit.model.save_pretrained(folder / "hf")
    g = torch.Generator().manual_seed(0)
    train = dm.split("train")
    torch.save(train[torch.randperm(len(train), generator=g)[: plan["calib"]]].clone(), folder / "calib.pt")
    torch.save(dm.split("test").clone(), folder / "eval.pt")
    (folder / "dense.json").write_text(json.dumps({"train_seconds": seconds, "steps": plan["steps"]}))
    (folder / "done").write_text("")
    return folder


def perplexity(model: torch.nn.Module, ids: torch.Tensor, batch: int = 8) -> float:
    from lightning_prune.app.models import perplexity as ppl

    return ppl(model, [{"input_ids": ids[i : i + batch]} for i in range(0, len(ids), batch)])


def ours_cell(folder: Path, method: str, sparsity: float, out: Path) -> None:
    """One measurement of ours, in this (fresh) process: load, prune(), time, memory, perplexity."""
    import warnings

    from transformers import LlamaForCausalLM

    import lightning_prune

    warnings.filterwarnings("ignore")
    model = LlamaForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32).eval()
    batches, evals = calibration_batches(folder), torch.load(folder / "eval.pt")
    cls, kwargs = {**OURS, **NM_OURS}[method]
    if kwargs.get("head"):  # the same criterion with the output head pruned too
        head = {"parameters": [t.param for t in common.targets(model)] + [model.lm_head.weight]}
        kwargs = {**{k: v for k, v in kwargs.items() if k != "head"}, **head}
    pruner = make_pruner((cls, kwargs), sparsity, len(batches), eval_batches=0)
    rss_before = common.rss_mib()
    common.reset_peak_rss()  # VmHWM then measures the pruning alone
    start = time.perf_counter()
    record = lightning_prune.prune(model, batches, pruner)
    seconds = time.perf_counter() - start
    peak = common.rss_mib("VmHWM")
    zeros = [int((t.param == 0).sum()) for t in pruner.targets]
    out.write_text(
        json.dumps(
            {
                "method": method,
                "sparsity": sparsity,
                "seconds_oneshot": seconds,
                "rss_before_mib": rss_before,
                "peak_rss_oneshot_mib": peak,
                "perplexity": perplexity(model, evals),
                "achieved_sparsity": sum(zeros) / sum(t.param.numel() for t in pruner.targets),
                "targets": len(pruner.targets),
                "lm_head_sparsity": float((model.lm_head.weight == 0).float().mean()),
                "info": {k: v for k, v in record["info"].items() if isinstance(v, (int, float, str))},
            }
        )
    )


def run_cell(folder: Path, method: str, sparsity: float, rep: int) -> dict[str, Any] | None:
    path = folder / "cells" / f"{method}-{sparsity}-r{rep}.json".replace(" ", "_").replace("/", "_")
    if path.exists():
        return json.loads(path.read_text())
    path.parent.mkdir(exist_ok=True)
    if method in PEERS or method in NM_PEERS:
        peer, mask = NM_PEERS.get(method, (PEERS.get(method), "0:0"))
        python = PEER_VENV / "bin" / "python"
        if not python.exists() and not make_peer_venv():
            return None
        cmd = [
            str(python),
            str(ROOT / "lm_peer.py"),
            "--model",
            str(folder / "hf"),
            "--calib",
            str(folder / "calib.pt"),
        ]
        cmd += ["--eval", str(folder / "eval.pt"), "--method", peer, "--sparsity", str(sparsity), "--mask", mask]
        cmd += ["--out", str(path)]
    else:
        cmd = [sys.executable, __file__, "--cell", str(folder), method, str(sparsity), str(path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.exists():
        print(f"FAILED {method} {sparsity}:\n{proc.stderr[-3000:]}", flush=True)
        return None
    r = json.loads(path.read_text())
    r["seconds_process"] = time.perf_counter() - start
    r["commit"] = common.commit()
    path.write_text(json.dumps(r))
    return r


def make_peer_venv() -> bool:
    constraints = common.CACHE / "llmc-constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    steps = [
        [sys.executable, "-m", "venv", str(PEER_VENV)],
        [str(PEER_VENV / "bin" / "pip"), "install", "-q", "torch==2.13.0"],
        [str(PEER_VENV / "bin" / "pip"), "install", "-q", "llmcompressor", "-c", str(constraints)],
    ]
    for cmd in steps:
        if subprocess.run(cmd).returncode != 0:
            print(f"could not build the llm-compressor venv ({' '.join(cmd)}): peer rows left out", flush=True)
            return False
    return True


def finetuning_setup(plan: dict[str, Any], folder: Path) -> tuple[Any, Any, int]:
    """``(datamodule, dense CausalLM with the fine-tuning optimizer, steps)``, seeded alike for every cell."""
    import lightning.pytorch as pl

    from lightning_prune.app.models import CausalLM

    pl.seed_everything(1, verbose=False)
    dm = datamodule(plan)
    ft = plan["finetune"]
    lit = CausalLM(**dm.model_args, **plan["model"], lr=1e-3, warmup_steps=ft // 20)
    lit.load_state_dict(torch.load(folder / "lit.pt"))
    return dm, lit, ft


def calibration_batches(folder: Path, rows: int = 8) -> list[dict[str, torch.Tensor]]:
    calib = torch.load(folder / "calib.pt")
    return [{"input_ids": calib[i : i + rows], "labels": calib[i : i + rows]} for i in range(0, len(calib), rows)]


def make_pruner(spec: tuple[str, dict[str, Any]], target: float, num_batches: int, **extra: Any) -> Any:
    """The callback ``spec = (class name, keyword arguments)`` names, reading ``num_batches``
    calibration batches (magnitude reads none)."""
    import lightning_prune

    cls, kwargs = spec
    if cls != "MagnitudePruning":
        kwargs = {**kwargs, "num_batches": num_batches}
    return getattr(lightning_prune, cls)(target=target, verbose=0, **extra, **kwargs)


# a one-shot round inside a fine-tuning fit's pruner: ``prune()`` runs it, the fit only keeps the masks
ONE_SHOT = {"schedule": "one_shot", "start_step": 1, "end_step": 1, "eval_batches": 0}


def gradual_cell(plan: dict[str, Any], folder: Path, method: str, target: float) -> dict[str, Any]:
    """Training with step rounds to ``target`` (``GRADUAL[method]``), perplexity at the end (cached)."""
    return common.cell(
        f"gradual-{method}-{target}".replace(" ", "_"),
        lambda: _measure_gradual(plan, folder, method, target),
        folder / "cells",
    )


def _measure_gradual(plan: dict[str, Any], folder: Path, method: str, target: float) -> dict[str, Any]:
    dm, lit, ft = finetuning_setup(plan, folder)
    every = max(ft // 10, 1)
    pruner = make_pruner(GRADUAL[method], target, 16, start_step=every, end_step=every * 6, every_n_steps=every)
    trainer = common.trainer(max_steps=ft, max_epochs=-1, callbacks=[pruner], limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(lit, datamodule=dm)
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "target": target,
        "sparsity": pruner.sparsity,
        "perplexity": perplexity(lit.model.eval(), torch.load(folder / "eval.pt")),
        "round_seconds": sum(h["seconds"] for h in pruner.history),
        "fit_seconds": seconds,
        "rounds": len(pruner.history),
    }


def finetune_cell(plan: dict[str, Any], folder: Path, method: str) -> dict[str, Any]:
    """One-shot N:M with ``prune()``, then ``FINETUNE`` steps of training with the masks frozen (the
    same pruner as a callback: its one round is done, so it only keeps the zeros)."""
    name = f"finetune-{method}".replace(" ", "_")
    return common.cell(name, lambda: _measure_finetune(plan, folder, method), folder / "cells")


def _measure_finetune(plan: dict[str, Any], folder: Path, method: str) -> dict[str, Any]:
    import lightning_prune
    from lightning_prune.patterns import parse_pattern

    dm, lit, ft = finetuning_setup(plan, folder)
    batches, evals = calibration_batches(folder), torch.load(folder / "eval.pt")
    pruner = make_pruner(NM_OURS[method], 0.5, len(batches), **ONE_SHOT)
    lightning_prune.prune(lit, batches, pruner)
    oneshot = perplexity(lit.model.eval(), evals)
    trainer = common.trainer(max_steps=ft, max_epochs=-1, callbacks=[pruner], limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(lit, datamodule=dm)
    nm = parse_pattern(NM_OURS[method][1]["pattern"])
    groups_ok = all(
        bool((nm.pruned_per_group(t.matrix(t.param.detach() == 0)) >= nm.n).all())  # type: ignore[attr-defined]
        for t in pruner.targets
    )
    return {
        "method": method,
        "perplexity_oneshot": oneshot,
        "perplexity": perplexity(lit.model.eval(), evals),
        "pattern_holds": groups_ok,
        "fit_seconds": time.perf_counter() - start,
    }


STRUCTURED: dict[str, tuple[str, dict[str, Any]]] = {
    "magnitude (L1 of the structure)": ("MagnitudePruning", {}),
    "OBD fisher": ("OBDPruning", {}),
    "OBS layer-wise (structured)": ("OBSPruning", {}),
}
STRUCTURED_FINETUNE = ("magnitude (L1 of the structure)", "OBS layer-wise (structured)")


def structured_cell(plan: dict[str, Any], folder: Path, method: str, target: float, finetune: bool) -> dict[str, Any]:
    """``pattern="channels"``, ``scope="layer"``: ``target`` of every block's attention heads and MLP
    neurons removed one-shot with ``prune()``, the model shrunk (outputs checked), and optionally
    ``FINETUNE`` steps of training with the structures frozen (the same pruner as a callback)."""
    return common.cell(
        f"structured-{method}-{target}-ft{int(finetune)}".replace(" ", "_"),
        lambda: _measure_structured(plan, folder, method, target, finetune),
        folder / "cells",
    )


def _measure_structured(
    plan: dict[str, Any], folder: Path, method: str, target: float, finetune: bool
) -> dict[str, Any]:
    import lightning_prune
    from lightning_prune.models.graph import discover

    dm, lit, ft = finetuning_setup(plan, folder)
    batches, evals = calibration_batches(folder), torch.load(folder / "eval.pt")
    pruner = make_pruner(STRUCTURED[method], target, len(batches), pattern="channels", scope="layer", **ONE_SHOT)
    start = time.perf_counter()
    lightning_prune.prune(lit, batches, pruner)
    seconds = time.perf_counter() - start
    r: dict[str, Any] = {
        "method": method,
        "target": target,
        "seconds_oneshot": seconds,
        "perplexity_oneshot": perplexity(lit.model.eval(), evals),
    }
    small = lightning_prune.shrink(lit.model, example_inputs={"input_ids": evals[:4]})
    kinds = {f.name: f.kind for f in discover(lit.model)[0]}
    r.update(
        params_before=small.params_before,
        params_after=small.params_after,
        heads_removed=sum(n for f, n in small.removed.items() if kinds[f] == "heads"),
        neurons_removed=sum(n for f, n in small.removed.items() if kinds[f] == "neurons"),
        shrink_max_abs_diff=small.max_abs_diff,
    )
    if finetune:
        trainer = common.trainer(max_steps=ft, max_epochs=-1, callbacks=[pruner], limit_val_batches=0)
        start = time.perf_counter()
        trainer.fit(lit, datamodule=dm)
        r["fit_seconds"] = time.perf_counter() - start
        r["perplexity"] = perplexity(lit.model.eval(), evals)
        kept = pruner.pattern.units(pruner.masks)
        again = lightning_prune.shrink(lit.model)
        r["structures_stay_removed"] = sum(again.removed.values()) == sum(p for p, _ in kept.values())
    return r


def structured_section(plan: dict[str, Any], folder: Path, dense_ppl: float) -> str:
    targets = plan["structured"]
    header = [
        "method",
        *(f"{t:.0%} one-shot ppl" for t in targets),
        *(f"{t:.0%} after {plan['finetune']} steps" for t in targets),
        "one-shot s",
    ]
    body = [["dense", *(f"{dense_ppl:.2f}" for _ in targets), *([""] * (1 + len(targets)))]]
    sizes = []
    for method in STRUCTURED:
        cells = [
            structured_cell(plan, folder, method, t, method in STRUCTURED_FINETUNE and t == targets[0]) for t in targets
        ]
        for c in cells:
            print(
                f"structured {method} {c['target']}: {c['perplexity_oneshot']:.2f} -> {c.get('perplexity')}", flush=True
            )
            sizes.append((c["target"], c["params_before"], c["params_after"], c["heads_removed"], c["neurons_removed"]))
        after = [f"{c['perplexity']:.2f}" if "perplexity" in c else "-" for c in cells]
        oneshot = [f"{c['perplexity_oneshot']:.2f}" for c in cells]
        body.append([method, *oneshot, *after, f"{statistics.mean(c['seconds_oneshot'] for c in cells):.1f}"])
    shape_text = "; ".join(
        f"{t:.0%}: {h} heads and {n} MLP neurons removed, {b / 1e6:.2f}M -> {a / 1e6:.2f}M parameters"
        for t, b, a, h, n in sorted(set(sizes))
    )
    return (
        "### Structured: attention heads and MLP neurons (pattern='channels', scope='layer': the same fraction of "
        "every block's heads and neurons; test perplexity)\n\n"
        f"{common.md_table(header, body)}\n\n"
        f"Shrunk with `lightning_prune.shrink` (outputs equal to the masked model's): {shape_text}. The CPU "
        "speed-up of these shapes is in the structured section (`benchmarks/structured.py`)."
    )


def nm_section(plan: dict[str, Any], folder: Path, dense_ppl: float) -> str:
    """One-shot 2:4 and 4:8 perplexity (ours and llm-compressor's), then a short fine-tune of ours."""
    body = [["dense", f"{dense_ppl:.2f}", ""]]
    for method in [*NM_OURS, *NM_PEERS]:
        r = run_cell(folder, method, 0.5, 0)
        if r is None:
            body.append([method, "not run", ""])
            continue
        print(f"{method}: ppl {r['perplexity']:.2f}, {r['seconds_oneshot']:.1f} s", flush=True)
        body.append([method, f"{r['perplexity']:.2f}", f"{r['seconds_oneshot']:.1f}"])
    ft = []
    for method in FINETUNE_NM:
        r = finetune_cell(plan, folder, method)
        print(f"finetune {method}: {r['perplexity_oneshot']:.2f} -> {r['perplexity']:.2f}", flush=True)
        holds = "yes" if r["pattern_holds"] else "**no**"
        ft.append([method, f"{r['perplexity_oneshot']:.2f}", f"{r['perplexity']:.2f}", holds])
    return (
        "### One-shot N:M (N of every M consecutive input weights zero; 50% of every decoder Linear; test "
        "perplexity; seconds of the prune()/oneshot() call, one run each)\n\n"
        f"{common.md_table(['method', 'one-shot ppl', 'seconds'], body)}\n\n"
        f"### 2:4, then fine-tuning {plan['finetune']} steps with the masks frozen (test perplexity)\n\n"
        + common.md_table(["method (2:4)", "one-shot ppl", "after fine-tuning", "2:4 holds"], ft)
    )


def median_range(values: list[float], digits: int = 2) -> str:
    """One value, or the median (min-max) of the repeats."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def oneshot_section(plan: dict[str, Any], folder: Path, dense_ppl: float, params: int) -> str:
    """One-shot unstructured against llm-compressor (the ``PAIRS`` timed ``reps`` times, alternated),
    the targets against SparseGPT, and the gradual table."""
    sparsities = plan["sparsities"]
    results: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for s in sparsities:
        paired = [m for pair in PAIRS for m in pair]
        runs = [*common.alternation(paired, plan["reps"], swap=True)]
        runs += [(0, m) for m in [*OURS, *PEERS] if m not in paired]
        for rep, method in runs:
            r = run_cell(folder, method, s, rep)
            if r is not None:
                results.setdefault((method, s), []).append(r)
                print(f"{method} {s}: ppl {r['perplexity']:.2f}, {r['seconds_oneshot']:.1f} s", flush=True)

    header = ["method", *(f"{s:.0%} ppl" for s in sparsities), *(f"{s:.0%} s" for s in sparsities), "peak extra MiB"]
    body = [["dense", *(f"{dense_ppl:.2f}" for _ in sparsities), *([""] * (1 + len(sparsities)))]]
    for method in [*OURS, *PEERS]:
        cells = [results.get((method, s), []) for s in sparsities]
        if not any(cells):
            body.append([method, "not run", *([""] * (2 * len(sparsities)))])
            continue
        ppl = [median_range([c[0]["perplexity"]]) if c else "-" for c in cells]
        secs = [median_range([r["seconds_oneshot"] for r in c], 1) if c else "-" for c in cells]
        mem = max((r["peak_rss_oneshot_mib"] - r["rss_before_mib"] for c in cells for r in c), default=float("nan"))
        body.append([method, *ppl, *secs, f"{mem:.0f}"])
    seq = [r for (m, s), rs in results.items() if m.startswith("OBS sequential fast") for r in rs]
    block_mib = max((r["info"].get("block_input_bytes", 0) for r in seq), default=0) / 2**20
    hess_mib = max((r["info"].get("peak_hessian_bytes", 0) for r in seq), default=0) / 2**20

    targets = []
    for s in sparsities:
        ours, theirs = results.get(("OBS sequential fast (layer)", s)), results.get(("llm-compressor SparseGPT", s))
        exact = results.get(("OBS sequential exact (layer)", s))
        if ours and theirs:
            best = min(ours[0]["perplexity"], exact[0]["perplexity"] if exact else float("inf"))
            ok = best <= theirs[0]["perplexity"] * 1.001
            targets.append(
                [
                    f"OBS perplexity <= SparseGPT's at {s:.0%}",
                    "yes" if ok else "**no**",
                    f"{best:.2f} vs {theirs[0]['perplexity']:.2f}",
                ]
            )
            t_ours = statistics.median(r["seconds_oneshot"] for r in ours)
            t_theirs = statistics.median(r["seconds_oneshot"] for r in theirs)
            targets.append(
                [
                    f"one-shot wall time <= SparseGPT's at {s:.0%} (median of {len(ours)})",
                    "yes" if t_ours <= t_theirs else "**no**",
                    f"{t_ours:.1f} s vs {t_theirs:.1f} s ({t_ours / t_theirs:.2f}x)",
                ]
            )

    grad = []
    for method in GRADUAL:
        rs = [gradual_cell(plan, folder, method, t) for t in plan["gradual"]]
        print(f"gradual {method}: {[round(r['perplexity'], 2) for r in rs]}", flush=True)
        grad.append(
            [method, *(f"{r['perplexity']:.2f}" for r in rs), f"{statistics.mean(r['round_seconds'] for r in rs):.1f}"]
        )

    cells = [r for rs in results.values() for r in rs] + [
        json.loads(p.read_text()) for p in (folder / "cells").glob("gradual-*.json")
    ]
    commits = sorted({r.get("commit", FIRST_RUN) for r in cells})
    train_s = json.loads((folder / "dense.json").read_text())["train_seconds"]
    return (
        f"Cells computed at commits {', '.join(commits)} (each cell's commit is in its JSON).\n\n"
        f"Dense: {params / 1e6:.1f}M parameters ({plan['model']['num_layers']} blocks), {plan['steps']} steps "
        f"({train_s / 60:.0f} min), test perplexity {dense_ppl:.2f}. Calibration: {plan['calib']} windows of "
        f"{plan['data']['seq_len']} tokens (ours in batches of 8, llm-compressor one per sample).\n\n"
        "### One-shot, unstructured (perplexity on the test split; seconds of the prune()/oneshot() call, median "
        "(min-max) of the alternating repeats; peak extra MiB: resident memory above the loaded model during it)\n\n"
        f"{common.md_table(header, body)}\n\n"
        f"Sequential OBS holds one block's inputs ({block_mib:.1f} MiB: {plan['calib']} windows x "
        f"{plan['data']['seq_len']} tokens x hidden {plan['model']['hidden_size']}, float32) and one layer's "
        f"Hessian at a time ({hess_mib:.1f} MiB, float64).\n\n"
        f"{common.md_table(['target', 'met', 'measured'], targets)}\n\n"
        f"### Gradual, step-based (fine-tuning the dense model {plan['finetune']} steps; rounds every "
        f"{max(plan['finetune'] // 10, 1)} steps over the first 60%; test perplexity)\n\n"
        + common.md_table(["method", *(f"{t:.0%}" for t in plan["gradual"]), "round s"], grad)
    )


# block name -> (title, section); the dense model's section comes first in RESULTS.md
SECTIONS = {
    "lm": ("Language model: one-shot and gradual, against llm-compressor", oneshot_section),
    "lm-nm": ("Language model: N:M (2:4, 4:8) against llm-compressor", nm_section),
    "lm-structured": ("Language model: structured pruning (heads and neurons)", structured_section),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--nm", action="store_true", help="only the N:M section (its own block in RESULTS.md)")
    p.add_argument("--structured", action="store_true", help="only the structured section (its own block)")
    p.add_argument("--cell", nargs=4, metavar=("FOLDER", "METHOD", "SPARSITY", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.cell:
        folder, method, sparsity, out = a.cell
        ours_cell(Path(folder), method, float(sparsity), Path(out))
        return
    name = "quick" if a.quick else "full"
    plan, start = PLANS[name], time.time()
    folder = dense(plan, name)
    from transformers import LlamaForCausalLM

    dense_model = LlamaForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32).eval()
    dense_ppl = perplexity(dense_model, torch.load(folder / "eval.pt"))
    params = sum(p.numel() for p in dense_model.parameters())
    print(f"dense: {params / 1e6:.1f}M parameters, test perplexity {dense_ppl:.2f}", flush=True)
    block = "lm-nm" if a.nm else "lm-structured" if a.structured else "lm"
    title, section = SECTIONS[block]
    text = section(plan, folder, dense_ppl, params) if block == "lm" else section(plan, folder, dense_ppl)
    print(text)
    if a.quick:  # a smoke run is not published
        return
    flag = {"lm-nm": " --nm", "lm-structured": " --structured"}.get(block, "")
    where = (
        " (cells cached in `benchmarks/.cache/lm`)"
        if block == "lm"
        else f"; the dense model of the section above (test perplexity {dense_ppl:.2f}), the same "
        f"{plan['calib']} calibration windows"
    )
    common.write_block(
        block,
        f"## {title}\n\n`python benchmarks/lm.py{flag}` at `{common.commit()}`, {(time.time() - start) / 60:.0f} "
        f"minutes on {common.machine()}{where}.\n\n{text}",
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
