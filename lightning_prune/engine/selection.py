"""Turn scores into masks with an exact count.

Rules (all deterministic, identical on every rank given identical scores):

* Higher score = more important. The lowest scores are pruned.
* Masks only shrink: entries pruned in an earlier round rank below everything (``-inf``).
* Non-finite scores (NaN, +inf, -inf: from non-finite weights or curvature) are never pruned: an
  entry whose importance is unknown is kept. If the round cannot reach its count from the
  finite-scored entries, it refuses with :class:`UnreachableSparsity` instead of pruning
  unknown entries by position. Callers warn about kept non-finite entries.
* Ties are broken by position: layers in target order, then flat (row-major) index; among equal
  scores the earlier entry is pruned first. Implemented with one stable sort.
* Floor: every layer keeps at least ``max(1, ceil(min_density * numel))`` entries (no layer
  collapse). Protected entries are the layer's highest-scoring kept ones.
* ``scope="global"``: ``round(sparsity * total)`` entries are zero after the round.
  ``scope="layer"``: every layer gets ``round(sparsity * numel)`` zeros.
  ``scope="row"``: every output row (``weight[i]``) gets ``round(sparsity * row_numel)`` zeros, the
  comparison groups of Wanda and SparseGPT's uniform allocation; the floor applies per row.
* ``allowed`` (how a pattern such as N:M restricts the choice, :mod:`lightning_prune.patterns`):
  entries it rules out are never chosen, as if their scores were not finite. Patterns call this
  module; it knows none of them.
* Sharded layers (FSDP2, :class:`Shards`): each rank passes the scores and masks of its block of
  rows and gets the masks of that block, the same entries a single process would choose from the
  whole layers. The k-th lowest key is found by bisection on its bits, one all-reduce of counts
  per step (65 steps), and ties are split by position from a table of tie counts per layer and
  block: the traffic is a few kilobytes per round, and no rank ever holds another rank's scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_prune.runtime.distributed import Collectives

SCOPES = ("global", "layer", "row")
Allowed = Callable[[Tensor], Tensor]  # sort keys laid out like the mask -> which entries may be chosen


class UnreachableSparsity(RuntimeError):
    """The round's count cannot be met from entries with finite scores."""


@dataclass(frozen=True)
class Shards:
    """Where each layer's entries live when some are sharded across ranks.

    ``chunk[name]``: the position of this rank's block among the layer's blocks (rows, in mesh
    order; 0 for a layer every rank holds whole). ``owned[name]``: whether this rank's entries count
    (a layer held whole by every rank is counted by rank 0 only, and every rank computes its mask).
    """

    comm: Collectives
    chunk: Mapping[str, int]
    owned: Mapping[str, bool]


def floor_count(numel: int, min_density: float) -> int:
    """Number of entries a layer must keep."""
    return min(numel, max(1, math.ceil(min_density * numel - 1e-9)))


def check_feasible(numels: Mapping[str, int], sparsity: float, scope: str, min_density: float) -> None:
    """Raise if the floor makes ``sparsity`` unreachable (checked before training starts)."""
    if scope == "row":  # each row keeps its floor of its own entries; rows are as feasible as layers here
        scope = "layer"
    if scope == "layer":
        for name, n in numels.items():
            if round(sparsity * n) > n - floor_count(n, min_density):
                raise ValueError(
                    f"target={sparsity} with scope='layer' would leave layer {name!r} ({n} weights) fewer than "
                    f"the floor of {floor_count(n, min_density)} (min_density={min_density}); lower one of them"
                )
        return
    total = sum(numels.values())
    keep_floor = sum(floor_count(n, min_density) for n in numels.values())
    if round(sparsity * total) > total - keep_floor:
        raise ValueError(
            f"target={sparsity} is unreachable: the per-layer floor (min_density={min_density}) keeps "
            f"{keep_floor} of {total} weights, so at most {(total - keep_floor) / total:.6f} can be pruned"
        )


def sort_key(score: Tensor, mask: Tensor, allowed: Allowed | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """Flat keys in ``dtype``: pruned entries -inf, non-finite scores +inf (never chosen), the rest their score;
    entries ``allowed`` rules out +inf too."""
    key = score.detach().flatten().to(dtype, copy=True)  # one copy, filled in place
    key.masked_fill_(~torch.isfinite(key), math.inf)
    key.masked_fill_(~mask.flatten(), -math.inf)
    if allowed is not None:
        key.masked_fill_(~allowed(key.view(mask.shape)).flatten(), math.inf)
    return key


def _protect_floor(key: Tensor, mask: Tensor, min_density: float | None) -> Tensor:
    """Set the key of the layer's top ``floor`` kept entries to +inf so they are never chosen
    (``min_density=None``: no floor at all); in place, on :func:`sort_key`'s own copy."""
    if min_density is None:
        return key
    floor = min(floor_count(key.numel(), min_density), int(mask.sum()))
    if floor == 0:
        return key
    key[_extreme(key, floor, lowest=False)] = math.inf
    return key


def _extreme(key: Tensor, k: int, *, lowest: bool = True) -> Tensor:
    """Indices of the ``k`` lowest (or highest) keys, ties broken as a stable ascending sort breaks them
    (lower index first among the lowest, higher among the highest), in linear time: the ``k``-th value,
    everything beyond it, and the first (last) of its ties. A layer's full sort dominated selection."""
    n = key.numel()
    t = torch.kthvalue(key, k if lowest else n - k + 1).values
    beyond = ((key < t) if lowest else (key > t)).nonzero().flatten()
    ties = (key == t).nonzero().flatten()
    rest = k - beyond.numel()
    return torch.cat([beyond, ties[:rest] if lowest else ties[ties.numel() - rest :]])


def select_masks(
    scores: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    sparsity: float,
    *,
    scope: str = "global",
    min_density: float | None = 0.0,
    allowed: Allowed | None = None,
    shards: Shards | None = None,
) -> dict[str, Tensor]:
    """Return new masks (True = kept) reaching ``sparsity`` under the rules in the module docstring
    (``min_density=None``: no floor, not even one entry). With ``shards``, ``scores`` and ``masks``
    are this rank's blocks (whole rows: ``scope="row"`` and N:M groups stay within a rank)."""
    if scope not in SCOPES:
        raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}")
    names = list(masks)
    if scope == "row":
        return {n: _select_rows(scores[n], masks[n], sparsity, min_density, allowed).view_as(masks[n]) for n in names}
    if shards is not None and shards.comm.world_size > 1:
        return _select_sharded(scores, masks, sparsity, scope, min_density, allowed, shards)
    dtype = _key_dtype(scores, names, allowed)
    keys = {
        n: _protect_floor(sort_key(scores[n], masks[n], allowed, dtype), masks[n].flatten(), min_density) for n in names
    }

    if scope == "layer":
        out = {}
        for n in names:
            k = max(round(sparsity * masks[n].numel()), int((~masks[n]).sum()))
            _check_reachable({n: keys[n]}, {n: scores[n]}, k, sparsity)
            out[n] = _prune_lowest(keys[n], k).view_as(masks[n])
        return out

    sizes = [masks[n].numel() for n in names]
    already = sum(int((~masks[n]).sum()) for n in names)
    k = max(round(sparsity * sum(sizes)), already)
    _check_reachable(keys, scores, k, sparsity)
    keep = _prune_lowest(torch.cat([keys[n].to(keys[names[0]].device) for n in names]), k)
    return {n: part.view_as(masks[n]).to(masks[n].device) for n, part in zip(names, keep.split(sizes))}


def _key_dtype(scores: Mapping[str, Tensor], names: list[str], allowed: Allowed | None) -> torch.dtype:
    """The keys' dtype: float32 where every score is float32 (exact in float64 too, and the selection only
    compares keys, so it chooses the same entries at half the bytes), else float64."""
    dtypes = {scores[n].dtype for n in names}
    return dtypes.pop() if allowed is None and len(dtypes) == 1 and dtypes <= {torch.float32} else torch.float64


def _select_rows(
    score: Tensor, mask: Tensor, sparsity: float, min_density: float | None, allowed: Allowed | None = None
) -> Tensor:
    """``scope="row"`` for one layer, all rows at once: each row is a layer of its own."""
    m = mask.reshape(mask.shape[0], -1)
    rows, d = m.shape
    key = sort_key(score.reshape(rows, -1), m, allowed).view(rows, d)
    rank = torch.empty_like(key, dtype=torch.long)
    rank.scatter_(1, torch.sort(key, dim=1, stable=True).indices, torch.arange(d, device=key.device).expand(rows, d))
    floor = torch.clamp(m.sum(1), max=0 if min_density is None else floor_count(d, min_density))  # top kept entries
    key = torch.where(rank >= d - floor[:, None], torch.full_like(key, math.inf), key)
    k = torch.clamp(m.logical_not().sum(1), min=round(sparsity * d))
    choosable = (key < math.inf).sum(1)
    if bool((k > choosable).any()):
        r = int((k > choosable).nonzero()[0])
        raise UnreachableSparsity(
            f"the round cannot reach sparsity {sparsity:.6g} in row {r}: it needs {int(k[r])} pruned entries and only "
            f"{int(choosable[r])} can be pruned (non-finite scores, the per-row floor and entries the pattern keeps "
            "are never pruned). The weights were not touched"
        )
    order = torch.sort(key, dim=1, stable=True).indices
    pruned = torch.arange(d, device=key.device)[None, :] < k[:, None]
    return torch.ones_like(m).scatter_(1, order, ~pruned)


def _check_reachable(keys: Mapping[str, Tensor], scores: Mapping[str, Tensor], k: int, sparsity: float) -> None:
    """Refuse if pruning ``k`` entries would need entries that are floor-protected or non-finite."""
    choosable = sum(int((key < math.inf).sum()) for key in keys.values())  # pruned (-inf) + finite, unprotected
    if k <= choosable:
        return
    bad = {n: int((~torch.isfinite(scores[n])).sum()) for n in keys}
    bad = {n: c for n, c in bad.items() if c}
    protected = sum(int((key == math.inf).sum()) for key in keys.values()) - sum(bad.values())
    raise UnreachableSparsity(
        f"the round cannot reach sparsity {sparsity:.6g} ({k} pruned entries): only {choosable} entries can be "
        f"pruned. Never pruned: entries with non-finite (NaN/inf) scores {bad or 'none'} (from non-finite weights or "
        f"curvature) and at least {max(protected, 0)} entries the per-layer floor (min_density) or the pattern keeps. "
        "The weights were not touched"
    )


def _prune_lowest(key: Tensor, k: int) -> Tensor:
    """Keep mask without the ``k`` lowest keys (ties: lower index first, as :func:`_extreme`), built from
    the ``k``-th value without an index per pruned entry."""
    if k <= 0:
        return torch.ones_like(key, dtype=torch.bool)
    t = torch.kthvalue(key, k).values
    keep = key > t
    ties = (key == t).nonzero().flatten()
    keep[ties[k - int((key < t).sum()) :]] = True  # the ties after the first ones needed stay
    return keep


# ---------------------------------------------------------------- sharded layers (FSDP2)
_I64 = torch.iinfo(torch.int64)


def _ordered(key: Tensor) -> Tensor:
    """float64 keys -> int64 with the same order (``-0.0`` counted as ``+0.0``), for exact bisection."""
    b = (key + 0.0).view(torch.int64)
    return torch.where(b >= 0, b, _I64.min - b - 1)


def _sums(shards: Shards, names: Sequence[str], values: Sequence[Sequence[float]], device: torch.device) -> Tensor:
    """Per-layer values summed over the ranks that own them: ``[len(names), len(values[0])]`` (on the CPU)."""
    t = torch.tensor(
        [list(v) if shards.owned[n] else [0.0] * len(v) for n, v in zip(names, values)],
        dtype=torch.float64,
        device=device,  # where the backend reduces (NCCL: the GPU)
    )
    shards.comm.all_reduce_sum_([t])
    return t.cpu()


def _lowest_sharded(
    keys: Mapping[str, Tensor], groups: Sequence[Sequence[str]], ks: Sequence[int], shards: Shards
) -> dict[str, Tensor]:
    """Keep-masks (flat) pruning the ``ks[g]`` lowest keys of each group of layers, ties by position
    (layer order, then block, then index in the block): :func:`_prune_lowest` over ranks."""
    srt = {n: torch.sort(_ordered(k)).values for n, k in keys.items()}  # 8 bytes per local entry, kept
    names = [n for g in groups for n in g]
    device = next(iter(keys.values())).device

    def counts(bounds: Sequence[int]) -> list[float]:  # owned entries <= bound, per group, summed over ranks
        local = [
            sum(
                float(torch.searchsorted(srt[n], torch.tensor(b, device=device), right=True))
                for n in g
                if shards.owned[n]
            )
            for g, b in zip(groups, bounds)
        ]
        t = torch.tensor(local, dtype=torch.float64, device=device)
        shards.comm.all_reduce_sum_([t])
        return t.tolist()

    lo, hi = [_I64.min - 1] * len(groups), [_I64.max] * len(groups)  # count(<= lo) < k <= count(<= hi)
    while any(h - low > 1 for low, h in zip(lo, hi)):
        mid = [(low + h) // 2 for low, h in zip(lo, hi)]
        for g, c in enumerate(counts([max(m, _I64.min) for m in mid])):
            if hi[g] - lo[g] > 1:
                if c >= ks[g]:
                    hi[g] = mid[g]
                else:
                    lo[g] = mid[g]
    value = {n: hi[g] for g, grp in enumerate(groups) for n in grp}
    below = counts([max(h - 1, _I64.min) if k > 0 else _I64.min for h, k in zip(hi, ks)])
    world = shards.comm.world_size
    ties = torch.zeros(len(names), world, dtype=torch.float64)
    for i, n in enumerate(names):
        if shards.owned[n]:  # equal values are one run of the sorted keys
            left = torch.searchsorted(srt[n], torch.tensor(value[n], device=device))
            ties[i, shards.chunk[n]] = float(
                torch.searchsorted(srt[n], torch.tensor(value[n], device=device), right=True) - left
            )
    srt.clear()  # the final masks compare the keys again, one layer at a time
    ties = ties.to(device)
    shards.comm.all_reduce_sum_([ties])
    ties = ties.cpu()
    out, i = {}, 0
    for g, grp in enumerate(groups):
        need = ks[g] - int(below[g]) if ks[g] > 0 else 0
        for n in grp:
            row = ties[i].tolist()
            before = sum(row[: shards.chunk[n]])
            mine = int(min(max(need - before, 0), row[shards.chunk[n]]))
            need -= int(sum(row))
            if ks[g] <= 0:
                out[n] = torch.ones_like(keys[n], dtype=torch.bool)
            else:
                o = _ordered(keys[n])
                tie = o == value[n]
                out[n] = ~((o < value[n]) | (tie & (tie.cumsum(0) <= mine)))
            i += 1
    return out


def _select_sharded(
    scores: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    sparsity: float,
    scope: str,
    min_density: float | None,
    allowed: Allowed | None,
    shards: Shards,
) -> dict[str, Tensor]:
    """``scope="global"``/``"layer"`` over rank-local blocks: the floor, the count and the
    reachability check on global counts, then :func:`_lowest_sharded`."""
    names = list(masks)
    keys = {n: sort_key(scores[n], masks[n], allowed) for n in names}
    device = next(iter(masks.values())).device
    sizes = _sums(shards, names, [[m.numel(), float((~m).sum())] for m in masks.values()], device)
    numel = {n: int(sizes[i, 0]) for i, n in enumerate(names)}
    pruned = {n: int(sizes[i, 1]) for i, n in enumerate(names)}
    if min_density is not None:
        floors = [min(floor_count(numel[n], min_density), numel[n] - pruned[n]) for n in names]
        # the floor: each layer's top entries, i.e. those its lowest (numel - floor) leave
        protected = _lowest_sharded(keys, [[n] for n in names], [numel[n] - f for n, f in zip(names, floors)], shards)
        for n in names:
            keys[n].masked_fill_(protected.pop(n), math.inf)
    if scope == "layer":
        groups = [[n] for n in names]
        ks = [max(round(sparsity * numel[n]), pruned[n]) for n in names]
    else:
        groups = [names]
        ks = [max(round(sparsity * sum(numel.values())), sum(pruned.values()))]
    stats = _sums(
        shards,
        names,
        [[float((keys[n] < math.inf).sum()), float((~torch.isfinite(scores[n])).sum())] for n in names],
        device,
    )
    start = 0
    for g, k in zip(groups, ks):
        rows = stats[start : start + len(g)]
        start += len(g)
        choosable = int(rows[:, 0].sum())
        if k > choosable:
            bad = {n: int(c) for n, c in zip(g, rows[:, 1].tolist()) if c}
            where = f" in {g[0]}" if len(g) == 1 else ""
            raise UnreachableSparsity(
                f"the round cannot reach sparsity {sparsity:.6g} ({k} pruned entries{where})"
                f": only {choosable} entries can be pruned. Never pruned: entries with non-finite (NaN/inf) scores "
                f"{bad or 'none'} and entries the per-layer floor (min_density) or the pattern keeps. The weights "
                "were not touched"
            )
    keep = _lowest_sharded(keys, groups, ks, shards)
    return {n: keep[n].view_as(masks[n]).to(masks[n].device) for n in names}
