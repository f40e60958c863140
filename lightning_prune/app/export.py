"""``save_hf=DIR``: the Hugging Face folder a run writes (the model, shrunk where heads and neurons were removed,
its tokenizer, and the model card of :mod:`lightning_prune.app.card`), and the measurements the card states.

Shared by every mode that writes one (``train``, ``oneshot``, ``shrink``); rank 0 writes it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from lightning_prune.app import card
from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.engine.calibration import eval_mode


def holds_hf(model: pl.LightningModule) -> bool:
    """Whether the LightningModule holds a ``transformers`` model in ``.model`` (the language models)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(getattr(model, "model", None), transformers.PreTrainedModel)


def measure(hf: Any, datamodule: Any) -> dict[str, Any]:
    """The model card's facts about ``hf`` as it is now: its sizes, its parameters, its held-out perplexity."""
    return {**card.snapshot(hf), "held_out": card.held_out(hf, datamodule.val_dataloader())}


def perplexity(hf: Any, datamodule: Any) -> float:
    """``hf``'s held-out perplexity, as :func:`measure` gives it."""
    return card.held_out(hf, datamodule.val_dataloader())["perplexity"]


def publish(
    cfg: DictConfig,
    model: pl.LightningModule,
    pruner: PruningCallback | None,
    datamodule: Any,
    parent: Mapping[str, Any],
    perplexity: Mapping[str, float],
    recovery: Mapping[str, int] | None,
) -> dict[str, Any]:
    """``save_hf``: the Hugging Face folder (:func:`save_hf`) with its model card (:mod:`~lightning_prune.app.card`;
    ``parent``: :func:`measure` of the model the run started from); results.json's entries for them."""
    directory, saved = save_hf(cfg, model, pruner, datamodule, parent_params=parent["params"]["total"])
    facts = card.publish(cfg, directory, parent, saved, perplexity, parent["held_out"], recovery)
    return {"hf_checkpoint": directory, "card": facts}


def hf_model(cfg: DictConfig, model: pl.LightningModule) -> Any:
    """The Hugging Face model ``save_hf=DIR`` writes (the LightningModule's ``model``), checked before any work."""
    if not cfg.get("save_hf"):
        return None
    try:
        from transformers import PreTrainedModel
    except ImportError as err:
        raise ValueError(f"save_hf={cfg.save_hf!r} needs transformers: pip install 'lightning-prune[lm]'") from err
    hf = getattr(model, "model", None)
    if not isinstance(hf, PreTrainedModel):
        raise ValueError(
            f"save_hf={cfg.save_hf!r} writes a Hugging Face checkpoint, but {cfg.model._target_} holds no "
            "transformers model in `.model`: use a Hugging Face model (e.g. experiment=llama_text), or drop save_hf"
        )
    return hf


def save_hf(
    cfg: DictConfig,
    model: pl.LightningModule,
    pruner: PruningCallback | None,
    datamodule: Any,
    parent_params: int | None = None,
) -> tuple[str, Any]:
    """Write the pruned model to ``save_hf`` as an ordinary Hugging Face checkpoint (and the data's tokenizer, else
    the pretrained model's); returns the folder and the model read back from it.

    Heads and neurons removed (``pattern="channels"``) are cut out first (:func:`~lightning_prune.shrink`),
    so the checkpoint is a smaller dense model with its sizes in the config; other patterns are saved
    dense with their zeros. The written directory is read back with ``AutoModelForCausalLM.from_pretrained``
    and must compute what the pruned model computes, else this raises. ``parent_params``: the parameters of the
    model the run started from, for the message (a shrunk student is already smaller than its parent)."""
    from transformers import AutoModelForCausalLM

    from lightning_prune.surgery.shrink import shrink

    hf, directory = hf_model(cfg, model), Path(str(cfg.save_hf)).expanduser()
    batch = next(iter(datamodule.val_dataloader()))
    ids = batch["input_ids"][:2].to(hf.device)
    structured = pruner is not None and pruner.pattern.removes_structures
    with eval_mode(hf), torch.no_grad():
        before = parent_params if parent_params is not None else sum(p.numel() for p in hf.parameters())
        out = shrink(hf, example_inputs={"input_ids": ids}) if structured else None
        (out if out is not None else hf).save_pretrained(directory)
        after = out.params_after if out is not None else sum(p.numel() for p in hf.parameters())
        if (tok := tokenizer(cfg, datamodule)) is not None:
            tok.save_pretrained(directory)
        loaded = AutoModelForCausalLM.from_pretrained(directory).to(hf.device).eval()
        want, got = hf(input_ids=ids).logits, loaded(input_ids=ids).logits
    if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
        raise RuntimeError(
            f"save_hf={str(directory)!r}: the checkpoint read back computes other logits than the pruned model "
            f"(max difference {(got - want).abs().max().item():.3g})"
        )
    print(
        f"Hugging Face checkpoint: {directory} ({before:,} -> {after:,} parameters"
        f"{', shrunk' if structured else ', dense with zeros' if pruner is not None else ''}); "
        "AutoModelForCausalLM.from_pretrained reads it",
        flush=True,
    )
    return str(directory), loaded


def tokenizer(cfg: DictConfig, datamodule: Any) -> Any:
    """The tokenizer ``save_hf`` writes beside the model: the data module's (a ``transformers`` tokenizer, or a
    ``tokenizers.Tokenizer`` wrapped in one), else the one in the pretrained model's folder (``model.path``),
    else ``None``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is not None:
        return (
            tokenizer if hasattr(tokenizer, "save_pretrained") else PreTrainedTokenizerFast(tokenizer_object=tokenizer)
        )
    return AutoTokenizer.from_pretrained(str(cfg.model.path)) if cfg.model.get("path") else None
