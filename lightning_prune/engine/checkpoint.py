"""A pruner's checkpoint format: bit-packed masks with checksums, its round history, its last round's point.

:meth:`~lightning_prune.engine.pruner.Pruner.state_dict` and ``load_state_dict`` go through
:func:`encode_state` and :func:`decode_state` only, so the format and its version live here. Masks are
saved as whole layers (gathered one at a time when FSDP2-sharded), so any world size resumes them;
each carries a CRC32 of its shape and bits. A corrupted or hand-edited state is refused when it is
loaded, with an error that names the parameter; :func:`fit_masks` checks masks against the
parameters they are bound to (names and shapes) and cuts whole layers to this rank's block.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_prune.engine import masks as M
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.runtime.offload import storage_device

STATE_VERSION = 2


def encode_state(
    label: str,
    masks: Mapping[str, Tensor] | None,
    targets: Sequence[PruneTarget],
    history: Iterable[Mapping[str, Any]],
    unit: str,
    last_point: int | None,
) -> dict[str, Any]:
    """The state of a pruner called ``label``: its masks (``None`` before the first round) on ``targets``,
    its round records, its schedule's unit and the point of its last round."""
    packed = None
    if masks is not None:  # whole layers (gathered one at a time when sharded): any world size resumes
        by_name = {t.name: t for t in targets}
        packed = {}
        for n, m in masks.items():
            bits = M.pack_mask(by_name[n].gather(m))
            packed[n] = {**bits, "crc32": _crc(bits)}
    return {
        "version": STATE_VERSION,
        "pruner": label,
        "masks": packed,
        "history": [dict(r) for r in history],
        "unit": unit,
        "last_point": last_point,
    }


@dataclass(frozen=True)
class SavedState:
    """A checkpointed pruner state, verified: what :func:`decode_state` gives back."""

    history: list[dict[str, Any]]
    last_point: int | None
    masks: dict[str, Any]  # packed masks by parameter name, each verified; {}: saved before the first round


def decode_state(state: Any, label: str, unit: str) -> SavedState:
    """``state`` checked for a pruner called ``label`` whose schedule counts ``unit`` (epochs or steps):
    its version, its writer, its fields and every mask's size and checksum."""
    if not isinstance(state, Mapping):
        raise ValueError(f"pruning state must be a dict, got {type(state).__name__}")
    version = state.get("version")
    if version != STATE_VERSION:
        raise ValueError(f"unsupported pruning state version {version!r} (this version reads {STATE_VERSION})")
    needed = ("masks", "history", "unit", "last_point")
    if missing := [k for k in needed if k not in state]:
        raise ValueError(f"pruning state is missing {missing}: it is corrupted or hand-edited")
    writer = state.get("pruner")
    if writer is not None and writer != label:
        raise ValueError(
            f"this pruning state was written by {writer}, and this pruner is {label}: load it "
            f"into a {writer} (masks carry the criterion's assumptions, e.g. OBS's compensated weights)"
        )
    history = [dict(r) for r in state["history"]]
    saved_unit, last = state["unit"], state["last_point"]
    if last is not None and saved_unit != unit:
        raise ValueError(
            f"the checkpointed pruner ran {saved_unit} rounds, this one has {unit} triggers: "
            f"resume with the same kind of triggers ({saved_unit} arguments)"
        )
    packed = state["masks"]
    if packed is not None:
        unpack_masks(packed)  # corrupted or hand-edited state is refused now, naming the parameter
    return SavedState(history, last, dict(packed) if packed is not None else {})


def is_pruning_state(state: Any) -> bool:
    """Whether a checkpoint entry looks like a pruner's state (:func:`encode_state`)."""
    return isinstance(state, Mapping) and {"version", "masks", "history"} <= set(state)


def unpack_masks(packed: Mapping[str, Any]) -> dict[str, Tensor]:
    """Checkpointed masks, each verified (size, checksum) and unpacked; whole layers."""
    masks = {}
    for name, p in packed.items():
        try:
            numel = 1
            for d in p["shape"]:
                numel *= int(d)
            if p["bits"].dtype != torch.uint8 or p["bits"].numel() != (numel + 7) // 8:
                raise ValueError(f"{p['bits'].numel()} bytes for shape {list(p['shape'])}")
            if "crc32" in p and _crc(p) != p["crc32"]:
                raise ValueError("checksum mismatch")
            masks[name] = M.unpack_mask(p)
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"checkpointed mask for {name!r} is corrupted or hand-edited ({type(err).__name__}: {err})"
            ) from err
    return masks


def fit_masks(
    masks: Mapping[str, Tensor], targets: Sequence[PruneTarget], what: str, whole: bool = True
) -> Mapping[str, Tensor]:
    """Masks checked against the targets' names and shapes, on their parameters' devices.

    ``whole``: the masks are of whole layers (a checkpoint), cut to this rank's block when sharded;
    else they are already this rank's blocks (a pruner's own :class:`~lightning_prune.engine.masks.PackedMasks`
    are checked and kept packed, their bits moved)."""
    names = {t.name for t in targets}
    if set(masks) != names:
        missing, extra = sorted(names - set(masks)), sorted(set(masks) - names)
        raise ValueError(
            f"{what} pruning masks do not match this model's targets: "
            f"missing {missing[:5]}, unexpected {extra[:5]} (check include/exclude/parameters)"
        )
    packed = masks if isinstance(masks, M.PackedMasks) and not whole else None  # checked and kept as bits
    out: dict[str, Tensor] = {}
    for t in targets:
        mask = masks[t.name] if packed is None else None
        found = packed.shape(t.name) if packed is not None else mask.shape  # type: ignore[union-attr]
        shape = t.param.shape if whole else t.local_param.shape
        if found != shape:
            raise ValueError(f"{what} mask for {t.name!r} has shape {tuple(found)}, the parameter has {tuple(shape)}")
        if packed is not None:
            packed.move_(t.name, storage_device(t.local_param))
        else:
            out[t.name] = (t.local(mask) if whole else mask).to(storage_device(t.local_param))  # type: ignore[union-attr]
    return packed if packed is not None else out


def _crc(packed: Mapping[str, Any]) -> int:
    """Checksum of a packed mask: its shape and its bits."""
    shape = ",".join(str(int(d)) for d in packed["shape"])  # type: ignore[union-attr]
    return zlib.crc32(packed["bits"].numpy().tobytes(), zlib.crc32(shape.encode()))  # type: ignore[union-attr]
