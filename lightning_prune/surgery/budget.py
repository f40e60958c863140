"""``shrink_to``: the best smaller model for a parameter budget, choosing width (hidden size, heads, MLP
neurons) against depth (blocks) by measurement, as Minitron ranks its candidates.

A Hugging Face decoder has four axes that make it smaller: the hidden size (:func:`~lightning_prune.prune_hidden`),
the attention heads and the MLP neurons of every block (``pattern="channels"`` + :func:`~lightning_prune.shrink`),
and the number of blocks (:func:`~lightning_prune.prune_blocks`). :func:`shrink_to` enumerates shapes on a
grid of the first three and the fourth, gives each shape the **largest MLP width that fits the budget** (the
parameter count of every shape is exact: the model class is built from the shape's config on the meta
device), picks ``candidates`` of them (the single-axis cuts and the most balanced mixes), prunes each from the
dense model on ``data`` and ranks them by the measured calibration loss on held-out batches. The best one is
returned, ready for ``save_pretrained``, with the table of every candidate in ``Shrunk.candidates``. With
``recover_steps``, each candidate is first distilled from the dense model for that many steps and ranked after
(Minitron ranks its candidates after a lightweight retraining).

Each candidate: blocks by their measured removal cost (scored once, on the dense model), then heads and
neurons with label-free structured OBS (every block the same counts, consumers refitted), then the hidden
size with :func:`~lightning_prune.prune_hidden`'s OBS score (readers refitted, norms rescaled). The budget
counts the parameters outside the embeddings and the output head by default (``count="non_embedding"``),
as Minitron reports its sizes.
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lightning_prune.engine.calibration import Calibration, LossFn, describe_batch, eval_mode, no_kv_cache
from lightning_prune.models import hf_config as hf
from lightning_prune.models import layouts
from lightning_prune.surgery.shrink import RefusedSave, Shrunk

COUNTS = ("non_embedding", "all")
AXES = ("hidden", "heads", "neurons", "depth")
HIDDEN_KEPT = (1.0, 0.875, 0.75, 0.625, 0.5)
HEADS_KEPT = (1.0, 0.75, 0.5)
DEPTH_REMOVED = (0.0, 0.125, 0.25, 0.375)


@dataclass(frozen=True)
class Shape:
    """One candidate: what each axis keeps (``blocks``: how many), and its exact parameter count."""

    hidden: int
    kv_heads: int
    heads: int
    intermediate: int
    blocks: int
    params: int

    def text(self) -> str:
        return (
            f"hidden {self.hidden}, heads {self.heads}/{self.kv_heads} kv, MLP {self.intermediate}, "
            f"{self.blocks} blocks"
        )


def shrink_to(
    model: nn.Module,
    data: Sequence[Any],
    params: float | int,
    *,
    count: str = "non_embedding",
    axes: Sequence[str] | None = None,
    candidates: int = 8,
    eval_batches: int | None = None,
    loss_fn: LossFn | None = None,
    recover_steps: int = 0,
    recover_lr: float = 1e-4,
    verbose: int = 1,
) -> Shrunk:
    """The best of ``candidates`` smaller shapes of ``model`` (a Hugging Face decoder of a registered
    architecture, or a module holding one) within ``params``: a fraction in ``(0, 1)`` of the dense model's
    parameters (counted as ``count`` says) or a number of them.

    ``data``: calibration batches with a loss (a list; the last ``eval_batches``, default a quarter of them,
    rank the candidates by their mean loss, the others prune them); ``axes``: which of ``("hidden", "heads",
    "neurons", "depth")`` may change (default: every one the architecture can cut: GPT-2's and BERT's
    configs tie the head size to the hidden size, so their hidden size and heads stay; ``"neurons"`` fills
    the budget; without it a candidate is the largest shape of the other axes within the budget).

    ``recover_steps``: rank the candidates after that many steps of logit distillation from ``model`` each
    (AdamW at ``recover_lr``, KD at temperature 1 on the calibration batches, cycled, the dense model the
    teacher), as Minitron ranks its candidates after a lightweight retraining: the loss right after pruning
    predicts poorly which candidate recovers best. It needs batches the decoder can be fed (mappings with
    ``input_ids``, optionally ``attention_mask``); the default 0 ranks the one-shot candidates.

    Returns the best candidate's :class:`Shrunk` (a copy; ``model`` is untouched), recovered when
    ``recover_steps > 0``; ``Shrunk.candidates`` lists every candidate's shape, parameters, held-out loss
    (``"loss"``, after recovery; ``"loss_oneshot"`` before it) and seconds, in the order tried.
    """
    if count not in COUNTS:
        raise ValueError(f"`count` must be one of {COUNTS}, got {count!r}")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"`candidates` must be an integer >= 1, got {candidates!r}")
    _check_recovery_args(recover_steps, recover_lr)
    _, hf_model, arch = _decoder(model)
    axes = _axes(hf_model, arch, axes)
    data = list(data)
    eval_batches = max(1, len(data) // 4) if eval_batches is None else eval_batches
    if isinstance(eval_batches, bool) or not isinstance(eval_batches, int) or not 1 <= eval_batches < len(data):
        raise ValueError(
            f"`eval_batches={eval_batches!r}` must leave calibration batches: `data` gave {len(data)} batches, and "
            "the last eval_batches of them rank the candidates"
        )
    calib, held_out = data[:-eval_batches], data[-eval_batches:]
    if recover_steps:
        _check_recoverable(model, calib)
    if not Calibration(model, loss_fn, training_step=True, output_loss=True).has_loss(held_out[0]):
        raise ValueError(
            f"shrink_to ranks the candidates by their loss, and {type(model).__name__} gives none on `data`: pass "
            "batches with labels (a causal LM: labels=input_ids) or loss_fn=lambda model, batch: ... (the mean loss)"
        )
    dense = _shape_of(hf_model, arch)
    counter = _Counter(hf_model, arch, count)
    budget = _budget(params, counter(dense))
    shapes = grid(hf_model, arch, dense, budget, counter, axes)
    if not shapes:
        raise ValueError(
            f"no shape of {type(hf_model).__name__} on the grid fits params={params!r} ({budget:,} {count} "
            f"parameters of {counter(dense):,}) with axes={list(axes)}: allow more axes or a larger budget"
        )
    chosen = pick(shapes, dense, candidates)
    order = _block_order(model, calib, loss_fn) if any(s.blocks < dense.blocks for s in chosen) else []
    rows, result, shape = _rank(
        model, calib, held_out, chosen, dense, order, loss_fn, recover_steps, recover_lr, verbose
    )
    result.candidates = rows
    recovered = f", each recovered {recover_steps} steps of logit distillation (lr {recover_lr:g})"
    result.notes.append(
        f"shrink_to(params={params!r}, count={count!r}, axes={list(axes)}): best of {len(rows)}"
        f"{recovered if recover_steps else ''}: {shape.text()}"
    )
    return result


def _rank(
    model: nn.Module,
    calib: Sequence[Any],
    held_out: Sequence[Any],
    chosen: Sequence[Shape],
    dense: Shape,
    order: Sequence[int],
    loss_fn: LossFn | None,
    recover_steps: int,
    recover_lr: float,
    verbose: int,
) -> tuple[list[dict[str, Any]], Shrunk, Shape]:
    """Every shape of ``chosen`` built (and recovered: ``recover_steps``) and measured on ``held_out``: the rows of
    ``Shrunk.candidates``, the best candidate and its shape."""
    rows, best = [], None
    for shape in chosen:
        start = time.perf_counter()
        small = build_candidate(model, calib, shape, dense, order, loss_fn)
        loss = oneshot = mean_loss(small.model, held_out, loss_fn)
        if recover_steps:
            _distil(_decoder(small.model)[1], _decoder(model)[1], calib, recover_steps, recover_lr)
            loss = mean_loss(small.model, held_out, loss_fn)
        rows.append({**asdict(shape), "loss_oneshot": oneshot, "loss": loss, "seconds": time.perf_counter() - start})
        if verbose >= 1:
            after = f", {loss:.4f} after {recover_steps} recovery steps" if recover_steps else ""
            print(f"shrink_to: {shape.text()}: {shape.params:,} params, loss {oneshot:.4f}{after}", flush=True)
        if best is None or loss < best[0]:
            best = (loss, small, shape)
    assert best is not None
    return rows, best[1], best[2]


def _check_recovery_args(steps: Any, lr: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`recover_steps` must be an integer >= 0, got recover_steps={steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"`recover_lr` must be a finite learning rate > 0, got recover_lr={lr!r}")


def _check_recoverable(model: nn.Module, calib: Sequence[Any]) -> None:
    """Refuse, before any candidate is built, batches the decoder cannot be fed and a model with nothing to train."""
    for i, batch in enumerate(calib):
        if _inputs(batch) is None:
            keys = f" with keys {list(batch)}" if isinstance(batch, Mapping) else ""
            raise ValueError(
                f"`recover_steps` distils each candidate on the calibration batches, fed to the decoder as "
                f"input_ids (and attention_mask): batch {i} is a {type(batch).__name__}{keys}, "
                f"{describe_batch(batch)}; pass mappings with an `input_ids` tensor, or recover_steps=0"
            )
    if not any(p.requires_grad for p in _decoder(model)[1].parameters()):
        raise ValueError(
            f"`recover_steps` trains each candidate's parameters, and every parameter of {type(model).__name__} "
            "has requires_grad=False: unfreeze the ones to train, or pass recover_steps=0"
        )


def _inputs(batch: Any) -> dict[str, torch.Tensor] | None:
    """What a decoder is fed to distil on ``batch`` (its token ids and padding mask, no labels), or ``None``."""
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        return None
    return {k: batch[k] for k in ("input_ids", "attention_mask") if isinstance(batch.get(k), torch.Tensor)}


def _distil(student: nn.Module, teacher: nn.Module, batches: Sequence[Any], steps: int, lr: float) -> None:
    """Train ``student`` ``steps`` steps of logit distillation from ``teacher`` (in eval mode, no gradient) on
    ``batches`` cycled in order: AdamW at ``lr`` over the parameters that require a gradient, loss
    :func:`~lightning_prune.distill.losses.kd_loss` at temperature 1 over the positions ``attention_mask`` keeps.
    Minitron's lightweight retraining of a candidate before it is ranked. The student trains in train mode;
    every module's own ``training`` flag, and ``use_cache``, are restored after; no gradient is left behind."""
    from lightning_prune.distill.losses import kd_loss, output_logits

    if steps == 0:
        return
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    with eval_mode(student), eval_mode(teacher), no_kv_cache(student), no_kv_cache(teacher), torch.enable_grad():
        student.train()  # eval_mode restores each module's own flag on exit
        for step in range(steps):
            inputs = _inputs(batches[step % len(batches)])
            assert inputs is not None  # refused before any candidate (_check_recoverable)
            with torch.no_grad():
                target = output_logits(teacher(**inputs))
            loss = kd_loss(output_logits(student(**inputs)), target, 1.0, mask=inputs.get("attention_mask"))
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"shrink_to: the distillation loss is {float(loss)} at recovery step {step}: "
                    f"lower recover_lr={lr:g}"
                )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _axes(hf_model: nn.Module, arch: layouts.Architecture, axes: Sequence[str] | None) -> tuple[str, ...]:
    """The axes to search: those given (each one the architecture can cut, else refused), or all it can."""
    from lightning_prune.surgery.hidden import hidden_stream

    why: dict[str, str] = {}
    try:
        hidden_stream(hf_model)
    except ValueError as err:
        why["hidden"] = str(err)
    if not arch.attention_parts or any(a.fixed for a in arch.attention_parts):
        why["heads"] = f"{arch.name}: " + (arch.attention_parts[0].fixed if arch.attention_parts else "no attention")
    if not arch.mlp_parts:
        why["neurons"] = f"{arch.name}: its MLP is a Mixture of Experts (prune_experts removes experts)"
    if axes is None:
        return tuple(a for a in AXES if a not in why)
    if isinstance(axes, str) or not axes or any(a not in AXES for a in axes):
        raise ValueError(f"`axes` must name some of {AXES}, got {axes!r}")
    if cannot := {a: why[a] for a in axes if a in why}:
        raise ValueError(f"`axes={list(axes)}`: {type(hf_model).__name__} cannot cut {list(cannot)}: {cannot}")
    return tuple(axes)


def _decoder(model: nn.Module) -> tuple[str, nn.Module, layouts.Architecture]:
    found = layouts.registered(model)
    if len(found) != 1:
        raise ValueError(
            f"shrink_to needs one Hugging Face decoder of a registered architecture ({sorted(layouts.REGISTRY)}); "
            f"{type(model).__name__} holds {[type(m).__name__ for _, m, _ in found] or 'none'}"
        )
    return found[0]


def _shape_of(hf_model: nn.Module, arch: layouts.Architecture) -> Shape:
    config, keys = hf_model.config, arch.config_keys()
    return Shape(
        hidden=getattr(config, keys["hidden"]),
        kv_heads=getattr(config, keys.get("kv_heads", keys["heads"]), None) or getattr(config, keys["heads"]),
        heads=getattr(config, keys["heads"]),
        intermediate=getattr(config, keys["intermediate"]) or _mlp_width(hf_model, arch),
        blocks=getattr(config, keys["layers"]),
        params=0,
    )


def _mlp_width(hf_model: nn.Module, arch: layouts.Architecture) -> int:
    """The MLP width of the first block, read off its layers (GPT-2's ``n_inner=None`` means 4 x hidden)."""
    block = hf_model.get_submodule(layouts.block_list_path(hf_model, arch) or "")[0]
    for where, part in layouts.block_parts(arch, block):
        if isinstance(part, layouts.MLP):
            consumer = layouts.layer(block.get_submodule(where) if where else block, part.consumer, part.conv1d)
            return int(consumer.weight.shape[0] if part.conv1d else consumer.in_features)
    raise ValueError(f"{type(hf_model).__name__}: no MLP in its first block")


class _Counter:
    """The exact parameter count of a shape: the model class built from the shape's config on meta."""

    def __init__(self, hf_model: nn.Module, arch: layouts.Architecture, count: str) -> None:
        self.model, self.arch, self.count = hf_model, arch, count
        self.keys = arch.config_keys()
        self.head_dim = getattr(hf_model.config, "head_dim", None) or (
            getattr(hf_model.config, self.keys["hidden"]) // getattr(hf_model.config, self.keys["heads"])
        )

    def values(self, s: Shape) -> dict[str, Any]:
        k = self.keys
        values: dict[str, Any] = {k["hidden"]: s.hidden, k["heads"]: s.heads, k["intermediate"]: s.intermediate}
        values[k["layers"]] = s.blocks
        if "kv_heads" in k:
            values[k["kv_heads"]] = s.kv_heads
        if "head_dim" in k:
            values[k["head_dim"]] = self.head_dim
        for key in self.arch.per_block:  # per-block lists keep their first entries (cut with the blocks)
            if isinstance(per_block := getattr(self.model.config, key, None), list):
                values[key] = per_block[: s.blocks]
        return values

    def __call__(self, s: Shape) -> int | None:
        """The parameters of shape ``s``, or ``None`` where its config class refuses it."""
        try:
            config = hf.updated_config(self.model.config, self.values(s))
        except Exception:  # the config class's own validation, whatever it raises
            return None
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = type(self.model)(config)
        total = sum(p.numel() for p in built.parameters())
        if self.count == "non_embedding":
            total -= sum(p.numel() for p in layouts.embedding_parameters(built, self.arch))
        return total


def _budget(params: float | int, dense: int | None) -> int:
    if dense is None:
        raise ValueError("the dense model's own config is refused by its config class")
    if isinstance(params, bool) or not isinstance(params, numbers.Real) or not math.isfinite(params) or params <= 0:
        raise ValueError(f"`params` must be a fraction in (0, 1) or a number of parameters, got {params!r}")
    budget = int(params * dense) if params < 1 else int(params)
    if budget >= dense:
        raise ValueError(f"`params={params!r}` ({budget:,}) is not below the dense model's {dense:,}")
    return budget


def grid(
    hf_model: nn.Module,
    arch: layouts.Architecture,
    dense: Shape,
    budget: int,
    counter: Callable[[Shape], int | None],
    axes: Sequence[str],
) -> list[Shape]:
    """Every shape on the grid within ``budget``: hidden sizes, key/value heads and block counts from the axes
    allowed, each with the largest MLP width that fits (``"neurons"`` allowed), else the full one."""
    from lightning_prune.surgery.hidden import allowed_sizes, hidden_stream

    hiddens = [dense.hidden]
    if "hidden" in axes:
        allowed = [*allowed_sizes(hf_model, hidden_stream(hf_model)[2]), dense.hidden]
        hiddens = sorted({min(allowed, key=lambda h: abs(h - f * dense.hidden)) for f in HIDDEN_KEPT}, reverse=True)
    kvs = sorted({max(1, round(f * dense.kv_heads)) for f in (HEADS_KEPT if "heads" in axes else (1.0,))})[::-1]
    depths = sorted({dense.blocks - round(f * dense.blocks) for f in (DEPTH_REMOVED if "depth" in axes else (0,))})
    shapes = []
    for h, kv, b in itertools.product(hiddens, kvs, depths[::-1]):
        heads = kv * (dense.heads // dense.kv_heads)
        base = Shape(h, kv, heads, dense.intermediate, b, 0)
        shape = _fill(base, budget, counter) if "neurons" in axes else base
        if shape is not None and (n := counter(shape)) is not None and n <= budget:
            shapes.append(Shape(**{**asdict(shape), "params": n}))
    return shapes


def _fill(base: Shape, budget: int, counter: Callable[[Shape], int | None]) -> Shape | None:
    """``base`` with the largest MLP width (at most its own, at least an eighth of it) within ``budget``."""
    low, high = max(1, base.intermediate // 8), base.intermediate
    fits = lambda i: (n := counter(Shape(**{**asdict(base), "intermediate": i}))) is not None and n <= budget  # noqa: E731
    if not fits(low):
        return None
    while low < high:  # the count grows with the width: the largest that fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return Shape(**{**asdict(base), "intermediate": low})


def pick(shapes: Sequence[Shape], dense: Shape, n: int) -> list[Shape]:
    """``n`` shapes to try, one per combination of axes cut: those cutting one axis first, then the others by
    their most balanced member (the smallest spread of what the axes keep), most balanced first."""

    def kept(s: Shape) -> tuple[float, ...]:
        return (s.hidden / dense.hidden, s.kv_heads / dense.kv_heads, s.intermediate / dense.intermediate,
                s.blocks / dense.blocks)  # fmt: skip

    def spread(s: Shape) -> float:
        return max(kept(s)) - min(kept(s))

    best: dict[tuple[bool, ...], Shape] = {}
    for s in sorted(shapes, key=lambda s: (spread(s), -s.params)):
        best.setdefault(tuple(k < 1 for k in kept(s)), s)
    return sorted(best.values(), key=lambda s: (sum(k < 1 for k in kept(s)) > 1, spread(s)))[:n]


def _block_order(model: nn.Module, data: Sequence[Any], loss_fn: LossFn | None) -> list[int]:
    """The blocks by their measured removal cost on the dense model (cheapest first), scored once."""
    from lightning_prune.surgery.depth import block_scores

    scores = block_scores(model, data, score="loss", loss_fn=loss_fn)
    return sorted(range(len(scores)), key=lambda i: scores[i])


def build_candidate(
    model: nn.Module, data: Sequence[Any], shape: Shape, dense: Shape, order: Sequence[int], loss_fn: LossFn | None
) -> Shrunk:
    """``model`` cut to ``shape``: blocks, then heads and neurons (label-free structured OBS), then hidden."""
    from lightning_prune.criteria import OBS
    from lightning_prune.engine.pruner import Pruner
    from lightning_prune.engine.round import prune
    from lightning_prune.surgery.depth import remove_blocks
    from lightning_prune.surgery.hidden import prune_hidden
    from lightning_prune.surgery.shrink import shrink

    _, _, arch = _decoder(model)
    before = sum(p.numel() for p in model.parameters())
    current = copy.deepcopy(model)
    notes = []
    if shape.blocks < dense.blocks:
        drop = sorted(order[: dense.blocks - shape.blocks])
        current = remove_blocks(current, drop).model
        notes.append(f"blocks {drop} removed")
    counter = _Counter(_decoder(current)[1], arch, "all")
    keys = counter.keys
    cuts = {  # part -> (fraction of its structures removed, the config sizes it sets)
        "attention": (1 - shape.kv_heads / dense.kv_heads, ("heads", "kv_heads")),
        "mlp": (1 - shape.intermediate / dense.intermediate, ("intermediate",)),
    }
    for part, (fraction, sizes) in cuts.items():
        if fraction <= 0:
            continue
        criterion = OBS(allocation="reconstruction", recompute_steps=1)  # label-free, one pass: cheap rounds
        pruner = Pruner(criterion, fraction, pattern="channels", include=[f"*.{getattr(arch, part)}.*"],
                        num_batches=len(data), eval_batches=0, verbose=0)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a step on the way may be no standard config (3 heads of hidden 32)
            prune(current, data, pruner, loss_fn=loss_fn)
            current = shrink(current).model
        _, hf_now, _ = _decoder(current)
        for size in sizes:  # the sizes reached so far, written unchecked: the final shape is checked below
            if size in keys:
                setattr(hf_now.config, keys[size], getattr(shape, size))
    if shape.hidden < dense.hidden:
        current = prune_hidden(current, data, dense.hidden - shape.hidden, loss_fn=loss_fn).model
    _describe(current, counter, shape)
    result = Shrunk(current, {}, {}, params_before=before, notes=notes)
    result.params_after = sum(p.numel() for p in current.parameters())
    return result


def _describe(model: nn.Module, counter: _Counter, shape: Shape) -> None:
    """Write ``shape``'s sizes into the config of the decoder in ``model``, checked as ``from_pretrained`` builds
    it; a shape its config class refuses raises (the grid only holds shapes it accepts)."""
    _, hf_model, _ = _decoder(model)
    values = counter.values(shape)
    if problem := hf.check_config(hf_model, values):
        raise RuntimeError(f"shrink_to: the candidate {shape.text()} is not what its config describes: {problem}")
    for key, value in values.items():
        setattr(hf_model.config, key, value)
    if isinstance(hf_model.__dict__.get("save_pretrained"), RefusedSave):  # a step's on the way: described now
        del hf_model.__dict__["save_pretrained"]


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None) -> float:
    """The mean loss of ``model`` over ``batches`` (``loss_fn``, else the output's ``.loss``)."""
    calib = Calibration(model, loss_fn, training_step=True, output_loss=True)
    with eval_mode(model), no_kv_cache(model):
        losses = [float(calib.loss(b, i)) for i, b in enumerate(batches)]
    return sum(losses) / len(losses)


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """``Shrunk.candidates`` as a Markdown table; a "one-shot loss" column (before recovery) when some row was
    recovered (``shrink_to(recover_steps=...)``)."""
    recovered = any(r.get("loss_oneshot", r["loss"]) != r["loss"] for r in rows)
    oneshot = " one-shot loss |" if recovered else ""
    head = (
        f"| hidden | heads (kv) | MLP | blocks | parameters |{oneshot} loss | seconds |\n"
        + "|---" * (7 + recovered)
        + "|"
    )
    lines = [
        f"| {r['hidden']} | {r['heads']} ({r['kv_heads']}) | {r['intermediate']} | {r['blocks']} | {r['params']:,} | "
        + (f"{r.get('loss_oneshot', r['loss']):.4f} | " if recovered else "")
        + f"{r['loss']:.4f} | {r['seconds']:.1f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])
