"""Block-diagonal empirical Fisher statistics (WoodFisher, Singh & Alistarh 2020).

Each layer's flattened weight (its ``(d_out, d_in)`` matrix, row-major) is cut into blocks of
``block_size``; block ``b`` has ``F_b = (1/m) sum_n g_nb g_nb^T`` over ``m`` per-sample gradients.
The block sums are an all-reducible sufficient statistic; WoodFisher's Woodbury recursion over the
``m`` gradients builds the same matrix (tests check the equality), and with ``m >= block_size`` the
direct sums are the cheaper of the two and need no gradients stored. The solver that inverts and
uses them is :mod:`lightning_prune.solvers.blockfisher`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_prune.engine.targets import PruneTarget
from lightning_prune.runtime.distributed import LOCAL, Collectives
from lightning_prune.stats.estimators import Estimator, _chunks, per_sample_grads


def _blocks(numel: int, block_size: int) -> tuple[int, int]:
    nb = math.ceil(numel / block_size)
    return nb, nb * block_size - numel


class BlockFisher(Estimator):
    """Sums of per-sample gradient outer products in blocks of each layer's flattened weight."""

    name = "block_fisher"

    def __init__(self, targets: Sequence[PruneTarget], block_size: int, comm: Collectives = LOCAL) -> None:
        super().__init__(targets, comm)
        self.block_size = block_size
        self.F: dict[str, Tensor] = {}
        self.count: dict[str, Tensor] = {}
        for n, t in self.targets.items():
            nb, _ = _blocks(t.param.numel(), block_size)
            self.F[n] = torch.zeros(nb, block_size, block_size, dtype=torch.float32, device=t.param.device)
            self.count[n] = torch.zeros((), dtype=torch.float64, device=t.param.device)

    def update(self, name: str, x: Tensor, g: Tensor) -> None:
        nb, pad = _blocks(self.targets[name].param.numel(), self.block_size)
        for xc, gc in _chunks(x.float(), g.float()):
            flat = per_sample_grads(xc, gc).flatten(1)
            flat = torch.nn.functional.pad(flat, (0, pad)).view(-1, nb, self.block_size).transpose(0, 1)
            self.F[name].baddbmm_(flat.transpose(1, 2), flat)  # (nb, B, n) @ (nb, n, B)
        self.count[name] += x.shape[0]

    def tensors(self) -> list[Tensor]:
        return [*self.F.values(), *self.count.values()]

    def seen(self, name: str) -> bool:
        return bool(self.count[name] > 0)

    def blocks(self, name: str) -> Tensor:
        """``(num_blocks, B, B)`` Fisher blocks; padding coordinates get an identity diagonal."""
        F = self.F[name].double() / self.count[name]
        nb, pad = _blocks(self.targets[name].param.numel(), self.block_size)
        if pad:
            idx = torch.arange(self.block_size - pad, self.block_size, device=F.device)
            F = F.clone()
            F[-1, idx, idx] = torch.diagonal(F[-1])[: self.block_size - pad].mean().clamp_min(1e-30)
        return F

    def diagonal(self, name: str) -> Tensor:
        diag = torch.diagonal(self.F[name], dim1=1, dim2=2).flatten().double() / self.count[name]
        return self._shape(name, diag[: self.targets[name].param.numel()])


def to_blocks(w: Tensor, block_size: int) -> Tensor:
    nb, pad = _blocks(w.numel(), block_size)
    return torch.nn.functional.pad(w.flatten(), (0, pad)).view(nb, block_size)


def from_blocks(wb: Tensor, shape: torch.Size) -> Tensor:
    numel = math.prod(shape)
    return wb.flatten()[:numel].view(shape)
