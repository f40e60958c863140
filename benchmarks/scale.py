"""OBS round time on one Linear layer against the floor, and peak extra memory.

    python benchmarks/scale.py [--dims 512,1024,2048,4096] [--reps 3] [--dtype float64] [--device cpu]

Floor: Cholesky + inverse of H + one d_row x d_col x d_col GEMM, the least any OBS method that
forms ``H^-1`` and touches every weight once can do. Solver: ``prepare_hessian`` (dead inputs,
damping, the upper factor of ``H^-1``) plus ``sparsegpt_prune`` (``solver="fast"``) at 50% sparsity, timed
alternately with the floor in the same process. Peak extra memory is the peak resident set (or
CUDA allocation) during the call minus what the inputs already held.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from lightning_prune.solvers.obc import prepare_hessian, sparsegpt_prune

BLOCK = 128


def timed(fn, device: torch.device) -> tuple[float, float]:
    """Seconds of ``fn()`` and the peak memory it added, in bytes (RSS on the CPU, allocations on CUDA)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        common.reset_peak_rss()
        base = common.rss_mib("VmRSS") * 2**20
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = common.rss_mib("VmHWM") * 2**20 - base
    return time.perf_counter() - start, peak


def problem(d: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    X = torch.randn(2 * d, d, generator=g, dtype=dtype)
    H = (X.T @ X / (2 * d)).to(device)
    W = torch.randn(d, d, generator=g, dtype=dtype).to(device)
    return W, H


def bench(d: int, reps: int, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    W, H = problem(d, dtype, device)
    counts = torch.full((d,), d // 2, device=device)
    forced = torch.zeros(d, d, dtype=torch.bool, device=device)

    def floor() -> None:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        (W @ Hinv).sum()

    def solver() -> None:
        U, W1, _, _ = prepare_hessian(H, W, 0.01, "bench")
        sparsegpt_prune(W1, U, counts, forced, blocksize=BLOCK)

    runs = common.alternated({"floor": lambda: timed(floor, device), "solver": lambda: timed(solver, device)}, reps)
    (f_times, f_mem), (s_times, s_mem) = (list(zip(*runs[k])) for k in ("floor", "solver"))
    return {
        "d": d,
        "floor_s": statistics.median(f_times),
        "solver_s": statistics.median(s_times),
        "ratio": statistics.median(s_times) / statistics.median(f_times),
        "floor_mem_mb": max(f_mem) / 2**20,
        "solver_mem_mb": max(s_mem) / 2**20,
        "layer_mb": W.numel() * W.element_size() / 2**20,
    }


def table(rows: list[dict[str, float]]) -> str:
    return common.md_table(
        ["d (rows = cols)", "solver / floor", "peak extra memory (solver)", "= x one d x d matrix"],
        [
            [r["d"], f"{r['ratio']:.2f}x", f"{r['solver_mem_mb']:.0f} MB", f"{r['solver_mem_mb'] / r['layer_mb']:.1f}"]
            for r in rows
        ],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="512,1024,2048,4096")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    rows = []
    for d in (int(x) for x in a.dims.split(",")):
        rows.append(bench(d, a.reps, dtype, device))
        print(
            f"  d={d}: solver/floor {rows[-1]['ratio']:.2f}x, peak extra {rows[-1]['solver_mem_mb']:.0f} MB", flush=True
        )
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\nOBS fast solver, one round at 50% sparsity, {a.dtype} on {name}:\n")
    print(table(rows))


if __name__ == "__main__":
    main()
