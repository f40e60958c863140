"""Smaller LLaMAs saved as Hugging Face checkpoints: parameters and CPU forward latency, dense vs small.

    python benchmarks/shrink_hf.py             # writes the "shrink-hf" block of RESULTS.md
    python benchmarks/shrink_hf.py --reps 3    # fewer timing repetitions
    python benchmarks/shrink_hf.py --quality   # perplexity on a briefly trained model: "shrink-hf-quality"
    python benchmarks/shrink_hf.py --generate  # a 111M LLaMA: prefill, decoding tok/s, memory: "shrink-hf-generate"

The model has the shape of ``benchmarks/lm.py``'s (LLaMA, 8 blocks, hidden 192, 4 heads, MLP 512,
vocabulary 4096) with **random weights**: the trained model is not cached here and takes longer to
train than this measurement, so no perplexity is reported (sizes and speed do not depend on the
weights). Each small model is pruned, shrunk, written with ``save_pretrained`` and read back with
``AutoModelForCausalLM.from_pretrained``; the loaded model is the one timed, and its logits are
checked against the pruned model's (width: the masked model; depth: the dense model with the removed
blocks replaced by the identity).

* width 25% / 50%: ``pattern="channels"``, the default scope on Hugging Face models (the same
  number of heads and MLP neurons removed in every block), magnitude ranking (the sizes are what
  is timed; which structures go does not change the speed);
* depth 25%: ``prune_blocks`` removes 2 of the 8 blocks (Block Influence).

Forward latency: ``model(input_ids)`` without gradients, 128 tokens, batch 1 and 16; dense and small
alternated in every repetition (``common.alternated``). On a shared machine a repetition's time is
mostly the other processes': the table gives the fastest repetition of each (the least disturbed)
and the speed-up as the median of the per-repetition ratios (dense and small timed back to back).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_prune import MagnitudePruning, prune, prune_blocks, shrink
from lightning_prune.surgery.depth import as_identity

SHAPE = {"hidden_size": 192, "num_hidden_layers": 8, "num_attention_heads": 4, "intermediate_size": 512}
VOCAB, SEQ = 4096, 128


def dense_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=SEQ, num_key_value_heads=4, **SHAPE)
    return LlamaForCausalLM(config).eval()


def calibration() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (x := torch.randint(0, VOCAB, (8, SEQ), generator=g)), "labels": x} for _ in range(4)]


def small_model(kind: str, fraction: float, folder: Path) -> tuple[Any, dict[str, Any]]:
    """Pruned, shrunk, saved and loaded back; the loaded model and what it records."""
    model, data = dense_model(), calibration()
    ids = data[0]["input_ids"][:2]
    if kind == "width":
        prune(model, data, MagnitudePruning(target=fraction, pattern="channels", num_batches=len(data), verbose=0))
        small = shrink(model, example_inputs={"input_ids": ids})
    else:
        small = prune_blocks(model, data, fraction, score="influence", example_inputs={"input_ids": ids})
    small.save_pretrained(folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    kept = small.blocks_kept.get("model.layers", range(len(model.model.layers)))
    with torch.no_grad(), as_identity([b for i, b in enumerate(model.model.layers) if i not in kept]):
        diff = float((loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max())
    return loaded, {"config": dict(next(iter(small.hf_configs.values()))), "max_abs_diff": diff}


def latency(model: Any, batch: int) -> float:
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=ids)
    return time.perf_counter() - start


# --quality: a small LLaMA of lm.py's family, trained briefly here (lm.py's 46-minute model is not cached)
QUALITY_PLAN: dict[str, Any] = {
    "model": {"hidden_size": 96, "num_layers": 8, "num_heads": 4, "intermediate_size": 256},
    "data": {"vocab_size": 1024, "seq_len": 64, "batch_size": 16, "max_files": 200},
    "steps": 400,
    "calib": 64,
}
WIDTH = {  # name -> (callback, keyword arguments); the default scope: the same count in every block
    "magnitude (L1)": ("MagnitudePruning", {}),
    "activations (Wanda-sp)": ("Wanda", {"scope": "layer"}),
    "OBS (structured, default)": ("OBSPruning", {}),
}
DEPTH = {  # name -> prune_blocks keyword arguments
    "ShortGPT Block Influence": {"score": "influence"},
    "output reconstruction": {"score": "reconstruction"},
    "loss (identity replacement)": {"score": "loss"},
    "loss, greedy": {"score": "loss", "greedy": True},
}


def quality() -> None:
    """Perplexity and parameters of width 25/50% and depth 25% (one-shot) on a briefly trained model."""
    import lm

    import lightning_prune

    started = time.perf_counter()
    folder = lm.dense(QUALITY_PLAN, "shrink-hf")
    batches, evals = lm.calibration_batches(folder), torch.load(folder / "eval.pt")
    trained = json.loads((folder / "dense.json").read_text())

    def load() -> Any:
        return LlamaForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32).eval()

    def params(model: Any) -> str:
        return f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f}M"

    dense = load()
    rows = [["dense", "-", params(dense), f"{lm.perplexity(dense, evals):.2f}", ""]]
    ids = {"input_ids": evals[:2]}
    for fraction in (0.25, 0.5):
        for name, (cls, kw) in WIDTH.items():
            model = load()
            start = time.perf_counter()
            pruner = getattr(lightning_prune, cls)(fraction, pattern="channels", num_batches=len(batches),
                                                   verbose=0, **kw)  # fmt: skip
            prune(model, batches, pruner)
            small = shrink(model, example_inputs=ids)
            seconds = time.perf_counter() - start
            ppl = lm.perplexity(_round_trip(small), evals)
            rows.append([f"width {fraction:.0%}", name, params(small.model), f"{ppl:.2f}", f"{seconds:.1f}"])
            print(rows[-1], flush=True)
    for name, kw in {"OBS width 25%, then blocks by loss": {"score": "loss"}}.items():  # about width 50%'s size
        model = load()
        start = time.perf_counter()
        prune(model, batches, lightning_prune.OBSPruning(target=0.25, pattern="channels", num_batches=len(batches),
                                                         verbose=0))  # fmt: skip
        width = shrink(model, example_inputs=ids)
        small = prune_blocks(width.model, batches, 0.25, example_inputs=ids, **kw)
        seconds = time.perf_counter() - start
        ppl = lm.perplexity(_round_trip(small), evals)
        rows.append(["width 25% + depth 25%", name, params(small.model), f"{ppl:.2f}", f"{seconds:.1f}"])
        print(rows[-1], flush=True)
    for name, kw in DEPTH.items():
        model = load()
        start = time.perf_counter()
        small = prune_blocks(model, batches, 0.25, example_inputs=ids, **kw)
        seconds = time.perf_counter() - start
        ppl = lm.perplexity(_round_trip(small), evals)
        (kept,) = small.blocks_kept.values()
        removed = sorted(set(range(QUALITY_PLAN["model"]["num_layers"])) - set(kept))
        rows.append([f"depth 25% (blocks {removed})", name, params(small.model), f"{ppl:.2f}", f"{seconds:.1f}"])
        print(rows[-1], flush=True)
    body = "\n".join(
        [
            "## Smaller LLaMAs: perplexity of width and depth pruning, one-shot",
            "",
            f"`python benchmarks/shrink_hf.py --quality` at `{common.commit()}`, {time.perf_counter() - started:.0f} s "
            f"on {common.machine()}. A small LLaMA of `benchmarks/lm.py`'s family ({QUALITY_PLAN['model']}, "
            f"vocabulary {QUALITY_PLAN['data']['vocab_size']}, windows of {QUALITY_PLAN['data']['seq_len']}) trained "
            f"here for {trained['steps']} steps ({trained['train_seconds'] / 60:.0f} min): lm.py's 46-minute model "
            "is not cached on this machine, so these are a briefly trained model's numbers, one seed, no "
            f"fine-tuning. Calibration: {QUALITY_PLAN['calib']} training windows; perplexity on the test split, "
            "measured on the model loaded back with `AutoModelForCausalLM.from_pretrained` after `save_pretrained`. "
            "Width: `pattern='channels'`, the default scope (the same number of heads and neurons in every block); "
            "activations (Wanda-sp): `Wanda(pattern='channels', scope='layer')`, `|w| ||x||` summed over each "
            "structure; depth: `prune_blocks(model, batches, 0.25, ...)` (2 of 8 blocks); width + depth: OBS width "
            "25%, shrunk, then 2 of its 8 blocks by loss (about width 50%'s parameters).",
            "",
            common.md_table(["shrunk", "method", "parameters", "test ppl", "prune + shrink s"], rows),
        ]
    )
    common.write_block("shrink-hf-quality", body)
    print(body)


def _round_trip(small: Any) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        small.save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(tmp).eval()


GEN_SHAPE = {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "intermediate_size": 2816}
GEN_PREFILL, GEN_PROMPT, GEN_NEW = 512, 64, 32


def generate_speed(reps: int, threads: int) -> None:
    """What users deploy: ``generate`` on a 111M-parameter LLaMA (random weights), dense against each smaller
    checkpoint loaded back with ``from_pretrained``: prefill latency (batch 1, 512 tokens), decoding
    tokens per second (batch 1, greedy, KV cache, 32 new tokens after 64), forward throughput (batch 16 x
    128 tokens), the weights' MiB and the peak resident memory of a prefill above the loaded model."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        num_key_value_heads=GEN_SHAPE["num_attention_heads"],
        **GEN_SHAPE,
    )
    dense = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": (x := torch.randint(0, VOCAB, (4, SEQ), generator=g)), "labels": x} for _ in range(2)]
    prefill = torch.randint(0, VOCAB, (1, GEN_PREFILL), generator=g)
    prompt = prefill[:, :GEN_PROMPT]
    batch16 = torch.randint(0, VOCAB, (16, SEQ), generator=g)

    def measures(model: Any) -> dict[str, Any]:
        def run_prefill() -> float:
            with torch.no_grad():
                start = time.perf_counter()
                model(input_ids=prefill)
            return time.perf_counter() - start

        def run_decode() -> float:
            kw = dict(max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW, do_sample=False, use_cache=True, pad_token_id=0)
            start = time.perf_counter()
            model.generate(prompt, **kw)
            return GEN_NEW / (time.perf_counter() - start)

        def run_b16() -> float:
            with torch.no_grad():
                start = time.perf_counter()
                model(input_ids=batch16)
            return 16 * SEQ / (time.perf_counter() - start)

        return {"prefill": run_prefill, "decode": run_decode, "b16": run_b16}

    def build(kind: str) -> Any:
        """``kind``: "MLP 25%" (neurons only: 16 heads less 25% is 12, which LlamaConfig refuses for a hidden
        size of 1024), "width 50%" (heads and neurons), "depth 25%", or two of them joined by " + "."""
        model, small = copy.deepcopy(dense), None
        ids = data[0]["input_ids"][:1]
        for part in kind.split(" + "):
            fraction = float(part.split()[1].rstrip("%")) / 100
            if part.startswith(("MLP", "width")):
                include = ["*mlp*"] if part.startswith("MLP") else None
                prune(model, data, MagnitudePruning(fraction, pattern="channels", include=include, verbose=0))
                small = shrink(model, example_inputs={"input_ids": ids})
            else:
                small = prune_blocks(model, data, fraction, score="influence", example_inputs={"input_ids": ids})
            model = small.model
        assert small is not None
        folder = saved / kind.replace(" ", "_").replace("%", "").replace("+", "and")
        small.save_pretrained(folder)  # refuses what a standard config cannot describe
        return AutoModelForCausalLM.from_pretrained(folder).eval(), folder

    def peak_mib(folder: Path) -> float:
        """Peak resident MiB of a fresh process that loads ``folder`` and runs the prefill (all alike: the
        interpreter and libraries are in every figure)."""
        cmd = [sys.executable, __file__, "--peak", str(folder)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        return float(proc.stdout.strip().splitlines()[-1])

    def mib(model: Any) -> float:
        return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    rows = []
    kinds = ["MLP 25%", "width 50%", "depth 25%", "MLP 25% + depth 25%"]
    dense_row = None
    saved = Path(tempfile.mkdtemp(prefix="shrink-hf-"))
    dense.save_pretrained(saved / "dense")
    for kind in kinds:
        small, folder = build(kind)
        for m in (dense, small):  # warm-up
            for f in measures(m).values():
                f()
        got = {k: {"dense": [], "small": []} for k in ("prefill", "decode", "b16")}
        for _, who in common.alternation(["dense", "small"], reps, swap=True):
            for key, f in measures(dense if who == "dense" else small).items():
                got[key][who].append(f())
        pairs = {k: list(zip(v["dense"], v["small"])) for k, v in got.items()}
        prefill_ratio = statistics.median(d / s for d, s in pairs["prefill"])
        decode_ratio = statistics.median(s / d for d, s in pairs["decode"])
        b16_ratio = statistics.median(s / d for d, s in pairs["b16"])
        if dense_row is None:
            dense_row = ["dense", f"{sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M", f"{mib(dense):.0f}",
                         f"{peak_mib(saved / 'dense'):.0f}", f"{1000 * min(got['prefill']['dense']):.0f}", "",
                         f"{max(got['decode']['dense']):.1f}", "", f"{max(got['b16']['dense']):.0f}", ""]  # fmt: skip
            rows.append(dense_row)
        rows.append(
            [kind, f"{sum(p.numel() for p in small.parameters()) / 1e6:.1f}M", f"{mib(small):.0f}",
             f"{peak_mib(folder):.0f}", f"{1000 * min(got['prefill']['small']):.0f}", f"{prefill_ratio:.2f}x",
             f"{max(got['decode']['small']):.1f}", f"{decode_ratio:.2f}x", f"{max(got['b16']['small']):.0f}",
             f"{b16_ratio:.2f}x"]
        )  # fmt: skip
        print(rows[-1], flush=True)
        del small
    shutil.rmtree(saved)
    header = ["model", "parameters", "weights MiB", "process peak MiB", "prefill 512 ms", "prefill speed-up",
              "decode tok/s", "decode speed-up", "b16 tok/s", "b16 speed-up"]  # fmt: skip
    body = "\n".join(
        [
            "## Smaller LLaMAs: generate() speed and memory on the CPU",
            "",
            f"`python benchmarks/shrink_hf.py --generate --reps {reps} --threads {threads}` at `{common.commit()}`, "
            f"{time.perf_counter() - started:.0f} s on {common.machine()} (load average {os.getloadavg()[0]:.1f} "
            f"at the end). A random-init LLaMA ({GEN_SHAPE}, vocabulary {VOCAB}, float32); each smaller model is "
            "pruned by magnitude (the sizes are what is timed; MLP 25%: a quarter of the MLP neurons, heads kept, as "
            "16 heads less a quarter is 12, which LlamaConfig refuses for a hidden size of 1024), shrunk, saved "
            "with `save_pretrained` and the one "
            "loaded back with `AutoModelForCausalLM.from_pretrained` is timed. Prefill: one forward of 512 tokens, "
            f"batch 1; decode: `generate` of {GEN_NEW} new tokens after {GEN_PROMPT} (greedy, KV cache, batch 1, "
            f"prompt included in the time); b16: a forward of 16 x {SEQ} tokens. {reps} repetitions alternated "
            "with the dense model: the best repetition, and the speed-up as the median of the per-repetition "
            "ratios. Process peak MiB: the peak resident memory of a fresh process that loads the checkpoint with "
            "`from_pretrained` and runs the prefill (interpreter and libraries included, alike in every row).",
            "",
            common.md_table(header, rows),
        ]
    )
    common.write_block("shrink-hf-generate", body)
    print(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--quality", action="store_true", help="perplexity on a briefly trained model instead")
    parser.add_argument("--generate", action="store_true", help="generate() speed and memory on a 111M model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak", type=Path, help=argparse.SUPPRESS)  # worker: load, prefill, print VmHWM
    args = parser.parse_args()
    if args.peak:
        model = AutoModelForCausalLM.from_pretrained(args.peak).eval()
        with torch.no_grad():
            model(input_ids=torch.randint(0, VOCAB, (1, GEN_PREFILL)))
        print(common.rss_mib("VmHWM"))
        return
    if args.quality:
        quality()
        return
    if args.generate:
        generate_speed(args.reps, args.threads)
        return
    started = time.perf_counter()
    dense = dense_model()
    n_dense = sum(p.numel() for p in dense.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, fraction in (("width", 0.25), ("width", 0.5), ("depth", 0.25)):
            small, record = small_model(kind, fraction, Path(tmp) / f"{kind}-{fraction}")
            n_small = sum(p.numel() for p in small.parameters())
            cells = []
            for batch in (1, 16):
                for m in (dense, small):  # warm-up
                    latency(m, batch)
                times = common.alternated(
                    {"dense": lambda b=batch: latency(dense, b), "small": lambda b=batch, s=small: latency(s, b)},
                    args.reps,
                    swap=True,
                )
                d, s = min(times["dense"]), min(times["small"])
                ratio = statistics.median(a / b for a, b in zip(times["dense"], times["small"]))
                cells += [f"{1000 * d:.1f}", f"{1000 * s:.1f}", f"{ratio:.2f}x"]
            config = ", ".join(f"{k}={v}" for k, v in record["config"].items())
            rows.append(
                [f"{kind} {fraction:.0%}", config, f"{n_dense / 1e6:.2f}M -> {n_small / 1e6:.2f}M", *cells,
                 f"{record['max_abs_diff']:.1e}"]
            )  # fmt: skip
            print(rows[-1], flush=True)
    header = [
        "shrunk", "config written", "parameters", "b1 dense ms", "b1 small ms", "b1 speed-up", "b16 dense ms",
        "b16 small ms", "b16 speed-up", "max abs logit diff (loaded vs pruned)",
    ]  # fmt: skip
    body = "\n".join(
        [
            "## Smaller LLaMAs as Hugging Face checkpoints: parameters and CPU forward latency",
            "",
            f"`python benchmarks/shrink_hf.py --reps {args.reps}` at `{common.commit()}`, "
            f"{time.perf_counter() - started:.0f} s on {common.machine()}. LLaMA of `benchmarks/lm.py`'s shape "
            f"({SHAPE}, vocabulary {VOCAB}) with **random weights** (no perplexity: the trained model is not cached "
            "here). Every small model went through `save_pretrained` and `AutoModelForCausalLM.from_pretrained`, "
            f"and the loaded one is timed: `model(input_ids)`, {SEQ} tokens, no gradients, {args.reps} repetitions "
            "alternated with the dense model: ms = the fastest repetition, speed-up = the median of the "
            "per-repetition ratios. Width: `pattern='channels'` with the default (uniform) "
            "scope; depth: `prune_blocks(..., 0.25, score='influence')`. The machine is shared (load average "
            f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs): the dense model's times differ "
            "between rows by as much as the speed-ups, so these are indications, not measurements; rerun on a "
            "quiet machine.",
            "",
            common.md_table(header, rows),
        ]
    )
    common.write_block("shrink-hf", body)
    print(body)


if __name__ == "__main__":
    main()
