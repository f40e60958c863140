"""Hugging Face checkpoints of shrunk models: the config that describes the new sizes.

After :func:`lightning_prune.surgery.shrink.shrink` the layers of a ``transformers`` model are smaller than
its ``config`` says, and ``from_pretrained`` builds a model from the config before it loads the
weights: every shrunk projection would be a "size mismatch". :func:`config_update` reads the new
sizes off the shrunk model's families and writes them where a standard config keeps them, as the
layout registry (:mod:`lightning_prune.models.layouts`) says, each family carrying its keys:

* ``intermediate_size`` (gated MLPs: LLaMA, Mistral, Qwen2, Phi-3's fused one; BERT's intermediate),
  ``n_inner`` (GPT-2), ``shared_expert_intermediate_size`` (Qwen2-MoE's shared expert);
* ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim`` (LLaMA-style attention: the
  model reads ``head_dim`` from the config, else ``hidden_size // num_attention_heads``, which
  changes with the heads; it is written even where the config class has no such field, as
  Qwen2's: its attention reads it with ``getattr``).

A standard config holds one size per kind for every block, so only a model whose blocks all kept
the same numbers can be described; otherwise the reason is returned and nothing is written. The
update is then checked the way ``from_pretrained`` would use it: the config class must accept it
(``LlamaConfig`` refuses a ``hidden_size`` that is not a multiple of ``num_attention_heads``), and
a model built from it (on the meta device: shapes only) must have exactly the shrunk model's
parameter names and shapes. New kinds of sizes (the number of experts) are one more reader in
:data:`READERS`; ``num_hidden_layers`` after removing blocks is written by :mod:`lightning_prune.surgery.depth`,
checked the same way (:func:`check_config`).

GPT-2's fused ``c_attn`` and BERT's ``query``/``key``/``value`` heads are not removed: those models
derive the head size from ``hidden_size / num_attention_heads`` (GPT-2 also splits ``c_attn`` at
``hidden_size``), so no config of theirs describes fewer heads of the same size, and discovery
(:mod:`lightning_prune.models.graph`) leaves them alone, saying so. transformers 5 has no ``prune_heads``.

``transformers`` is never imported here: a model of it exists only if it was imported already.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lightning_prune.models.graph import Family
from lightning_prune.models.layouts import pretrained_models, relative, within


def family_fields(f: Family) -> dict[str, int]:
    """The config attributes a family's size gives, as its layout says (:attr:`Family.fields`)."""
    return {key: f.size * per + const for key, per, const in f.fields}


def _families(model: nn.Module, families: Sequence[Family]) -> Iterable[tuple[str, str, int]]:
    for f in families:
        for attr, value in family_fields(f).items():
            yield attr, f.name, value


# readers: (the Hugging Face model, its families) -> (config attribute, where, value); one value per attribute
# describes the model only if every "where" gives the same value
READERS: list[Callable[[nn.Module, Sequence[Family]], Iterable[tuple[str, str, int]]]] = [_families]


def config_values(model: nn.Module, families: Sequence[Family]) -> tuple[dict[str, int], str | None]:
    """The config attributes the sizes of ``model`` (a ``PreTrainedModel``) give, or why one value per
    attribute cannot describe them (blocks that differ)."""
    found: dict[str, dict[str, int]] = {}
    for reader in READERS:
        for attr, where, value in reader(model, families):
            found.setdefault(attr, {})[where] = value
    differ = {attr: values for attr, values in found.items() if len(set(values.values())) > 1}
    if differ:
        parts = []
        for attr, values in differ.items():
            listed = ", ".join(f"{w or type(model).__name__}: {v}" for w, v in list(values.items())[:6])
            parts.append(f"{attr} differs between blocks ({listed}{', ...' if len(values) > 6 else ''})")
        return {}, "; ".join(parts)
    return {attr: next(iter(values.values())) for attr, values in found.items()}, None


def updated_config(config: Any, values: Mapping[str, int]) -> Any:
    """A copy of ``config`` with ``values``, read back as ``from_pretrained`` reads a saved one (the
    config class validates it)."""
    new = copy.deepcopy(config)
    for attr, value in values.items():
        setattr(new, attr, value)
    return type(config).from_dict(new.to_dict())


def _refusal(config: Any, values: Mapping[str, int], err: Exception) -> str:
    """The config class's refusal of ``values``: its last line (the constraint), as one sentence."""
    return f"{type(config).__name__} refuses {dict(values)}: {str(err).strip().splitlines()[-1].strip().rstrip('.')}"


def check_config(model: nn.Module, values: Mapping[str, int]) -> str | None:
    """Why a standard config with ``values`` would not describe ``model``, or ``None`` if it does.

    The config class must accept the values, and a model built from that config must hold exactly
    ``model``'s parameter and buffer names and shapes (built on the meta device: no memory, no init)."""
    config = model.config
    try:
        new = updated_config(config, values)
    except Exception as err:  # the config class's own validation, whatever it raises
        return _refusal(config, values, err)
    try:
        with torch.device("meta"):
            reference = type(model)(new)
    except Exception as err:
        return f"{type(model).__name__} cannot be built from the updated config ({type(err).__name__}: {err})"
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    keys = sorted(set(want) | set(have))
    wrong = [f"{k}: {have.get(k)} here, {want.get(k)} from the config" for k in keys if want.get(k) != have.get(k)]
    if wrong:
        return (
            f"a {type(model).__name__} built from the updated config {dict(values)} has other shapes "
            f"({len(wrong)}: {'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}): the config does not say where "
            "these sizes live"
        )
    return None


def config_update(model: nn.Module, families: Sequence[Family]) -> tuple[dict[str, int], str | None]:
    """The config values that describe the shrunk ``model`` (a ``PreTrainedModel``; ``families``: its
    own, names relative to it), or why a standard config cannot (then the values are empty)."""
    values, problem = config_values(model, families)
    if problem is None:
        problem = check_config(model, values)
    return ({}, problem) if problem else (values, None)


def predicted_problem(model: nn.Module, families: Sequence[Family], kept: Mapping[str, int]) -> str | None:
    """Why the sizes a round will leave (``kept`` structures per family, families named in ``model``)
    could not be saved as standard checkpoints of the Hugging Face models in ``model``, or ``None``.
    Only what the config classes accept is checked: the shapes come after shrinking."""
    for prefix, pretrained in pretrained_models(model):
        mine = [
            replace(f, name=relative(prefix, f.name), size=kept.get(f.name, f.size))
            for f in families
            if within(prefix, f.name)
        ]
        values, problem = config_values(pretrained, mine)
        if problem is None and values:
            try:
                updated_config(pretrained.config, values)
            except Exception as err:
                problem = _refusal(pretrained.config, values, err)
        if problem:
            return problem
    return None


def target_hint(model: nn.Module, families: Sequence[Family], pruned: Sequence[Family]) -> str:
    """The targets (0.01 to 0.99) whose rounding (``round(target * size)`` structures of each family in
    ``pruned`` removed) leaves sizes the config classes in ``model`` accept, as ranges: said when a
    target is chosen (pattern='channels' binding) and when a shrunk model is refused for it."""
    ok = []
    for t in range(1, 100):
        kept = {f.name: f.size - round(t / 100 * f.size) for f in pruned}
        if predicted_problem(model, families, kept) is None:
            ok.append(t)
    runs: list[list[int]] = []  # consecutive percentages, as [first, last]
    for t in ok:
        if runs and runs[-1][1] == t - 1:
            runs[-1][1] = t
        else:
            runs.append([t, t])
    ranges = [f"{a / 100}" if a == b else f"{a / 100}-{b / 100}" for a, b in runs]
    return f"targets that save here: {', '.join(ranges)}" if ranges else "no target saves here"


def advice(model: nn.Module, families: Sequence[Family], before: Sequence[Family], pruned: Sequence[str]) -> str:
    """What to do instead, by why no standard config describes the shrunk ``model`` (a ``PreTrainedModel``;
    ``families``: its own; ``before``: the families it was shrunk from, with their sizes then; ``pruned``:
    the names of those that lost structures). Each cause has its own fix: the default scope is no help
    when the blocks already agree and the config class refuses the counts."""
    values, differ = config_values(model, families)
    if differ:
        return (
            "Its config holds one size per kind for every block: prune with pattern='channels' and the default "
            "scope (the same number of heads and neurons in every block)"
        )
    try:
        updated_config(model.config, values)
    except Exception:
        hint = target_hint(model, before, [f for f in before if f.name in pruned])
        return (
            f"Every block kept the same sizes, but {type(model.config).__name__} refuses these counts: prune to a "
            f"target whose rounding keeps counts it accepts ({hint}), or leave the heads whole (include=['*mlp*'] "
            "prunes MLP neurons only)"
        )
    return (
        f"Its config does not say where these sizes live ({type(model).__name__} reads them from other fields "
        "than the ones written): leave those layers out of the pruning (exclude=[...])"
    )
