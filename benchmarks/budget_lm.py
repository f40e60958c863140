"""Smaller LLaMAs for a parameter budget: our axes and the budget's pick against Minitron's activation
importance and magnitude, one-shot and after the same short distillation.

python benchmarks/budget_lm.py --oneshot            # 25% and 50% of the non-embedding parameters removed
python benchmarks/budget_lm.py --norms              # prune_hidden: RMSNorm weights rescaled against kept
python benchmarks/budget_lm.py --cost 2             # one round's seconds: structured against SparseGPT
python benchmarks/budget_lm.py --recover 100        # the 50% rows distilled 100 steps, perplexity every 25

A LLaMA of ``PLAN`` (8 blocks, hidden 256, 8 heads, MLP 768: 7.8M parameters) is trained here once
(``lm.dense``, cached). Rows:

* ours, one axis: the hidden size alone (``prune_hidden``, OBS: readers refitted, norms rescaled); heads and
  neurons alone (``shrink_to(axes=("heads", "neurons"))``); blocks alone (``prune_blocks``, by loss);
* ours, the budget's pick: ``shrink_to(model, data, params)`` over hidden, heads, neurons and depth;
* Minitron's activation importance (Muralidharan et al. 2024, implemented here from the paper: mean |output| of
  every norm per hidden channel, mean |activation| per MLP neuron, mean L2 norm of each head's output;
  plain slicing, no compensation) at the **same shape** as the budget's pick, and at the hidden-only shape;
* magnitude at the budget's shape (heads and neurons by the L1 norm of their weights, ``MagnitudePruning``;
  the hidden size by the group L2 norm of every weight a channel owns, Torch-Pruning's criterion);
* the dense model, and (``--recover``) the dense model trained the same extra steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import lm

import lightning_prune
import lightning_prune.surgery.shrink
from lightning_prune import prune, prune_blocks, prune_hidden, shrink, shrink_to
from lightning_prune.surgery.budget import _Counter, _decoder, _describe, _shape_of, table

PLAN: dict[str, Any] = {
    "model": {
        "hidden_size": 256,
        "num_layers": 8,
        "num_heads": 8,
        "intermediate_size": 768,
        "lr": 0.002,
        "warmup_steps": 50,
    },
    "data": {"vocab_size": 2048, "seq_len": 64, "batch_size": 16},
    "steps": 600,
    "calib": 128,
}
EVAL_WINDOWS = 256
FRACTIONS = (0.25, 0.5)  # of the non-embedding parameters removed
OUT = common.CACHE / "budget"
RECOVER_AT = (0.5,)
RECOVER_ROWS = [
    "ours: the budget's pick (shrink_to)",
    "ours: hidden only (OBS)",
    "Minitron activation, the pick's shape",
    "magnitude, the pick's shape",
    "Minitron activation: hidden only",
]
TP_ROW = "Torch-Pruning package (benchmarks/torch_pruning_llm.py), its own shape"
CURVE_EVERY = 25
RANK_STEPS, RANK_LR = 20, 1e-4  # shrink_to(recover_steps=, recover_lr=): Minitron-style ranking after a short KD


def load(folder: Path) -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32).eval()


def non_embedding(model: nn.Module) -> int:
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


# ------------------------------------------------------------------------------- Minitron's importance
@torch.no_grad()
def minitron_width(model: nn.Module, batches: list[dict[str, torch.Tensor]], kv_heads: int, neurons: int) -> nn.Module:
    """A copy keeping, in every block, the ``kv_heads`` key/value groups and ``neurons`` MLP neurons of highest
    activation importance (Minitron: mean |activation| of a neuron, mean L2 norm of a head's output), sliced."""
    model = copy.deepcopy(model)
    cfg = model.config
    hd, rep = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    head_imp: dict[int, torch.Tensor] = {}
    neuron_imp: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):

        def o_hook(m: nn.Module, args: tuple[Any, ...], i: int = i) -> None:
            x = args[0].reshape(-1, cfg.num_attention_heads, hd).float()
            head_imp[i] = head_imp.get(i, 0) + x.norm(dim=-1).sum(0)

        def d_hook(m: nn.Module, args: tuple[Any, ...], i: int = i) -> None:
            neuron_imp[i] = neuron_imp.get(i, 0) + args[0].reshape(-1, args[0].shape[-1]).abs().float().sum(0)

        hooks += [
            layer.self_attn.o_proj.register_forward_pre_hook(o_hook),
            layer.mlp.down_proj.register_forward_pre_hook(d_hook),
        ]
    for b in batches:
        model(input_ids=b["input_ids"])
    for h in hooks:
        h.remove()
    for i, layer in enumerate(model.model.layers):
        groups = head_imp[i].view(-1, rep).sum(1)  # a key/value head with the query heads that share it
        keep_g = torch.sort(torch.argsort(groups, descending=True)[:kv_heads]).values
        q_rows = torch.cat([torch.arange(g * rep * hd, (g + 1) * rep * hd) for g in keep_g.tolist()])
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in keep_g.tolist()])
        keep_n = torch.sort(torch.argsort(neuron_imp[i], descending=True)[:neurons]).values
        a, m = layer.self_attn, layer.mlp
        for lin, rows in (
            (a.q_proj, q_rows),
            (a.k_proj, kv_rows),
            (a.v_proj, kv_rows),
            (m.gate_proj, keep_n),
            (m.up_proj, keep_n),
        ):
            _cut(lin, rows, 0)
        _cut(a.o_proj, q_rows, 1)
        _cut(m.down_proj, keep_n, 1)
        a.num_key_value_groups = rep
    return model


def _cut(lin: nn.Linear, index: torch.Tensor, dim: int) -> None:
    lin.weight = nn.Parameter(lin.weight.index_select(dim, index).contiguous())
    if dim == 0 and lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias[index].contiguous())
    lin.out_features, lin.in_features = lin.weight.shape


def at_shape(model: nn.Module, batches: list, shape: Any, dense: Any, order: list[int], how: str) -> nn.Module:
    """``model`` cut to ``shape`` by ``how``: "minitron" (activation importance, sliced) or "magnitude"."""
    from lightning_prune.surgery.depth import remove_blocks

    _, _, arch = _decoder(model)
    counter = _Counter(model, arch, "all")
    current = copy.deepcopy(model)
    if shape.blocks < dense.blocks:
        current = remove_blocks(current, sorted(order[: dense.blocks - shape.blocks])).model
    if how == "minitron":
        current = minitron_width(current, batches, shape.kv_heads, shape.intermediate)
    else:
        for glob, fraction in (
            ("*.self_attn.*", 1 - shape.kv_heads / dense.kv_heads),
            ("*.mlp.*", 1 - shape.intermediate / dense.intermediate),
        ):
            if fraction > 0:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pruner = lightning_prune.MagnitudePruning(fraction, pattern="channels", include=[glob], verbose=0)
                    prune(current, batches, pruner)
                    current = shrink(current).model
    for key, value in {
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "intermediate_size": shape.intermediate,
    }.items():
        setattr(current.config, key, value)
    if shape.hidden < dense.hidden:
        score, norms = ("activation", "keep") if how == "minitron" else ("magnitude", "keep")
        current = prune_hidden(current, batches, dense.hidden - shape.hidden, score=score, norms=norms).model
    _describe(current, counter, shape)
    return current


# ------------------------------------------------------------------------------------------ speed
@torch.no_grad()
def speedups(model: nn.Module, dense: nn.Module, ids: torch.Tensor, reps: int = 5) -> tuple[float, float]:
    """CPU prefill (8 windows) and cached greedy decode (32 tokens after 8, batch 1) speed-ups over ``dense``:
    the ratio of median seconds, the two models alternated in this process so that a busy machine hits both."""
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=32, min_new_tokens=32, do_sample=False, use_cache=True, pad_token_id=0)
    runs = {
        "prefill": lambda m: m(input_ids=ids[:8]),
        "decode": lambda m: m.generate(ids[:1, :8], generation_config=gen),
    }
    out = []
    for run in runs.values():
        times: dict[str, list[float]] = {"dense": [], "model": []}
        for _, name in common.alternation(["dense", "model"], reps, swap=True):
            start = time.perf_counter()
            run(dense if name == "dense" else model)
            times[name].append(time.perf_counter() - start)
        out.append(float(torch.tensor(times["dense"]).median() / torch.tensor(times["model"]).median()))
    return out[0], out[1]


# ------------------------------------------------------------------------------------------ one-shot rows
def hidden_for(model: nn.Module, budget: int) -> int:
    """The largest hidden size (the config accepts) whose non-embedding count is within ``budget``."""
    from lightning_prune.surgery.hidden import allowed_sizes, hidden_stream

    _, _, arch = _decoder(model)
    counter, dense = _Counter(model, arch, "non_embedding"), _shape_of(model, arch)
    sizes = allowed_sizes(model, hidden_stream(model)[2])
    fits = [h for h in sizes if (n := counter(type(dense)(**{**dense.__dict__, "hidden": h}))) and n <= budget]
    return max(fits)


def oneshot(folder: Path) -> list[dict[str, Any]]:
    calib = lm.calibration_batches(folder)
    ids = torch.load(folder / "eval.pt")[:EVAL_WINDOWS]
    dense = load(folder)
    rows = [
        {
            "budget": "dense",
            "method": "dense",
            "params": non_embedding(dense),
            "ppl": lm.perplexity(dense, ids),
            "seconds": 0.0,
            "speed": (1.0, 1.0),
            "shape": "",
        }
    ]
    print(rows[-1], flush=True)
    _, _, arch = _decoder(dense)
    base = _shape_of(dense, arch)
    from lightning_prune.surgery.budget import _block_order

    order = _block_order(dense, calib[:-4], None)

    def add(fraction: float, method: str, fn: Any) -> Any:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fn()
        model = result.model if isinstance(result, lightning_prune.surgery.shrink.Shrunk) else result
        c = model.config
        rows.append(
            {
                "budget": f"-{fraction:.0%}",
                "method": method,
                "params": non_embedding(model),
                "ppl": lm.perplexity(model.eval(), ids),
                "seconds": time.perf_counter() - start,
                "speed": speedups(model.eval(), dense, ids),
                "shape": f"hidden {c.hidden_size}, kv heads {c.num_key_value_heads}, MLP {c.intermediate_size}, "
                f"{c.num_hidden_layers} blocks",
            }
        )
        print(rows[-1], flush=True)
        (OUT / "oneshot.json").write_text(json.dumps(rows, indent=1))
        if fraction in RECOVER_AT and method in RECOVER_ROWS:  # kept for --recover
            model.save_pretrained(OUT / "rows" / f"{fraction}-{RECOVER_ROWS.index(method)}")
        return result

    for fraction in FRACTIONS:
        budget = int((1 - fraction) * non_embedding(dense))
        h = hidden_for(dense, budget)
        add(fraction, "ours: hidden only (OBS)", lambda: prune_hidden(dense, calib, base.hidden - h))
        add(
            fraction,
            "ours: heads + neurons only (OBS)",
            lambda: shrink_to(dense, calib, 1 - fraction, axes=("heads", "neurons"), verbose=0),
        )
        add(fraction, "ours: blocks only (loss)", lambda: prune_blocks(dense, calib, round(fraction * base.blocks)))
        pick = add(fraction, "ours: the budget's pick (shrink_to)", lambda: shrink_to(dense, calib, 1 - fraction))
        (OUT / f"candidates-{fraction}.md").write_text(table(pick.candidates))
        ranked = add(
            fraction,
            f"ours: the budget's pick ranked after {RANK_STEPS} KD steps (its model has had them)",
            lambda: shrink_to(dense, calib, 1 - fraction, recover_steps=RANK_STEPS, recover_lr=RANK_LR),
        )
        (OUT / f"candidates-{fraction}-recovered.md").write_text(table(ranked.candidates))
        best = min(pick.candidates, key=lambda r: r["loss"])
        shape = type(base)(**{k: best[k] for k in ("hidden", "kv_heads", "heads", "intermediate", "blocks", "params")})
        add(
            fraction,
            "Minitron activation, the pick's shape",
            lambda: at_shape(dense, calib, shape, base, order, "minitron"),
        )
        add(fraction, "magnitude, the pick's shape", lambda: at_shape(dense, calib, shape, base, order, "magnitude"))
        add(
            fraction,
            "Minitron activation: hidden only",
            lambda: prune_hidden(dense, calib, base.hidden - h, score="activation", norms="keep"),
        )
        add(
            fraction,
            "magnitude (group L2): hidden only",
            lambda: prune_hidden(dense, calib, base.hidden - h, score="magnitude", norms="keep"),
        )
    return rows


# ------------------------------------------------------------------------------------------ norms
def norms_table(folder: Path) -> list[list[str]]:
    """``prune_hidden`` at 25% and 50% of the hidden size, each score with the norms rescaled and kept."""
    calib = lm.calibration_batches(folder)
    ids = torch.load(folder / "eval.pt")[:EVAL_WINDOWS]
    dense = load(folder)
    rows = [["dense", "", "", f"{lm.perplexity(dense, ids):.2f}"]]
    for fraction in (0.25, 0.5):
        for score in ("obs", "activation", "magnitude"):
            for norms in ("rescale", "keep"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    small = prune_hidden(dense, calib, fraction, score=score, norms=norms).model
                rows.append([f"-{fraction:.0%}", score, norms, f"{lm.perplexity(small.eval(), ids):.2f}"])
                print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------ cost
def cost(folder: Path, reps: int) -> list[list[str]]:
    """Seconds of one round on the dense model, alternated ``reps`` times in this process: the SparseGPT
    preset (50% unstructured), structured OBS at 50% of heads and neurons (the default, and label-free with
    one pass: what ``shrink_to``'s candidates use), ``prune_hidden`` at 25% and a whole ``shrink_to`` search."""
    calib = lm.calibration_batches(folder)
    n = len(calib)

    def structured(**kw: Any) -> Any:
        return lambda m: prune(
            m,
            calib,
            lightning_prune.OBSPruning(0.5, pattern="channels", num_batches=n, eval_batches=0, verbose=0, **kw),
        )

    runs = {
        "SparseGPT(0.5), unstructured": lambda m: prune(
            m, calib, lightning_prune.SparseGPT(0.5, num_batches=n, eval_batches=0, verbose=0)
        ),
        "OBSPruning(0.5, pattern='channels'), the default": structured(),
        "the same, label-free, one pass (shrink_to's)": structured(allocation="reconstruction", recompute_steps=1),
        "prune_hidden(0.25)": lambda m: prune_hidden(m, calib, 0.25),
        "shrink_to(0.5): 8 candidates, ranked by loss": lambda m: shrink_to(m, calib, 0.5, verbose=0),
    }
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for _, name in common.alternation(list(runs), reps):
        model = load(folder)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs[name](model)
        seconds[name].append(time.perf_counter() - start)
        print(name, seconds[name][-1], flush=True)
    base = min(seconds["SparseGPT(0.5), unstructured"])
    return [[k, " / ".join(f"{s:.1f}" for s in v), f"{min(v) / base:.2f}x"] for k, v in seconds.items()]


# ------------------------------------------------------------------------------------------ recovery
def recover(folder: Path, steps: int) -> list[dict[str, Any]]:
    """Each saved row (and the dense model) trained ``steps`` steps on identical batches: the rows with
    ``Distillation`` from the dense model (loss + KD at T=2), the dense model with its own loss; test
    perplexity every ``CURVE_EVERY`` steps."""
    import lightning.pytorch as pl

    ids = torch.load(folder / "eval.pt")[:EVAL_WINDOWS]
    model_args = {k: v for k, v in PLAN["model"].items() if k not in ("lr", "warmup_steps")}  # fine-tuning's own
    plan = {**PLAN, "model": model_args, "finetune": steps}
    out = []
    for fraction in RECOVER_AT:
        runs = [(-1, "dense, trained the same steps"), *enumerate(RECOVER_ROWS), ("tp", TP_ROW)]
        for k, method in runs:
            path = OUT / "rows" / f"{fraction}-{k}"
            if k != -1 and not path.exists():
                continue
            dm, lit, ft = lm.finetuning_setup(plan, folder)  # the same seed, batches and optimizer for every row
            callbacks: list[Any] = []
            if k != -1:
                from transformers import AutoModelForCausalLM

                teacher = copy.deepcopy(lit.model).eval()
                lit.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                callbacks.append(lightning_prune.Distillation(teacher=teacher))
            points: list[tuple[int, float]] = []

            class Curve(pl.Callback):
                def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
                    if trainer.global_step % CURVE_EVERY == 0:
                        module.eval()
                        points.append((trainer.global_step, lm.perplexity(module.model, ids)))
                        module.train()

            points.append((0, lm.perplexity(lit.model.eval(), ids)))
            lit.train()
            trainer = common.trainer(max_steps=ft, max_epochs=-1, callbacks=[*callbacks, Curve()], limit_val_batches=0)
            start = time.perf_counter()
            trainer.fit(lit, datamodule=dm)
            out.append(
                {
                    "budget": f"-{fraction:.0%}" if k != -1 else "dense",
                    "method": method,
                    "steps": ft,
                    "params": non_embedding(lit.model),
                    "curve": points,
                    "seconds": time.perf_counter() - start,
                }
            )
            print(out[-1], flush=True)
            (OUT / f"recover-{steps}.json").write_text(json.dumps(out, indent=1))
    return out


def publish(block: str, lines: list[str]) -> None:
    """``lines`` as ``block`` of RESULTS.md, and printed."""
    body = "\n".join(lines)
    common.write_block(block, body)
    print(body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--oneshot", action="store_true")
    parser.add_argument("--recover", type=int, default=0, help="distillation steps for the saved 50%% rows")
    parser.add_argument("--norms", action="store_true", help="prune_hidden's norms: rescaled against kept")
    parser.add_argument("--cost", type=int, default=0, help="repetitions of the cost table's rounds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    folder = lm.dense(PLAN, "budget")
    trained = json.loads((folder / "dense.json").read_text())
    if args.oneshot:
        rows = oneshot(folder)
        if (tp := OUT / "torch_pruning.json").exists():  # benchmarks/torch_pruning_llm.py, run before
            rows += [{**r, "speed": (float("nan"), float("nan"))} for r in json.loads(tp.read_text())]
        publish(
            "budget-lm-oneshot",
            [
                "## Smaller LLaMAs for a parameter budget, one-shot",
                "",
                f"`python benchmarks/budget_lm.py --oneshot` at `{common.commit()}`, "
                f"{time.perf_counter() - started:.0f} s on {common.machine()}. A LLaMA of {PLAN['model']} "
                f"(vocabulary {PLAN['data']['vocab_size']}, windows of {PLAN['data']['seq_len']}, batch "
                f"{PLAN['data']['batch_size']}) trained here {trained['steps']} steps "
                f"({trained['train_seconds'] / 60:.0f} min, not converged: one seed); calibration: "
                f"{PLAN['calib']} training windows (16 batches; shrink_to ranks on the last 4); perplexity on the "
                f"first {EVAL_WINDOWS} test windows. "
                "Budgets count the parameters outside the embeddings and the output head. Minitron and magnitude rows "
                "take the shape the budget's pick chose (or the hidden-only shape), so only the scores and the "
                "compensation differ. Prefill x / decode x: CPU speed-up over the dense model (8 windows of "
                f"{PLAN['data']['seq_len']}; 32 cached greedy tokens, batch 1), medians of 5 alternated runs in this "
                "process. Torch-Pruning rows: `python benchmarks/torch_pruning_llm.py` (the package as its LLM "
                "example calls it, uniform ratio; data-free, seconds are its prune alone; speed not measured). "
                "The budget's candidates: `benchmarks/.cache/budget/candidates-*.md`.",
                "",
                common.md_table(
                    [
                        "removed",
                        "method",
                        "non-embedding params",
                        "test ppl",
                        "prune s",
                        "prefill x",
                        "decode x",
                        "shape",
                    ],
                    [
                        [
                            r["budget"],
                            r["method"],
                            f"{r['params']:,}",
                            f"{r['ppl']:.2f}",
                            f"{r['seconds']:.0f}",
                            f"{r['speed'][0]:.2f}",
                            f"{r['speed'][1]:.2f}",
                            r["shape"],
                        ]
                        for r in rows
                    ],
                ),
            ],
        )
    if args.norms:
        publish(
            "budget-lm-norms",
            [
                "## The hidden size: RMSNorm weights rescaled or kept",
                "",
                f"`python benchmarks/budget_lm.py --norms` at `{common.commit()}` on {common.machine()}: "
                "`prune_hidden(model, calib, fraction, score=, norms=)` on the dense model of the one-shot table "
                "(its calibration windows; test perplexity on the same windows). `rescale` multiplies every norm's "
                "weight by sqrt(mean kept E[r^2] / mean E[r^2]), `keep` leaves it; one seed.",
                "",
                common.md_table(["hidden removed", "score", "norms", "test ppl"], norms_table(folder)),
            ],
        )
    if args.cost:
        publish(
            "budget-lm-cost",
            [
                "## What a round costs: structured against unstructured",
                "",
                f"`python benchmarks/budget_lm.py --cost {args.cost}` at `{common.commit()}` on {common.machine()}: "
                f"the dense model of the one-shot table, {PLAN['calib']} calibration windows, no loss before/after "
                f"(eval_batches=0), {args.cost} repetitions alternated in one process; ratio: the fastest repetition "
                "over SparseGPT's fastest.",
                "",
                common.md_table(["round", "seconds", "against SparseGPT"], cost(folder, args.cost)),
            ],
        )
    if args.recover:
        rows = recover(folder, args.recover)
        points = sorted({s for r in rows for s, _ in r["curve"]})
        publish(
            "budget-lm-recover",
            [
                f"## Smaller LLaMAs for a parameter budget, after {args.recover} steps of distillation",
                "",
                f"`python benchmarks/budget_lm.py --recover {args.recover}` at `{common.commit()}`, "
                f"{time.perf_counter() - started:.0f} s on {common.machine()}. The one-shot models of the table "
                f"above at {', '.join(f'-{f:.0%}' for f in RECOVER_AT)} (saved, loaded back), each trained "
                f"{args.recover} steps with `Distillation(teacher=dense)` (loss + KD at T=2), AdamW lr 1e-3, the same "
                "seed and batches for every row; the dense row is the dense model trained the same steps on its own "
                "loss. Test perplexity every "
                f"{CURVE_EVERY} steps; one seed.",
                "",
                common.md_table(
                    ["removed", "method", "params", *[f"step {s}" for s in points], "fit s"],
                    [
                        [
                            r["budget"],
                            r["method"],
                            f"{r['params']:,}",
                            *[f"{dict(r['curve']).get(s, float('nan')):.2f}" for s in points],
                            f"{r['seconds']:.0f}",
                        ]
                        for r in rows
                    ],
                ),
            ],
        )


if __name__ == "__main__":
    main()
