"""Hutchinson's estimator of the true Hessian diagonal, ``diag(H) ~ E_z[z * Hz]``.

Hessian-vector products need double backward, which ordinary training steps do not do, so this
runs as a calibration pass at round time over the window's stored batches, in eval mode (see
:mod:`lightning_prune.engine.calibration`: BatchNorm statistics and metric states untouched). Probes are
Rademacher vectors from a generator seeded by (seed, round, rank, batch, probe): reruns are
reproducible. Sums and counts are all-reduced like every other estimator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_prune.engine.calibration import Calibration, eval_mode
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.runtime.distributed import LOCAL, Collectives
from lightning_prune.stats.estimators import Estimator


class Hutchinson(Estimator):
    name = "hutchinson"

    def __init__(
        self, targets: Sequence[PruneTarget], num_probes: int = 8, seed: int = 0, comm: Collectives = LOCAL
    ) -> None:
        super().__init__(targets, comm)
        self.num_probes, self.seed = num_probes, seed
        self.sum = {n: torch.zeros_like(t.param, dtype=torch.float64) for n, t in self.targets.items()}
        self.count = torch.zeros((), dtype=torch.float64, device=next(iter(self.sum.values())).device)

    def tensors(self) -> list[Tensor]:
        return [*self.sum.values(), self.count]

    def seen(self, name: str) -> bool:
        return bool(self.count > 0)

    def diagonal(self, name: str) -> Tensor:
        return self.sum[name] / self.count

    def calibrate(self, calib: Calibration, batches: Sequence[Any], round_index: int) -> None:
        """Accumulate ``z * Hz`` over ``batches`` x ``num_probes`` Rademacher probes."""
        if not calib.has_loss(batches[0] if batches else None):
            raise ValueError(
                f"curvature='hutchinson' needs a loss to differentiate twice, and there is {calib.describe()}: "
                "pass loss_fn=lambda model, batch: ... (manual optimization's training_step cannot be borrowed)"
            )
        names = list(self.targets)
        targets = [self.targets[n] for n in names]
        params = [t.param for t in targets]
        rank = self.comm.rank
        progress = calib.progress(len(batches), "Hutchinson calibration")
        with eval_mode(calib.model), torch.enable_grad():
            for b, batch in enumerate(batches):
                loss = calib.loss(batch, b).float()
                if not bool(torch.isfinite(loss)):
                    self.skipped += 1  # a NaN/inf loss has no usable curvature
                    progress()
                    continue
                grads = torch.autograd.grad(loss, params, create_graph=True)
                for k in range(self.num_probes):
                    gen = torch.Generator(device=params[0].device)
                    gen.manual_seed(hash((self.seed, round_index, rank, b, k)) % (2**63))
                    # drawn as (d_out, d_in) matrices: the same probes whatever the weight's storage layout
                    zs = [
                        t.unmatrix(torch.randint(0, 2, t.shape2d, generator=gen, device=t.param.device))
                        .to(t.param.dtype)
                        .mul_(2)
                        .sub_(1)
                        for t in targets
                    ]
                    hz = torch.autograd.grad(grads, params, grad_outputs=zs, retain_graph=k + 1 < self.num_probes)
                    for n, z, h in zip(names, zs, hz):
                        self.sum[n] += (z * h).double()
                    self.count += 1
                progress()
            progress.close()
        self.batches = len(batches)
        self.reduce_()
