"""Pruning while distilling against prune-then-distil, at equal token budgets (issue #43, part 5).

    python benchmarks/pwd_lm.py                        # budgets 30 and 90 steps, seeds 0-2 (resumable)
    python benchmarks/pwd_lm.py --budgets 30 --seeds 0  # a part of the grid

The dense LLaMA of ``budget_lm.PLAN`` (``lm.dense(PLAN, "budget")``, cached) loses 50% of its non-embedding
parameters to one pruner, ``OBSPruning(0.5, pattern="channels")`` (the structured default: heads and MLP neurons,
global allocation), inside ``Trainer.fit`` with ``Distillation(teacher=dense)`` beside it from the first step.
Every run of a budget has the same steps, batches, optimizer and learning-rate schedule
(``lm.finetuning_setup``); only the pruner's step triggers differ (``SCHEDULES``):

* one-shot + distillation: one round to 50%, then distillation for the rest of the budget;
* iterative: 25% at the first round, 50% half-way (2 rounds, linear);
* prune while distilling: 3 rounds over the first third, or 6 over the first half (cubic, the library's default).

A round's curvature comes from the ``WINDOW`` training batches before it (step triggers), so the first round of
every method is at step ``WINDOW``, not 0: the steps before it are the same for all. The seed sets the batch
order (so the batches of every window too); the dense model is the same. ``--reference`` adds one row:
``shrink_to(dense, calib, 0.5)`` (the budget's pick, one-shot, on the saved calibration windows) distilled the
same steps, seed 0. Each run is a JSON under ``benchmarks/.cache/pwd`` (an interrupted grid resumes); all of them
are gathered into ``benchmarks/out/pwd_lm.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import budget_lm
import common
import lm

import lightning_prune

TARGET = 0.5
WINDOW = 4  # training batches (of 16 windows) before a round: its curvature
CELLS = common.CACHE / "pwd"
GATHERED = Path(__file__).resolve().parent / "out" / "pwd_lm.json"
CURVE_POINTS = 6  # perplexity every budget / 6 steps, seed 0
REFERENCE = "reference: shrink_to(0.5) one-shot (the budget's pick) + distillation"


def rounds(first: int, last: int, n: int) -> dict[str, int]:
    """Step triggers for ``n`` rounds evenly from ``first`` to about ``last`` (the last round at
    ``first + (n - 1) * every``)."""
    every = max((last - first) // max(n - 1, 1), 1)
    return {"start_step": first, "end_step": first + (n - 1) * every, "every_n_steps": every}


def schedules(budget: int) -> dict[str, dict[str, Any]]:
    """Method name -> the pruner's schedule arguments for a run of ``budget`` steps."""
    half = budget // 2
    return {
        "(a) one-shot, then distil": {"schedule": "one_shot", "start_step": WINDOW},
        "(c) iterative: 2 rounds (first, half-way)": {
            "schedule": "linear",
            "start_step": WINDOW,
            "end_step": half,
            "every_n_steps": half - WINDOW,
        },
        "(b) while distilling: 3 rounds over the first third": {"schedule": "cubic", **rounds(WINDOW, budget // 3, 3)},
        "(b) while distilling: 6 rounds over the first half": {"schedule": "cubic", **rounds(WINDOW, half, 6)},
    }


def make_pruner(budget: int, method: str) -> Any:
    return lightning_prune.OBSPruning(
        TARGET, pattern="channels", num_batches=WINDOW, eval_batches=0, verbose=0, **schedules(budget)[method]
    )


def run(folder: Path, budget: int, method: str, seed: int, curve: bool) -> dict[str, Any]:
    """One fit of ``budget`` steps: the pruner of ``method`` (or the reference's shrunk model) and
    ``Distillation`` from the dense model; test perplexity at the end (and every budget / 6 steps if ``curve``)."""
    import lightning.pytorch as pl

    ids = torch.load(folder / "eval.pt")[: budget_lm.EVAL_WINDOWS]
    model_args = {k: v for k, v in budget_lm.PLAN["model"].items() if k not in ("lr", "warmup_steps")}
    dm, lit, ft = lm.finetuning_setup({**budget_lm.PLAN, "model": model_args, "finetune": budget}, folder)
    dm.seed = seed  # the batch order, hence every capture window
    teacher = copy.deepcopy(lit.model).eval()
    callbacks: list[Any] = []
    pruner = None
    if method == REFERENCE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calib = lm.calibration_batches(folder)
            lit.model = lightning_prune.shrink_to(lit.model, calib, 1 - TARGET, verbose=0).model
    else:
        pruner = make_pruner(budget, method)
        callbacks.append(pruner)
    callbacks.append(lightning_prune.Distillation(teacher=teacher))
    every = max(budget // CURVE_POINTS, 1)
    points: list[tuple[int, float]] = []

    class Curve(pl.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            if curve and trainer.global_step % every == 0 and trainer.global_step < budget:
                module.eval()
                points.append((trainer.global_step, lm.perplexity(module.model, ids)))
                module.train()

    lit.train()
    trainer = common.trainer(max_steps=ft, max_epochs=-1, callbacks=[*callbacks, Curve()], limit_val_batches=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lit, datamodule=dm)
    seconds = time.perf_counter() - start
    ppl = lm.perplexity(lit.model.eval(), ids)
    points.append((budget, ppl))
    small = lightning_prune.shrink(lit.model, example_inputs={"input_ids": ids[:4]}).model
    return {
        "budget": budget,
        "method": method,
        "seed": seed,
        "ppl": ppl,
        "curve": points,
        "params": budget_lm.non_embedding(small),
        "seconds": seconds,
        "round_seconds": sum(h["seconds"] for h in pruner.history) if pruner else 0.0,
        "rounds": [(h["global_step"], round(h["sparsity"], 4)) for h in pruner.history] if pruner else [],
        "schedule": schedules(budget).get(method, {}),
    }


def cell_name(budget: int, method: str, seed: int) -> str:
    return f"{budget}-{method.split(')')[0].strip('(')}-{common.fingerprint(method)}-s{seed}"


def cell(folder: Path, budget: int, method: str, seed: int) -> dict[str, Any]:
    r = common.cell(cell_name(budget, method, seed), lambda: run(folder, budget, method, seed, curve=seed == 0), CELLS)
    print(
        f"{budget} steps, {method}, seed {seed}: ppl {r['ppl']:.2f}, params {r['params']:,}, {r['seconds']:.0f} s",
        flush=True,
    )
    return r


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def verdict(rows: list[dict[str, Any]], budgets: list[int]) -> list[str]:
    """Each (b) schedule against (a) and (c) at each budget on the seeds both ran (the same batches): the paired
    differences, and whether it wins beyond the seed spread (every seed better than the other's best seed; two
    seeds at least)."""
    lines = []
    for budget in budgets:
        by = {
            m: {r["seed"]: r["ppl"] for r in rows if r["budget"] == budget and r["method"] == m}
            for m in schedules(budget)
        }
        others = [m for m in by if not m.startswith("(b)") and by[m]]
        for m in [m for m in by if m.startswith("(b)") and by[m]]:
            parts, wins = [], []
            for o in others:
                seeds = sorted(set(by[m]) & set(by[o]))
                ours, theirs = [by[m][k] for k in seeds], [by[o][k] for k in seeds]
                wins.append(len(seeds) >= 2 and max(ours) < min(theirs))
                parts.append(
                    f"{o.split(':')[0].split(',')[0]}: {statistics.mean(ours):.2f} against "
                    f"{statistics.mean(theirs):.2f} "
                    f"over seeds {seeds}, per seed "
                    + " / ".join(f"{x - y:+.2f}" for x, y in zip(ours, theirs, strict=True))
                )
            beyond = "beyond the seed spread" if wins and all(wins) else "not beyond the seed spread"
            lines.append(f"- {budget} steps, {m}: " + "; ".join(parts) + f" ({beyond})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[30, 90])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reference", action="store_true", help="the shrink_to row (seed 0, every budget)")
    parser.add_argument("--methods", type=int, nargs="+", help="indexes into schedules(budget), in this order")
    parser.add_argument("--cached", action="store_true", help="publish the grid's runs done so far; run none")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    folder = lm.dense(budget_lm.PLAN, "budget")
    order = lambda b: [list(schedules(b))[i] for i in args.methods] if args.methods else list(schedules(b))  # noqa: E731
    grid = [(b, m, seed) for seed in args.seeds for b in args.budgets for m in order(b)]
    grid += [(b, REFERENCE, 0) for b in args.budgets] if args.reference else []
    if args.cached:
        done = [g for g in grid if (CELLS / f"{cell_name(*g)}.json").exists()]
        args.missing = [g for g in grid if g not in done]
        grid = done
    rows = [cell(folder, *g) for g in grid]  # seed-major: a cut grid still has every method at every budget
    GATHERED.parent.mkdir(exist_ok=True)
    GATHERED.write_text(json.dumps(rows, indent=1))
    publish(rows, args, time.perf_counter() - started, folder)


def publish(rows: list[dict[str, Any]], args: argparse.Namespace, seconds: float, folder: Path) -> None:
    budgets = args.budgets
    dense = json.loads((folder / "dense.json").read_text())
    table = []
    for budget in budgets:
        for method in [*schedules(budget), REFERENCE]:
            rs = sorted((r for r in rows if r["budget"] == budget and r["method"] == method), key=lambda r: r["seed"])
            if not rs:
                continue
            table.append(
                [
                    budget,
                    f"{budget * budget_lm.PLAN['data']['batch_size'] * budget_lm.PLAN['data']['seq_len']:,}",
                    method,
                    spread([r["ppl"] for r in rs]),
                    " / ".join(f"{r['ppl']:.2f}" for r in rs),
                    ", ".join(sorted({f"{r['params']:,}" for r in rs})),
                    f"{statistics.mean(r['seconds'] for r in rs):.0f}",
                    f"{statistics.mean(r['round_seconds'] for r in rs):.0f}",
                    ", ".join(str(p) for p, _ in rs[0]["rounds"]),
                ]
            )
    curves = []
    for budget in budgets:
        runs = [r for r in rows if r["seed"] == 0 and r["budget"] == budget]
        steps = sorted({s for r in runs for s, _ in r["curve"]})
        body = [[r["method"], *[f"{dict(map(tuple, r['curve']))[s]:.2f}" for s in steps]] for r in runs]
        curves += ["", common.md_table([f"{budget} steps", *[f"step {s}" for s in steps]], body)]
    command = f"python benchmarks/pwd_lm.py --budgets {' '.join(map(str, budgets))} --seeds " + " ".join(
        map(str, args.seeds)
    )
    missing = getattr(args, "missing", [])
    left_out = (
        " **Not run (out of time on the shared machine), left out:** "
        + "; ".join(f"{b} steps {m} seed {seed}" for b, m, seed in missing)
        + "."
        if missing
        else ""
    )
    budget_lm.publish(
        "pwd-lm",
        [
            "## Pruning while distilling against prune-then-distil, at equal token budgets",
            "",
            f"`{command}{' --reference' if args.reference else ''}` at `{common.commit()}` on {common.machine()} "
            f"({sum(r['seconds'] for r in rows) / 60:.0f} min of fits in all, this invocation {seconds / 60:.0f} min; "
            "runs cached in `benchmarks/.cache/pwd`, gathered in "
            "`benchmarks/out/pwd_lm.json`). The dense LLaMA of the budget tables (hidden 256, 8 blocks, 8 heads, "
            f"MLP 768, {dense['steps']} steps; test perplexity 62.53) loses {TARGET:.0%} of its non-embedding "
            "parameters to `OBSPruning(0.5, pattern='channels', num_batches="
            f"{WINDOW}, eval_batches=0)` (heads and MLP neurons, the structured default's global allocation) "
            "inside `Trainer.fit`, with `Distillation(teacher=dense)` (loss + KD at T=2) from the first step; "
            "every run of a budget has the same steps, batches (per seed), AdamW lr 1e-3 and warm-up; only the "
            f"pruner's step triggers differ. A round's curvature is the {WINDOW} training batches before it, so "
            f"every method's first round is at step {WINDOW} (the steps before it are identical for all). "
            "Tokens: steps x 16 windows x 64. Perplexity on the first "
            f"{budget_lm.EVAL_WINDOWS} test windows after the last step; mean (min-max) over the seeds (the seed "
            "sets the batch order, hence the capture windows). Params: non-embedding, counted after "
            "`lightning_prune.shrink` of the final model (dense: 6,820,096). Fit s: the whole fit, rounds "
            "included; round s: the pruner's rounds alone." + left_out,
            "",
            common.md_table(
                [
                    "steps",
                    "tokens",
                    "method",
                    "test ppl",
                    "per seed",
                    "params after",
                    "fit s",
                    "round s",
                    "round steps",
                ],
                table,
            ),
            "",
            f"Test perplexity along the fit, seed 0 (every budget / {CURVE_POINTS} steps; step 0 is the dense model, "
            "62.53; rows are masked, not yet shrunk):",
            "",
            *curves[1:],
            "",
            *verdict(rows, budgets),
        ],
    )


if __name__ == "__main__":
    main()
