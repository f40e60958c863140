"""llm-compressor (PyPI ``llmcompressor``) as a peer: one-shot SparseGPT or Wanda on a saved LLaMA, one measurement.

Run with the llm-compressor venv's python, one process per measurement::

    benchmarks/.cache/llmc-venv/bin/python benchmarks/lm_peer.py --model DIR --calib CALIB.pt --eval EVAL.pt \
        --method sparsegpt|wanda --sparsity 0.5 [--mask 0:0|2:4] [--dampening 0.01] [--block-size 128] \
        [--dtype float32|bfloat16|float16] --out RESULT.json

``DIR`` is a ``save_pretrained`` causal LM (untied ``lm_head``), loaded in ``--dtype`` (default float32; ``gpu.py``
passes bfloat16, the dtype its own side prunes in); ``CALIB.pt`` / ``EVAL.pt`` are
``torch.save``d LongTensors ``(N, T)`` of token ids, one sequence per row.

What it does: loads the model, passes CALIB to ``oneshot`` as a ``datasets.Dataset`` with ``input_ids`` and
``attention_mask`` columns (``num_calibration_samples=N``, ``max_seq_length=T``, ``batch_size=1``,
``shuffle_calibration_samples=False``; already tokenized, so the stand-in tokenizer given as ``processor``, which
``oneshot`` insists on when given a dataset, is never used) with the recipe
``SparseGPTModifier(sparsity, mask_structure, dampening_frac, block_size, targets=["Linear"],
ignore=["re:.*lm_head"])`` or ``WandaPruningModifier(sparsity, mask_structure, targets, ignore)``. The pipeline is
``oneshot``'s default ``"independent"``, which picks ``SequentialPipeline`` for either modifier: one
``LlamaDecoderLayer`` at a time (the model's ``_no_split_modules``), all of its Linears calibrated in one pass on
the dense layer's inputs, then the pruned layer's outputs propagated to the next (``propagate_error=True``).
``--dampening`` / ``--block-size`` mean nothing to Wanda. ``torch``'s thread count is left at its default.

Measured, written as JSON to ``--out``: ``seconds_oneshot`` (the ``oneshot`` call alone; ``cpu_seconds_oneshot``: its
process CPU time), ``seconds_total`` (process start, from ``/proc/self/stat``, to after pruning), ``peak_rss_mib``
(the process's ``ru_maxrss`` up to after pruning),
``rss_before_mib`` (``VmRSS`` just before ``oneshot``) and ``peak_rss_oneshot_mib`` (the peak RSS during ``oneshot``
alone: the peak mark is reset through ``/proc/self/clear_refs`` just before it, so ``peak_rss_oneshot_mib -
rss_before_mib`` is pruning's extra memory even when loading peaked higher); ``peak_gpu_mib``
(``torch.cuda.max_memory_allocated`` during ``oneshot``, reset just before it; ``None`` without CUDA: llm-compressor's
sequential pipeline onloads each layer to the GPU where there is one); the perplexity on EVAL (exp of the token-weighted
mean of ``model(input_ids, labels=input_ids).loss``, eval mode, batches of 8 rows); the fraction of exact zeros over the
Linear weights inside the decoder layers and in ``lm_head``; N:M violations; and how many Hessians SparseGPT failed to
invert (llm-compressor only logs a warning and goes on with an identity inverse, i.e. plain magnitude pruning without
the OBS update).

Found when setting it up (llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0+cpu):
with the default ``targets=["Linear"]`` and no ``ignore``, ``lm_head`` IS pruned, silently (its name reaches the
modifier as ``"lm_head."`` so the ``lm_head`` warning never fires). SparseGPT's unstructured mask prunes, in each
block of ``block_size`` columns (all rows, k weights), every score ``<=`` the ``int(k * s)``-th smallest, so
``int(k * s) + 1`` or more (0.5002 on 64 x 64 at 0.5); Wanda prunes exactly ``int(cols * s)`` per output row. With
an N:M mask ``sparsity`` is ignored (N of every M consecutive inputs are pruned).

Install (worked; no dependency problems, torchvision is not pulled in)::

    python3 -m venv benchmarks/.cache/llmc-venv
    echo "torch==2.13.0" > benchmarks/.cache/llmc-constraints.txt
    benchmarks/.cache/llmc-venv/bin/pip install torch==2.13.0
    benchmarks/.cache/llmc-venv/bin/pip install llmcompressor -c benchmarks/.cache/llmc-constraints.txt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import llmcompressor
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from loguru import logger
from process import make_resident
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

EVAL_BATCH = 8
IGNORE = ["re:.*lm_head"]
TARGETS = ["Linear"]


def seconds_since_process_start() -> float:
    """Wall seconds since this process started (the kernel's start time, so interpreter startup and imports count)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start_ticks = int(fields[19])  # field 22, starttime, in clock ticks since boot
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def status_mib(key: str = "VmRSS") -> float:
    """A memory line of ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: its peak) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def maxrss_mib() -> float:
    """Peak resident set size so far (``ru_maxrss``) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``, and with it ``ru_maxrss``) to the current RSS; False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def stand_in_tokenizer() -> PreTrainedTokenizerFast:
    """A one-word tokenizer: ``oneshot`` demands a processor when given a dataset, but never uses it on token ids."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>"
    )


def make_recipe(method: str, sparsity: float, mask: str, dampening: float, block_size: int) -> Any:
    """The llm-compressor modifier for ``method``, aimed at every Linear but ``lm_head``."""
    if method == "sparsegpt":
        return SparseGPTModifier(
            sparsity=sparsity,
            mask_structure=mask,
            dampening_frac=dampening,
            block_size=block_size,
            targets=TARGETS,
            ignore=IGNORE,
        )
    if method == "wanda":
        return WandaPruningModifier(sparsity=sparsity, mask_structure=mask, targets=TARGETS, ignore=IGNORE)
    raise ValueError(f"unknown method {method!r}")


def decoder_linears(model: PreTrainedModel) -> dict[str, torch.nn.Linear]:
    """The Linear layers inside the decoder layers (``model.layers.*``), the ones meant to be pruned."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
    }


def zero_fraction(weights: list[torch.Tensor]) -> float:
    """Fraction of exact zeros over ``weights`` together."""
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def nm_violations(weights: list[torch.Tensor], mask: str) -> int | None:
    """Groups of ``m`` consecutive inputs (per output row) with fewer than ``n`` zeros; ``None`` for unstructured."""
    n, m = (int(x) for x in mask.split(":"))
    if n == 0:
        return None
    bad = 0
    for w in weights:
        groups = (w == 0).reshape(w.shape[0], -1, m).sum(-1)
        bad += int((groups < n).sum())
    return bad


@torch.no_grad()
def perplexity(model: PreTrainedModel, ids: torch.Tensor, batch: int = EVAL_BATCH) -> float:
    """exp of the mean next-token cross-entropy, every predicted token of every row weighted equally."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], batch):
        x = ids[i : i + batch]
        loss = model(input_ids=x, labels=x).loss
        tokens = x.shape[0] * (x.shape[1] - 1)
        total += float(loss) * tokens
        count += tokens
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--calib", required=True, type=Path)
    p.add_argument("--eval", required=True, type=Path)
    p.add_argument("--method", required=True, choices=["sparsegpt", "wanda"])
    p.add_argument("--sparsity", required=True, type=float)
    p.add_argument("--mask", default="0:0")
    p.add_argument("--dampening", default=0.01, type=float)
    p.add_argument("--block-size", default=128, type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)

    cholesky_failures: list[str] = []
    pipelines: list[str] = []
    logger.add(
        lambda msg: cholesky_failures.append(str(msg)),
        level="WARNING",
        filter=lambda record: "Failed to invert hessian" in record["message"],
    )
    logger.add(
        lambda msg: pipelines.append(msg.record["message"]),
        level="INFO",
        filter=lambda record: record["message"].startswith("Inferred `"),
    )

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    make_resident(model)  # the baseline below holds the model, as ours does (scale_lm.py)
    calib = torch.load(args.calib).long()
    eval_ids = torch.load(args.eval).long()
    n, t = calib.shape
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    recipe = make_recipe(args.method, args.sparsity, args.mask, args.dampening, args.block_size)
    kwargs: dict[str, Any] = dict(
        dataset=dataset,
        processor=stand_in_tokenizer(),
        num_calibration_samples=n,
        max_seq_length=t,
        batch_size=1,
        shuffle_calibration_samples=False,
    )

    peak_before = maxrss_mib()
    reset = reset_peak_rss()
    rss_before = status_mib("VmRSS")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    model = oneshot(model=model, recipe=recipe, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    seconds_oneshot, cpu_oneshot = time.perf_counter() - start, time.process_time() - cpu_start
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    seconds_total = seconds_since_process_start()
    peak_oneshot = status_mib("VmHWM") if reset else None
    peak_rss = max(peak_before, maxrss_mib())

    pruned = [m.weight.detach() for m in decoder_linears(model).values()]
    result: dict[str, Any] = {
        "method": args.method,
        "sparsity": args.sparsity,
        "mask": args.mask,
        "dampening": args.dampening if args.method == "sparsegpt" else None,
        "block_size": args.block_size if args.method == "sparsegpt" else None,
        "calib_rows": n,
        "seq_len": t,
        "seconds_oneshot": seconds_oneshot,
        "cpu_seconds_oneshot": cpu_oneshot,
        "seconds_total": seconds_total,
        "peak_rss_mib": peak_rss,
        "rss_before_mib": rss_before,
        "peak_rss_oneshot_mib": peak_oneshot,
        "peak_gpu_mib": peak_gpu,
        "dtype": args.dtype,
        "perplexity": perplexity(model, eval_ids),
        "achieved_sparsity": zero_fraction(pruned),
        "lm_head_sparsity": zero_fraction([model.lm_head.weight.detach()]),
        "pruned_layers": len(pruned),
        "nm_violations": nm_violations(pruned, args.mask),
        "cholesky_failures": len(cholesky_failures),
        "llmcompressor_version": llmcompressor.__version__,
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "pipeline": "; ".join(pipelines) or "unknown",
        "oneshot_kwargs": {
            "recipe": repr(recipe),
            **{k: v for k, v in kwargs.items() if k not in ("dataset", "processor")},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
