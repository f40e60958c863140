"""The blocks SquareHead matches: found in the student, paired by name in the teacher, and their hidden
states read from a block's output. Each is one small function, so a shared layout helper can replace it."""

from __future__ import annotations

import fnmatch
from typing import Any

from torch import Tensor, nn


def block_hidden(out: Any) -> Tensor:
    """A block's hidden states: its output, or the first element of the tuple a decoder layer returns."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(f"Distillation: a SquareHead block returned {type(out).__name__}, not hidden states")


def find_feature_blocks(model: nn.Module, blocks: str) -> list[str]:
    """Names of the blocks SquareHead matches: ``"auto"``, the decoder's layers (the largest
    ``nn.ModuleList`` of at least two modules of one type, by parameters), or a glob over module names
    (the outermost matches)."""
    if blocks == "auto":
        best, size = [], 0
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
                n = sum(p.numel() for p in module.parameters())
                if n > size:
                    best, size = [f"{name}.{i}" if name else str(i) for i in range(len(module))], n
        if not best:
            raise ValueError(
                f"`squarehead_blocks='auto'` found no nn.ModuleList of identical blocks in {type(model).__name__}: "
                "name them with a glob, e.g. squarehead_blocks='model.layers.*'"
            )
        return best
    found: list[str] = []
    for name, _ in model.named_modules():
        if name and fnmatch.fnmatchcase(name, blocks) and not any(name.startswith(f"{f}.") for f in found):
            found.append(name)
    if not found:
        tops = [n for n, _ in model.named_children()]
        raise ValueError(f"`squarehead_blocks={blocks!r}` matches no module of {type(model).__name__} (top: {tops})")
    return found


def pair_block(name: str, teacher: nn.Module, blocks: str) -> str:
    """The teacher's module for the student's block ``name``: the same name, else the one module whose
    dotted name ends with the other's (a PEFT student's ``base_model.model.model.layers.0`` and a bare
    teacher's ``model.layers.0``). Anything else is refused, naming the block."""
    names = [n for n, _ in teacher.named_modules() if n]
    if name in names:
        return name
    found = [n for n in names if name.endswith(f".{n}") or n.endswith(f".{name}")]
    found = [n for n in found if len(n.split(".")) == max(len(f.split(".")) for f in found)] if found else []
    if len(found) != 1:
        raise ValueError(
            f"`squarehead_blocks={blocks!r}`: the teacher ({type(teacher).__name__}) has "
            f"{'several' if found else 'no'} block for the student's {name!r}{f' ({found[:3]})' if found else ''}; "
            "SquareHead pairs blocks by name, so the teacher needs the student's architecture"
        )
    return found[0]
