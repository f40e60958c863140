"""Cross-rank plumbing: which strategies are supported, all-reduce of statistics, broadcast of results.

Curvature statistics are sums with counts, so one all-reduce of each sum gives exactly the
statistics a single process would have computed on the union of the ranks' batches. After a round
the masks and the pruned layers' weights are broadcast from rank 0, so they are bitwise identical
everywhere even if two ranks' floating-point reductions ever differed.
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor

SUPPORTED = "single device, 'ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook' (any accelerator, any number of nodes)"


def check_strategy(trainer: pl.Trainer) -> None:
    """Refuse strategies that shard parameters: pruning them would be silently wrong.

    FSDP, DeepSpeed and model-parallel strategies hold only a shard of each weight per rank, so
    per-layer scores, masks and OBS updates computed from a shard are not those of the layer.
    """
    strategy = trainer.strategy
    sharded = any("DeepSpeed" in cls.__name__ for cls in type(strategy).__mro__)
    if isinstance(strategy, SingleDeviceStrategy) or (isinstance(strategy, DDPStrategy) and not sharded):
        return
    raise ValueError(
        f"lightning-prune does not support strategy {type(strategy).__name__}: it shards parameters, so "
        f"masks and weight updates would be computed from shards. Supported strategies: {SUPPORTED}."
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensors: Iterable[Tensor]) -> None:
    """Sum tensors across ranks in place (no-op in a single process)."""
    if not is_distributed():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a Python float across ranks."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / dist.get_world_size()


def broadcast_(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite tensors on every rank with rank ``src``'s values (bool tensors travel as uint8)."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t.view(torch.uint8) if t.dtype == torch.bool else t, src=src)
