"""A pruner's masks on the model it is bound to: they only shrink, and pruned weights stay exactly zero.

:class:`MaskState` is what :meth:`~lightning_prune.engine.pruner.Pruner.bind` builds for one model: the
targets, their parameters, their masks (this rank's blocks under FSDP2), the multipliers that freeze
pruned weights around every optimizer step, and the kept counts (whole layers, the same on every
rank). :meth:`MaskState.commit_` is the only place new masks land. The masks are held as bits
(:class:`~lightning_prune.engine.masks.PackedMasks`: ``numel / 8`` bytes per layer, whatever the depth),
and every consumer unpacks one layer at a time. The zeroing itself is :mod:`lightning_prune.engine.masks`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from lightning_prune.criteria.base import RoundResult
from lightning_prune.engine import masks as M
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.patterns import Pattern
from lightning_prune.runtime.distributed import Collectives, default_collectives
from lightning_prune.runtime.offload import storage_device


class MaskState:
    """The targets of one model and their masks (``None`` until the first round: every weight kept).

    Building one moves the masks to their parameters' devices and zeroes what they prune; the kept
    counts are taken then (a collective when sharded: every rank builds it)."""

    def __init__(self, targets: list[PruneTarget], masks: Mapping[str, Tensor] | None) -> None:
        self.targets = targets
        self.masks = None if masks is None else M.packed(masks)
        # multipliers of layers with at least one pruned weight, built at the first training step that needs
        # them (None: not built): on the CPU a bit mask as large as the weights, which prune() never needs
        self._frozen: dict[str, Tensor] | None = None
        self._kept: dict[str, int] = {}
        self._units: tuple[Pattern, dict[str, tuple[int, int]]] | None = None  # units() of the current masks
        self._refresh()
        M.apply_masks_(self.params, self.masks or {})

    @property
    def params(self) -> dict[str, Tensor]:
        """The targets' parameters, looked up now: accelerate replaces an offloaded one at every read."""
        return {t.name: t.param for t in self.targets}

    @property
    def sharded(self) -> bool:
        """Whether some targets are FSDP2-sharded (masks are then per-rank blocks)."""
        return any(t.sharded for t in self.targets)

    def current(self) -> Mapping[str, Tensor]:
        """The masks, or all-True ones before the first round (this rank's blocks), unpacked as they are read:
        a snapshot (a commit installs new ones, it does not change these)."""
        if self.masks is not None:
            return self.masks
        return M.AllKept({t.name: (t.local_param.shape, storage_device(t.param)) for t in self.targets})

    def full(self) -> dict[str, Tensor]:
        """Whole-layer masks on CPU, gathered one layer at a time when sharded (a collective)."""
        current = self.current()
        return {t.name: t.gather(current[t.name]).to("cpu", copy=True) for t in self.targets}

    def kept_counts(self) -> dict[str, int]:
        """Kept entries per layer, whole layers (counted when the masks change: every rank agrees)."""
        return dict(self._kept)

    def units(self, pattern: Pattern) -> dict[str, tuple[int, int]]:
        """``(pruned, total)`` per layer of what ``pattern`` counts: weights, or structures; whole layers
        when sharded."""
        if self.sharded:
            kept = self.kept_counts()
            return {t.name: (t.param.numel() - kept[t.name], t.param.numel()) for t in self.targets}
        if self._units is None or self._units[0] is not pattern:  # counted once per commit: rounds ask often
            self._units = (pattern, pattern.units(self.current()))
        return dict(self._units[1])

    def removes_something(self, sparsity: float, pattern: Pattern, scope: str) -> bool:
        """Whether a round to ``sparsity`` (of what ``pattern`` counts, allocated at ``scope``) would prune
        anything the masks still keep."""
        units = self.units(pattern)
        if scope == "layer":
            return any(round(sparsity * n) > p for p, n in units.values())
        return round(sparsity * sum(n for _, n in units.values())) > sum(p for p, _ in units.values())

    def sparsity(self) -> float:
        """Fraction of the targets' weights that are pruned."""
        if self.masks is None:
            return 0.0
        total = sum(t.param.numel() for t in self.targets)
        return 1.0 - sum(self._kept.values()) / max(total, 1)

    def commit_(
        self,
        result: RoundResult,
        before: Mapping[str, Tensor],
        comm: Collectives,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        reset_moved: bool = False,
    ) -> None:
        """Install new masks (which may only shrink), zero what they prune, and sync all ranks.
        ``reset_moved``: the optimizer moments of weights the round moved are zeroed too."""
        new, done = M.PackedMasks(), result.masks
        for n, m in before.items():  # one layer unpacked at a time; the round's packed masks are consumed
            mask = done.pop(n) if isinstance(done, M.PackedMasks) else done[n]
            new[n] = mask.to(device=m.device, dtype=torch.bool).logical_and_(m)
        whole = [t.name for t in self.targets if not t.sharded]  # a sharded layer's blocks differ by rank
        comm.broadcast_([*(new.bits(n) for n in whole), *(self.params[n].data for n in whole)])
        self.masks = new
        self._refresh()
        M.apply_masks_(self.params, new)
        reset = {n: True for n in result.updated} if reset_moved else None
        M.zero_optimizer_state_(optimizers, self.params, new, reset_kept=reset)

    def freeze_grads_(self) -> None:
        """Zero the gradients of pruned weights (before an optimizer step)."""
        if frozen := self._multipliers():
            M.mask_grads_(self.params, frozen)

    def freeze_weights_(self) -> None:
        """Re-zero pruned weights (after an optimizer step)."""
        if frozen := self._multipliers():
            M.apply_masks_(self.params, frozen)

    def _refresh(self) -> None:
        masks = self.masks if self.masks is not None else M.PackedMasks()
        params = self.params
        for name in masks:
            if masks.device(name) != (home := storage_device(params[name])):
                masks.move_(name, home)
        self._frozen, self._units = None, None
        self._kept = self._count_kept()  # a collective when sharded

    def _multipliers(self) -> dict[str, Tensor]:
        if self._frozen is None:
            masks = self.masks or {}
            self._frozen = {n: M.multiplier(m, self.params[n]) for n, m in masks.items() if not bool(m.all())}
        return self._frozen

    def _count_kept(self) -> dict[str, int]:
        current, targets = self.current(), self.targets
        counts = [float(current[t.name].sum()) if self.masks is not None else t.local_param.numel() for t in targets]
        if self.sharded and (comm := default_collectives()).world_size > 1:
            sharded = [t.sharded for t in targets]
            device = targets[0].param.device  # where the backend reduces (NCCL: the GPU)
            part = torch.tensor([c if s else 0.0 for c, s in zip(counts, sharded)], dtype=torch.float64, device=device)
            comm.all_reduce_sum_([part])
            counts = [p if s else c for p, c, s in zip(part.tolist(), counts, sharded)]
        return {t.name: int(c) for t, c in zip(targets, counts)}
