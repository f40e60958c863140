"""Models dispatched by accelerate with offloaded weights (``device_map`` with ``"cpu"``/``"disk"`` entries,
``offload_folder``, ``cpu_offload``, ``disk_offload``): pruned one block at a time, never all resident.

accelerate keeps an offloaded module's parameters on the meta device; its hook (``AlignDevicesHook`` with
``offload=True``) reads them from a weights map (CPU tensors, memory-mapped ``.dat`` files in the offload
folder, or the checkpoint's own safetensors) before each forward and drops them after. A block-by-block
round needs a block's weights to stay put across its forwards and its solve, and its pruned weights to
outlive the block: :func:`onloaded` reads the block's weights once onto the hooks' execution device, tells
the hooks not to reload them meanwhile, and on exit writes the weights the round changed back into the map
and puts the block back on meta. A weight read from the checkpoint's safetensors is written to the offload
folder instead (the checkpoint is never modified), so later forwards and ``save_pretrained`` read the
pruned values. accelerate is imported only where a model has its hooks (it stays optional).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def _hooks(module: nn.Module) -> list[Any]:
    """accelerate's hooks on ``module`` (a ``SequentialHook`` holds several)."""
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", [hook]))


def _offloading(module: nn.Module) -> list[Any]:
    """The hooks that hold ``module``'s weights in a weights map (they are on meta outside its forward)."""
    return [h for h in _hooks(module) if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None]


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate has hooks on ``model`` (``device_map=``, ``dispatch_model``, offload helpers)."""
    return any(_hooks(m) for m in model.modules())


def is_offloaded(model: nn.Module) -> bool:
    """Whether some of ``model``'s weights live in accelerate's weights maps rather than in the model."""
    return any(_offloading(m) for m in model.modules())


def offloaded_names(model: nn.Module) -> set[str]:
    """The names (as ``named_parameters``/``named_buffers`` give them) of the tensors accelerate offloads."""
    found: set[str] = set()
    for prefix, module in model.named_modules():
        for hook in _offloading(module):
            found.update(f"{prefix}.{name}" if prefix else name for name, _ in _tensors(module, hook))
    return found


def storage_device(t: Tensor) -> torch.device:
    """Where a weight's values are kept: its device, or the CPU for an offloaded (meta) one. Masks live there."""
    return torch.device("cpu") if t.is_meta else t.device


def execution_devices(model: nn.Module) -> set[torch.device]:
    """The devices accelerate's hooks compute on."""
    found = (getattr(h, "execution_device", None) for m in model.modules() for h in _hooks(m))
    return {_indexed(torch.device(d)) for d in found if d is not None}


def _indexed(device: torch.device) -> torch.device:
    """``"cuda"`` as the index it means (accelerate's hooks name theirs), other devices as they are."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def round_device(model: nn.Module, device: torch.device | None, where: str) -> torch.device | None:
    """The ``device`` a block-by-block round moves blocks to itself: ``None`` on a model accelerate dispatched
    (its hooks place every module, and :func:`onloaded` brings offloaded blocks to their execution device).
    ``device`` is accepted there only as the hooks' one execution device, and refused otherwise."""
    if device is None or not is_dispatched(model):
        return device
    devices = execution_devices(model)
    if devices != {_indexed(device)}:
        raise ValueError(
            f"{where}: {type(model).__name__} is dispatched by accelerate to {sorted(map(str, devices))}, whose hooks "
            "move each module's inputs and weights there, which would fight moving blocks to another device. Pass "
            "device=None (each offloaded block is then read onto accelerate's execution device, pruned and written "
            "back), dispatch it with that device as execution device, or load it on the CPU without device_map"
        )
    return None


def check_round(model: nn.Module, blocks: str | None, distributed: bool) -> None:
    """Refuse a round that cannot run on offloaded weights: one that holds every layer at once (not block by
    block: the weights are on meta outside their forward), or one under several processes (untested)."""
    if not is_offloaded(model):
        return
    names = sorted(offloaded_names(model))
    what = f"{type(model).__name__} has {len(names)} weights offloaded by accelerate ({names[0]}, ...)"
    if blocks is None:
        raise ValueError(
            f"{what}: only a block-by-block round (the defaults on a decoder, SparseGPT(...), blocks='auto') reads "
            "them one block at a time; this round solves every layer at once (blocks=None). Use a block-by-block "
            "round, or load the model without offload"
        )
    if distributed:
        raise ValueError(f"{what}: pruning offloaded weights under several processes is not supported; use one")


def check_blocks(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Refuse, before any forward, a hook that offloads a whole subtree above a block (``place_submodules``): it
    reads every block at once, and its weights map, not the blocks, would hold what later forwards use."""
    inside = {id(b) for b in blocks}
    for name, module in model.named_modules():
        whole = any(h.place_submodules for h in _offloading(module)) and id(module) not in inside
        if whole and (below := [n for n, m in module.named_modules() if id(m) in inside]):
            raise ValueError(
                f"accelerate offloads {name or type(model).__name__!r} as one piece (a hook with "
                f"place_submodules=True above the blocks {below[:2]}), which a block-by-block round cannot read "
                "one block at a time. Dispatch with a device_map over the blocks (e.g. "
                "from_pretrained(..., device_map=..., offload_folder=...))"
            )


def _tensors(module: nn.Module, hook: Any) -> list[tuple[str, Tensor]]:
    """The tensors ``hook`` offloads, as accelerate names them (relative to ``module``)."""
    from accelerate.utils import named_module_tensors

    return list(
        named_module_tensors(
            module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True
        )
    )


@contextlib.contextmanager
def onloaded(block: nn.Module, changed: Sequence[tuple[nn.Module, str]]) -> Iterator[None]:
    """``block``'s offloaded weights read once onto their execution device for the duration; on exit the
    ones named in ``changed`` (``(module, attribute)``: what the round may modify) are written back to their
    weights maps, and every one goes back to meta. Nothing is done (nor imported) on a block without offload."""
    held = [(m, h) for m in block.modules() for h in _offloading(m)]
    if not held:
        yield
        return
    from accelerate.utils import set_module_tensor_to_device

    wanted = {(id(m), name) for m, name in changed}
    loaded: list[tuple[nn.Module, Any]] = []
    try:
        for module, hook in held:
            for name, _ in _tensors(module, hook):
                value = hook.weights_map[name]
                set_module_tensor_to_device(module, name, hook.execution_device, value=value)
            hook.offload = False  # its forwards keep these weights (it would reload them from the map)
            loaded.append((module, hook))
        yield
    finally:
        for module, hook in loaded:
            for name, tensor in _tensors(module, hook):
                owner, _, leaf = name.rpartition(".")
                if (id(module.get_submodule(owner)), leaf) in wanted:
                    write_back(hook.weights_map, name, tensor)
                set_module_tensor_to_device(module, name, "meta")
            hook.offload = True


def write_back(weights_map: Any, name: str, value: Tensor) -> None:
    """Store ``value`` as ``name`` in an accelerate weights map: in place of a CPU tensor, or as a ``.dat``
    file in the offload folder (a weight read from the checkpoint's safetensors too: the checkpoint is left
    as it was), so that the map's next read gives ``value``."""
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    value = value.detach().to("cpu")
    while isinstance(weights_map, PrefixedDataset):
        name, weights_map = weights_map.prefix + name, weights_map.dataset
    if isinstance(weights_map, OffloadedWeightsLoader):
        if name in weights_map.state_dict:
            weights_map.state_dict[name] = value
        elif weights_map.save_folder is None:
            raise ValueError(
                f"cannot write the pruned {name!r} back: accelerate's weights map reads it from "
                f"{weights_map.index[name]} and has no offload folder to write to; pass offload_folder=..."
            )
        else:
            offload_weight(value, name, weights_map.save_folder, index=weights_map.index)
    elif isinstance(weights_map, MutableMapping):
        weights_map[name] = value
    else:
        raise TypeError(f"cannot write the pruned {name!r} back into a {type(weights_map).__name__} weights map")
