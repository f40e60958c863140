"""The mask engine: boolean masks and the only code that zeroes weights, gradients and optimizer state.

Masks are plain ``bool`` tensors keyed by parameter name (True = kept); for a parameter FSDP2
sharded, the mask of the rank's local block (:mod:`lightning_prune.runtime.sharding`), applied to the local
shards of the weight, its gradient and its optimizer moments. The model is never
reparametrised: no ``weight_orig``, no forward pre-hook, so the state dict keeps its keys and dtypes
and the forward pass costs nothing extra. A pruned weight is *frozen* at exactly 0.0 by three
cheap in-place operations:

* :func:`mask_grads_` before every optimizer step (and before gradient clipping, so the clip norm
  only sees live weights);
* :func:`apply_masks_` after every optimizer step (catches optimizers whose update is not
  proportional to the gradient);
* :func:`zero_optimizer_state_` at every round (momentum, ``exp_avg``, ``exp_avg_sq``... of pruned
  entries), so nothing can revive them later.

Pruned entries are *set* to 0.0, never multiplied by 0: ``nan * 0`` is NaN, so a multiply would
leave NaN/inf at pruned entries and turn an inf gradient there into NaN. The per-step updates use a
:func:`multiplier` built once per round: on the CPU an integer mask in the weight's width (all ones
kept, all zeros pruned) ANDed with the float's bits, which zeroes pruned entries exactly whatever
their value and leaves kept entries bit for bit, at the cost of the multiply it replaced
(``benchmarks/masking.py``); on other devices the bool mask, through ``masked_fill_``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from lightning_prune.runtime.sharding import local

_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def multiplier(mask: Tensor, param: Tensor) -> Tensor:
    """What the per-step updates apply to ``param`` (and its gradient) for the bool ``mask`` (True = kept)."""
    if param.device.type == "cpu" and param.dtype in _BITS:
        return mask.to(_BITS[param.dtype]).neg_()  # -1 (all bits set) kept, 0 pruned
    return mask


def _zero_(tensors: list[Tensor], masks: list[Tensor]) -> None:
    for t, m in zip(tensors, masks):
        if m.dtype is torch.bool:
            t.masked_fill_(~m, 0.0)
        elif t.element_size() == m.element_size():
            t.view(m.dtype).bitwise_and_(m)
        else:  # a gradient in another dtype than its weight
            t.masked_fill_(m == 0, 0.0)


@torch.no_grad()
def apply_masks_(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Set the pruned entries of every masked parameter to exactly 0.0 (bool masks or multipliers). A meta
    one (offloaded by accelerate) holds no values here: the round prunes it where it reads it."""
    names = [n for n in masks if n in params and not params[n].is_meta]
    _zero_([local(params[n].data) for n in names], [masks[n] for n in names])


@torch.no_grad()
def mask_grads_(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Set the gradients of pruned entries to exactly 0.0 (parameters without a gradient are skipped)."""
    names = [n for n in masks if n in params and params[n].grad is not None]
    _zero_([local(params[n].grad) for n in names], [masks[n] for n in names])  # type: ignore[arg-type]


# per-element optimizer states that estimate a gradient's scale, not its direction (Adam/AdamW/
# NAdam/RAdam, AMSGrad, Adamax, RMSprop/Adadelta, Adagrad, Rprop): kept for weights an update moved
SCALE_STATES = frozenset({"exp_avg_sq", "max_exp_avg_sq", "exp_inf", "square_avg", "acc_delta", "sum", "step_size"})


@torch.no_grad()
def zero_optimizer_state_(
    optimizers: Iterable[torch.optim.Optimizer],
    params: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    *,
    reset_kept: Mapping[str, bool] | None = None,
) -> int:
    """Zero every per-element optimizer state tensor of pruned entries; return how many were touched.

    Any state tensor with the parameter's shape counts as per-element (SGD's ``momentum_buffer``,
    Adam's ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, RMSprop, Adagrad, ...). Scalars such as
    Adam's ``step`` are left alone. ``reset_kept[name] = True`` also zeroes the kept entries' first
    moments (after an OBS weight update their direction is stale, see ``OBSPruning(optimizer_state=
    ...)``) but keeps their second moments (:data:`SCALE_STATES`): Adam's bias correction follows
    the parameter's step count, which runs on, so a zeroed ``exp_avg_sq`` makes the next tens of
    steps up to ~6x the learning rate (m/sqrt(v) with v refilling at 1 - beta2 per step).
    """
    touched = 0
    by_id = {id(p): n for n, p in params.items() if n in masks}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                name = by_id.get(id(p))
                state = opt.state.get(p) if name is not None else None
                if not state:
                    continue
                mask = masks[name]
                reset = bool(reset_kept and reset_kept.get(name, False))
                for key, value in state.items():
                    if isinstance(value, Tensor) and value.shape == p.shape and value.is_floating_point():
                        value = local(value)  # FSDP2: the moments are DTensors sharded like the weight
                        if reset and key not in SCALE_STATES:
                            value.zero_()
                        else:
                            value.masked_fill_(~mask.to(value.device), 0.0)
                        touched += 1
    return touched


def pack_mask(mask: Tensor) -> dict[str, object]:
    """Pack a bool mask into bits (1/8 of its bool size) for checkpoints."""
    flat = mask.detach().to("cpu", torch.bool).flatten()
    pad = (-flat.numel()) % 8
    bits = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8).to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return {"shape": list(mask.shape), "bits": (bits * weights).sum(dim=1, dtype=torch.uint8)}


def unpack_mask(packed: Mapping[str, object]) -> Tensor:
    """Inverse of :func:`pack_mask`."""
    shape = tuple(int(s) for s in packed["shape"])  # type: ignore[union-attr]
    bits: Tensor = packed["bits"]  # type: ignore[assignment]
    numel = 1
    for s in shape:
        numel *= s
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    flat = ((bits.to(torch.uint8).unsqueeze(1) >> shifts) & 1).flatten()[:numel]
    return flat.to(torch.bool).view(shape)
