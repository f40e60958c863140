"""The blocks SquareHead matches: found in the student (the layout registry's block finding), paired by name
in the teacher, and their hidden states read from a block's output."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_prune.models.layouts import block_output, find_blocks


def block_hidden(out: Any) -> Tensor:
    """A block's hidden states: its output, or the first element of the tuple a decoder layer returns."""
    return block_output(out, "Distillation: a SquareHead block")


def find_feature_blocks(model: nn.Module, blocks: str) -> list[str]:
    """Names of the blocks SquareHead matches: ``"auto"``, the decoder's layers (the registry's block list,
    else the largest ``nn.ModuleList`` of at least two modules of one type, by parameters), or a glob over
    module names (the outermost matches)."""
    return [name for name, _ in find_blocks(model, blocks, arg="squarehead_blocks")]


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
