"""The Lightning side of distribution: which strategies are supported, and collectives through them."""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from torch import Tensor

from lightning_prune.distributed import Collectives

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


class StrategyCollectives(Collectives):
    """The core's collectives through ``trainer.strategy``.

    Sums go through ``strategy.reduce``. Tensors are broadcast with ``torch.distributed`` on the
    strategy's world: ``strategy.broadcast`` pickles Python objects, which would copy every mask and
    weight through host memory.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    @property
    def rank(self) -> int:
        return self.strategy.global_rank

    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    def all_reduce_sum_(self, tensors: Iterable[Tensor]) -> None:
        if self.world_size == 1:
            return
        for t in tensors:
            out = self.strategy.reduce(t, reduce_op="sum")
            if out is not t:
                t.copy_(out)

    def broadcast_(self, tensors: Iterable[Tensor], src: int = 0) -> None:
        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        for t in tensors:
            dist.broadcast(t.view(torch.uint8) if t.dtype == torch.bool else t, src=src)

    def mean(self, value: float, device: torch.device | None = None) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        return float(self.strategy.reduce(t, reduce_op="mean"))
