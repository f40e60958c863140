"""The GPU run, prepared and one command long: one JSON line per measurement, under 8 minutes on one H100/H200.

    python benchmarks/gpu.py                 # on a CUDA machine; writes $OUT/gpu.jsonl (else benchmarks/out/gpu/)
    python benchmarks/gpu.py --dry-run       # the same code on the CPU with tiny shapes, in seconds (the tests run it)

Measurements, in this order (the most wanted first, as the time budget may cut the last ones):

* ``export_semi_structured``: a 4096 x 11008 Linear (LLaMA-7B's ``down_proj``) pruned 2:4 by magnitude, in bf16,
  converted with :func:`lightning_prune.export_semi_structured`: the converted layer's outputs against the dense layer
  with zeros (relative error) and both layers' ms per call at several token counts (alternated, medians);
* ``sparsegpt_7b``: ``SparseGPT(0.5)`` through ``prune(model, batches, pruner, device="cuda")`` on a LLaMA-2-7B-shaped
  random-init model (hidden 4096, 32 blocks, 32 heads, MLP 11008, vocab 32000) in bf16 held on the CPU: seconds,
  peak GPU memory (``torch.cuda.max_memory_allocated``, reset before) and peak CPU memory above the model (``VmHWM``
  reset through ``clear_refs`` before, less ``VmRSS`` then);
* ``defaults_1b``: the defaults, ``OBSPruning(0.5)`` (its core ``Pruner(OBS(), 0.5)``: ``prune()`` plans them block by
  block), against ``SparseGPT(0.5)`` on the same 1B-shaped model (hidden 2048, 16 blocks, 16 heads, MLP 5632), both
  with ``device="cuda"`` from the CPU: the same three figures for each;
* ``prefill_decode_1b``: a width-shrunk 1B-shaped model against its dense parent, on the GPU in bf16: half the heads
  and MLP neurons pruned by magnitude (``pattern="channels"``), removed by ``shrink``, saved and loaded back with
  ``from_pretrained``; prefill tokens/s (batch 1 x 2048 tokens) and decode tokens/s (``generate`` of 128 new tokens
  with the KV cache), medians of alternated repetitions. The weights are random: a width-shrunk checkpoint's speed
  depends on the sizes it kept, not on which channels went;
* ``llmcompressor_7b``: llm-compressor's SparseGPT (``benchmarks/lm_peer.py``, in a subprocess) on the same model (same
  seed and init, the weights' checksum is in both lines), saved to a temporary folder, with the same calibration
  tokens; skipped where ``llmcompressor`` does not import (the GPU machine has no network to install it).

Every line has ``measurement``, ``device``, ``torch``, ``commit`` (``unknown`` where the copy has no ``.git``; then
``source``, a hash of ``lightning_prune/`` and this script, names the code), ``seconds`` and the figures, or
``skipped`` with the reason (a missing package, no CUDA, the time budget, a failure with its traceback's tail).
Calibration: ``--calib`` rows of random tokens (default 32 x 512), one row per batch, the same for both pruners.

On a GPU each measurement runs in its own process (``--isolate``, the default there) under a hard time limit: the
budget (``--budget``, 450 s) less the minimum kept for the measurements after it; a process past its limit is killed
and its line says so, with the last lines of its log (``<out>/logs/<measurement>.log``). ``--dry-run`` runs them in
this process (tiny shapes: hidden 64, 2 blocks), where the 2:4 export refuses the CPU and says so in its line.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

# this copy of the library first (the GPU machine has it installed nowhere), and the harness's process.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from process import alternated, commit, reset_peak_rss, rss_mib

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
MARK = "@@gpu.py-line "  # a child's result line on its stdout, among whatever the libraries print
TARGET = 0.5
SEED = 0
ITERS = 20  # calls of the 2:4 layer per timing
PEER = ROOT / "lm_peer.py"  # llm-compressor's side, run in its own process


@dataclass(frozen=True)
class Sizes:
    """A LLaMA shape (multi-head attention: as many key/value heads as heads, as LLaMA-2-7B)."""

    hidden: int
    layers: int
    heads: int
    mlp: int
    vocab: int


@dataclass(frozen=True)
class Setup:
    """What every measurement reads: the device, the shapes and repetitions, the time left."""

    device: str
    dry_run: bool
    big: Sizes
    small: Sizes
    calib: tuple[int, int]  # rows, tokens per row
    prefill: int  # tokens of the prefill (batch 1)
    prompt: int  # tokens of the prompt before decoding
    decode: int  # new tokens generated
    reps: int  # alternated repetitions of each timing
    layer: tuple[int, int]  # the 2:4 layer's (out, in) features
    export_tokens: tuple[int, ...]
    out: Path
    deadline: float  # time.time() by which the measurement must end


GPU_SETUP = dict(
    big=Sizes(4096, 32, 32, 11008, 32000),
    small=Sizes(2048, 16, 16, 5632, 32000),
    prefill=2048,
    prompt=128,
    decode=128,
    reps=5,
    layer=(4096, 11008),
    export_tokens=(16, 512, 4096),
)
DRY_SETUP = dict(
    big=Sizes(64, 2, 4, 128, 256),
    small=Sizes(64, 2, 4, 128, 256),
    prefill=32,
    prompt=8,
    decode=4,
    reps=2,
    layer=(64, 128),
    export_tokens=(16,),
)


class Skipped(Exception):
    """A measurement that cannot run here (a package, the device); ``figures``: what it measured before that."""

    def __init__(self, why: str, **figures: Any) -> None:
        super().__init__(why)
        self.figures = figures


# ---------------------------------------------------------------------------------------- helpers
def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda" and "torch" in sys.modules:
        sys.modules["torch"].cuda.empty_cache()


def describe(sizes: Sizes) -> dict[str, int]:
    return {
        "hidden": sizes.hidden,
        "layers": sizes.layers,
        "heads": sizes.heads,
        "mlp": sizes.mlp,
        "vocab": sizes.vocab,
    }


def build_llama(sizes: Sizes, setup: Setup, where: str) -> Any:
    """A random-init ``LlamaForCausalLM`` of ``sizes`` in bf16, put on ``where``.

    Built on the run's device (on a GPU the 7B initialises in a second; the CPU would take minutes) with bf16 as
    the default dtype (the rotary ``inv_freq`` is float32 anyway, as in ``from_pretrained``), then moved: the same
    seed gives the same weights in every process.
    """
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=sizes.vocab,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.mlp,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(setup.device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model = model.to(where).eval()
    free(setup.device)
    return model


def checksum(model: Any) -> float:
    """A cheap fingerprint of the weights (embedding and first query projection, summed in float64)."""
    inner = model.model
    weights = (inner.embed_tokens.weight, inner.layers[0].self_attn.q_proj.weight)
    return float(sum(w.detach().double().sum() for w in weights))


def token_rows(setup: Setup, vocab: int) -> Any:
    import torch

    rows, tokens = setup.calib
    return torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(SEED + 1))


def pruned_with(model: Any, batches: list[Any], pruner: Any, setup: Setup) -> dict[str, Any]:
    """``prune(model, batches, pruner, device=...)`` timed; its peak GPU memory and peak CPU memory above before."""
    import torch

    from lightning_prune import prune

    free(setup.device)
    cuda = setup.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    gpu_before = torch.cuda.memory_allocated() if cuda else 0
    reset_peak_rss()  # then the baseline: the peak mark, reset to the resident pages now, can only be at or above it
    rss_before = rss_mib()
    start = time.perf_counter()
    record = prune(model, batches, pruner, device=setup.device, num_batches=len(batches))
    sync(setup.device)
    seconds = time.perf_counter() - start
    return {
        "prune_seconds": round(seconds, 3),
        "peak_gpu_mib": round((torch.cuda.max_memory_allocated() - gpu_before) / 2**20, 1) if cuda else None,
        "peak_gpu_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1) if cuda else None,
        "peak_cpu_above_model_mib": round(rss_mib("VmHWM") - rss_before, 1),
        "rss_before_mib": round(rss_before, 1),
        "sparsity": round(float(record["sparsity"]), 5),
        "plan": (record.get("info") or {}).get("plan"),
    }


def timed(fn: Callable[[], Any], device: str) -> float:
    """Wall seconds of one call, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternated_medians(calls: dict[str, Callable[[], Any]], reps: int, device: str) -> dict[str, float]:
    """Median seconds of each call over ``reps`` rounds, all called in turn each round (reversed on odd rounds, so
    none always goes first), after one warm-up call each."""
    for fn in calls.values():
        fn()
    seconds = alternated({k: partial(timed, fn, device) for k, fn in calls.items()}, reps, swap=True)
    return {k: statistics.median(v) for k, v in seconds.items()}


# ---------------------------------------------------------------------------------------- measurements
def export_2_4(setup: Setup) -> dict[str, Any]:
    """A 2:4 Linear, dense with zeros against exported: relative error of the outputs, ms per call."""
    import torch

    from lightning_prune import Pruner, export_semi_structured, prune
    from lightning_prune.criteria import Magnitude
    from lightning_prune.surgery.export import is_two_four

    out_f, in_f = setup.layer
    torch.manual_seed(SEED)
    dense = torch.nn.Linear(in_f, out_f, bias=False, device=setup.device)
    pruner = Pruner(Magnitude(), TARGET, pattern="2:4", verbose=0)
    prune(dense, [torch.randn(8, in_f, device=setup.device)], pruner, num_batches=1)
    dense = dense.to(torch.bfloat16).requires_grad_(False)
    figures: dict[str, Any] = {"shape": [out_f, in_f], "dtype": "bfloat16", "two_four": is_two_four(dense.weight)}
    if setup.device == "cuda" and torch.cuda.get_device_capability() < (8, 0):
        raise Skipped(f"2:4 kernels need compute capability >= 8.0, this GPU has {torch.cuda.get_device_capability()}")
    sparse = copy.deepcopy(dense)
    try:
        figures["converted"] = export_semi_structured(sparse)
    except RuntimeError as err:  # the CPU (the dry run): the library's own refusal
        raise Skipped(f"export_semi_structured refused: {err}", **figures) from err
    x = torch.randn(max(setup.export_tokens), in_f, device=setup.device, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected, got = dense(x).float(), sparse(x).float()
    figures["relative_error"] = float((got - expected).norm() / expected.norm())
    figures["backend"] = next((c.__name__ for c in type(sparse.weight).__mro__ if "SemiStructured" in c.__name__), None)
    rows = []
    with torch.inference_mode():
        for tokens in setup.export_tokens:
            calls = {"dense": repeated(dense, x[:tokens]), "2:4": repeated(sparse, x[:tokens])}
            med = alternated_medians(calls, setup.reps, setup.device)
            d, s = med["dense"] / ITERS * 1e3, med["2:4"] / ITERS * 1e3
            rows.append({"tokens": tokens, "dense_ms": round(d, 4), "two_four_ms": round(s, 4), "speedup": d / s})
    return {**figures, "timings": rows, "timing": f"medians of {setup.reps} alternations of {ITERS} calls each"}


def repeated(layer: Any, x: Any) -> Callable[[], None]:
    """``ITERS`` calls of ``layer`` on ``x``: one timing (a single call of a layer is too short to time)."""

    def call() -> None:
        for _ in range(ITERS):
            layer(x)

    return call


def sparsegpt_big(setup: Setup) -> dict[str, Any]:
    """SparseGPT(0.5) on the 7B-shaped model held on the CPU, one block at a time on the device."""
    from lightning_prune import SparseGPT

    model = build_llama(setup.big, setup, "cpu")
    ids = token_rows(setup, setup.big.vocab)
    figures = {
        "model": describe(setup.big),
        "params": sum(p.numel() for p in model.parameters()),
        "weights_checksum": checksum(model),
        "calibration": f"{ids.shape[0]} x {ids.shape[1]} random tokens, one row per batch",
        "pruner": f"SparseGPT({TARGET}, eval_batches=0)",
    }
    batches = [{"input_ids": row[None]} for row in ids]
    pruner = SparseGPT(TARGET, eval_batches=0, verbose=0 if setup.dry_run else 1)
    return {**figures, **pruned_with(model, batches, pruner, setup)}


def defaults_small(setup: Setup) -> dict[str, Any]:
    """The defaults (``OBSPruning(0.5)``'s core pruner) against ``SparseGPT(0.5)``, each on a copy of one model."""
    from lightning_prune import Pruner, SparseGPT
    from lightning_prune.criteria import OBS

    model = build_llama(setup.small, setup, "cpu")
    ids = token_rows(setup, setup.small.vocab)
    batches = [{"input_ids": row[None]} for row in ids]
    verbose = 0 if setup.dry_run else 1
    pruners = {
        "sparsegpt": lambda: SparseGPT(TARGET, eval_batches=0, verbose=verbose),
        "defaults": lambda: Pruner(OBS(), TARGET, eval_batches=0, verbose=verbose),
    }
    results = {}
    for name, make in pruners.items():
        copy_ = copy.deepcopy(model)
        results[name] = pruned_with(copy_, batches, make(), setup)
        del copy_
        free(setup.device)
    return {
        "model": describe(setup.small),
        "params": sum(p.numel() for p in model.parameters()),
        "calibration": f"{ids.shape[0]} x {ids.shape[1]} random tokens, one row per batch",
        "pruners": {"sparsegpt": f"SparseGPT({TARGET})", "defaults": f"OBSPruning({TARGET}) = Pruner(OBS(), {TARGET})"},
        **results,
        "time_ratio_defaults_to_sparsegpt": results["defaults"]["prune_seconds"]
        / results["sparsegpt"]["prune_seconds"],
    }


def shrunk_checkpoint(dense: Any, setup: Setup) -> Any:
    """Half the heads and MLP neurons of every block pruned by magnitude and removed, saved with
    ``save_pretrained`` and loaded back with ``from_pretrained``: the width-shrunk checkpoint a user deploys."""
    import torch
    import transformers

    from lightning_prune import Pruner, prune, shrink
    from lightning_prune.criteria import Magnitude

    model = copy.deepcopy(dense)
    ids = token_rows(replace(setup, calib=(1, 8)), setup.small.vocab).to(setup.device)
    pruner = Pruner(Magnitude(), TARGET, pattern="channels", eval_batches=1, verbose=0)
    prune(model, [{"input_ids": ids}], pruner, num_batches=1)
    folder = Path(tempfile.mkdtemp(prefix="gpu-shrunk-"))
    try:
        shrink(model, inplace=True).save_pretrained(folder)
        del model
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return loaded.to(device=setup.device, dtype=torch.bfloat16).eval()


def decode_speed(setup: Setup) -> dict[str, Any]:
    """Prefill and decode tokens/s of the dense 1B-shaped model and of its width-shrunk copy."""
    import inspect

    import torch

    dense = build_llama(setup.small, setup, setup.device)
    small = shrunk_checkpoint(dense, setup)
    g = torch.Generator().manual_seed(SEED + 2)
    prefill = torch.randint(0, setup.small.vocab, (1, setup.prefill), generator=g).to(setup.device)
    prompt = torch.randint(0, setup.small.vocab, (1, setup.prompt), generator=g).to(setup.device)
    known = inspect.signature(dense.forward).parameters  # transformers >= 4.45 computes the last logits alone
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in known), None)
    last = {keep: 1} if keep else {}
    logits = f"logits of the last token ({keep}=1)" if keep else "logits of every token"
    n = setup.decode

    def forward(model: Any) -> Callable[[], Any]:
        return lambda: model(input_ids=prefill, use_cache=False, **last)

    def generate(model: Any) -> Callable[[], Any]:
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)

    with torch.inference_mode():
        pre = alternated_medians({"dense": forward(dense), "shrunk": forward(small)}, setup.reps, setup.device)
        dec = alternated_medians({"dense": generate(dense), "shrunk": generate(small)}, setup.reps, setup.device)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("dense", dense), ("shrunk", small))}
    cfg = small.config
    return {
        "model": describe(setup.small),
        "shrunk": {"heads": cfg.num_attention_heads, "mlp": cfg.intermediate_size, "hidden": cfg.hidden_size},
        "params": params,
        "prefill_tokens_per_s": {k: setup.prefill / s for k, s in pre.items()},
        "decode_tokens_per_s": {k: n / s for k, s in dec.items()},
        "prefill_speedup": pre["dense"] / pre["shrunk"],
        "decode_speedup": dec["dense"] / dec["shrunk"],
        "how": (
            f"bf16 on {setup.device}; prefill: batch 1 x {setup.prefill} tokens, one forward without cache, "
            f"{logits}; decode: generate {n} new tokens (greedy, KV cache) after a "
            f"{setup.prompt}-token prompt, tokens/s = {n} / its seconds; medians of {setup.reps} alternated "
            "repetitions after a warm-up. The shrunk model is the checkpoint save_pretrained wrote, loaded with "
            "from_pretrained; its channels were chosen by magnitude on random weights: a width-shrunk "
            "checkpoint's speed depends on the sizes it kept, not on which channels went"
        ),
    }


def peer_big(setup: Setup) -> dict[str, Any]:
    """llm-compressor's SparseGPT on the same 7B-shaped model, saved to a temporary folder (lm_peer.py)."""
    import torch

    folder = Path(tempfile.mkdtemp(prefix="gpu-peer-"))
    try:
        model = build_llama(setup.big, setup, "cpu")
        figures = {"model": describe(setup.big), "weights_checksum": checksum(model)}
        model.save_pretrained(folder / "model")
        del model
        free(setup.device)
        ids = token_rows(setup, setup.big.vocab)
        torch.save(ids, folder / "calib.pt")
        torch.save(ids[:2, :64], folder / "eval.pt")
        cmd = [sys.executable, str(PEER), "--model", str(folder / "model")]
        cmd += ["--calib", str(folder / "calib.pt"), "--eval", str(folder / "eval.pt"), "--method", "sparsegpt"]
        cmd += ["--sparsity", str(TARGET), "--dtype", "bfloat16", "--out", str(folder / "result.json")]
        log = setup.out / "logs" / "llmcompressor_7b.peer.log"
        rc, tail = run_logged(cmd, log, setup.deadline - time.time() - 5)
        if rc != 0:
            why = "stopped at the time limit" if rc is None else f"lm_peer.py exited with {rc}"
            raise Skipped(f"{why}; its log ends: {tail}", **figures)
        r = json.loads((folder / "result.json").read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    above = None if r["peak_rss_oneshot_mib"] is None else r["peak_rss_oneshot_mib"] - r["rss_before_mib"]
    return {
        **figures,
        "calibration": f"{r['calib_rows']} x {r['seq_len']} random tokens, batch_size=1",
        "prune_seconds": r["seconds_oneshot"],
        "peak_gpu_mib": r.get("peak_gpu_mib"),
        "peak_cpu_above_model_mib": above,
        "sparsity": r["achieved_sparsity"],
        "cholesky_failures": r["cholesky_failures"],
        "llmcompressor": r["llmcompressor_version"],
        "pipeline": r["pipeline"],
    }


LLAMA = ("torch", "numpy", "transformers")


@dataclass(frozen=True)
class Measurement:
    name: str
    run: Callable[[Setup], dict[str, Any]]
    needs: tuple[str, ...]  # modules that must import
    floor: float  # seconds on a GPU below which it is not started (kept for it by those before it)


MEASUREMENTS = [
    Measurement("export_semi_structured", export_2_4, ("torch", "numpy"), 20),
    Measurement("sparsegpt_7b", sparsegpt_big, LLAMA, 90),
    Measurement("defaults_1b", defaults_small, LLAMA, 45),
    Measurement("prefill_decode_1b", decode_speed, LLAMA, 30),
    Measurement("llmcompressor_7b", peer_big, (*LLAMA, "llmcompressor", "datasets", "loguru"), 90),
]
BY_NAME = {m.name: m for m in MEASUREMENTS}


# ---------------------------------------------------------------------------------------- the run
def source_hash() -> str:
    """The code that measured, where the copy has no ``.git``: ``lightning_prune/`` and this script's bytes."""
    h = hashlib.sha1()
    for path in [*sorted((REPO / "lightning_prune").rglob("*.py")), Path(__file__).resolve()]:
        h.update(path.relative_to(REPO).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def missing_modules(names: tuple[str, ...]) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def header(dry_run: bool) -> dict[str, Any]:
    """The fields every line starts with: the device's name, torch's version, the code."""
    try:
        import torch
    except ImportError:
        device, version = "unknown (torch does not import)", None
    else:
        version = torch.__version__
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not dry_run else cpu_name()
    return {"device": device, "torch": version, "commit": commit(), "source": source_hash(), "dry_run": dry_run}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        name = "CPU"
    return f"cpu: {name}, {os.cpu_count()} logical CPUs"


def measure(m: Measurement, setup: Setup) -> dict[str, Any]:
    """Run one measurement here: its figures, or ``skipped`` with the reason (never raises)."""
    start = time.perf_counter()
    try:
        if missing := missing_modules(m.needs):
            raise Skipped(f"{', '.join(missing)} not importable here")
        figures = m.run(setup)
    except Skipped as s:
        figures = {**s.figures, "skipped": str(s)}
    except Exception as err:  # one measurement's failure must not lose the others
        tail = traceback.format_exc().strip().splitlines()[-12:]
        figures = {"skipped": f"failed: {type(err).__name__}: {err}", "traceback": tail}
    finally:
        free(setup.device)
    return {"seconds": round(time.perf_counter() - start, 3), **figures}


def run_logged(cmd: list[str], log: Path, limit: float) -> tuple[int | None, str]:
    """``cmd`` with its output in ``log``, killed with its whole process group after ``limit`` seconds: its exit
    code (``None`` when killed) and the last lines of its log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(limit, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    text = log.read_text(errors="replace")
    lines = [line.strip() for chunk in text.splitlines() for line in chunk.split("\r") if line.strip()]
    return rc, " | ".join(lines[-6:])[-1500:]


def in_child(m: Measurement, args: argparse.Namespace, limit: float) -> dict[str, Any]:
    """Run one measurement in its own process, killed after ``limit`` seconds; its line, or why there is none."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", m.name, "--out", str(args.out)]
    cmd += ["--calib", args.calib, "--deadline", str(time.time() + limit)] + (["--dry-run"] if args.dry_run else [])
    start = time.perf_counter()
    rc, tail = run_logged(cmd, args.out / "logs" / f"{m.name}.log", limit)
    seconds = round(time.perf_counter() - start, 3)
    lines = [line for line in (args.out / "logs" / f"{m.name}.log").read_text().splitlines() if line.startswith(MARK)]
    if lines:
        return {**json.loads(lines[-1][len(MARK) :]), "seconds_process": seconds}
    why = f"stopped at its time limit of {limit:.0f} s" if rc is None else f"its process exited with {rc}"
    return {"seconds": seconds, "skipped": f"{why}; its log ends: {tail}"}


def make_setup(args: argparse.Namespace, deadline: float) -> Setup:
    rows, tokens = (int(v) for v in args.calib.lower().split("x"))
    sizes = DRY_SETUP if args.dry_run else GPU_SETUP
    device = "cpu" if args.dry_run else "cuda"
    return Setup(device=device, dry_run=args.dry_run, calib=(rows, tokens), out=args.out, deadline=deadline, **sizes)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "out" / "gpu"
    p.add_argument("--out", type=Path, default=default_out, help="folder for gpu.jsonl and logs/ (default: $OUT)")
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU with tiny shapes")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 450; dry run 120)")
    p.add_argument("--only", default=None, help=f"comma-separated measurements, of {list(BY_NAME)}")
    p.add_argument("--calib", default=None, help="calibration ROWSxTOKENS (default 32x512; dry run 4x16)")
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each measurement in its own process under a hard time limit (default: on a GPU, not in a dry run)",
    )
    p.add_argument("--child", choices=list(BY_NAME), help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.budget = args.budget if args.budget is not None else (120.0 if args.dry_run else 450.0)
    args.calib = args.calib or ("4x16" if args.dry_run else "32x512")
    args.isolate = (not args.dry_run) if args.isolate is None else args.isolate
    parts = args.calib.lower().split("x")
    if len(parts) != 2 or not all(v.isdigit() and int(v) > 0 for v in parts):
        p.error(f"--calib must be ROWSxTOKENS with positive integers (e.g. 32x512), got {args.calib!r}")
    if not args.budget > 0:
        p.error(f"--budget must be a positive number of seconds, got {args.budget!r}")
    names = args.only.split(",") if args.only else list(BY_NAME)
    if unknown := [n for n in names if n not in BY_NAME]:
        p.error(f"--only names unknown measurements {unknown}; they are {list(BY_NAME)}")
    args.only = names
    return args


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the measurements (or one, as a child) and write one JSON line each to ``<out>/gpu.jsonl`` and stdout."""
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:  # one measurement, for the parent: its line on stdout after the mark
        line = measure(BY_NAME[args.child], make_setup(args, args.deadline or time.time() + args.budget))
        print(MARK + json.dumps(line), flush=True)
        return [line]
    deadline = time.time() + args.budget
    head = header(args.dry_run)
    chosen = [BY_NAME[n] for n in args.only]
    runnable = [m for m in chosen if not missing_modules(m.needs)]
    scale = 0.01 if args.dry_run else 1.0  # the floors are GPU seconds; the dry run's shapes take a hundredth
    no_cuda = not args.dry_run and not cuda_available()
    path = args.out / "gpu.jsonl"
    path.write_text("")
    lines = []
    for i, m in enumerate(chosen):
        kept = sum(x.floor * scale for x in chosen[i + 1 :] if x in runnable)
        limit = deadline - time.time() - kept
        if m not in runnable:
            figures = {"seconds": 0.0, "skipped": f"{', '.join(missing_modules(m.needs))} not importable here"}
        elif no_cuda:
            figures = {"seconds": 0.0, "skipped": "no CUDA device here: run it on a GPU machine, or pass --dry-run"}
        elif limit < m.floor * scale:
            figures = {
                "seconds": 0.0,
                "skipped": f"time budget: {max(limit, 0):.0f} s left for it ({kept:.0f} s kept for the ones after "
                f"it), and it needs at least {m.floor * scale:.0f} s",
            }
        elif args.isolate:
            print(f"gpu.py: {m.name}, in its own process, at most {limit:.0f} s", file=sys.stderr, flush=True)
            figures = in_child(m, args, limit)
        else:
            figures = measure(m, make_setup(args, time.time() + limit))
        line = {"measurement": m.name, **head, **figures}
        lines.append(line)
        text = json.dumps(line)
        print(text, flush=True)
        with open(path, "a") as f:
            f.write(text + "\n")
    return lines


if __name__ == "__main__":
    main()
