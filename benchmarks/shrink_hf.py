"""Smaller LLaMAs saved as Hugging Face checkpoints: parameters and CPU forward latency, dense vs small.

    python benchmarks/shrink_hf.py             # writes the "shrink-hf" block of RESULTS.md
    python benchmarks/shrink_hf.py --reps 3    # fewer timing repetitions

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
import os
import statistics
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
from lightning_prune.depth import as_identity

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
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
