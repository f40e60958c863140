"""``shrink``: turn structures pruned with ``pattern="channels"`` into a smaller dense model.

Masks make a model sparse, not smaller. After structured pruning every removed structure has zero
consumer columns, so it contributes nothing; :func:`shrink` deletes it physically: the producer
rows (and biases, and per-channel BatchNorm entries), the consumer columns, and for attention the
whole heads (Hugging Face LLaMA-style attention infers the number of heads from the projections'
shapes, so fewer heads need no config change; ``num_heads``/``num_key_value_heads`` attributes,
where a model class keeps them, are updated; Phi-3's attention reads ``num_attention_heads`` from the
config all its blocks share, so that is written at once, and blocks keeping different counts of it
are refused). Fused layers (Phi-3's ``qkv_proj``, ``gate_up_proj``) lose the structures' rows in each
of their parts. The families are the ones
:func:`lightning_prune.models.graph.discover` finds, so what pruning could remove, shrinking can.

The result computes what the masked model computes (checked on ``example_inputs`` when given).
Its :attr:`Shrunk.plan` (kept structures per family, JSON-friendly) rebuilds the same shapes on a
freshly built model, ``shrink(fresh, plan=plan)``, so a saved ``state_dict`` of the small model
loads into it.

Hugging Face models (``transformers.PreTrainedModel``, also inside a LightningModule) get their
``config`` updated to the new sizes (:mod:`lightning_prune.models.hf_config`), so ``small.save_pretrained(d)``
(:meth:`Shrunk.save_pretrained`) writes a checkpoint that ``AutoModelFor*.from_pretrained(d)`` loads
without custom code. That needs the same sizes in every block, which is what ``pattern="channels"``
prunes on Hugging Face models by default; a model no standard config describes (blocks that differ,
counts the config class refuses) is refused there, with the advice for its cause, or written with its
plan (``with_plan=True``) for :func:`load_shrunk`. Its config keeps the old sizes, so its own
``save_pretrained`` is replaced by one that refuses the same way (:class:`RefusedSave`): transformers'
would write a checkpoint ``from_pretrained`` cannot load.
"""

from __future__ import annotations

import copy
import json
import numbers
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.engine.targets import is_hf_conv1d
from lightning_prune.models import hf_config as hf
from lightning_prune.models.graph import Family, Slot, discover
from lightning_prune.models.layouts import model_output
from lightning_prune.runtime.distributed import warn

PLAN_FILE = "pruning_plan.json"
WEIGHTS_FILE = "shrunk_model.safetensors"  # not a name from_pretrained reads: it fails instead of re-initialising
PLAN_FORMAT = "lightning-prune shrunk model"
PLAN_VERSION = 1
STANDARD_WEIGHTS = ("model*.safetensors*", "pytorch_model*.bin*")  # what from_pretrained reads (with indices)
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


@dataclass
class Shrunk:
    model: nn.Module
    plan: dict[str, list[int]]  # family -> kept structure indices
    removed: dict[str, int]  # family -> structures removed
    notes: list[str] = field(default_factory=list)  # what discovery left alone
    max_abs_diff: float | None = None  # outputs against the masked model, on example_inputs
    params_before: int = 0
    params_after: int = 0
    # shrunk Hugging Face models, by their name in `model` ("": the model itself): the config values written,
    # or why no standard config describes the model (its config is then left as it was)
    hf_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    nonstandard: dict[str, str] = field(default_factory=dict)
    advice: dict[str, str] = field(default_factory=dict)  # what to do instead, by the cause in `nonstandard`
    # depth (lightning_prune.surgery.depth): block list -> the indices of the original blocks kept, in order
    blocks_kept: dict[str, list[int]] = field(default_factory=dict)
    # experts (lightning_prune.surgery.experts): MoE block -> the indices of the original experts kept, in order
    experts_kept: dict[str, list[int]] = field(default_factory=dict)
    # the budget search (lightning_prune.surgery.budget.shrink_to): every candidate's shape, parameters, loss, seconds
    candidates: list[dict[str, Any]] = field(default_factory=list)
    # config values the shrunk modules read at run time (Phi-3's num_attention_heads), written at once into the
    # config their blocks share, as they were before, by Hugging Face model: what a with_plan checkpoint keeps
    config_before: dict[str, dict[str, Any]] = field(default_factory=dict)

    def save_pretrained(self, directory: str | os.PathLike[str], *, with_plan: bool = False, **kwargs: Any) -> Path:
        """Write the shrunk Hugging Face model as a checkpoint in ``directory``.

        With the same sizes in every block (``pattern="channels"``'s default on Hugging Face models)
        this is the model's own ``save_pretrained(directory, **kwargs)``: the config says the new sizes
        and ``AutoModelFor*.from_pretrained(directory)`` loads it anywhere (the tokenizer is not part
        of the model: save yours beside it). Otherwise no standard config can describe the model, and
        it refuses, saying why, unless ``with_plan=True``: then it writes the unpruned architecture's
        config, the weights under a name ``from_pretrained`` does not read (so plain loading fails
        loudly instead of re-initialising) and ``pruning_plan.json``, which :func:`load_shrunk` reads.
        A folder holding the other kind's files (a standard checkpoint's weights, or a plan) is refused:
        the loader would read those instead.
        """
        name, model = self._hf_model()
        directory = Path(directory)
        if directory.is_file():  # transformers logs this and writes nothing
            raise ValueError(f"`directory` {str(directory)!r} is a file: save_pretrained writes a folder")
        if name not in self.nonstandard:
            _check_stale(directory, (PLAN_FILE, WEIGHTS_FILE), "lightning_prune.load_shrunk would read them instead")
            model.save_pretrained(directory, **kwargs)
            return directory
        why = self.nonstandard[name]
        if not with_plan:
            raise ValueError(_not_standard(model, why, self.advice.get(name, ""), plain=False))
        _check_stale(directory, STANDARD_WEIGHTS, "from_pretrained would load them with this unpruned config")
        if kwargs:
            raise ValueError(f"with_plan=True writes one safetensors file; {sorted(kwargs)} apply to save_pretrained")
        from safetensors.torch import save_model

        directory.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(model.config)  # the unpruned sizes: from_config builds what the plan shrinks
        for key, value in self.config_before.get(name, {}).items():
            setattr(config, key, value)
        config.architectures = [type(model).__name__]  # as the model's save_pretrained records it
        config.save_pretrained(directory)
        plan = {hf.relative(name, f): kept for f, kept in self.plan.items() if hf.within(name, f)}
        record = {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "plan": plan,
            "weights": WEIGHTS_FILE,
            "why_not_standard": why,
            "load_with": "lightning_prune.load_shrunk(directory)",
        }
        (directory / PLAN_FILE).write_text(json.dumps(record, indent=1))
        save_model(model, str(directory / WEIGHTS_FILE))
        warn(
            f"wrote {directory} with {PLAN_FILE}: the blocks of this {type(model).__name__} differ ({why}), so plain "
            "from_pretrained cannot load it; lightning_prune.load_shrunk(directory) can"
        )
        return directory

    def _hf_model(self) -> tuple[str, nn.Module]:
        """The one Hugging Face model to save: the shrunk one, or the only one in ``model``."""
        names = list(dict.fromkeys([*self.hf_configs, *self.nonstandard]))
        found = dict(hf.pretrained_models(self.model))
        if not names:
            names = list(found)
        if not names:
            raise ValueError(
                f"save_pretrained writes Hugging Face checkpoints, and {type(self.model).__name__} holds no "
                "transformers.PreTrainedModel: save small.model.state_dict() and rebuild the shapes with "
                "shrink(fresh_model, plan=small.plan)"
            )
        if len(names) > 1:
            raise ValueError(
                f"{type(self.model).__name__} holds several shrunk Hugging Face models {names}: save each with "
                "small.model.get_submodule(name).save_pretrained(directory)"
            )
        return names[0], self.model.get_submodule(names[0]) if names[0] else self.model


def _check_stale(directory: Path, patterns: Iterable[str], why: str) -> None:
    """Refuse a folder holding another kind of save's weights or plan: the loader would read those, not ours."""
    found = sorted({f.name for p in patterns for f in directory.glob(p)}) if directory.is_dir() else []
    if found:
        raise ValueError(
            f"`directory` {str(directory)!r} holds {found} from another save: {why}. Save into an empty or new "
            "folder (or remove them). Nothing was written"
        )


def _not_standard(model: nn.Module, why: str, advice: str, *, plain: bool) -> str:
    """Why a shrunk model is no standard checkpoint, what to do instead, and how to save it anyway."""
    anyway = (
        "save it with small.save_pretrained(directory, with_plan=True) (small: what lightning_prune.shrink returned)"
        if plain
        else "pass with_plan=True"
    )
    return (
        f"the shrunk {type(model).__name__} cannot be saved as a standard Hugging Face checkpoint: {why}. Plain "
        f"from_pretrained could not load it: its config keeps the unpruned sizes. {advice + '; or ' if advice else ''}"
        f"{anyway} to write the weights with their pruning plan, loaded by lightning_prune.load_shrunk(directory)"
    )


class RefusedSave:
    """Set as a shrunk model's own ``save_pretrained`` when no standard config describes it: transformers'
    would write the unpruned config beside the shrunk weights, a folder ``from_pretrained`` cannot load.
    It raises :meth:`Shrunk.save_pretrained`'s explanation instead (it holds only that text, so copies and
    pickles of the model refuse too; a later shrink that makes the sizes describable removes it)."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message[:60]!r}...)"


def load_shrunk(directory: str | os.PathLike[str], model_class: Any = None) -> nn.Module:
    """Load what ``Shrunk.save_pretrained(directory, with_plan=True)`` wrote: the architecture from its
    ``config.json`` (``model_class``, default the class its ``architectures`` names, e.g.
    ``transformers.AutoModelForCausalLM`` or ``LlamaForCausalLM``), shrunk to the plan, then the
    weights (strictly). Its config still holds the unpruned sizes: no standard one describes it."""
    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_model

    directory = Path(directory)
    if not (directory / PLAN_FILE).is_file():
        raise FileNotFoundError(
            f"{directory} has no {PLAN_FILE}: load_shrunk reads what save_pretrained(..., with_plan=True) wrote "
            "(a standard checkpoint loads with from_pretrained)"
        )
    record = json.loads((directory / PLAN_FILE).read_text())
    if record.get("format") != PLAN_FORMAT or record.get("version") != PLAN_VERSION:
        raise ValueError(
            f"{directory / PLAN_FILE} is not a {PLAN_FORMAT} of version {PLAN_VERSION} "
            f"(format {record.get('format')!r}, version {record.get('version')!r})"
        )
    config = transformers.AutoConfig.from_pretrained(directory)
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, archs[0], None) if len(archs) == 1 else None
        if model_class is None:
            raise ValueError(
                f"{directory}/config.json names architectures {archs}: pass model_class (e.g. "
                "transformers.AutoModelForCausalLM)"
            )
    if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
        model = model_class(config)
    else:
        model = model_class.from_config(config)
    weights = str(directory / record["weights"])
    with safe_open(weights, framework="pt") as f:  # build in the weights' dtype (from_config builds float32)
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    floating = {_DTYPES[d] for d in dtypes if d in _DTYPES}
    if len(floating) == 1:
        model.to(floating.pop())
    with warnings.catch_warnings():  # it is known not to be standard: that is why it was saved with its plan
        warnings.filterwarnings("ignore", message=".*standard Hugging Face config.*")
        shrink(model, plan=record["plan"], inplace=True)
    load_model(model, weights, strict=True)
    return model.eval()


def _matrix(module: nn.Module) -> Tensor:
    """The ``(d_out, d_in)`` view of a layer's weight (Conv unfolded, HF Conv1D transposed)."""
    w = module.weight.detach()
    return w.T if is_hf_conv1d(module) else w.reshape(w.shape[0], -1)


def _removable(model: nn.Module, family: Family) -> Tensor:
    """Structures whose consumer columns are exactly zero in every consumer: they contribute nothing."""
    gone = torch.ones(family.size, dtype=torch.bool)
    for s in family.consumers:
        gone &= (s.view(_matrix(model.get_submodule(s.module)), family.size) == 0).all(1).cpu()
    return gone


def _keep(slots: list[Slot], size: int, kept: Tensor, dim: int) -> Tensor:
    """The indices along one layer's axis (of ``dim``) that stay: each slot's span holds its ``kept``
    structures (in ``kept``'s order), and what lies outside every slot (a fused layer's other parts) stays."""
    pieces, at = [], 0
    for s in sorted(slots, key=lambda s: s.offset):
        pieces += [torch.arange(at, s.offset), (s.offset + kept[:, None] * s.width + torch.arange(s.width)).flatten()]
        at = s.span(size).stop
    return torch.cat([*pieces, torch.arange(at, dim)])


def _param(module: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _shrink_out(module: nn.Module, slots: list[Slot], size: int, kept: Tensor) -> None:
    rows = _keep(slots, size, kept, _matrix(module).shape[0]).to(module.weight.device)
    with torch.no_grad():
        if is_hf_conv1d(module):
            _param(module, "weight", module.weight[:, rows])
            module.nf = rows.numel()
        else:
            _param(module, "weight", module.weight[rows])
        if getattr(module, "bias", None) is not None:
            _param(module, "bias", module.bias[rows])
    if isinstance(module, nn.Linear):
        module.out_features = rows.numel()
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = rows.numel()


def _shrink_in(module: nn.Module, slots: list[Slot], size: int, kept: Tensor) -> None:
    with torch.no_grad():
        if isinstance(module, nn.modules.conv._ConvNd):  # a channel's kh*kw columns are one input channel
            _param(module, "weight", module.weight[:, kept.to(module.weight.device)])
            module.in_channels = kept.numel()
            return
        cols = _keep(slots, size, kept, _matrix(module).shape[1]).to(module.weight.device)
        if is_hf_conv1d(module):
            _param(module, "weight", module.weight[cols])
        else:
            _param(module, "weight", module.weight[:, cols])
            module.in_features = cols.numel()


def _shrink_norm(norm: nn.Module, kept: Tensor) -> None:
    idx = kept.to(norm.running_mean.device if norm.running_mean is not None else "cpu")
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(norm, name, None) is not None:
                _param(norm, name, getattr(norm, name)[idx])
        for name in ("running_mean", "running_var"):
            if getattr(norm, name, None) is not None:
                setattr(norm, name, getattr(norm, name)[idx].clone())
    norm.num_features = kept.numel()


def _by_module(slots: tuple[Slot, ...]) -> dict[str, list[Slot]]:
    """A family's slots per layer (a fused layer holds several, cut together)."""
    out: dict[str, list[Slot]] = {}
    for s in slots:
        out.setdefault(s.module, []).append(s)
    return out


def _apply(model: nn.Module, family: Family, kept: Tensor) -> None:
    for name, slots in _by_module(family.producers).items():
        _shrink_out(model.get_submodule(name), slots, family.size, kept)
    for name in family.norms:
        _shrink_norm(model.get_submodule(name), kept)
    for name, slots in _by_module(family.consumers).items():
        _shrink_in(model.get_submodule(name), slots, family.size, kept)
    if family.kind == "heads":
        attention = model.get_submodule(family.name)
        rep = getattr(attention, "num_key_value_groups", 1)
        for attr, n in (("num_heads", kept.numel() * rep), ("num_key_value_heads", kept.numel())):
            if isinstance(getattr(attention, attr, None), int):
                setattr(attention, attr, n)
    values = hf.family_fields(replace(family, size=kept.numel()))
    for key in family.reads_config:  # read at run time from the config every block shares (checked: one value)
        setattr(model.get_submodule(family.name).config, key, values[key])


def _shared_config(model: nn.Module, families: list[Family], cuts: list[tuple[Family, Tensor]]) -> dict[str, dict]:
    """The config values the cut families' modules read at run time from their (shared) configs, before the
    cut, by the Hugging Face model holding them; refused, before anything changes, where the blocks (cut or
    not) would need different values of one config."""
    kept = {f.name: k.numel() for f, k in cuts}
    wanted: dict[tuple[int, str], dict[str, int]] = {}
    before: dict[str, dict[str, Any]] = {}
    for f in families:
        if not f.reads_config:
            continue
        config = model.get_submodule(f.name).config
        values = hf.family_fields(replace(f, size=kept.get(f.name, f.size)))
        for key in f.reads_config:
            wanted.setdefault((id(config), key), {})[f.name] = values[key]
            if f.name in kept:
                holder = next((p for p, _ in hf.pretrained_models(model) if hf.within(p, f.name)), "")
                before.setdefault(holder, {}).setdefault(key, getattr(config, key))
    for (_, key), values in wanted.items():
        if len(set(values.values())) > 1:
            listed = ", ".join(f"{n}: {v}" for n, v in list(values.items())[:4])
            raise ValueError(
                f"shrink: these attention modules read {key} at run time from the config all their blocks share, so "
                f"every block must keep the same number ({listed}{' ...' if len(values) > 4 else ''}): prune with "
                "pattern='channels' and the default scope (the same count in every block)"
            )
    return before


def _check_kept(name: str, kept: Any, size: int) -> None:
    """``plan[name]`` must list distinct structure indices in ``0..size-1``, at least one: a repeated
    index would duplicate a structure (a different model), and an empty family would leave layers
    with no outputs or inputs."""
    where = f"`plan[{name!r}]`"
    if isinstance(kept, (str, bytes, Mapping)) or not isinstance(kept, Iterable):
        raise ValueError(f"{where} must be a list of kept structure indices, got {kept!r}")
    values = kept.tolist() if isinstance(kept, Tensor) else list(kept)
    if bad := [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)]:
        raise ValueError(f"{where} must hold integer structure indices, got {bad[:5]}")
    values = [int(v) for v in values]
    if not values:
        raise ValueError(
            f"{where} keeps no structure of the {size}; every family keeps at least one (pruning's floor does)"
        )
    if outside := sorted({v for v in values if not 0 <= v < size}):
        raise ValueError(f"{where} has indices {outside[:5]} outside 0..{size - 1}")
    if repeated := sorted(v for v, n in Counter(values).items() if n > 1):
        raise ValueError(f"{where} repeats indices {repeated[:5]}; each kept structure is listed once")


@torch.no_grad()
def _run(model: nn.Module, inputs: Any) -> Tensor:
    training = model.training
    model.eval()
    try:
        if isinstance(inputs, Mapping):
            out = model(**inputs)
        else:
            out = model(inputs)
        return model_output(out, "shrink", "pass example_inputs=None").detach().clone()
    finally:
        model.train(training)


def check_outputs(
    model: nn.Module, example_inputs: Any, reference: Tensor, atol: float, rtol: float, explain: Callable[[float], str]
) -> float:
    """The largest difference of ``model``'s output from ``reference``; raises ``explain(diff)`` past the tolerance."""
    got = _run(model, example_inputs)
    diff = float((got - reference).abs().max()) if got.shape == reference.shape else float("inf")
    if not diff <= atol + rtol * float(reference.abs().max()):
        raise RuntimeError(explain(diff))
    return diff


def shrink(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    plan: Mapping[str, list[int]] | None = None,
    inplace: bool = False,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> Shrunk:
    """Rebuild the pruned structures of ``model`` as smaller dense layers.

    Args:
        model: a model pruned with ``pattern="channels"`` (any ``nn.Module`` or LightningModule).
        example_inputs: a batch (tensor, or a dict of keyword arguments) on which the shrunk
            model's outputs must equal the original's within ``atol + rtol * max|output|`` (float32
            rounding grows with the logits); otherwise it raises and the
            original is untouched.
        plan: kept structures per family (``Shrunk.plan`` of an earlier call): rebuild a freshly
            built model to those shapes, whatever its weights, to load a small ``state_dict``.
            Each listed family keeps at least one structure, each index once; a bad plan is refused
            before anything changes.
        inplace: modify ``model`` itself (a pruning callback's masks then no longer fit it)
            instead of a deep copy.

    Returns:
        :class:`Shrunk`; its ``model`` is ready for ``save_pretrained`` where it holds a Hugging Face
        model whose blocks all kept the same sizes (config updated, ``Shrunk.hf_configs``), else
        ``Shrunk.nonstandard`` says why not and ``Shrunk.advice`` what to do (with a warning), and the
        model's own ``save_pretrained`` raises that instead of writing a checkpoint that would not load.
        A shrink that removes nothing (no whole structure is zero) warns.
    """
    families, notes = discover(model)
    by_name = {f.name: f for f in families}
    if plan is not None:
        if not isinstance(plan, Mapping):
            raise ValueError(f"`plan` must map family names to kept structure indices (Shrunk.plan), got {plan!r}")
        if unknown := sorted(set(plan) - set(by_name)):
            raise ValueError(f"`plan` names families {unknown[:5]} that {type(model).__name__} does not have")
        for name, kept in plan.items():  # all checked before any layer changes (inplace=True loses nothing)
            _check_kept(name, kept, by_name[name].size)
    cuts = []
    for f in families:
        if plan is not None:
            if f.name not in plan:
                continue
            kept = torch.as_tensor(list(plan[f.name]), dtype=torch.long)
        else:
            kept = (~_removable(model, f)).nonzero().flatten()
        if kept.numel() != f.size:
            cuts.append((f, kept))
    shared = _shared_config(model, families, cuts)
    reference = _run(model, example_inputs) if example_inputs is not None else None
    before = sum(p.numel() for p in model.parameters())
    out = model if inplace else copy.deepcopy(model)
    for f, kept in cuts:
        _apply(out, f, kept)
    kept_plan = {f.name: kept.tolist() for f, kept in cuts}
    removed = {f.name: f.size - kept.numel() for f, kept in cuts}
    if plan is None and not kept_plan:
        _say_nothing_removed(model, families, notes)
    result = Shrunk(out, kept_plan, removed, notes, params_before=before, config_before=shared)
    result.params_after = sum(p.numel() for p in out.parameters())
    if reference is not None:
        result.max_abs_diff = check_outputs(
            out,
            example_inputs,
            reference,
            atol,
            rtol,
            lambda diff: (
                f"shrink: the shrunk model's outputs differ from the original's by {diff:.3g} (> atol={atol} + "
                f"rtol={rtol} x max|output|) on example_inputs; a structure was wired in a way the grouping did not see"
                + (" (the original model was modified: inplace=True)" if inplace else "; the original is untouched")
            ),
        )
    _update_configs(result, families)
    return result


def _say_nothing_removed(model: nn.Module, families: list[Family], notes: list[str]) -> None:
    """A shrink that removes nothing returns the model as it was: say so, and why, rather than nothing."""
    if not families:
        warn(
            f"shrink: nothing could be removed: discovery finds no structure in {type(model).__name__} "
            f"({'; '.join(notes[:3]) or 'no Linear/Conv chain, gated MLP or attention block'}); it is returned "
            "unchanged"
        )
        return
    total = sum(f.size for f in families)
    warn(
        f"shrink: nothing could be removed from {type(model).__name__}: no whole head, neuron or channel is zero (none "
        f"of its {total} structures in {len(families)} families has all its consumer weights zero), so it is returned "
        "unchanged. Unstructured and N:M masks zero single weights, which make a model sparse, not smaller: prune "
        "with pattern='channels' to remove whole structures"
    )


def _update_configs(result: Shrunk, before: list[Family]) -> None:
    """Write the new sizes into the config of every shrunk Hugging Face model in ``result.model``, or
    record (and warn) why no standard config describes it and make its own ``save_pretrained`` refuse
    (``before``: the families the model was shrunk from, for the advice)."""
    for name, model in hf.pretrained_models(result.model):
        if not any(hf.within(name, f) for f in result.plan):
            continue  # nothing removed in it: its config still holds
        families = discover(model)[0]
        values, problem = hf.config_update(model, families)
        if problem is not None:
            mine = [replace(f, name=hf.relative(name, f.name)) for f in before if hf.within(name, f.name)]
            pruned = [hf.relative(name, f) for f in result.plan if hf.within(name, f)]
            result.nonstandard[name] = problem
            result.advice[name] = hf.advice(model, families, mine, pruned)
            model.save_pretrained = RefusedSave(_not_standard(model, problem, result.advice[name], plain=True))
            warn(
                f"shrink: no standard Hugging Face config describes the shrunk {type(model).__name__}: {problem}. "
                "Its config keeps the old sizes, so Shrunk.save_pretrained and the model's own save_pretrained refuse "
                f"it (with_plan=True writes it with its plan, for lightning_prune.load_shrunk). {result.advice[name]}"
            )
            continue
        if isinstance(model.__dict__.get("save_pretrained"), RefusedSave):  # an earlier shrink's: described now
            del model.__dict__["save_pretrained"]
        for attr, value in values.items():
            setattr(model.config, attr, value)
        result.hf_configs[name] = values
