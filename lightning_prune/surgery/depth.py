"""Depth: remove whole decoder (or encoder) blocks, scored on calibration data.

A residual block that is replaced by the identity passes its input on unchanged, so removing it is
exact for the blocks after it: they see what they would have seen from the identity. Blocks are
ranked by what that replacement costs, measured with the later blocks seeing the new inputs:

* ``score="loss"``: the actual increase of the mean calibration loss (the quantity second-order
  criteria estimate, here measured; one pass over the batches per block);
* ``score="reconstruction"``: label-free, the relative squared error of the model's output
  (logits, or the encoder's last hidden states) against the full model's;
* ``score="influence"``: ShortGPT's Block Influence, ``1 - cos(x_in, x_out)`` of each block's input
  and output hidden states averaged over tokens, from one pass (the baseline; it ignores what the
  later blocks make of the change).

Why not a pattern (``pattern="blocks"`` in :mod:`lightning_prune.patterns`): a pattern turns the
criterion's per-weight scores into masks. A block's removal is neither: its cost is not a sum of
weight scores, and zero weights make a block the identity only in pre-norm blocks without biases
(not GPT-2's biased projections, not BERT's post-norm). So depth is one call,
:func:`prune_blocks`, that scores, removes and returns the smaller model; ``pattern="blocks"``
says so. Width and depth combine: ``shrink`` the width-pruned model, then ``prune_blocks`` it
(or the other order); both keep the config in step.

Removal (:func:`remove_blocks`) deletes the blocks from their ``nn.ModuleList``, renumbers every
``layer_idx`` in the blocks left (Hugging Face attention indexes the key/value cache by it, so
``generate()`` with a cache works), and on a Hugging Face model writes ``num_hidden_layers`` (and
``layer_types`` where the config has it) so that ``save_pretrained`` / ``from_pretrained`` round
trip; a config with other per-block lists is refused (they would stay uncut). GPT-2 with
``scale_attn_by_inverse_layer_idx`` is refused: its attention depends on the block's position, so a
renumbered block computes something else.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.engine.calibration import Calibration, LossFn, batch_runner, eval_mode, no_kv_cache, output_module
from lightning_prune.models import hf_config as hf
from lightning_prune.models.layouts import block_input, block_output, find_block_list, layout_of, model_output
from lightning_prune.surgery.shrink import Shrunk, _run, check_outputs

SCORES = ("loss", "reconstruction", "influence")


@contextlib.contextmanager
def as_identity(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """``blocks`` pass their input hidden states on unchanged (what removing them computes)."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        hidden = block_input(args, kwargs)
        if isinstance(out, tuple):
            return (hidden, *out[1:])
        if isinstance(out, Tensor):
            return hidden
        raise TypeError(f"{type(module).__name__} returns {type(out).__name__}: cannot replace it by the identity")

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def block_scores(
    model: nn.Module,
    data: Sequence[Any],
    *,
    score: str = "loss",
    loss_fn: LossFn | None = None,
    blocks: str = "auto",
    removed: Sequence[int] = (),
) -> list[float]:
    """The cost of replacing each block by the identity (see the module docstring), one per block in
    order; lower goes first. ``data``: calibration batches as :func:`lightning_prune.prune` takes them.
    ``removed``: blocks already replaced by the identity in every pass (greedy removal); their score is
    ``inf``. ``"loss"`` is then the increase over the model without them, ``"reconstruction"`` still the
    error against the full model's outputs (what the smaller model would lose in all)."""
    if score not in SCORES:
        raise ValueError(f"`score` must be one of {SCORES}, got {score!r}")
    batches = list(data)
    if not batches:
        raise ValueError("`data` gave no batches: block scores need calibration batches")
    _, layers = find_block_list(model, blocks)
    run = batch_runner(model, loss_fn, f"score={score!r}")  # refuses a module it cannot run, before any pass
    gone = set(removed)
    if bad := sorted(i for i in gone if isinstance(i, bool) or not (isinstance(i, int) and 0 <= i < len(layers))):
        raise ValueError(f"`removed` must hold block indices in 0..{len(layers) - 1}, got {bad[:5]}")
    without = [layers[i] for i in sorted(gone)]
    out = [math.inf] * len(layers)
    with eval_mode(model), no_kv_cache(model):
        if score == "influence":
            with as_identity(without):
                for i, bi in _influence(run, layers, batches, gone).items():
                    out[i] = bi
            return out
        if score == "loss":
            calib = Calibration(model, loss_fn, training_step=True, output_loss=True)
            if not calib.has_loss(batches[0]):
                raise ValueError(
                    f"score='loss' needs a loss and {type(model).__name__} gave none: pass loss_fn=lambda model, "
                    "batch: ..., batches with labels (Hugging Face), or score='reconstruction' (label-free)"
                )
            with as_identity(without):
                base = calib.mean_loss(batches)
            for i, block in enumerate(layers):
                if i not in gone:
                    with as_identity([*without, block]):
                        out[i] = calib.mean_loss(batches) - base
            return out
        outputs = _outputs(model, layers, run)
        reference = [outputs(b, j) for j, b in enumerate(batches)]
        for i, block in enumerate(layers):
            if i in gone:
                continue
            with as_identity([*without, block]):
                err = 0.0
                for j, (b, ref) in enumerate(zip(batches, reference)):
                    got = outputs(b, j)
                    num = sum((y - r).pow(2).sum() for y, r in zip(got, ref, strict=True))
                    err += float(num / sum(r.pow(2).sum() for r in ref).clamp_min(1e-30))
            out[i] = err / len(batches)
        return out


def _outputs(
    model: nn.Module, layers: nn.ModuleList, run: Callable[[Any, int], Any]
) -> Callable[[Any, int], list[Tensor]]:
    """The model's outputs on a batch (logits, or an encoder's last hidden states), in float32: what ``model``
    returns, or for a module without ``forward`` (a LightningModule with only ``training_step``) what the
    module holding the blocks returns in the call ``run`` makes (one entry per call)."""
    found = output_module(model, [layers])
    if found is None:
        raise ValueError(
            f"score='reconstruction' compares {type(model).__name__}'s outputs, and neither it nor a submodule holding "
            "its blocks implements forward: use score='loss' or 'influence', or pass the model inside"
        )
    name, top = found

    def output(out: Any) -> Tensor:
        return model_output(out, "score='reconstruction'", "use score='loss' or 'influence'").float()

    if top is model:
        return lambda batch, batch_idx: [output(run(batch, batch_idx))]
    captured: list[Tensor] = []

    def outputs(batch: Any, batch_idx: int) -> list[Tensor]:
        captured.clear()
        handle = top.register_forward_hook(lambda module, args, out: captured.append(output(out)))
        try:
            run(batch, batch_idx)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(
                f"score='reconstruction' reads the output of {name!r}, and {type(model).__name__} did not call it on "
                f"batch {batch_idx}"
            )
        return list(captured)

    return outputs


def _influence(
    run: Callable[[Any, int], Any], layers: nn.ModuleList, batches: Sequence[Any], skip: set[int]
) -> dict[int, float]:
    """ShortGPT's Block Influence: ``1 - cos(x_in, x_out)`` per token, averaged over all tokens."""
    sums = dict.fromkeys(range(len(layers)), 0.0)
    counts = dict.fromkeys(range(len(layers)), 0)

    def hook(i: int) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x, y = block_input(args, kwargs).float(), block_output(out).float()
            cos = torch.nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), dim=-1)
            sums[i] += float((1 - cos).sum())
            counts[i] += cos.numel()

        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(layers) if i not in skip]
    try:
        for j, batch in enumerate(batches):
            run(batch, j)
    finally:
        for h in handles:
            h.remove()
    return {i: sums[i] / max(counts[i], 1) for i in range(len(layers)) if i not in skip}


def _count(n: int | float, total: int) -> int:
    """Blocks to remove: an integer, or a fraction in ``(0, 1)`` of ``total`` (rounded); at least one stays."""
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n):
        raise ValueError(f"`n` must be a number of blocks or a fraction in (0, 1), got {n!r}")
    count = round(float(n) * total) if not isinstance(n, numbers.Integral) and 0 < n < 1 else n
    if not isinstance(count, numbers.Integral) or not 1 <= count <= total - 1:
        raise ValueError(
            f"`n`={n!r} must remove between 1 and {total - 1} of the {total} blocks (an integer, or a fraction in "
            f"(0, 1) that rounds to one), got {count!r}"
        )
    return int(count)


def remove_blocks(
    model: nn.Module,
    drop: Sequence[int],
    *,
    blocks: str = "auto",
    example_inputs: Any = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> Shrunk:
    """A copy of ``model`` without the blocks at indices ``drop`` (``model`` is untouched).

    On ``example_inputs`` the copy must compute what ``model`` computes with those blocks replaced by
    the identity (within ``atol + rtol * max|output|``), else it raises. ``Shrunk.hf_configs`` holds the
    config values written (``num_hidden_layers``, ``layer_types``); ``Shrunk.plan`` is empty (no width
    change), ``Shrunk.removed`` is ``{block list: blocks removed}`` and ``Shrunk.blocks_kept`` the
    original indices of the blocks left.
    """
    name, layers = find_block_list(model, blocks)
    total = len(layers)
    values = list(drop)
    if bad := [d for d in values if isinstance(d, bool) or not isinstance(d, numbers.Integral) or not 0 <= d < total]:
        raise ValueError(f"`drop` must hold block indices in 0..{total - 1}, got {bad[:5]}")
    if len(set(values)) != len(values) or not 1 <= len(values) <= total - 1:
        raise ValueError(f"`drop` must name distinct blocks, at least one and at most {total - 1}, got {values}")
    _check_removable(model, name, layers)
    values = [int(d) for d in values]
    kept = [i for i in range(total) if i not in set(values)]
    checked = _checked_module(model, layers, example_inputs)
    reference = None
    if example_inputs is not None:
        with as_identity([layers[i] for i in values]):
            reference = _run(model.get_submodule(checked), example_inputs)
    before = sum(p.numel() for p in model.parameters())
    out = copy.deepcopy(model)
    new_layers = out.get_submodule(name)
    assert isinstance(new_layers, nn.ModuleList)
    for i in sorted(values, reverse=True):
        del new_layers[i]  # the list renumbers its keys: model.layers.0, 1, ... as a fresh model names them
    for j, block in enumerate(new_layers):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = j  # the key/value cache is indexed by it
    result = Shrunk(out, {}, {name: len(values)}, params_before=before, blocks_kept={name: kept})
    result.params_after = sum(p.numel() for p in out.parameters())
    _update_depth_configs(result, name, total, kept)
    if reference is not None:
        result.max_abs_diff = check_outputs(
            out.get_submodule(checked),
            example_inputs,
            reference,
            atol,
            rtol,
            lambda diff: (
                f"remove_blocks: the model without blocks {values} differs from the model with them replaced "
                f"by the identity by {diff:.3g} on example_inputs (> atol={atol} + rtol={rtol} x max|output|): "
                "something in the model depends on the blocks' positions; the original is untouched"
            ),
        )
    return result


def _check_removable(model: nn.Module, name: str, layers: nn.ModuleList) -> None:
    """Refuse a model whose blocks cannot be removed whichever they are (before any scoring pass in
    :func:`prune_blocks`): attention that depends on the block's position, a Hugging Face config that does not
    count these blocks or holds per-block settings it could not cut."""
    for module in layers.modules():
        if getattr(getattr(module, "config", None), "scale_attn_by_inverse_layer_idx", False):
            raise ValueError(
                f"{type(module).__name__} scales attention by 1/(layer_idx + 1) (scale_attn_by_inverse_layer_idx): "
                "a renumbered block would compute something else, so its blocks cannot be removed"
            )
    total = len(layers)
    for prefix, pretrained in hf.pretrained_models(model):
        if not hf.within(prefix, name):
            continue
        config = pretrained.config
        if getattr(config, "num_hidden_layers", None) != total:
            raise ValueError(
                f"{type(config).__name__}.num_hidden_layers is {getattr(config, 'num_hidden_layers', None)}, but "
                f"{name!r} holds {total} blocks: the config does not describe this block list"
            )
        cut = layout_of(pretrained).per_block  # config lists with one entry per block, cut with the blocks
        per_block = [k for k, v in config.to_dict().items() if isinstance(v, list) and len(v) == total and k not in cut]
        if per_block:  # a setting per block that would stay unsliced: the reloaded model would differ
            raise ValueError(
                f"{type(config).__name__} holds per-block settings {per_block} (lists of {total}, one per block) that "
                f"remove_blocks does not know how to cut (it cuts {list(cut)}): the saved config would not "
                "describe the blocks left, so the blocks are not removed"
            )


def _checked_module(model: nn.Module, layers: nn.ModuleList, example_inputs: Any) -> str:
    """The name of the module ``example_inputs`` are run through (``model(**example_inputs)``): ``model``, or
    for a module without ``forward`` (a LightningModule with only ``training_step``) the submodule holding the
    blocks that implements one. Refused before any work when there is none."""
    if example_inputs is None:
        return ""
    found = output_module(model, [layers])
    if found is None:
        raise ValueError(
            f"`example_inputs` are run as model(**example_inputs), and {type(model).__name__} implements no forward "
            "(nor does a submodule holding its blocks): implement forward, pass the model inside, or drop "
            "example_inputs"
        )
    return found[0]


def _update_depth_configs(result: Shrunk, name: str, total: int, kept: Sequence[int]) -> None:
    """``num_hidden_layers`` (and ``layer_types``) of the Hugging Face model holding the block list,
    checked as ``from_pretrained`` would build it (the config class and the shapes)."""
    for prefix, pretrained in hf.pretrained_models(result.model):
        if not hf.within(prefix, name):
            continue
        config = pretrained.config  # its block count and per-block settings were checked by _check_removable
        values: dict[str, Any] = {"num_hidden_layers": len(kept)}
        for key in layout_of(pretrained).per_block:
            if isinstance(per_block := getattr(config, key, None), list) and len(per_block) == total:
                values[key] = [per_block[i] for i in kept]
        problem = hf.check_config(pretrained, values)
        if problem is not None:
            raise ValueError(f"the model without blocks cannot be described by its config: {problem}")
        for attr, value in values.items():
            setattr(config, attr, value)
        result.hf_configs[prefix] = values


def prune_blocks(
    model: nn.Module,
    data: Sequence[Any],
    n: int | float,
    *,
    score: str = "loss",
    loss_fn: LossFn | None = None,
    blocks: str = "auto",
    example_inputs: Any = None,
    greedy: bool = False,
) -> Shrunk:
    """Remove the ``n`` blocks (an integer, or a fraction of them) whose replacement by the identity costs
    least by ``score`` on ``data``; returns the smaller model (a copy, ready for ``save_pretrained``),
    with ``Shrunk.notes`` giving the scores and the blocks removed.

    ``greedy=True`` removes one block at a time and scores the rest again with it gone (``n`` times the
    passes): blocks whose removals interact (two that each matter little, but not both) are seen.

    A LightningModule that implements only ``training_step`` (a Hugging Face model in ``self.model``) is run as
    :func:`~lightning_prune.prune` runs it (``loss_fn``, else its ``training_step``); ``"reconstruction"`` and
    ``example_inputs`` use the model inside that holds the blocks."""
    name, layers = find_block_list(model, blocks)
    count = _count(n, len(layers))
    _check_removable(model, name, layers)  # before the scores' passes
    _checked_module(model, layers, example_inputs)
    data = list(data)  # read once: greedy scores it again after each removal (a generator would be spent)
    drop: list[int] = []
    steps = []
    for _ in range(count if greedy else 1):
        scores = block_scores(model, data, score=score, loss_fn=loss_fn, blocks=blocks, removed=drop)
        order = [i for i in sorted(range(len(scores)), key=lambda i: scores[i]) if i not in drop]
        drop += order[: 1 if greedy else count]
        steps.append(", ".join(f"{i}: {s:.4g}" for i, s in enumerate(scores) if math.isfinite(s)))
    drop.sort()
    result = remove_blocks(model, drop, blocks=blocks, example_inputs=example_inputs)
    listed = "; then ".join(f"({s})" for s in steps)
    result.notes.append(f"blocks removed {drop} by score={score!r}{', greedy' if greedy else ''}: per block {listed}")
    return result
