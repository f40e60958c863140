"""What a round costs per rank under FSDP2: memory, gathered bytes and time, sharded (2 CPU ranks) vs one process.

    python benchmarks/fsdp.py            # runs both sides (torch.distributed.run for the sharded one)

One ``prune()`` round (the same core as a round inside ``Trainer.fit``) on an MLP of 1024-wide
layers (about 3.7M weights, 15 MB), from 4 batches of 256 random samples, for magnitude, OBD
(empirical Fisher) and layer-wise OBS (the defaults). Sharded: ``fully_shard`` on every Linear and
the model, 2 gloo ranks, each with half of every batch. Per rank it reports:

* the weights it holds (its shards), and the criterion's statistics (every target layer, unsharded);
* the peak resident memory during ``prune()`` above the resident memory before it (sampled every
  millisecond from ``/proc/self/statm``, after ``malloc_trim`` and one untimed warm-up round; an
  upper bound of what the round held: freed memory may stay with the allocator);
* the bytes gathered from the shards (``sharding.gather``: whole layers, masks) and the largest
  single gather: what crosses the network besides the statistics' all-reduce;
* the round's wall time.

Writes the table between the ``<!-- fsdp:start -->`` markers of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

WIDTH, LAYERS, BATCH, BATCHES = 1024, 3, 256, 4
PAGE = os.sysconf("SC_PAGE_SIZE")


def model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(512, WIDTH), nn.ReLU()]
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 16))


def batches(rank: int, world: int) -> list:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(BATCHES):
        x, y = torch.randn(BATCH, 512, generator=g), torch.randint(0, 16, (BATCH,), generator=g)
        out.append((x[rank::world], y[rank::world]))
    return out


def pruners():
    from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning

    return {
        "magnitude": lambda: MagnitudePruning(0.7, verbose=0, eval_batches=BATCHES),
        "OBD (fisher, empirical)": lambda: OBDPruning(0.7, fisher_type="empirical", num_batches=BATCHES, verbose=0),
        "OBS (layer-wise)": lambda: OBSPruning(0.7, num_batches=BATCHES, verbose=0),
    }


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Peak:
    """Peak resident memory above the start, sampled on a thread."""

    def __enter__(self) -> Peak:
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def worker(out: str) -> None:
    """One rank (or the single process): every criterion, one round each, on a fresh model."""
    import torch.distributed as dist

    from lightning_prune import prune, sharding

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    gathered = {"bytes": 0, "largest": 0}
    plain_gather = sharding.gather

    def counting(p, part=None):
        t = plain_gather(p, part)
        if sharding.is_sharded(p):
            gathered["bytes"] += t.numel() * t.element_size()
            gathered["largest"] = max(gathered["largest"], t.numel() * t.element_size())
        return t

    sharding.gather = counting  # every caller goes through the module attribute
    rows = {}
    for name, make in [("warm-up", pruners()["magnitude"]), *pruners().items()]:  # first call: one-time costs
        net = model()
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for m in net:
                if isinstance(m, nn.Linear):
                    fully_shard(m, mesh=mesh)
            fully_shard(net, mesh=mesh)
        pruner = make()
        stats: list = []
        make_estimator = pruner.criterion.make_estimator

        def keep(*args, _make=make_estimator, **kwargs):
            est = _make(*args, **kwargs)
            stats.append(est)
            return est

        pruner.criterion.make_estimator = keep
        data = batches(rank, world)
        held = sum(sharding.local(p.detach()).numel() * 4 for p in net.parameters())
        gathered.update(bytes=0, largest=0)
        if world > 1:
            dist.barrier()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so RSS starts from what is live
        start = time.perf_counter()
        with Peak() as peak:
            prune(net, data, pruner, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
        seconds = time.perf_counter() - start
        est = stats[0] if stats else None
        stat_bytes = sum(t.numel() * t.element_size() for t in est.tensors()) if est is not None else 0
        rows[name] = {
            "held": held,
            "stats": stat_bytes,
            "peak": peak.peak - peak.start,
            "gathered": gathered["bytes"],
            "largest": gathered["largest"],
            "seconds": seconds,
            "sparsity": pruner.sparsity,
        }
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    if world > 1:
        dist.destroy_process_group()


READING = (
    "Reading: each rank holds half the weights; the statistics are replicated (every rank accumulates every "
    "layer's sums from its own batches: 1x the weights for OBD's Fisher diagonal, 3.3x for layer-wise OBS's "
    "diagonal + `d_in^2 + d_out^2`). Magnitude and OBD score their own rows, gather nothing, and their round "
    "peak (selection temporaries: the float64 keys and their sort, per local weight) about halves. Layer-wise OBS "
    "gathers each layer for its score and again for its solve (which rank j runs for every 2nd layer j, the "
    "ranks at the same time), but its peak stays at the one-process level: the replicated statistics, the "
    "re-estimated ones of `recompute_steps` and the float64 scores dominate, not the gathered layers."
)


def mb(b: float) -> str:
    return f"{b / 2**20:.1f}"


def main() -> None:
    import common

    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for label, cmd in (
            ("one process", [sys.executable, __file__, "--worker", f"{d}/one"]),
            (
                "FSDP2, 2 ranks",
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", __file__, "--worker", f"{d}/two"],
            ),
        ):
            Path(cmd[-1]).mkdir()
            subprocess.run(cmd, check=True, env=env)
            results[label] = [json.loads(p.read_text()) for p in sorted(Path(cmd[-1]).glob("rank*.json"))]
    full = model()
    weights = sum(p.numel() * 4 for p in full.parameters())
    largest = max(m.weight.numel() * 4 for m in full if isinstance(m, nn.Linear))
    body = []
    for name in pruners():
        for label, ranks in results.items():
            for rank, rows in enumerate(ranks):
                r = rows[name]
                body.append([name, label, rank, mb(r["held"]), mb(r["stats"]), mb(r["peak"]), mb(r["gathered"])])
                body[-1] += [mb(r["largest"]), f"{r['seconds']:.2f}", f"{r['sparsity']:.3f}"]
    header = ["criterion", "run", "rank", "weights held (MB)", "statistics (MB)", "peak extra RSS in the round (MB)"]
    header += ["gathered (MB)", "largest gather (MB)", "round s", "sparsity"]
    body = (
        "## FSDP2: what a round costs per rank\n\n"
        f"`python benchmarks/fsdp.py` at `{common.commit()}` on {common.machine().split(', threads')[0]}, one thread "
        "per process. One `prune()` round (the core "
        f"a `Trainer.fit` round runs) on an MLP 512-{WIDTH}x{LAYERS + 1}-16 ({weights / 2**20:.1f} MB of float32 "
        f"parameters, largest layer {largest / 2**20:.1f} MB), {BATCHES} batches of {BATCH} random samples, "
        "target 0.7. FSDP2: `fully_shard` on every Linear and the model, 2 gloo ranks on this machine's 2 cores, "
        "each with half of every batch; the one-process run has the whole model and whole batches. Peak RSS is "
        "sampled every millisecond above the RSS before `prune()` (an upper bound: freed memory can stay with "
        "the allocator). Gathered: bytes that `sharding.gather` assembled from the shards (weights of one layer "
        "at a time, and bool masks).\n\n" + common.md_table(header, body) + "\n\n" + READING
    )
    print(body)
    common.write_block("fsdp", body)


if __name__ == "__main__":
    main()
