"""``pattern="blocks"``: whole blocks are removed by :func:`lightning_prune.surgery.depth.prune_blocks`, not by masks.

A pattern turns a criterion's per-weight scores into masks; a block's cost (the loss when it is
replaced by the identity, with the later blocks seeing the new inputs) is not a sum of weight
scores, and zero weights make a block the identity only in pre-norm blocks without biases. So the
string is recognised here only to say where depth pruning lives.
"""

from __future__ import annotations

from lightning_prune.patterns.base import Pattern, register


@register("")  # not a pattern the pruner accepts: left out of the list of forms
def _parse(pattern: str) -> Pattern | None:
    if pattern != "blocks":
        return None
    raise ValueError(
        "pattern='blocks' removes whole blocks, which masks cannot express: call "
        "lightning_prune.prune_blocks(model, data, n, score='loss' | 'reconstruction' | 'influence'), which scores "
        "the blocks on `data`, removes n of them (a number or a fraction) and returns the smaller model"
    )
