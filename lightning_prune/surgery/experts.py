"""Experts: remove whole Mixture-of-Experts experts from Hugging Face MoE models, scored on calibration data.

A top-k router scores the experts with ``softmax(W h)``, keeps the ``k`` best and mixes their outputs
with those probabilities (renormalised over the ``k`` where the model says so). Deleting expert ``e``
with its router row ``W[e]`` is exactly the same model as forcing its router logit to ``-inf``: the
softmax over the experts left equals the softmax over all of them with ``e``'s term gone, and every
token that chose ``e`` takes its next-best expert instead. :func:`masked_experts` computes that (it
sets the logits of the router's own ``F.linear(h, weight)`` to ``-inf``), so the cost of a removal
can be measured before anything is removed, and the removal checked against it.

Scores, one per expert of each MoE block, lower goes first (``score=``):

* ``"reconstruction"`` (default): the measured relative squared error of the MoE block's output on
  the calibration tokens when the expert is removed and the router renormalises over the rest
  (``sum ||y - y_without_e||^2 / sum ||y||^2``). Label-free, exact for the block, one model pass
  (each block is run once more per expert on its captured input). It is what the removal costs the
  block, rerouting included, where the other scores only look at what the expert did.
* ``"loss"``: the measured increase of the mean calibration loss with the expert removed (all other
  experts present), the quantity second-order criteria estimate (here measured, not expanded): one
  pass over the batches per expert, so ``blocks x experts`` passes. It sees what the later blocks
  make of the change; it needs a loss.
* ``"reap"``: REAP's router-weighted expert activation (arXiv:2510.13999; llm-compressor's
  ``REAPPruningModifier``): the mean over the tokens routed to expert ``j`` of ``g_j * ||f_j(x)||_2``,
  ``g_j`` the routing weight that multiplies its output, ``f_j(x)`` its output. An expert no token
  chose scores 0, as there.
* ``"frequency"``: the fraction of tokens whose top-k holds the expert (the baseline).

All are computed on the unpruned model, every block in the same pass(es) (llm-compressor's REAP
instead scores block by block on the outputs of the already pruned earlier blocks).

Removal (:func:`remove_experts`) deletes the experts' slices of the fused 3-D expert parameters
(``gate_up_proj[E, ...]``, ``down_proj[E, ...]``: how transformers 5 stores Mixtral, Qwen2-MoE and
OLMoE experts; experts kept as a ``ModuleList`` of modules are refused), the router's rows (weight,
bias, per-expert buffers such as ``e_score_correction_bias``), updates every ``num_experts`` count and
the config's ``num_local_experts`` / ``num_experts``, and keeps ``num_experts_per_tok``: a count that
leaves fewer experts than the router's top-k is refused. Qwen2-MoE's shared expert is not a routed
expert and stays. The same number of experts is removed in every MoE block (a standard config holds
one expert count): a non-uniform removal is refused, since plain ``from_pretrained`` could not load it.
Group-limited routers (``n_group``, DeepSeek-V3 style) are refused: the groups would lose different
counts.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_prune.engine.calibration import Calibration, LossFn, batch_runner, eval_mode, no_kv_cache, output_module
from lightning_prune.models import hf_config as hf
from lightning_prune.models import layouts
from lightning_prune.models.layouts import block_output
from lightning_prune.surgery.shrink import Shrunk, _run, check_outputs

SCORES = ("reconstruction", "loss", "reap", "frequency")
MODULE_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")  # attributes modules keep it in


@dataclass
class MoeLayer:
    """One MoE block: its name, the module, its router (``gate``/``router``) and its fused experts."""

    name: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    part: layouts.MoE = layouts.GENERIC_MOE


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    """A module's own parameters and buffers (not its children's)."""
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


def _layer(name: str, block: nn.Module, part: layouts.MoE = layouts.GENERIC_MOE) -> MoeLayer:
    """``block`` as a :class:`MoeLayer` (``part``: its layout), or a ValueError saying why its experts cannot be
    removed."""
    experts = getattr(block, part.experts)
    router = getattr(block, layouts.router_of(part, block) or "")
    where = f"{name or 'the model'} ({type(block).__name__})"
    if isinstance(experts, nn.ModuleList) or not any(True for _ in experts.parameters(recurse=False)):
        raise ValueError(
            f"{where} keeps its experts as {type(experts).__name__} without fused per-expert parameters: "
            "prune_experts removes experts stored as 3-D parameters [num_experts, ...] (transformers 5's Mixtral, "
            "Qwen2-MoE, OLMoE), not a list of expert modules"
        )
    count = getattr(experts, "num_experts", None)
    top_k = getattr(router, "top_k", None)
    weight = getattr(router, "weight", None)
    if not isinstance(count, int) or not isinstance(top_k, int):
        raise ValueError(
            f"{where}: its experts ({type(experts).__name__}) and router ({type(router).__name__}) must say "
            f"num_experts and top_k as integers, got num_experts={count!r}, top_k={top_k!r}"
        )
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[0] != count:
        raise ValueError(
            f"{where}: the router {type(router).__name__} has no weight of shape [num_experts={count}, hidden] "
            f"(got {None if weight is None else tuple(weight.shape)}): its logits are not one row per expert"
        )
    for piece in (experts, router):
        if other := [n for n, _ in piece.named_children() if any(True for _ in piece.get_submodule(n).parameters())]:
            raise ValueError(f"{where}: {type(piece).__name__} holds submodules with parameters {other}")
        if bad := {n: tuple(t.shape) for n, t in _tensors(piece).items() if t.dim() == 0 or t.shape[0] != count}:
            raise ValueError(
                f"{where}: {type(piece).__name__} holds tensors that are not one slice per expert ({bad}); "
                "prune_experts cannot tell how to cut them"
            )
    return MoeLayer(name, block, router, experts, count, top_k, part)


def find_moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every MoE block of ``model``: where the layout registry places them in registered Hugging Face models,
    elsewhere a module with ``experts`` and a ``gate`` or ``router`` (as transformers names them). Raises if
    there is none, or if one of them is of a kind whose experts cannot be removed."""
    placed, holders = layouts.parts_by_name(model)
    found = []
    for name, module in model.named_modules():
        part = placed.get(name)
        if part is None and not any(layouts.within(h, name) for h in holders):
            part = layouts.GENERIC_MOE
        if isinstance(part, layouts.MoE) and layouts.present(part, module):
            found.append(_layer(name, module, part))
    if not found:
        raise ValueError(
            f"found no Mixture-of-Experts block in {type(model).__name__} (a module with `experts` and a `gate` or "
            "`router`, as in Hugging Face Mixtral, Qwen2-MoE, OLMoE): prune_experts removes MoE experts"
        )
    for _, pretrained in hf.pretrained_models(model):
        config = pretrained.config
        for key in ("n_group", "topk_group"):
            if getattr(config, key, None) not in (None, 1):
                raise ValueError(
                    f"{type(config).__name__}.{key}={getattr(config, key)!r}: group-limited routing picks experts "
                    "within groups, which removing experts would unbalance; prune_experts does not remove them"
                )
    return found


class _MaskLogits(TorchFunctionMode):
    """Sets chosen columns of ``F.linear(h, weight)`` to ``-inf`` for the given router weights."""

    def __init__(self, masks: Mapping[int, tuple[Tensor, Tensor]]) -> None:
        super().__init__()
        self.masks, self.seen = masks, set()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) >= 2 and (hit := self.masks.get(id(args[1]))) and args[1] is hit[0]:
            self.seen.add(id(args[1]))
            out = out.index_fill(-1, hit[1].to(out.device), float("-inf"))
        return out


@contextlib.contextmanager
def masked_experts(model: nn.Module, drop: Mapping[str, Sequence[int]]) -> Iterator[None]:
    """Within the block, the routers of the named MoE blocks never choose the experts in ``drop`` (their
    logits are ``-inf``): what the model without them computes. Raises if a router did not compute its
    logits as ``F.linear(h, router.weight)`` (then this would mask nothing)."""
    with _masked({layer.name: layer for layer in find_moe_layers(model)}, drop):
        yield


@contextlib.contextmanager
def _masked(layers: Mapping[str, MoeLayer], drop: Mapping[str, Sequence[int]]) -> Iterator[None]:
    masks: dict[int, tuple[Tensor, Tensor]] = {}
    for name, experts in drop.items():
        if name not in layers:
            raise ValueError(f"`drop` names {name!r}, not an MoE block: {list(layers)[:5]}")
        if experts:
            weight = layers[name].router.weight
            masks[id(weight)] = (weight, torch.as_tensor(list(experts), dtype=torch.long))
    mode = _MaskLogits(masks)
    with mode:
        yield
    if missed := [n for n, e in drop.items() if e and id(layers[n].router.weight) not in mode.seen]:
        raise RuntimeError(
            f"the routers of {missed} did not compute their logits as F.linear(hidden, router.weight) in this pass "
            "(or were not called): their experts could not be masked"
        )


def _hidden(args: tuple[Any, ...], kwargs: Mapping[str, Any], i: int, key: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(key)


@torch.no_grad()
def expert_scores(
    model: nn.Module,
    data: Sequence[Any],
    *,
    score: str = "reconstruction",
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
) -> dict[str, list[float]]:
    """Each MoE block's expert scores (see the module docstring), ``{block name: one per expert}``; lower
    goes first. ``data``: calibration batches as :func:`lightning_prune.prune` takes them, the first
    ``num_batches`` of them (default: all)."""
    if score not in SCORES:
        raise ValueError(f"`score` must be one of {SCORES}, got {score!r}")
    batches = _batches(data, num_batches)
    layers = find_moe_layers(model)
    run = batch_runner(model, loss_fn, f"score={score!r}")  # refuses a module it cannot run, before any pass
    with eval_mode(model), no_kv_cache(model):
        if score == "loss":
            return _loss_scores(model, layers, batches, loss_fn)
        if score == "reconstruction":
            return _reconstruction_scores(run, layers, batches)
        return _routing_scores(run, layers, batches, score)


def _batches(data: Sequence[Any], num_batches: int | None) -> list[Any]:
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"`num_batches` must be a positive integer or None (all of `data`), got {num_batches!r}")
    batches = list(itertools.islice(iter(data), num_batches))  # a DataLoader is read only as far as needed
    if not batches:
        raise ValueError("`data` gave no batches: expert scores need calibration batches")
    return batches


def _loss_scores(
    model: nn.Module, layers: Sequence[MoeLayer], batches: Sequence[Any], loss_fn: LossFn | None
) -> dict[str, list[float]]:
    calib = Calibration(model, loss_fn, training_step=True, output_loss=True)
    if not calib.has_loss(batches[0]):
        raise ValueError(
            f"score='loss' needs a loss and {type(model).__name__} gave none: pass loss_fn=lambda model, batch: ..., "
            "batches with labels (Hugging Face), or score='reconstruction' (label-free)"
        )
    base = calib.mean_loss(batches)
    by_name = {layer.name: layer for layer in layers}
    out = {}
    for layer in layers:
        row = []
        for e in range(layer.num_experts):
            with _masked(by_name, {layer.name: [e]}):
                row.append(calib.mean_loss(batches) - base)
        out[layer.name] = row
    return out


def _reconstruction_scores(
    run: Callable[[Any, int], Any], layers: Sequence[MoeLayer], batches: Sequence[Any]
) -> dict[str, list[float]]:
    """One model pass; each block, on the input it gets, is run again once per expert with that expert masked."""
    errs = {layer.name: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers}
    norms = dict.fromkeys(errs, 0.0)
    by_name = {layer.name: layer for layer in layers}
    busy = False

    def hook(layer: MoeLayer) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            nonlocal busy
            if busy:
                return
            busy = True
            try:
                y = block_output(out).float()
                norms[layer.name] += float(y.pow(2).sum())
                for e in range(layer.num_experts):
                    with _masked(by_name, {layer.name: [e]}):
                        errs[layer.name][e] += float((block_output(module(*args, **kwargs)).float() - y).pow(2).sum())
            finally:
                busy = False

        return fn

    _forward_hooked(run, batches, [(layer.block, hook(layer)) for layer in layers])
    return {n: (errs[n] / max(norms[n], 1e-30)).tolist() for n in errs}


def _forward_hooked(
    run: Callable[[Any, int], Any], batches: Sequence[Any], hooks: Sequence[tuple[nn.Module, Any]]
) -> None:
    """Run ``batches`` (``run(batch, index)``: :func:`~lightning_prune.engine.calibration.batch_runner`) with forward
    hooks (``(module, fn)``, called with kwargs) attached."""
    handles = [module.register_forward_hook(fn, with_kwargs=True) for module, fn in hooks]
    try:
        for i, batch in enumerate(batches):
            run(batch, i)
    finally:
        for h in handles:
            h.remove()


def _routing_scores(
    run: Callable[[Any, int], Any], layers: Sequence[MoeLayer], batches: Sequence[Any], score: str
) -> dict[str, list[float]]:
    """From the experts' inputs (hidden states, top-k indices, top-k weights): REAP or the routing frequency.
    An expert's own output is the experts module run on its tokens with only it chosen, at weight 1."""
    sums = {layer.name: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers}
    counts = {n: torch.zeros_like(s) for n, s in sums.items()}
    tokens = dict.fromkeys(sums, 0)
    busy = False

    def hook(layer: MoeLayer) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            nonlocal busy
            if busy:
                return
            h = _hidden(args, kwargs, 0, "hidden_states")
            index = _hidden(args, kwargs, 1, "top_k_index")
            weights = _hidden(args, kwargs, 2, "top_k_weights")
            if not all(isinstance(t, Tensor) for t in (h, index, weights)) or index.shape != weights.shape:
                raise TypeError(
                    f"{type(module).__name__} in {layer.name!r} is not called as experts(hidden_states, top_k_index, "
                    "top_k_weights): score='reap'/'frequency' read the routing from those arguments"
                )
            h, index, weights = (
                h.reshape(-1, h.shape[-1]),
                index.reshape(-1, index.shape[-1]),
                weights.reshape(index.shape),
            )
            tokens[layer.name] += index.shape[0]
            busy = True
            try:
                for e in range(layer.num_experts):
                    tok, slot = torch.where(index == e)
                    if tok.numel() == 0:
                        continue
                    counts[layer.name][e] += tok.numel()
                    if score == "reap":
                        one = torch.full((tok.numel(), 1), e, dtype=index.dtype, device=index.device)
                        f = module(h[tok], one, torch.ones(one.shape, dtype=weights.dtype, device=weights.device))
                        norm = f.float().norm(dim=-1).double()
                        sums[layer.name][e] += float((weights[tok, slot].double() * norm).sum())
            finally:
                busy = False

        return fn

    _forward_hooked(run, batches, [(layer.experts, hook(layer)) for layer in layers])
    if score == "frequency":
        return {n: (counts[n] / max(tokens[n], 1)).tolist() for n in sums}
    return {n: (sums[n] / counts[n].clamp_min(1.0)).tolist() for n in sums}


def _count(n: int | float, layer: MoeLayer) -> int:
    """Experts to remove per block: an integer, or a fraction in ``(0, 1)`` of them (rounded); top-k must stay."""
    total, most = layer.num_experts, layer.num_experts - layer.top_k
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n):
        raise ValueError(f"`n` must be a number of experts per block or a fraction in (0, 1), got {n!r}")
    count = round(float(n) * total) if not isinstance(n, numbers.Integral) and 0 < n < 1 else n
    if not isinstance(count, numbers.Integral) or not 1 <= count <= most:
        raise ValueError(
            f"`n`={n!r} must remove between 1 and {most} of the {total} experts per block (the router picks "
            f"top_k={layer.top_k}, so at least {layer.top_k} must stay; an integer, or a fraction in (0, 1) that "
            f"rounds to one), got {count!r}"
        )
    return int(count)


def _count_key(pretrained: nn.Module) -> str:
    """The config key of the routed experts' count: the first the layout names that the config holds."""
    config, moe = pretrained.config, layouts.layout_of(pretrained).moe or layouts.GENERIC_MOE
    values = config.to_dict()
    keys = [k for k in moe.count_keys if isinstance(values.get(k), int)]
    if not keys:
        raise ValueError(
            f"{type(config).__name__} has no expert count among {moe.count_keys}: its saved config could not say how "
            "many experts are left"
        )
    return keys[0]


def remove_experts(
    model: nn.Module,
    drop: Mapping[str, Sequence[int]],
    *,
    example_inputs: Any = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> Shrunk:
    """A copy of ``model`` without the experts ``drop[block name]`` (``model`` is untouched).

    Every MoE block must lose the same number of experts, leaving at least the router's top-k. On
    ``example_inputs`` the copy must compute what ``model`` computes with those experts masked
    (:func:`masked_experts`) within ``atol + rtol * max|output|``, else it raises. ``Shrunk.hf_configs``
    holds the config values written (``num_local_experts`` or ``num_experts``), ``Shrunk.removed`` the
    experts removed per block and ``Shrunk.experts_kept`` the original indices of the experts left.
    """
    layers = {layer.name: layer for layer in find_moe_layers(model)}
    plan = _drop_plan(model, layers, drop)
    checked = _checked_module(model, layers.values(), example_inputs)
    reference = None
    if example_inputs is not None:
        with eval_mode(model), no_kv_cache(model), masked_experts(model, plan):
            reference = _run(model.get_submodule(checked), example_inputs)
    before = sum(p.numel() for p in model.parameters())
    total = next(iter(layers.values())).num_experts
    left = total - len(next(iter(plan.values())))
    values = _config_values(model, layers, left, total)  # refuses before copying: nothing to lose
    out = copy.deepcopy(model)
    kept_all = {name: _cut_experts(_layer(name, out.get_submodule(name), layers[name].part), gone)
                for name, gone in plan.items()}  # fmt: skip
    for _, pretrained in hf.pretrained_models(out):
        for attr in MODULE_COUNTS:  # e.g. MixtralForCausalLM.num_experts, read by the load-balancing loss
            if getattr(pretrained, attr, None) == total:
                setattr(pretrained, attr, left)
    result = Shrunk(out, {}, {n: len(g) for n, g in plan.items()}, params_before=before, experts_kept=kept_all)
    result.params_after = sum(p.numel() for p in out.parameters())
    for prefix, pretrained in hf.pretrained_models(out):
        if prefix in values:
            problem = hf.check_config(pretrained, values[prefix])
            if problem is not None:
                raise ValueError(f"the model without experts cannot be described by its config: {problem}")
            for attr, value in values[prefix].items():
                setattr(pretrained.config, attr, value)
            result.hf_configs[prefix] = values[prefix]
    if reference is not None:
        result.max_abs_diff = check_outputs(
            out.get_submodule(checked),
            example_inputs,
            reference,
            atol,
            rtol,
            lambda diff: (
                f"remove_experts: the model without the experts differs from the model with them masked by {diff:.3g} "
                f"on example_inputs (> atol={atol} + rtol={rtol} x max|output|): its routing is not a softmax top-k "
                "over the router's logits; the original is untouched"
            ),
        )
    return result


def _drop_plan(model: nn.Module, layers: Mapping[str, MoeLayer], drop: Any) -> dict[str, list[int]]:
    """``drop`` checked: expert indices per MoE block, the same count (at least one) everywhere, top-k left."""
    if not isinstance(drop, Mapping):
        raise ValueError(f"`drop` must map MoE block names to expert indices, got {drop!r}")
    if unknown := [n for n in drop if n not in layers]:
        raise ValueError(f"`drop` names {unknown[:5]}, not MoE blocks of {type(model).__name__}: {list(layers)[:5]}")
    plan: dict[str, list[int]] = {}
    for name, layer in layers.items():
        values = list(drop.get(name, ()))
        total = layer.num_experts
        if bad := [
            v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < total
        ]:
            raise ValueError(f"`drop[{name!r}]` must hold expert indices in 0..{total - 1}, got {bad[:5]}")
        if len(set(values)) != len(values):
            raise ValueError(f"`drop[{name!r}]` repeats experts: {values}")
        if total - len(values) < layer.top_k:
            raise ValueError(
                f"`drop[{name!r}]` removes {len(values)} of {total} experts, leaving fewer than the router's "
                f"top_k={layer.top_k}"
            )
        plan[name] = sorted(int(v) for v in values)
    if len({len(v) for v in plan.values()}) != 1 or not next(iter(plan.values())):
        counts = {n: len(v) for n, v in plan.items()}
        raise ValueError(
            f"`drop` must remove the same number of experts (at least one) from every MoE block, got {counts}: a "
            "standard config holds one expert count, so plain from_pretrained could not load blocks that differ"
        )
    return plan


def _cut_experts(layer: MoeLayer, gone: Sequence[int]) -> list[int]:
    """Remove experts ``gone`` from one MoE block of the copy (experts' and router's slices, the counts its
    modules keep); returns the original indices of the experts left."""
    kept = [i for i in range(layer.num_experts) if i not in set(gone)]
    index = torch.as_tensor(kept, dtype=torch.long)
    with torch.no_grad():
        for part in (layer.experts, layer.router):
            for attr, t in _tensors(part).items():
                cut = t[index.to(t.device)].contiguous()
                if isinstance(t, nn.Parameter):
                    setattr(part, attr, nn.Parameter(cut, requires_grad=t.requires_grad))
                else:
                    setattr(part, attr, cut)
    for holder in (layer.block, layer.router, layer.experts):
        for attr in MODULE_COUNTS:
            if isinstance(getattr(holder, attr, None), int):
                setattr(holder, attr, len(kept))
    if isinstance(getattr(layer.router, "out_features", None), int):
        layer.router.out_features = len(kept)
    return kept


def _checked_module(model: nn.Module, layers: Iterable[MoeLayer], example_inputs: Any) -> str:
    """The name of the module ``example_inputs`` are run through (``model(**example_inputs)``): ``model``, or
    for a module without ``forward`` (a LightningModule with only ``training_step``) the submodule holding every
    MoE block that implements one. Refused before any work when there is none."""
    if example_inputs is None:
        return ""
    found = output_module(model, [layer.block for layer in layers])
    if found is None:
        raise ValueError(
            f"`example_inputs` are run as model(**example_inputs), and {type(model).__name__} implements no forward "
            "(nor does a submodule holding its MoE blocks): implement forward, pass the model inside, or drop "
            "example_inputs"
        )
    return found[0]


def _config_values(
    model: nn.Module, layers: Mapping[str, MoeLayer], left: int, total: int
) -> dict[str, dict[str, int]]:
    """The expert count to write into each Hugging Face model's config that holds MoE blocks."""
    values = {}
    for prefix, pretrained in hf.pretrained_models(model):
        if not any(hf.within(prefix, n) for n in layers):
            continue
        config = pretrained.config
        key = _count_key(pretrained)
        if getattr(config, key) != total:
            raise ValueError(
                f"{type(config).__name__}.{key} is {getattr(config, key)}, but its MoE blocks hold {total} experts: "
                "the config does not describe them"
            )
        top_k = getattr(config, "num_experts_per_tok", None)
        if isinstance(top_k, int) and top_k > left:
            raise ValueError(
                f"{type(config).__name__}.num_experts_per_tok={top_k} would exceed the {left} experts left per block"
            )
        values[prefix] = {key: left}
    return values


def prune_experts(
    model: nn.Module,
    data: Sequence[Any],
    n: int | float,
    *,
    score: str = "reconstruction",
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
    example_inputs: Any = None,
) -> Shrunk:
    """Remove ``n`` experts (an integer, or a fraction of them) from every MoE block, those that cost least by
    ``score`` on ``data`` in each block; returns the smaller model (a copy, ready for ``save_pretrained``),
    with ``Shrunk.notes`` giving the scores and the experts removed. See the module docstring for the
    scores and what removal changes. A LightningModule that implements only ``training_step`` is run as
    :func:`~lightning_prune.prune` runs it (``loss_fn``, else its ``training_step``); ``example_inputs`` go
    through the model inside that holds the MoE blocks."""
    layers = find_moe_layers(model)
    counts = {_count(n, layer) for layer in layers}
    if len(counts) != 1:
        raise ValueError(
            f"the MoE blocks of {type(model).__name__} hold different numbers of experts "
            f"({ {layer.name: layer.num_experts for layer in layers} }): `n` cannot remove the same count from each"
        )
    count = counts.pop()
    total = layers[0].num_experts
    _config_values(model, {layer.name: layer for layer in layers}, total - count, total)  # before the scores' passes
    _checked_module(model, layers, example_inputs)
    scores = expert_scores(model, data, score=score, loss_fn=loss_fn, num_batches=num_batches)
    drop = {name: sorted(sorted(range(len(row)), key=lambda i: (row[i], i))[:count]) for name, row in scores.items()}
    result = remove_experts(model, drop, example_inputs=example_inputs)
    listed = "; ".join(
        f"{name}: removed {drop[name]} of ({', '.join(f'{s:.4g}' for s in row)})" for name, row in scores.items()
    )
    result.notes.append(f"experts removed by score={score!r}, {count} per block: {listed}")
    return result
