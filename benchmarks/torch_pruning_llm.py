"""Torch-Pruning's LLM method, run by the ``torch-pruning`` package itself, at the budgets of ``budget_lm.py``.

pip install torch-pruning==1.6.1 -c <(echo torch==2.13.0)   # measured with 1.6.1; needs only torch and numpy
python benchmarks/torch_pruning_llm.py      # rows at 25% and 50% of the non-embedding parameters removed

As its ``examples/LLMs/prune_llm.py`` calls it: ``BasePruner`` (``MetaPruner`` in its older versions) with
``GroupMagnitudeImportance(p=2, group_reduction="mean")``, one uniform ``pruning_ratio`` that is also the
``head_pruning_ratio`` (``prune_num_heads=True``, ``prune_head_dims=False``: whole heads, RoPE untouched),
``round_to=4``, ``ignored_layers=[lm_head]``; it prunes MLP neurons, heads and the hidden size (embedding
channels, norms and every reader and writer of the residual stream) alike. Data-free: the example ids only
trace the graph. The ratio for a budget is found by bisection (the package rounds with int, ceil and
``round_to``, so no closed form is exact), then moved up to the first ratio whose config transformers 5 accepts.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import budget_lm
import lm
from budget_lm import EVAL_WINDOWS, OUT, PLAN, non_embedding

FRACTIONS = (0.25, 0.5)  # of the non-embedding parameters removed
SAVED = 0.5  # the row kept for budget_lm.py --recover


def _tp() -> Any:
    """``torch_pruning``, told that torch now reports ``cat(dim=-1)``'s dim as 2**64 - 1.

    Torch-Pruning (1.6.1) reads a saved dim of 100 or more as torch 1.11's uninitialised value and then maps the
    cat as a channel concat; RoPE's ``rotate_half`` (``cat((-x2, x1), dim=-1)``) then grows the attention group's
    indices by the concat offset on every pass round the graph's cycles, and ``BasePruner(...)`` never returns
    (the hang reported in VainF/Torch-Pruning#527). Raising the threshold makes it skip non-channel cats as intended.
    """
    import torch_pruning as tp

    tp.dependency.constants.MAX_VALID_DIM = 2**64
    return tp


def tp_prune(model: nn.Module, example_ids: torch.Tensor, ratio: float) -> nn.Module:
    """A copy of the ``LlamaForCausalLM`` pruned by Torch-Pruning as its LLM example does, its config and
    attention modules updated so that it runs, saves and loads as the smaller shape."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    tp = _tp()
    model = copy.deepcopy(model).eval()
    cfg = model.config
    num_heads: dict[nn.Module, int] = {}
    for layer in model.model.layers:
        a = layer.self_attn
        num_heads |= {a.q_proj: cfg.num_attention_heads, a.k_proj: cfg.num_key_value_heads}
        num_heads[a.v_proj] = cfg.num_key_value_heads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unwrapped parameters": the RMSNorm weights, pruned on their only dim
        pruner = tp.pruner.BasePruner(
            model,
            example_inputs=example_ids,
            importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
            global_pruning=False,
            output_transform=lambda out: out.logits,
            pruning_ratio=ratio,
            ignored_layers=[model.lm_head],
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=ratio,
            round_to=4,
        )
        for group in pruner.step(interactive=True):
            group.prune()
    _update_config(model)
    return model


def _update_config(model: nn.Module) -> None:
    """The example's attribute update for transformers 5: attention reads ``head_dim`` (kept, 32) and
    ``num_key_value_groups`` from the module and the rest from the shared config."""
    cfg, layers = model.config, model.model.layers
    hd = cfg.head_dim
    shapes = {
        (la.self_attn.q_proj.out_features, la.self_attn.k_proj.out_features, la.mlp.gate_proj.out_features)
        for la in layers
    }
    if len(shapes) != 1:
        raise ValueError(f"uniform pruning left blocks of different shapes {sorted(shapes)}; one config holds one")
    q, k, neurons = shapes.pop()
    if q % hd or k % hd:
        raise ValueError(f"q/k widths {q}/{k} are not whole heads of head_dim {hd}")
    cfg.hidden_size = model.lm_head.in_features
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = q // hd, k // hd, neurons
    for layer in layers:
        layer.self_attn.num_key_value_groups = q // k
        layer.mlp.hidden_size, layer.mlp.intermediate_size = cfg.hidden_size, neurons


def ratio_for(model: nn.Module, example_ids: torch.Tensor, budget: int, loadable: bool = True) -> float:
    """The smallest uniform ratio (the most kept) whose pruned model has at most ``budget`` non-embedding
    parameters, by bisection on fresh copies (the count is a non-increasing step function of the ratio); with
    ``loadable``, the next ratio up whose config transformers accepts (see ``next_loadable``)."""
    if budget >= non_embedding(model):
        raise ValueError(f"budget {budget} does not remove anything from {non_embedding(model)} parameters")
    lo, hi = 0.0, 0.99
    if non_embedding(tp_prune(model, example_ids, hi)) > budget:
        raise ValueError(f"budget {budget} is below what ratio {hi} leaves")
    for _ in range(16):
        mid = (lo + hi) / 2
        if non_embedding(tp_prune(model, example_ids, mid)) <= budget:
            hi = mid
        else:
            lo = mid
    return next_loadable(model, example_ids, hi) if loadable else hi


def next_loadable(model: nn.Module, example_ids: torch.Tensor, ratio: float, step: float = 1 / 1024) -> float:
    """The first ratio from ``ratio`` up (in ``step``s, finer than one ``round_to`` of the hidden size) whose
    pruned config passes transformers' validation: transformers 5's ``LlamaConfig`` refuses a hidden size that is
    not a multiple of the number of heads even with ``head_dim`` given, so such a model runs but cannot be
    saved or loaded, while Torch-Pruning rounds the hidden size (to 4) and the heads (ceil) independently."""
    from huggingface_hub.errors import StrictDataclassClassValidationError

    while ratio < 0.99:
        try:
            tp_prune(model, example_ids, ratio).config.validate()
            return ratio
        except StrictDataclassClassValidationError:
            ratio += step
    raise ValueError(f"no ratio from {ratio} up gives a config transformers accepts")


@torch.no_grad()
def reloads_equal(model: nn.Module, path: Path, ids: torch.Tensor) -> bool:
    """``save_pretrained`` + ``AutoModelForCausalLM.from_pretrained`` gives bitwise the same logits."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(path)
    back = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return torch.equal(model(input_ids=ids).logits, back(input_ids=ids).logits)


def _shape(model: nn.Module) -> str:
    c = model.config
    return (
        f"hidden {c.hidden_size}, kv heads {c.num_key_value_heads}, MLP {c.intermediate_size}, "
        f"{c.num_hidden_layers} blocks"
    )


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    folder = lm.dense(PLAN, "budget")
    dense = budget_lm.load(folder)
    ids = torch.load(folder / "eval.pt")[:EVAL_WINDOWS]
    example = lm.calibration_batches(folder)[0]["input_ids"][:1]  # traces the graph; the importance is data-free
    tag = version("torch-pruning")
    rows = []
    for fraction in FRACTIONS:
        budget = int((1 - fraction) * non_embedding(dense))
        start = time.perf_counter()
        free = ratio_for(dense, example, budget, loadable=False)
        ratio = next_loadable(dense, example, free)
        search = time.perf_counter() - start
        start = time.perf_counter()
        model = tp_prune(dense, example, ratio)
        seconds = time.perf_counter() - start
        row = {
            "budget": f"-{fraction:.0%}",
            "method": f"Torch-Pruning {tag} (its LLM example: group L2, uniform, hidden size too)",
            "params": non_embedding(model),
            "ppl": lm.perplexity(model, ids),
            "seconds": seconds,
            "ratio": ratio,
            "search_seconds": search,
            "shape": _shape(model),
        }
        if ratio != free:  # the budget's own ratio gives a config transformers 5 refuses: say what it was
            unsaved = tp_prune(dense, example, free)
            row["not_loadable"] = {
                "ratio": free,
                "params": non_embedding(unsaved),
                "ppl": lm.perplexity(unsaved, ids),
                "shape": _shape(unsaved),
            }
        rows.append(row)
        print(row, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = OUT / "rows" / f"{SAVED}-tp" if fraction == SAVED else Path(tmp)
            if not reloads_equal(model, path, ids[:8]):
                raise RuntimeError(f"the model saved to {path} does not give the same logits when loaded back")
        print(f"-{fraction:.0%}: save_pretrained + from_pretrained give equal logits", flush=True)
    (OUT / "torch_pruning.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
