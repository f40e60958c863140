"""``prune()`` under ``torch.distributed`` (run by tests/test_prune.py through ``torch.distributed.run``).

    python -m torch.distributed.run --nproc_per_node=2 tests/prune_job.py --out DIR

Every rank prunes the same model (``model()``; a tiny LLaMA for the block-by-block rounds) from its
own half of every batch (rank r: samples r, r + 2, ...) and writes DIR/rank{R}.pt with its masks and
weights; the test compares them with one process pruning from the whole batches (``batches()``).
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

from lightning_prune import OBDPruning, OBSPruning, SparseGPT, prune

PRUNERS = {
    "obd": lambda: OBDPruning(0.7, num_batches=4, verbose=0),
    "obs": lambda: OBSPruning(0.7, num_batches=4, verbose=0),
    "obs_kfac": lambda: OBSPruning(0.7, hessian="kfac", num_batches=4, verbose=0),
}
# block by block on a decoder: the calibration split across ranks, the layer solves spread across them
BLOCK_PRUNERS = {
    "sparsegpt": lambda: SparseGPT(0.5, num_batches=4, verbose=0),
    "obs_defaults": lambda: OBSPruning(0.5, num_batches=4, verbose=0, eval_batches=0),
    "obs_2of4": lambda: OBSPruning(0.5, pattern="2:4", num_batches=4, verbose=0, eval_batches=0),
}


def loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))


def batches(rank: int = 0, world: int = 1) -> list:
    x, y = make_data(256, 12, 4).tensors
    return [(x[i : i + 64][rank::world], y[i : i + 64][rank::world]) for i in range(0, 256, 64)]


def llama() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


def token_batches(rank: int = 0, world: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (4, 8, 16), generator=g)
    return [{"input_ids": b[rank::world], "labels": b[rank::world]} for b in ids]


def run(make, net, data, **kw) -> dict:
    pruner = make()
    record = prune(net, data, pruner, **kw)
    return {
        "masks": dict(pruner.masks),
        "weights": {k: v.clone() for k, v in net.state_dict().items()},
        "info": {k: v for k, v in record["info"].items() if isinstance(v, (int, float, str))},
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, make in PRUNERS.items():
        out[name] = run(make, copy.deepcopy(model()), batches(rank, world), loss_fn=loss)
    for name, make in BLOCK_PRUNERS.items():
        out[name] = run(make, llama(), token_batches(rank, world))
    torch.save(out, os.path.join(a.out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
