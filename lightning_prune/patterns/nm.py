"""``pattern="N:M"`` (e.g. ``"2:4"``, ``"4:8"``): N of every M consecutive weights of a row are zero.

This is the reading of SparseGPT, Wanda and llm-compressor's ``mask_structure`` (NVIDIA's "2:4" is
the same thing for N = M/2). Groups run along the *input* dimension of each output row, in the
layout torch's semi-structured kernels expect: ``in_features`` of a Linear, ``in_channels * kh * kw``
of an unfolded Conv, the rows of a Hugging Face ``Conv1D`` weight (stored in x out). Every target's
input dimension must be a multiple of M. The final sparsity of every layer is exactly N/M, so
``target`` must be N/M.

**How gradual rounds reach N:M** (``ramp``). A schedule's intermediate sparsity ``s < N/M`` is met
by masks that never break the pattern:

* ``"capped"`` (default): the round's lowest scores are pruned, with at most N pruned in any group
  (greedy under a per-group cap, which is the exact minimiser of the removed score for that
  constraint). At ``s = N/M`` every group has exactly N.
* ``"groups"``: whole groups are completed to N zeros, the groups whose N lowest scores sum
  lowest first; a fraction ``s / (N/M)`` of the groups is complete after the round, the rest dense.

Both only shrink masks. ``benchmarks/RESULTS.md`` compares them (gradual MLP, magnitude and OBS).
Layer-wise OBS chooses each group's zeros inside its column sweep (:meth:`NM.quotas`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_prune.engine.selection import Shards, select_masks, sort_key
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.patterns.base import Pattern, as_matrices, from_matrices, register

RAMPS = ("capped", "groups")


@dataclass(frozen=True)
class NM(Pattern):
    """N of every M consecutive input weights of a row are zero (see the module docstring)."""

    n: int
    m: int
    ramp: str = "capped"
    within_rows = True  # not a field: groups run along each output row

    def __post_init__(self) -> None:
        for name, value in (("n", self.n), ("m", self.m)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"`pattern` N:M: `{name}` must be an integer, got {value!r}")
        if not 0 < self.n < self.m:
            raise ValueError(f"`pattern='{self.n}:{self.m}'` needs 0 < N < M (N zeros in every M weights)")
        if self.ramp not in RAMPS:
            raise ValueError(f"`pattern` N:M: `ramp` must be one of {RAMPS}, got {self.ramp!r}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.n}:{self.m}"

    def __str__(self) -> str:
        return self.name if self.ramp == "capped" else f"{self.name} (ramp={self.ramp!r})"

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def check_target(self, target: float) -> None:
        if not math.isclose(target, self.sparsity, rel_tol=0, abs_tol=1e-9):
            raise ValueError(
                f"target={target} contradicts pattern='{self.name}', which makes every layer exactly "
                f"{self.sparsity:g} sparse ({self.n} of every {self.m} weights zero): pass target={self.sparsity:g}"
            )

    def check_min_density(self, min_density: float) -> None:
        if min_density > 1 - self.sparsity + 1e-12:
            raise ValueError(
                f"min_density={min_density} cannot hold under pattern='{self.name}', which keeps "
                f"{1 - self.sparsity:g} of every layer"
            )

    def bind(
        self, model: nn.Module, layers: Sequence[PruneTarget], target: float, scope: str, min_density: float
    ) -> NM:
        self.check_layers(layers)  # the pattern keeps its own floor (check_min_density): no feasibility check
        return self

    def check_layers(self, layers: Sequence[PruneTarget]) -> None:
        bad = [f"{t.name} (input dimension {t.shape2d[1]})" for t in layers if t.shape2d[1] % self.m]
        if bad:
            raise ValueError(
                f"pattern='{self.name}' groups {self.m} consecutive input weights, and these layers' input dimension "
                f"is not a multiple of {self.m}: {bad[:5]}{' ...' if len(bad) > 5 else ''}. Leave them dense with "
                "exclude=[...]"
            )

    def check_masks(self, masks: Mapping[str, Tensor], layers: Sequence[PruneTarget] | None, what: str) -> None:
        for name, mask in as_matrices(masks, layers).items():
            pruned = self.pruned_per_group(~mask)
            if bool((pruned > self.n).any()):
                raise ValueError(
                    f"{what} mask of {name!r} has groups of {self.m} with up to {int(pruned.max())} zeros, more than "
                    f"pattern='{self.name}' allows ({self.n}); masks only shrink, so it cannot become {self.name}. "
                    "Start from the dense model (or masks pruned with this pattern)"
                )

    # ------------------------------------------------------------------ groups
    def groups(self, x: Tensor) -> Tensor:
        """``(rows, d)`` -> ``(rows, d // m, m)``."""
        return x.reshape(x.shape[0], -1, self.m)

    def pruned_per_group(self, pruned: Tensor) -> Tensor:
        """``(rows, d)`` bool -> ``(rows, d // m)`` counts."""
        return self.groups(pruned).sum(2)

    def eligible(self, key: Tensor) -> Tensor:
        """``capped``: the entries greedy selection may choose, the ``n`` lowest keys of each group
        (ties: earlier column); already pruned entries (key ``-inf``) are among them."""
        g = self.groups(key)
        rank = torch.empty_like(g, dtype=torch.long)
        order = torch.sort(g, dim=2, stable=True).indices
        rank.scatter_(2, order, torch.arange(self.m, device=key.device).expand_as(g))
        return (rank < self.n).reshape(key.shape)

    def group_costs(self, key: Tensor) -> tuple[Tensor, Tensor]:
        """``groups``: each group's cost (the sum of its ``n`` lowest keys, already pruned entries
        counting 0) and whether it is complete (``n`` pruned)."""
        g = self.groups(key)
        complete = (g == -math.inf).sum(2) >= self.n
        low = torch.sort(torch.where(g == -math.inf, torch.zeros_like(g), g), dim=2).values[:, :, : self.n]
        return low.sum(2), complete

    def complete_groups(self, key: Tensor, chosen: Tensor) -> Tensor:
        """Masks (True = kept) that prune the ``n`` lowest keys of every ``chosen`` group."""
        pruned = self.eligible(key) & chosen.repeat_interleave(self.m, 1)
        return ~pruned & (key != -math.inf)

    # ------------------------------------------------------------------ choosing
    def select(
        self,
        scores: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        sparsity: float,
        *,
        scope: str = "global",
        min_density: float | None = 0.0,
        shards: Shards | None = None,
        layers: Sequence[PruneTarget] | None = None,
    ) -> dict[str, Tensor]:
        """Masks that keep the pattern, in the ``(d_out, d_in)`` view (see the module docstring); the
        pattern keeps its own floor (M - N of every M), so ``min_density`` is not applied."""
        scores, masks = as_matrices(scores, layers), as_matrices(masks, layers)
        self.check_masks(masks, None, "the current")
        if self.ramp == "groups":
            keys = {n: sort_key(scores[n], masks[n]).view(masks[n].shape) for n in masks}
            costs, complete = {}, {}
            for n, key in keys.items():
                costs[n], complete[n] = self.group_costs(key)
            fraction = min(1.0, sparsity / self.sparsity)
            chosen = select_masks(
                costs, {n: ~c for n, c in complete.items()}, fraction, scope=scope, min_density=None, shards=shards
            )
            out = {n: self.complete_groups(keys[n], ~chosen[n]) for n in keys}
        else:
            out = select_masks(
                scores, masks, sparsity, scope=scope, min_density=None, allowed=self.eligible, shards=shards
            )
        return from_matrices(out, layers)

    def quotas(self, layer: PruneTarget, pruned: Tensor) -> tuple[int, Tensor]:
        return self.m, self.pruned_per_group(layer.matrix(pruned))


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@register("'N:M' (e.g. '2:4')")
def _parse(spec: str) -> Pattern | None:
    match = _NM.match(spec)
    return NM(int(match.group(1)), int(match.group(2))) if match else None
