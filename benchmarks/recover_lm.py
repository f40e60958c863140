"""Recovery on the language model: one-shot SparseGPT, then the same fine-tuning budget per recipe.

    python benchmarks/recover_lm.py            # the small plan below (about 15-25 CPU-minutes, cached)
    python benchmarks/recover_lm.py --quick    # a 2-block smoke run, not published
    python benchmarks/recover_lm.py --grid     # 90%, 2:4, 50% width x {CE, KD}, gradual + KD (about 1-2 h)

The dense model is ``benchmarks/lm.py``'s architecture at the size of ``experiment=llama_text``
(LLaMA, 4 blocks, hidden 128, 1.9M parameters; Python's standard library, 150 files, byte-level
BPE of 4096 tokens, windows of 128) trained from scratch for ``steps`` steps (cached like lm.py's).
Each row prunes that model one-shot to 70% with the SparseGPT preset (``SparseGPT(0.7)``: 64
calibration windows), then fine-tunes it for ``finetune`` steps (AdamW, lr 1e-3, the same seed and
batches for every row) with the masks frozen:

* plain cross-entropy; logit KD (``Distillation()``: loss + KD at T=2 from the dense model); KD +
  SquareHead (``squarehead_weight=1``);
* LoRA (PEFT, r=16 on every Linear of the blocks, the base weights frozen, the same steps and lr)
  with plain CE and with KD: perplexity with the adapters kept separate, after ``masked_merge``
  (the zeros kept) and after PEFT's plain merge (dense again, for reference).

Test perplexity on the first ``eval_windows`` test windows.

``--grid`` adds, on the same dense model and budget, perplexity every ``curve_every`` fine-tuning
steps (the curve, and the first step within 5% of dense): one-shot at 90% unstructured
(``SparseGPT(0.9)``), 2:4 (``SparseGPT(0.5, pattern="2:4")``) and 50% width (``OBSPruning(0.5,
pattern="channels")``, heads and neurons, the same in every block) each recovered with CE and with KD;
and at 70%, gradual pruning during the fine-tuning with KD (oBERT's recipe: rounds every 10 steps
to step 60, cubic schedule) by OBS (``OBSPruning``, block by block, label-free) and by magnitude
(GMP), against one-shot + KD. Plot: ``benchmarks/recover_lm.png``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import lm
import torch

PLANS: dict[str, dict[str, Any]] = {
    "small": {
        "model": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 384},
        "data": {"vocab_size": 4096, "seq_len": 128, "batch_size": 16, "max_files": 150},
        "steps": 300,
        "calib": 64,
        "finetune": 100,
        "eval_windows": 256,
        "sparsity": 0.7,
        "lora_rank": 16,
    },
    "quick": {
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128},
        "data": {"vocab_size": 1024, "seq_len": 64, "batch_size": 8, "max_files": 60},
        "steps": 40,
        "calib": 16,
        "finetune": 10,
        "eval_windows": 32,
        "sparsity": 0.7,
        "lora_rank": 4,
    },
}
RECIPES = ("one-shot only", "CE", "KD", "KD + SquareHead", "LoRA CE", "LoRA KD", "dense CE")
# the grid: (label, pruner class, keyword arguments) pruned one-shot, then each recipe
GRID_PRUNERS = {
    "70% SparseGPT": ("SparseGPT", {"target": 0.7}),
    "90% SparseGPT": ("SparseGPT", {"target": 0.9}),
    "2:4 SparseGPT": ("SparseGPT", {"target": 0.5, "pattern": "2:4"}),
    "50% width OBS": ("OBSPruning", {"target": 0.5, "pattern": "channels"}),
}
GRID_ONE_SHOT = [(p, r) for p in GRID_PRUNERS for r in ("CE", "KD") if p != "70% SparseGPT"]
GRADUAL_KD = {  # pruned during the fine-tuning, with KD, to 70%
    "70% gradual OBS + KD": ("OBSPruning", {"allocation": "reconstruction", "scope": "layer", "blocks": "auto"}),
    "70% gradual GMP + KD": ("MagnitudePruning", {"scope": "layer"}),
}
CURVE_EVERY = 20
DENSE_RUN = "dense, no pruning"
# "dense CE": the dense model trained the same steps, unpruned: what the extra steps alone give a model
# that is not trained to convergence (the reference recovered perplexities are compared with)


def evals(folder: Path, plan: dict[str, Any]) -> torch.Tensor:
    return torch.load(folder / "eval.pt")[: plan["eval_windows"]]


def measure(plan: dict[str, Any], folder: Path, recipe: str) -> dict[str, Any]:
    import peft

    import lightning_prune
    from lightning_prune.surgery.lora import masked_merge

    dm, lit, ft = lm.finetuning_setup(plan, folder)
    ids = evals(folder, plan)
    teacher = copy.deepcopy(lit.model).eval()
    dense_ppl = lm.perplexity(teacher, ids)
    batches = lm.calibration_batches(folder)
    pruner = lightning_prune.SparseGPT(plan["sparsity"], verbose=0, **lm.ONE_SHOT)
    if recipe == "dense CE":
        trainer = common.trainer(max_steps=ft, max_epochs=-1, limit_val_batches=0)
        start = time.perf_counter()
        trainer.fit(lit, datamodule=dm)
        seconds = time.perf_counter() - start
        return {"recipe": recipe, "dense": dense_ppl, "one_shot": dense_ppl, "steps": ft, "fit_seconds": seconds,
                "perplexity": lm.perplexity(lit.model.eval(), ids)}  # fmt: skip
    lightning_prune.prune(lit, batches, pruner)
    out: dict[str, Any] = {
        "recipe": recipe,
        "dense": dense_ppl,
        "one_shot": lm.perplexity(lit.model.eval(), ids),
        "steps": ft,
    }
    if recipe == "one-shot only":
        return out
    callbacks: list[Any] = [pruner]
    if "KD" in recipe:
        callbacks.append(
            lightning_prune.Distillation(teacher=teacher, squarehead_weight=1.0 if "Square" in recipe else 0)
        )
    if recipe.startswith("LoRA"):
        modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        config = peft.LoraConfig(r=plan["lora_rank"], lora_alpha=2 * plan["lora_rank"], target_modules=modules)
        lit.model = peft.get_peft_model(lit.model, config)
    trainer = common.trainer(max_steps=ft, max_epochs=-1, callbacks=callbacks, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(lit, datamodule=dm)
    out["fit_seconds"] = time.perf_counter() - start
    out["perplexity"] = lm.perplexity(lit.model.eval(), ids)
    if recipe.startswith("LoRA"):
        plain = copy.deepcopy(lit.model).merge_and_unload()
        out["perplexity_plain_merge"] = lm.perplexity(plain.eval(), ids)
        lit.model = masked_merge(lit.model, pruner)
        out["perplexity_masked_merge"] = lm.perplexity(lit.model.eval(), ids)
    masks = pruner.current_masks()  # by the parameters themselves: merging renamed them
    out["zeros_held"] = all(bool((t.param.detach()[~masks[t.name]] == 0).all()) for t in pruner.targets)
    out["sparsity"] = pruner.sparsity
    return out


class Curve:
    """Test perplexity every ``every`` optimizer steps of a fit (and at step 0), in eval mode."""

    def __init__(self, ids: torch.Tensor, every: int) -> None:
        import lightning.pytorch as pl

        outer = self
        self.points: list[tuple[int, float]] = []

        class _Callback(pl.Callback):
            def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
                if trainer.global_step % every == 0:
                    outer.measure(trainer.global_step, pl_module)

        self.callback, self.ids = _Callback(), ids

    def measure(self, step: int, lit: Any) -> None:
        from lightning_prune.engine.calibration import eval_mode

        with eval_mode(lit):
            self.points.append((step, lm.perplexity(lit.model, self.ids)))


def measure_grid(plan: dict[str, Any], folder: Path, label: str, recipe: str) -> dict[str, Any]:
    """One grid cell: prune one-shot (``GRID_PRUNERS[label]``) then fine-tune with ``recipe`` ("CE" or "KD"),
    or prune gradually during a KD fine-tuning (``GRADUAL_KD[label]``); the perplexity curve."""
    import lightning_prune

    dm, lit, ft = lm.finetuning_setup(plan, folder)
    ids = evals(folder, plan)
    teacher = copy.deepcopy(lit.model).eval()
    dense_ppl = lm.perplexity(teacher, ids)
    batches = lm.calibration_batches(folder)
    curve = Curve(ids, plan.get("curve_every", CURVE_EVERY))
    out: dict[str, Any] = {"label": label, "recipe": recipe, "dense": dense_ppl, "steps": ft}
    if label == DENSE_RUN:  # the reference curve: the dense model trained the same steps
        curve.measure(0, lit)
        trainer = common.trainer(max_steps=ft, max_epochs=-1, callbacks=[curve.callback], limit_val_batches=0)
        trainer.fit(lit, datamodule=dm)
        return {**out, "perplexity": lm.perplexity(lit.model.eval(), ids), "curve": curve.points, "sparsity": 0.0}
    if label in GRADUAL_KD:
        cls, kwargs = GRADUAL_KD[label]
        extra = {} if cls == "MagnitudePruning" else {"num_batches": len(batches)}
        every = max(1, ft // 10)
        pruner = getattr(lightning_prune, cls)(
            0.7, start_step=every, end_step=int(0.6 * ft), every_n_steps=every, verbose=0, **kwargs, **extra
        )
        callbacks: list[Any] = [pruner, lightning_prune.Distillation(teacher=teacher)]
    else:
        cls, kwargs = GRID_PRUNERS[label]
        pruner = getattr(lightning_prune, cls)(verbose=0, num_batches=len(batches), **kwargs, **lm.ONE_SHOT)
        lightning_prune.prune(lit, batches, pruner)
        out["one_shot"] = lm.perplexity(lit.model.eval(), ids)
        callbacks = [pruner]
        if recipe == "KD":
            callbacks.append(lightning_prune.Distillation(teacher=teacher))
    curve.measure(0, lit)
    trainer = common.trainer(max_steps=ft, max_epochs=-1, callbacks=[*callbacks, curve.callback], limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(lit, datamodule=dm)
    out["fit_seconds"] = time.perf_counter() - start
    out["perplexity"] = lm.perplexity(lit.model.eval(), ids)
    out["curve"] = curve.points
    out["sparsity"] = pruner.sparsity
    masks = pruner.current_masks()
    out["zeros_held"] = all(bool((t.param.detach()[~masks[t.name]] == 0).all()) for t in pruner.targets)
    return out


def grid(plan: dict[str, Any], folder: Path, rows: list[dict[str, Any]], publish: bool) -> None:
    """The grid's cells (cached), its RESULTS block and plot; ``rows``: the first reading's, for 70%."""
    cells = folder / "recover-cells"
    dense_ppl = rows[0]["dense"]
    longer = next(r["perplexity"] for r in rows if r["recipe"] == "dense CE")
    results = []
    for label, recipe in [*GRID_ONE_SHOT, *((g, "KD") for g in GRADUAL_KD), ("70% SparseGPT", "KD"),
                          ("70% SparseGPT", "CE"), (DENSE_RUN, "CE")]:  # fmt: skip
        key = f"grid-{label}-{recipe}-{plan['finetune']}".replace(" ", "_").replace("%", "pct").replace(":", "of")
        r = common.cell(key, lambda label=label, recipe=recipe: measure_grid(plan, folder, label, recipe), cells)
        print({k: v for k, v in r.items() if k != "curve"}, flush=True)
        results.append(r)

    reference = dict(results.pop()["curve"])  # the dense run's perplexity at each measured step

    def within(r: dict[str, Any], ref: dict[int, float] | None = None) -> str:
        step = next((s for s, p in r["curve"] if p <= 1.05 * (ref[s] if ref else dense_ppl)), None)
        return "not within" if step is None else str(step)

    header = ["pruned", "recipe", "sparsity", "one-shot", "after fine-tuning", "vs dense", "vs dense + steps"]
    table = common.md_table(
        [*header, "first step within 5% of dense", "... of the dense run at that step"],
        [
            [
                r["label"],
                r["recipe"] if r["label"] not in GRADUAL_KD else "gradual + KD",
                f"{r['sparsity']:.1%}",
                f"{r['one_shot']:.2f}" if "one_shot" in r else "(dense start)",
                f"{r['perplexity']:.2f}",
                f"{r['perplexity'] / dense_ppl - 1:+.1%}",
                f"{r['perplexity'] / longer - 1:+.1%}",
                within(r),
                within(r, reference),
            ]
            for r in results
        ],
    )
    m, every = plan["model"], max(1, plan["finetune"] // 10)
    body = (
        "## Language model: recovery grid (90%, 2:4, 50% width; CE vs KD; gradual + KD)\n\n"
        f"The first reading's dense model (LLaMA {m['num_layers']} blocks, hidden {m['hidden_size']}, dense test "
        f"perplexity {dense_ppl:.2f}; the same {plan['finetune']} steps trained densely reach {longer:.2f}), the same "
        f"{plan['finetune']} fine-tuning steps and batches for every row (AdamW lr 1e-3), masks frozen after the last "
        "round; KD = `Distillation()` (loss + KD at T=2 from the dense model). Gradual rows prune during those steps "
        f"(a round every {every} steps from step {every} to step {int(0.6 * plan['finetune'])}, cubic) with KD. "
        f"Perplexity every {plan.get('curve_every', CURVE_EVERY)} steps: the curve in the plot, and the first step "
        f"within 5% of dense ({1.05 * dense_ppl:.2f}), and within 5% of the dense model trained as many steps "
        "(the model is not trained to convergence: every row keeps learning; this is the column to read). One seed. "
        "From `python benchmarks/recover_lm.py --grid` on "
        f"{common.machine()}, cells cached (`{common.commit()}`):\n\n{table}\n\n"
        "![perplexity against fine-tuning steps](recover_lm.png)\n"
    )
    print(body)
    if publish:
        plot(results, dense_ppl, reference)
        common.write_block("recover-lm-grid", body)


def plot(results: list[dict[str, Any]], dense_ppl: float, reference: dict[int, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        steps, ppl = zip(*r["curve"])
        name = r["label"] + ("" if r["label"] in GRADUAL_KD else f" + {r['recipe']}")
        ax.plot(steps, ppl, marker="o", markersize=3, label=name)
    ax.axhline(dense_ppl, color="gray", linestyle="--", linewidth=1, label="dense")
    ax.axhline(1.05 * dense_ppl, color="gray", linestyle=":", linewidth=1, label="dense + 5%")
    steps = sorted(reference)
    ax.plot(steps, [reference[s] for s in steps], color="black", linestyle="-.", label="dense, trained the same steps")
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning steps")
    ax.set_ylabel("test perplexity (log)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(common.ROOT / "recover_lm.png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--grid", action="store_true", help="also the grid (90%%, 2:4, width; CE/KD; gradual + KD)")
    a = p.parse_args()
    torch.set_num_threads(2)
    name = "quick" if a.quick else "small"
    plan = PLANS[name]
    folder = lm.dense({**plan, "calib": plan["calib"]}, f"recover-{name}")
    cells = folder / "recover-cells"
    rows = []
    for recipe in RECIPES:
        key = f"{recipe}-{plan['sparsity']}-{plan['finetune']}".replace(" ", "_").replace("+", "plus")
        r = common.cell(key, lambda recipe=recipe: measure(plan, folder, recipe), cells)
        print(r, flush=True)
        rows.append(r)
    dense_ppl = rows[0]["dense"]
    longer = next((r["perplexity"] for r in rows if r["recipe"] == "dense CE"), None)

    def f(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}"

    def final(r: dict[str, Any]) -> float:  # what is deployed sparse: the masked merge for LoRA
        return r.get("perplexity_masked_merge", r.get("perplexity", r["one_shot"]))

    table = common.md_table(
        [
            "recipe",
            "perplexity",
            "LoRA: masked merge",
            "LoRA: plain merge (dense)",
            "vs dense",
            "vs dense + steps",
            "fit s",
        ],
        [
            [
                r["recipe"],
                f(r.get("perplexity", r["one_shot"])),
                f(r.get("perplexity_masked_merge")),
                f(r.get("perplexity_plain_merge")),
                f"{final(r) / dense_ppl - 1:+.1%}",
                f"{final(r) / longer - 1:+.1%}" if longer else "",
                f"{r['fit_seconds']:.0f}" if "fit_seconds" in r else "",
            ]
            for r in rows
        ],
    )
    held = all(r.get("zeros_held", True) for r in rows)
    m = plan["model"]
    body = (
        "## Language model: recovery after one-shot SparseGPT (distillation, LoRA and its masked merge)\n\n"
        f"LLaMA {m['num_layers']} blocks, hidden {m['hidden_size']}, {plan['steps']} dense steps on the stdlib; "
        f"one-shot `SparseGPT({plan['sparsity']})` ({plan['calib']} calibration windows), then {plan['finetune']} "
        f"fine-tuning steps per row (AdamW lr 1e-3, same batches), masks frozen; test perplexity on "
        f"{plan['eval_windows']} windows, "
        f"dense {dense_ppl:.2f}. KD: `Distillation()` (loss + KD at T=2 from the dense model); SquareHead weight 1; "
        f"LoRA r={plan['lora_rank']} on every block Linear (base frozen): adapters separate / `masked_merge` / PEFT's "
        f"plain merge. Zeros held in every row: {held}. From `python benchmarks/recover_lm.py` at "
        f"`{common.commit()}` on {common.machine()}:\n\n{table}\n\n"
        "One seed, one sparsity, one budget: a first reading, not the issue's full grid. The dense model is not "
        "trained to convergence, so every row also keeps learning: `dense CE` (no pruning, the same steps) is the "
        "reference the recovered rows should be read against (`vs dense + steps`). LoRA rows train far fewer "
        "parameters at the full fine-tuning's learning rate. Fit seconds are wall time on a machine shared with "
        "other jobs: not comparable between rows.\n"
    )
    print(body)
    if not a.quick:
        common.write_block("recover-lm", body)
    if a.grid:
        grid(plan, folder, rows, publish=not a.quick)


if __name__ == "__main__":
    main()
