"""``prune()`` under ``torch.distributed`` (run by tests/test_prune.py through ``torch.distributed.run``).

    python -m torch.distributed.run --nproc_per_node=2 tests/prune_job.py --out DIR

Every rank prunes the same model (``model()``) from its own half of every batch (rank r: samples
r, r + 2, ...) and writes DIR/rank{R}.pt with its masks and weights; the test compares them with
one process pruning from the whole batches (``batches()``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_data

from lightning_prune import OBDPruning, OBSPruning, prune

PRUNERS = {
    "obd": lambda: OBDPruning(0.7, num_batches=4, verbose=0),
    "obs": lambda: OBSPruning(0.7, num_batches=4, verbose=0),
    "obs_kfac": lambda: OBSPruning(0.7, hessian="kfac", num_batches=4, verbose=0),
}


def loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))


def batches(rank: int = 0, world: int = 1) -> list:
    x, y = make_data(256, 12, 4).tensors
    return [(x[i : i + 64][rank::world], y[i : i + 64][rank::world]) for i in range(0, 256, 64)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, make in PRUNERS.items():
        net, pruner = copy.deepcopy(model()), make()
        prune(net, batches(rank, world), pruner, loss_fn=loss)
        out[name] = {"masks": dict(pruner.masks), "weights": {k: v.clone() for k, v in net.state_dict().items()}}
    torch.save(out, os.path.join(a.out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
