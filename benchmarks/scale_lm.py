"""Time and peak memory of one-shot pruning against llm-compressor, as LLaMA models grow.

    python benchmarks/scale_lm.py                  # 60M, 220M and 800M parameters (about an hour, one thread)
    python benchmarks/scale_lm.py --sizes 60m      # one size
    python benchmarks/scale_lm.py --ranks 60m      # also prune() under torchrun at 60M, 2 ranks x 1 thread
    python benchmarks/scale_lm.py --ranks 60m --fit 60m  # and the preset as a step round inside Trainer.fit
    python benchmarks/scale_lm.py --malloc 60m     # and the preset and the peer with glibc's mmap threshold fixed

Random-init LLaMAs (``save_pretrained``, float32; time and memory do not depend on training, quality
does: see lm.py and defaults_lm.py), 16 calibration sequences of 256 random tokens. Each cell runs in a
fresh process with one thread (``OMP_NUM_THREADS=1``), so the peak resident memory it measures is its
own: the peak mark is reset just before the call (``/proc/self/clear_refs``) and the figure is that
peak minus the resident memory just before (the loaded model, the interpreter and the libraries).

* ours, ``SparseGPT(0.5)``: the preset (block by block, fast solver, float32 solves), and the same
  with ``eval_batches=0`` (no loss measured before and after the round, as llm-compressor);
* ours, ``OBSPruning(0.5)``: the defaults as a user types them, through ``prune()`` (block by block,
  label-free, ``solver="auto"``: the most exact solver each layer's work budget allows);
* ``llm-compressor SparseGPT``: ``benchmarks/lm_peer.py`` in its own venv (``oneshot``'s sequential
  pipeline, ``SparseGPTModifier(sparsity=0.5)``), the llm-compressor section of lm.py.

``--ranks``: the same ``prune()`` calls under ``torch.distributed.run`` with two gloo processes of one
thread each (the machine's two cores): each rank calibrates on half of every batch and solves half of
each block's layers (``spread.py``); time and memory are rank 0's, the speed-up is against the
one-process row of the same method.

Ours measure the loss before and after on their last 8 batches (the default ``eval_batches``: two
forward passes of the whole model), which llm-compressor does not; the ``eval_batches=0`` row leaves
that out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

CACHE = common.CACHE / "scale_lm"
SIZES: dict[str, dict[str, int]] = {
    "60m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 16},
    "220m": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 4, "num_attention_heads": 16},
    "800m": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 4, "num_attention_heads": 32},
}
# sizes measured with the preset's eval_batches=0 row and the peer only (each cell about 10 minutes on one thread)
LARGE = {"800m"}
VOCAB, SEQ, ROWS, BATCH = 4096, 256, 16, 4
OURS = {
    "ours SparseGPT(0.5)": "sparsegpt",
    "ours SparseGPT(0.5, eval_batches=0)": "sparsegpt-noeval",
    "ours OBSPruning(0.5) defaults": "defaults",
}
PRUNERS = {  # worker method -> the pruner it measures
    "sparsegpt": lambda lp: lp.SparseGPT(0.5, verbose=0),
    "sparsegpt-noeval": lambda lp: lp.SparseGPT(0.5, eval_batches=0, verbose=0),
    "defaults": lambda lp: lp.OBSPruning(0.5, verbose=0),
}
PEER = "llm-compressor SparseGPT"
# glibc keeps freed blocks below its (self-raising) mmap threshold in its heap: with the threshold fixed low every
# large tensor is mapped and unmapped on its own, and the resident peak follows the tensors (rows with --malloc)
MALLOC = ", MALLOC_MMAP_THRESHOLD_=65536"
FIT = "ours SparseGPT(0.5, eval_batches=0), a step round in Trainer.fit"
RANKS = {  # row -> (worker method, one-process row it is compared with)
    "ours SparseGPT(0.5, eval_batches=0), 2 ranks": ("sparsegpt-noeval", "ours SparseGPT(0.5, eval_batches=0)"),
    "ours OBSPruning(0.5) defaults, 2 ranks": ("defaults", "ours OBSPruning(0.5) defaults"),
}


def model_dir(size: str) -> Path:
    """The saved random-init model of ``size`` and its calibration/eval token ids (made once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = CACHE / size
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dims = SIZES[size]
    cfg = LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=SEQ, num_key_value_heads=dims["num_attention_heads"], **dims
    )
    LlamaForCausalLM(cfg).save_pretrained(folder / "hf")
    g = torch.Generator().manual_seed(1)
    torch.save(torch.randint(0, VOCAB, (ROWS, SEQ), generator=g), folder / "calib.pt")
    torch.save(torch.randint(0, VOCAB, (2, SEQ), generator=g), folder / "eval.pt")
    (folder / "done").write_text("")
    return folder


def worker(method: str, folder: Path, out: Path) -> None:
    """One measurement of ours in this process: load, prune, write the JSON."""
    from transformers import LlamaForCausalLM

    import lightning_prune as lp

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    model = LlamaForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32).eval()
    ids = torch.load(folder / "calib.pt")
    batches = [  # under torchrun each rank takes its share of every batch
        {"input_ids": ids[i : i + BATCH][rank::world], "labels": ids[i : i + BATCH][rank::world]}
        for i in range(0, len(ids), BATCH)
    ]
    pruner = PRUNERS[method](lp)
    common.make_resident(model)
    before = common.rss_mib()
    common.reset_peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    record = lp.prune(model, batches, pruner)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    info = record["info"]
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank > 0:
        return
    out.write_text(
        json.dumps(
            {
                "seconds": wall,
                "cpu_seconds": cpu,
                "peak_extra_mib": common.rss_mib("VmHWM") - before,
                "rss_before_mib": before,
                "sparsity": record["sparsity"],
                "solver": info.get("solver"),
                "block_input_bytes": info.get("block_input_bytes"),
                "peak_hessian_bytes": info.get("peak_hessian_bytes"),
                "params": sum(p.numel() for p in model.parameters()),
            }
        )
    )


def fit_worker(folder: Path, out: Path) -> None:
    """The SparseGPT preset as a step round inside ``Trainer.fit`` (AdamW, batches of 4): peak memory of the
    round above the process at the round's start (model, gradients and optimizer state already there), and
    its seconds. The round calibrates on the 4 batches of the 4 training steps before it."""
    import lightning.pytorch as pl
    from transformers import LlamaForCausalLM

    import lightning_prune as lp

    model = LlamaForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32)
    ids = torch.load(folder / "calib.pt")
    batches = [{"input_ids": ids[i : i + BATCH], "labels": ids[i : i + BATCH]} for i in range(0, len(ids), BATCH)]
    loaded = common.rss_mib()

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-5)

    steps = len(batches)
    pruner = lp.SparseGPT(0.5, eval_batches=0, num_batches=steps, start_step=steps, schedule="one_shot", verbose=0)
    mark: dict[str, float] = {}

    class Before(pl.Callback):  # runs before the pruner's on_train_batch_end (callbacks run in list order)
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == steps:
                mark["rss"] = common.rss_mib()
                common.reset_peak_rss()
                mark["start"] = time.perf_counter()

    class After(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == steps:
                mark["seconds"] = time.perf_counter() - mark["start"]
                mark["peak"] = common.rss_mib("VmHWM")

    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Before(), pruner, After()],
    )  # fmt: skip
    trainer.fit(Lit(), train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    out.write_text(
        json.dumps(
            {
                "seconds": mark["seconds"],
                "peak_extra_mib": mark["peak"] - mark["rss"],
                "rss_before_mib": mark["rss"],
                "training_state_mib": mark["rss"] - loaded,
                "sparsity": pruner.sparsity,
                "solver": "fast",
                "params": sum(p.numel() for p in model.parameters()),
            }
        )
    )


def cell(name: str, size: str, folder: Path) -> dict[str, Any] | None:
    """Run (or read the cached) measurement ``name`` on ``size`` in a fresh one-thread process."""
    out = CACHE / (f"{size}-" + "".join(c if c.isalnum() or c in "-." else "_" for c in name) + ".json")
    if out.exists():
        return json.loads(out.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if name.endswith(MALLOC):
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        name = name.removesuffix(MALLOC)
    if name == PEER:
        from lm import PEER_VENV, make_peer_venv

        if not (PEER_VENV / "bin" / "python").exists() and not make_peer_venv():
            return None
        peer_out = out.with_suffix(".peer.json")
        cmd = [
            str(PEER_VENV / "bin" / "python"),
            str(Path(__file__).parent / "lm_peer.py"),
            "--model",
            str(folder / "hf"),
        ]
        cmd += ["--calib", str(folder / "calib.pt"), "--eval", str(folder / "eval.pt"), "--method", "sparsegpt"]
        cmd += ["--sparsity", "0.5", "--out", str(peer_out)]
    elif name == FIT:
        cmd = [sys.executable, __file__, "--worker", "fit", "--model", str(folder), "--out", str(out)]
    elif name in RANKS:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", __file__]
        cmd += ["--worker", RANKS[name][0], "--model", str(folder), "--out", str(out)]
    else:
        cmd = [sys.executable, __file__, "--worker", OURS[name], "--model", str(folder), "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"FAILED {name} {size}:\n{proc.stderr[-3000:]}", flush=True)
        return None
    if name == PEER:
        r = json.loads(peer_out.read_text())
        result = {
            "seconds": r["seconds_oneshot"],
            "cpu_seconds": r.get("cpu_seconds_oneshot"),
            "peak_extra_mib": r["peak_rss_oneshot_mib"] - r["rss_before_mib"],
            "sparsity": r.get("achieved_sparsity"),
        }
        out.write_text(json.dumps(result))
    result = json.loads(out.read_text())
    result["commit"] = common.commit()  # cells are cached: each row says which code it measured
    out.write_text(json.dumps(result))
    took = time.perf_counter() - start
    print(f"{size} {name}: {result['seconds']:.1f} s, {result['peak_extra_mib']:.0f} MiB ({took:.0f} s)", flush=True)
    return result


def plot(per_size: dict[str, tuple[int, dict[str, dict[str, Any] | None]]]) -> None:
    """Seconds and peak extra MiB against parameters, one line per method: ``benchmarks/scale_lm.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = dict.fromkeys(n for _, results in per_size.values() for n, r in results.items() if r)
    for name in names:
        points = sorted((params, r) for params, res in per_size.values() if (r := res.get(name)))
        for ax, key in zip(axes, ("seconds", "peak_extra_mib")):
            ax.plot([p / 1e6 for p, _ in points], [r[key] for _, r in points], marker="o", label=name)
    for ax, label in zip(axes, ("seconds (one thread per process)", "peak MiB above the loaded model")):
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("One-shot 50% on random-init LLaMAs: ours against llm-compressor's SparseGPT")
    fig.tight_layout()
    fig.savefig(common.ROOT / "scale_lm.png", dpi=110)


def ratio_to_peer(results: dict[str, dict[str, Any] | None], name: str, key: str, skip: tuple[str, ...]) -> str:
    """``key`` of row ``name`` over the peer's measured the same way (a row with the fixed mmap threshold: over
    the peer's row with it); blank for the rows in ``skip`` and where either figure is missing."""
    peer, r = results.get(PEER + MALLOC if name.endswith(MALLOC) else PEER), results[name]
    if name in skip or not (peer and r and peer.get(key) and r.get(key)):
        return ""
    return f"{r[key] / peer[key]:.2f}x"


def speedup(results: dict[str, dict[str, Any] | None], name: str) -> str:
    if name not in RANKS:
        return ""
    one, two = results.get(RANKS[name][1]), results[name]
    return f"{one['seconds'] / two['seconds']:.2f}x" if one and two else ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--worker")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--fit", default="", help="sizes that also get the Trainer.fit round row, e.g. 60m")
    parser.add_argument("--ranks", default="", help="sizes that also get the 2-rank rows (torchrun), e.g. 60m")
    parser.add_argument("--malloc", default="", help="sizes that also get the rows with glibc's mmap threshold fixed")
    a = parser.parse_args()
    if a.worker:
        (fit_worker if a.worker == "fit" else lambda f, o: worker(a.worker, f, o))(a.model, a.out)
        return
    rows = []
    per_size: dict[str, tuple[int, dict[str, dict[str, Any] | None]]] = {}
    for size in a.sizes.split(","):
        folder = model_dir(size)
        names = ["ours SparseGPT(0.5, eval_batches=0)"] if size in LARGE else [*OURS]
        names = [*names, *(RANKS if size in a.ranks.split(",") else []), *([FIT] if size in a.fit.split(",") else [])]
        names.append(PEER)
        if size in a.malloc.split(","):
            names += [f"ours SparseGPT(0.5, eval_batches=0){MALLOC}", PEER + MALLOC]
        results = {name: cell(name, size, folder) for name in names}
        params = next((r["params"] for r in results.values() if r and "params" in r), None)
        if params:
            per_size[size] = (params, results)
        model_mib = (params or 0) * 4 / 2**20
        peer = results[PEER]
        for name, r in results.items():
            if r is None:
                continue
            extra = ""
            if r.get("training_state_mib"):
                held = r["training_state_mib"]
                extra = f"the process held {held:.0f} MiB above the loaded model at the round's start"
            elif r.get("block_input_bytes"):
                inputs, hessian = r["block_input_bytes"] / 2**20, r["peak_hessian_bytes"] / 2**20
                extra = f"block inputs {inputs:.0f} MiB, widest Hessian {hessian:.0f} MiB"
            rows.append(
                [
                    f"{size} ({params / 1e6:.0f}M, {model_mib:.0f} MiB)" if params else size,
                    name,
                    f"{r['seconds']:.1f}",
                    f"{r['cpu_seconds']:.1f}" if r.get("cpu_seconds") else "",
                    # CPU seconds: steadier than wall time on a shared machine (one thread each)
                    ratio_to_peer(results, name, "cpu_seconds", (PEER, PEER + MALLOC, *RANKS)),
                    f"{r['peak_extra_mib']:.0f}",
                    f"{r['seconds'] / peer['seconds']:.2f}x" if peer and name != PEER else "",
                    speedup(results, name),
                    ratio_to_peer(results, name, "peak_extra_mib", (PEER, FIT, PEER + MALLOC)),
                    r.get("solver") or "",
                    extra,
                    r.get("commit", ""),
                ]
            )
    plot(per_size)
    header = ["model", "method", "seconds", "CPU s", "CPU vs peer", "peak extra MiB", "time vs peer", "2-rank speed-up"]
    header += ["memory vs peer"]
    header += ["solver", "held", "commit"]
    body = "\n\n".join(
        [
            "## Scale: time and peak memory of one-shot pruning against llm-compressor",
            "`python benchmarks/scale_lm.py --ranks 60m --fit 60m --malloc 60m,220m` on "
            f"{common.machine()} (cells cached: the commit column says which code each row measured); one thread "
            "per cell (`OMP_NUM_THREADS=1`), each cell a fresh process. "
            "Random-init LLaMAs (4 blocks, vocabulary 4096, float32), 16 calibration sequences of 256 tokens, 50% "
            "unstructured. Peak extra MiB: resident memory above the loaded model during the call, its weights read "
            "once before the baseline in ours and llm-compressor's alike (`from_pretrained` maps safetensors lazily: "
            "rows without this counted the model's own pages as the round first read them) (rank 0's in the "
            "2-rank rows: `torchrun --nproc_per_node=2`, one thread each, half of every batch per rank). 2-rank "
            "speed-up: the one-process row's seconds over the 2-rank row's. Trainer.fit row: the preset as a step "
            "round after 4 AdamW steps, its peak above the process at the round's start (which held the model, "
            "gradients, optimizer state and the allocator's pages of the steps' activations: the round fits in them), "
            "calibrated on the 4 training batches. Rows ending `MALLOC_MMAP_THRESHOLD_=65536`: the same cell with "
            "glibc's mmap threshold fixed at 64 KiB (it otherwise rises to 32 MiB as large blocks are freed, and "
            "the freed blocks stay in its heap), compared with the peer's row measured the same way. The 800M "
            "rows: random init, for time and memory only, the preset without the loss before/after and the peer.",
            common.md_table(header, rows),
            "![time and peak memory against model size](scale_lm.png)",
        ]
    )
    common.write_block("scale-lm", body)
    print(body)


if __name__ == "__main__":
    main()
