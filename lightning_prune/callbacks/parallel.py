"""The Lightning side of distribution: which strategies are supported, and collectives through them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy, Strategy
from torch import Tensor

from lightning_prune.runtime.distributed import Collectives

SUPPORTED = (
    "single device, 'ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook' (any accelerator, any number of nodes), and "
    "ModelParallelStrategy(tensor_parallel_size=1) with torch.distributed.fsdp.fully_shard in configure_model (FSDP2)"
)


def check_strategy(trainer: pl.Trainer) -> None:
    """Refuse strategies whose shards the core cannot prune: that would be silently wrong.

    FSDP2 (``ModelParallelStrategy`` with data-parallel ``fully_shard``) is supported: its DTensor
    weights are pruned through their local rows (:mod:`lightning_prune.runtime.sharding`). Tensor
    parallelism shards the layer inputs the statistics come from; FSDP1 (``FSDPStrategy``) flattens
    parameters into shards that do not follow rows; DeepSpeed likewise.
    """
    strategy = trainer.strategy
    names = [cls.__name__ for cls in type(strategy).__mro__]
    if isinstance(strategy, SingleDeviceStrategy) or (
        isinstance(strategy, DDPStrategy) and not any("DeepSpeed" in n for n in names)
    ):
        return
    if isinstance(strategy, ModelParallelStrategy):
        tp = getattr(strategy, "_tensor_parallel_size", None)
        if tp == 1:
            return
        raise ValueError(
            f"ModelParallelStrategy(tensor_parallel_size={tp!r}): tensor parallelism shards the layer inputs and "
            "output gradients that pruning statistics come from, which lightning-prune does not handle. Use "
            "ModelParallelStrategy(data_parallel_size=<world size>, tensor_parallel_size=1) with fully_shard "
            "(FSDP2) in configure_model (the default 'auto' makes every device a tensor-parallel rank)"
        )
    raise ValueError(
        f"lightning-prune does not support strategy {type(strategy).__name__}: it shards parameters in a way "
        f"masks and weight updates cannot follow. Supported strategies: {SUPPORTED}."
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

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out
