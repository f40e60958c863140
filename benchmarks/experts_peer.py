"""llm-compressor's REAP (``REAPPruningModifier``) as a peer of ``prune_experts``: one measurement.

Run with the llm-compressor venv's python (``benchmarks/experts_lm.py`` does)::

    benchmarks/.cache/llmc-venv/bin/python benchmarks/experts_peer.py --model DIR --calib CALIB.pt \
        --eval EVAL.pt --sparsity 0.25 --out RESULT.json

``DIR`` is a ``save_pretrained`` MoE causal LM (float32); ``CALIB.pt`` / ``EVAL.pt`` are ``torch.save``d
LongTensors ``(N, T)`` of token ids. ``oneshot`` gets CALIB as lm_peer.py passes it (``batch_size=1``, not
shuffled, a stand-in tokenizer it never uses) and the recipe ``REAPPruningModifier(sparsity=..., report_path=...)``:
``oneshot`` linearizes the fused experts (``LinearExperts2D``), scores each MoE block in its sequential pipeline
(the block's inputs come from the already pruned blocks before it), drops ``int(num_experts * sparsity)`` experts
per block and sets the config's expert count. Written to ``--out``: the perplexity of the pruned model (in this
process, as lm_peer.py measures it), its parameters, the experts per block, the experts kept per block (its
report), the tokens its saliency tracker saw routed to each expert of each block (read by wrapping
``REAPSaliencyTracker.compute_retained_experts``), and the ``oneshot`` wall time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import llmcompressor
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import REAPPruningModifier
from llmcompressor.modifiers.pruning.reap import utils as reap_utils
from lm_peer import perplexity, stand_in_tokenizer
from transformers import AutoModelForCausalLM


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--calib", required=True, type=Path)
    p.add_argument("--eval", required=True, type=Path)
    p.add_argument("--sparsity", required=True, type=float)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)

    routed: list[list[float]] = []  # the tokens REAP saw routed to each expert, block by block, in pruning order
    retained = reap_utils.REAPSaliencyTracker.compute_retained_experts

    def recording(self: Any, *a: Any, **k: Any) -> Any:
        routed.append(self.count.cpu().tolist())
        return retained(self, *a, **k)

    reap_utils.REAPSaliencyTracker.compute_retained_experts = recording

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    calib = torch.load(args.calib).long()
    n, t = calib.shape
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "retained.json"
        recipe = REAPPruningModifier(sparsity=args.sparsity, report_path=str(report))
        start = time.perf_counter()
        model = oneshot(
            model=model,
            recipe=recipe,
            dataset=dataset,
            processor=stand_in_tokenizer(),
            num_calibration_samples=n,
            max_seq_length=t,
            batch_size=1,
            shuffle_calibration_samples=False,
        )
        seconds = time.perf_counter() - start
        kept = json.loads(report.read_text())
    config = model.config
    result = {
        "sparsity": args.sparsity,
        "perplexity": perplexity(model, torch.load(args.eval).long()),
        "params": sum(p.numel() for p in model.parameters()),
        "experts": getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None),
        "kept": kept,
        "routed_tokens": routed,
        "seconds_oneshot": seconds,
        "calib_rows": n,
        "llmcompressor_version": llmcompressor.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
