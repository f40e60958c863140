"""Whole MoE experts removed from a small trained Mixtral: our scores against llm-compressor's REAP.

    OMP_NUM_THREADS=1 python benchmarks/experts_lm.py           # writes the "experts" block of RESULTS.md
    OMP_NUM_THREADS=1 python benchmarks/experts_lm.py --quick   # 60 training steps: a smoke run, not published

The model: ``transformers.MixtralForCausalLM``, 4 blocks, hidden 128, 4 heads, 8 experts of 256 per block
(top-2), vocabulary 4096, untied ``lm_head``, random init, trained from scratch for ``steps`` steps
(AdamW 3e-3, 50 warm-up steps, cosine to a tenth, batches of 16 windows, the load-balancing loss at 0.01) on
``benchmarks/lm.py``'s corpus (Python's standard library, ``TextDataModule``: byte-level BPE, 4096 tokens,
windows of 128), one thread. Cached under ``benchmarks/.cache/experts``. Perplexity on the whole test split.

Each cell removes 25% or 50% of the experts of every block (2 or 4 of 8) with ``prune_experts`` and one
score, calibrated on 128 training windows (16 batches of 8, the same for every cell, lm.py's choice), then
writes the small model with ``save_pretrained``, reads it back with ``AutoModelForCausalLM.from_pretrained``
and measures the loaded model (its logits are checked against the pruned model's). ``seconds``: scoring and
removal (one thread). llm-compressor 0.14's ``REAPPruningModifier(sparsity)`` runs through ``oneshot`` on the
same saved dense model and the same calibration windows (``benchmarks/experts_peer.py``, in its venv
``benchmarks/.cache/llmc-venv``, as ``lm_peer.py`` says how to build it); its perplexity is measured there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch

CACHE = common.CACHE / "experts"
PEER_VENV = common.CACHE / "llmc-venv"
SCORES = ("reconstruction", "loss", "reap", "frequency")
PLANS: dict[str, dict[str, Any]] = {
    "full": {
        "model": {
            "hidden_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "intermediate_size": 256,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        },
        "data": {"vocab_size": 4096, "seq_len": 128, "batch_size": 16},
        "steps": 800,
        "calib": 128,
        "fractions": [0.25, 0.5],
    },
    "quick": {
        "model": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
        },
        "data": {"vocab_size": 1024, "seq_len": 64, "batch_size": 8, "max_files": 60},
        "steps": 60,
        "calib": 16,
        "fractions": [0.5],
    },
}


def datamodule(plan: dict[str, Any]):
    from lightning_prune.app.data import TextDataModule

    return TextDataModule(**plan["data"], cache_dir=str(common.CACHE / "lm" / "text"))


def dense(plan: dict[str, Any], name: str) -> Path:
    """Train (or reuse) the dense Mixtral; save it (Hugging Face folder), calibration and eval ids."""
    from transformers import MixtralConfig, MixtralForCausalLM

    folder = CACHE / f"dense-{name}-{common.fingerprint([plan['model'], plan['data'], plan['steps']])}"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    dm = datamodule(plan)
    dm.setup()
    train = dm.split("train")
    config = MixtralConfig(
        vocab_size=plan["data"]["vocab_size"], max_position_embeddings=plan["data"]["seq_len"],
        tie_word_embeddings=False, router_aux_loss_coef=0.01, **plan["model"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    steps, batch = plan["steps"], plan["data"]["batch_size"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    warmup = min(50, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup if s < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
        ),
    )
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=g)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        rows = order[(step * batch) % len(train) :][:batch]
        x = train[rows]
        loss = model(input_ids=x, labels=x, output_router_logits=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {float(loss):.3f}", flush=True)
    seconds = time.perf_counter() - start
    model.eval().save_pretrained(folder / "hf")
    torch.save(train[torch.randperm(len(train), generator=g)[: plan["calib"]]].clone(), folder / "calib.pt")
    torch.save(dm.split("test").clone(), folder / "eval.pt")
    (folder / "dense.json").write_text(json.dumps({"train_seconds": seconds, "steps": steps}))
    (folder / "done").write_text("")
    return folder


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, batch: int = 8) -> float:
    """exp of the mean next-token cross-entropy, every predicted token weighted equally (as lm_peer.py)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(ids), batch):
        x = ids[i : i + batch]
        tokens = x.shape[0] * (x.shape[1] - 1)
        total += float(model(input_ids=x, labels=x).loss) * tokens
        count += tokens
    return math.exp(total / count)


def calibration(folder: Path, rows: int = 8) -> list[dict[str, torch.Tensor]]:
    calib = torch.load(folder / "calib.pt")
    return [{"input_ids": calib[i : i + rows], "labels": calib[i : i + rows]} for i in range(0, len(calib), rows)]


def load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def ours(folder: Path, score: str, fraction: float) -> dict[str, Any]:
    from lightning_prune import prune_experts

    model, data = load(folder / "hf"), calibration(folder)
    ids = data[0]["input_ids"][:2]
    start = time.perf_counter()
    small = prune_experts(model, data, fraction, score=score, example_inputs={"input_ids": ids})
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as d:
        small.save_pretrained(d)
        loaded = load(Path(d))
    with torch.no_grad():
        diff = float((loaded(input_ids=ids).logits - small.model(input_ids=ids).logits).abs().max())
    return {
        "perplexity": perplexity(loaded, torch.load(folder / "eval.pt")),
        "params": sum(p.numel() for p in loaded.parameters()),
        "experts": loaded.config.num_local_experts,
        "seconds": seconds,
        "loaded_max_abs_diff": diff,
        "kept": small.experts_kept,
    }


def routing(folder: Path) -> dict[str, Any]:
    """Tokens routed to each expert of each block in forward passes of the dense model on the calibration windows:
    causal as the model is, and with non-causal attention (a 4-D all-True mask: every token sees every other)."""
    model, data = load(folder / "hf"), calibration(folder)
    out: dict[str, Any] = {}
    for key, causal in (("routed_tokens", True), ("noncausal_routed_tokens", False)):
        counts = [torch.zeros(layer.mlp.experts.num_experts, dtype=torch.long) for layer in model.model.layers]

        def count(c: torch.Tensor) -> Any:
            def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:  # returns None: the output stays
                c.add_(torch.bincount(args[1].flatten(), minlength=c.numel()))

            return hook

        hooks = [layer.mlp.experts.register_forward_hook(count(c)) for layer, c in zip(model.model.layers, counts)]
        with torch.no_grad():
            for b in data:
                x = b["input_ids"]
                mask = None if causal else torch.ones(x.shape[0], 1, x.shape[1], x.shape[1], dtype=torch.bool)
                model(input_ids=x, attention_mask=mask)
        for h in hooks:
            h.remove()
        out[key] = [c.tolist() for c in counts]
    return out


def peer(folder: Path, fraction: float) -> dict[str, Any]:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        return {"error": f"no llm-compressor venv at {PEER_VENV} (see lm_peer.py's docstring to build it)"}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        files = ["--model", folder / "hf", "--calib", folder / "calib.pt", "--eval", folder / "eval.pt"]
        cmd = [str(a) for a in [python, common.ROOT / "experts_peer.py", *files, "--sparsity", fraction, "--out", out]]
        env = {**os.environ, "PYTHONPATH": ""}
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if run.returncode != 0 or not out.exists():
            tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
            return {"error": f"experts_peer.py exited {run.returncode}: {' / '.join(tail)}"}
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    name = "quick" if args.quick else "full"
    plan = PLANS[name]
    folder = dense(plan, name)
    cells = CACHE / f"cells-{folder.name}"
    base = common.cell(
        "dense", lambda: {"perplexity": perplexity(load(folder / "hf"), torch.load(folder / "eval.pt"))}, cells
    )
    model = load(folder / "hf")
    params = sum(p.numel() for p in model.parameters())
    total = model.config.num_local_experts
    rows = [["dense", f"{total}", f"{params / 1e6:.2f}M", f"{base['perplexity']:.2f}", "", ""]]
    kept: dict[str, Any] = {}
    routing_counts = common.cell(
        "routing", lambda: routing(folder), cells, reuse=lambda r: "noncausal_routed_tokens" in r
    )
    routed, noncausal = routing_counts["routed_tokens"][0], routing_counts["noncausal_routed_tokens"][0]
    peer_notes = []
    for fraction in plan["fractions"]:
        for score in SCORES:
            r = common.cell(f"ours-{score}-{fraction}", lambda s=score, f=fraction: ours(folder, s, f), cells)
            kept[(score, fraction)] = r["kept"]
            rows.append([
                f"prune_experts score={score!r}", f"{r['experts']}", f"{r['params'] / 1e6:.2f}M",
                f"{r['perplexity']:.2f}", f"{r['seconds']:.1f}", f"{r['loaded_max_abs_diff']:.1e}",
            ])  # fmt: skip
        r = common.cell(
            f"peer-reap-{fraction}", lambda f=fraction: peer(folder, f), cells, reuse=lambda r: "routed_tokens" in r
        )
        if "error" in r:
            rows.append(["llm-compressor REAPPruningModifier", "-", "-", "-", "-", r["error"]])
        else:
            same = r["kept"] == kept[("reap", fraction)]
            theirs = [round(c) for c in r["routed_tokens"][0]]
            if not peer_notes:  # the first block's routing does not depend on the fraction: said once
                peer_notes.append(
                    f"the tokens its REAP saw routed to each expert of the first block, {theirs}, "
                    f"{'equal' if theirs == routed else 'differ from'} those of the dense model's forward pass on the "
                    f"same windows, {routed}, and {'equal' if theirs == noncausal else 'differ from'} those of the "
                    f"dense model with non-causal attention (every token attending to every other), {noncausal}. "
                    "Why, as far as we found: its calibration context switches the model to eager attention, which "
                    "is causal only when given a mask, and Mixtral's blocks received none (transformers 5.17 in its "
                    "venv); the same harness on LLaMA (lm_peer.py's SparseGPT and Wanda) calibrates causally, its "
                    "layer inputs equal to a causal forward to 7e-7, so the LLaMA comparisons are unaffected"
                )
            rows.append([
                "llm-compressor REAPPruningModifier", f"{r['experts']}", f"{r['params'] / 1e6:.2f}M",
                f"{r['perplexity']:.2f}", f"{r['seconds_oneshot']:.1f}",
                f"experts kept {'the same as' if same else 'differ from'} ours with score='reap'",
            ])  # fmt: skip
    info = json.loads((folder / "dense.json").read_text())
    table = common.md_table(
        ["model", "experts per block", "parameters", "test perplexity", "seconds", "notes (loaded vs pruned logits)"],
        rows,
    )
    body = (
        f"### Experts: whole MoE experts removed from a trained Mixtral ({name})\n\n"
        f"`OMP_NUM_THREADS=1 python benchmarks/experts_lm.py{' --quick' if args.quick else ''}` "
        f"(commit {common.commit()}; {common.machine()}). Mixtral, {model.config.num_hidden_layers} blocks, hidden "
        f"{model.config.hidden_size}, {total} experts of {model.config.intermediate_size} (top-"
        f"{model.config.num_experts_per_tok}), {params / 1e6:.2f}M parameters, trained {info['steps']} steps "
        f"({info['train_seconds'] / 60:.1f} min) on the standard-library corpus of lm.py; calibration: "
        f"{plan['calib']} training windows of {plan['data']['seq_len']}; perplexity of the model written with "
        "save_pretrained and read back with AutoModelForCausalLM.from_pretrained, on the test split. The same "
        "number of experts is removed from every block. Scores: `reconstruction` (the MoE block's measured output "
        "error without the expert, routing renormalised), `loss` (the measured calibration loss increase), `reap` "
        "(mean router weight x expert output norm over the tokens routed to it), `frequency` (how often it is "
        "picked); all scored on the dense model, while llm-compressor's REAP scores block by block on the outputs of "
        "the already pruned blocks (its sequential pipeline).\n\n"
        + table
        + ("\n\nllm-compressor: " + "; ".join(peer_notes) + "." if peer_notes else "")
        + "\n\nSeconds: scoring and removal (ours), the `oneshot` call (llm-compressor), one thread each, on 2 cores "
        "shared with another job."
    )
    common.write_block("experts", body)
    print(body)


if __name__ == "__main__":
    main()
