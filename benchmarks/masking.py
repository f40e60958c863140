"""Cost of freezing pruned weights per step: exact zeros (bitwise AND / masked_fill_) vs the old multiply.

    python benchmarks/masking.py

The multiply (``torch._foreach_mul_`` by a 0/1 copy of the mask in the weight's dtype) was the
per-step masking until pruned entries had to be exactly 0.0 even when a weight or gradient is
NaN/inf (``nan * 0`` is NaN). This times, alternately in one run, that multiply, the bitwise AND of
the float's bits with an all-ones/all-zeros integer mask (what ``masks.apply_masks_`` does on the
CPU), and ``masked_fill_`` (what it does on other devices), on three model sizes, at 90% sparsity.
Writes the table into RESULTS.md.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch

from lightning_prune import masks as M

ROOT = Path(__file__).resolve().parent
MODELS = {
    "MLP 784-300-100-10": [(300, 784), (100, 300), (10, 100)],
    "12 x 1024x1024": [(1024, 1024)] * 12,
    "4 x 4096x4096": [(4096, 4096)] * 4,
}


def old_apply_masks_(params: dict, multipliers: dict) -> None:
    """``masks.apply_masks_`` before exact zeros: a fused multiply by the mask in the weight's dtype."""
    with torch.no_grad():
        names = [n for n in multipliers if n in params]
        torch._foreach_mul_([params[n].data for n in names], [multipliers[n] for n in names])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, reps: int) -> float:
    for _ in range(3):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps * 1e3


def measure(shapes: list[tuple[int, int]], device: str, rounds: int = 5) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(*s, generator=g).to(device) for s in shapes]
    keep = [(torch.rand(*s, generator=g) > 0.9).to(device) for s in shapes]
    floats = {str(i): m.to(w.dtype) for i, (m, w) in enumerate(zip(keep, weights))}
    exact = {str(i): M.multiplier(m, w) for i, (m, w) in enumerate(zip(keep, weights))}
    params = {str(i): w for i, w in enumerate(weights)}
    bools = dict(enumerate(keep))
    numel = sum(w.numel() for w in weights)
    reps = max(3, int(2e8 // numel))
    fns = {
        "multiply (old)": lambda: old_apply_masks_(params, floats),
        "exact (new)": lambda: M.apply_masks_(params, exact),
        "masked_fill_": lambda: [w.masked_fill_(~bools[i], 0.0) for i, w in enumerate(weights)],
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):  # alternate, take the median of each
        for name, fn in fns.items():
            times[name].append(time_ms(fn, device, reps))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [
        "| device | model | multiply (old), ms | exact (new), ms | new / old | masked_fill_, ms |",
        "|---|---|---|---|---|---|",
    ]
    for device in devices:
        for name, shapes in MODELS.items():
            t = measure(shapes, device)
            new = "exact (new)"
            lines.append(
                f"| {device} | {name} | {t['multiply (old)']:.3f} | {t[new]:.3f} | "
                f"{t[new] / t['multiply (old)']:.2f}x | {t['masked_fill_']:.3f} |"
            )
            print(lines[-1], flush=True)
    md = "\n".join(lines)
    block = (
        f"## Per-step masking: exact zeros vs the old multiply\n\n"
        f"`python benchmarks/masking.py` at `{common.commit()}` on {common.machine()}: one masking of all "
        "weights at 90% sparsity, median of 5 alternating rounds. On the CPU the new path is the bitwise AND; "
        "on other devices it is `masked_fill_`.\n\n"
        f"{md}"
    )
    common.write_block("masking", block)
    print(md)


if __name__ == "__main__":
    main()
