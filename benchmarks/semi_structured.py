"""2:4 inference speed-up on a GPU: a transformer MLP block, dense vs semi-structured, in one run.

    python benchmarks/semi_structured.py            # needs a CUDA GPU (compute capability >= 8.0)

The block is LLaMA-7B's MLP (4096 -> 11008 -> 4096, SiLU-gated), fp16, pruned 2:4 with magnitude
(the kernels' speed does not depend on which weights are zero), exported with
:func:`lightning_prune.export_semi_structured`. Dense and sparse forwards alternate, each timed with
CUDA events over ``--iters`` calls after a warm-up; the table gives the median of ``--repeats``
alternations per batch size (tokens), and the speed-up ratio. Writes the table between the
``<!-- semi:start -->`` markers of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from lightning_prune import MagnitudePruning, export_semi_structured, prune


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate, self.up, self.down = (
            nn.Linear(d, hidden, bias=False),
            nn.Linear(d, hidden, bias=False),
            nn.Linear(hidden, d, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def timed(module: nn.Module, x: torch.Tensor, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            module(x)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=11008)
    p.add_argument("--tokens", default="16,128,512,2048,8192")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("semi_structured.py needs a CUDA GPU: 2:4 kernels do not run on the CPU")
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    dense = MLP(a.d, a.hidden).cuda()
    prune(dense, [torch.randn(8, a.d, device="cuda")], MagnitudePruning(0.5, pattern="2:4", verbose=0))
    dense = dense.to(dtype)
    sparse = copy.deepcopy(dense)
    export_semi_structured(sparse)
    rows = []
    for tokens in [int(t) for t in a.tokens.split(",")]:
        x = torch.randn(tokens, a.d, device="cuda", dtype=dtype)
        ms = common.alternated(
            {"dense": lambda: timed(dense, x, a.iters), "2:4": lambda: timed(sparse, x, a.iters)}, a.repeats
        )
        d, s = statistics.median(ms["dense"]), statistics.median(ms["2:4"])
        rows.append([tokens, f"{d:.3f}", f"{s:.3f}", f"{d / s:.2f}x"])
        print(rows[-1], flush=True)
    name = torch.cuda.get_device_name()
    table = (
        f"2:4 MLP block {a.d}->{a.hidden}->{a.d} (SiLU-gated), {a.dtype}, {name}, torch {torch.__version__}; "
        f"median of {a.repeats} alternations of {a.iters} calls\n\n"
        + common.md_table(["tokens", "dense ms", "2:4 ms", "speed-up"], rows)
        + "\n\n`python benchmarks/semi_structured.py`"
    )
    print(table)
    common.write_block("semi", table)


if __name__ == "__main__":
    main()
