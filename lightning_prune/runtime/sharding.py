"""Sharded weights (FSDP2 ``fully_shard``): the local shard, one layer gathered at a time, writes back.

FSDP2 holds every parameter as a ``DTensor`` sharded by rows (``Shard(0)``) over a 1-D device mesh;
each rank's ``to_local()`` is a contiguous block of rows, in mesh order. The pruning core keeps
everything per element (masks, scores, the frozen multipliers) as *local* tensors of that block,
so memory follows the shard. What needs a whole layer (an OBS solve, a K-FAC saliency, a mask in a
checkpoint) gathers that one layer with :func:`gather` and writes its rows back with :func:`write_`.
Every gather is a collective: all ranks run the same round code in the same order, so they meet.

Layer inputs and output gradients, where the curvature comes from, are not sharded by FSDP (only
tensor parallelism shards them), so the statistics are all-reduced exactly as under DDP.
Placements other than one ``Shard(0)`` (tensor parallelism, HSDP's 2-D mesh) are refused by
:func:`check_sharding`, naming the parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

try:  # torch.distributed is optional in some builds
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter FSDP2 sharded)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank's own part of ``t`` (``t`` itself when it is not sharded); shares its storage."""
    return t.to_local() if is_sharded(t) else t


def rows(p: Tensor) -> slice:
    """The rows of the full ``p`` this rank holds (all of them when ``p`` is not sharded)."""
    if not is_sharded(p):
        return slice(0, p.shape[0] if p.dim() else 1)
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return slice(int(offset[0]), int(offset[0]) + int(shape[0]))


def chunk(p: Tensor) -> int:
    """Position of this rank's block among the blocks of ``p`` (0 when not sharded)."""
    return int(p.device_mesh.get_local_rank()) if is_sharded(p) else 0


def shard_of(p: Tensor, full: Tensor) -> Tensor:
    """The rows of ``full`` (laid out like ``p``) that this rank holds: a copy when sharded, so the
    whole layer it came from can be freed (a view would keep it alive)."""
    return full[rows(p)].clone() if is_sharded(p) else full


@torch.no_grad()
def gather(p: Tensor, part: Tensor | None = None) -> Tensor:
    """The full tensor: of ``p`` itself, or of ``part``, a local tensor laid out like ``p``'s shard
    (a mask, a score). A collective when ``p`` is sharded; a detached ``p`` otherwise."""
    if not is_sharded(p):
        return (p if part is None else part).detach()
    if part is None or is_sharded(part):
        return (p if part is None else part).detach().full_tensor()
    dtype = part.dtype
    x = part.to(torch.uint8) if dtype == torch.bool else part  # gloo all-gathers no bool
    full = DTensor.from_local(x, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    out = full.full_tensor()
    return out.to(torch.bool) if dtype == torch.bool else out


@torch.no_grad()
def write_(p: Tensor, full: Tensor) -> None:
    """Copy ``full`` (the whole layer, laid out like ``p``) into this rank's shard of ``p``."""
    local(p).copy_(full[rows(p)] if is_sharded(p) else full)


def check_sharding(names: Sequence[str], params: Sequence[Tensor], world_size: int) -> bool:
    """Whether any target is sharded; refuse placements whose local block is not rows of a 1-D mesh
    spanning every rank (tensor parallelism, HSDP), naming the parameter."""
    sharded = False
    for name, p in zip(names, params):
        if not is_sharded(p):
            continue
        sharded = True
        mesh, placements = p.device_mesh, tuple(p.placements)
        if mesh.ndim != 1 or placements != (Shard(0),) or mesh.size() != world_size:
            raise ValueError(
                f"parameter {name!r} is a DTensor with placements {placements} on a {mesh.ndim}-D mesh of "
                f"{mesh.size()} ranks (world size {world_size}): lightning-prune supports FSDP2's data-parallel "
                "sharding only (fully_shard, one Shard(0) over all ranks). Tensor parallelism and hybrid "
                "sharding shard the layer inputs or replicate shards, which the statistics and masks do not handle"
            )
    return sharded
