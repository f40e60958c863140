"""Cross-rank collectives the pruning core needs, without Lightning.

Curvature statistics are sums with counts, so one all-reduce of each sum gives exactly the
statistics a single process would have computed on the union of the ranks' batches. After a round
the masks and the pruned layers' weights are broadcast from rank 0, so they are bitwise identical
everywhere even if two ranks' floating-point reductions ever differed.

The core talks to a :class:`Collectives` object: :data:`LOCAL` in one process,
:class:`TorchDistributed` when ``torch.distributed`` is initialised (``prune()`` under
``torchrun``), and the Lightning adapter's strategy-backed subclass inside ``Trainer.fit``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class Collectives:
    """Single process: every collective is the identity."""

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def all_reduce_sum_(self, tensors: Iterable[Tensor]) -> None:
        """Sum tensors across ranks in place."""

    def broadcast_(self, tensors: Iterable[Tensor], src: int = 0) -> None:
        """Overwrite tensors on every rank with rank ``src``'s values."""

    def mean(self, value: float, device: torch.device | None = None) -> float:
        """Mean of a Python float across ranks."""
        return value

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (pickled), in rank order: for host objects such as kept batches, not statistics."""
        return [obj]


class TorchDistributed(Collectives):
    """``torch.distributed``'s default process group (any backend)."""

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    def all_reduce_sum_(self, tensors: Iterable[Tensor]) -> None:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def broadcast_(self, tensors: Iterable[Tensor], src: int = 0) -> None:
        for t in tensors:
            dist.broadcast(t.view(torch.uint8) if t.dtype == torch.bool else t, src=src)

    def mean(self, value: float, device: torch.device | None = None) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        self.all_reduce_sum_([t])
        return float(t) / self.world_size

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


LOCAL = Collectives()


def global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def warn(message: str) -> None:
    """A ``UserWarning`` on rank 0 only: every rank computes the same round, one message is enough."""
    if global_rank() == 0:
        warnings.warn(message, UserWarning, stacklevel=3)


def default_collectives() -> Collectives:
    """:class:`TorchDistributed` when a multi-process group is initialised, else :data:`LOCAL`."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributed()
    return LOCAL
