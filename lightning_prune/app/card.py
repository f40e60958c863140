"""The model card (``README.md``) of the Hugging Face folder a run writes with ``save_hf=DIR``, and its facts.

Every number on the card comes from one dict of facts (:func:`facts`), which the run's ``results.json`` holds too
(under ``"card"``), so the two cannot disagree: the parent model, what each axis lost (read from the parent's and
the result's configs), the parameters before and after (all, and outside the embeddings and output head), the
held-out perplexity before, after pruning and after recovery, the text it was measured on, the tokens the
recovery trained on, and the command that made it (``lightning-prune`` and Hydra's task overrides).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_prune.models import layouts

# card label -> the size in :meth:`~lightning_prune.models.layouts.Architecture.config_keys`
AXES = {
    "hidden size": "hidden",
    "attention heads": "heads",
    "kv heads": "kv_heads",
    "MLP neurons": "intermediate",
    "blocks": "layers",
}
PARAMS = {"total": "all", "non_embedding": "non-embedding", "non_embedding_nonzero": "non-embedding, not zero"}
PERPLEXITY = {"dense": "parent", "pruned": "after pruning", "recovered": "after recovery"}


def count_params(hf_model: nn.Module, nonzero: bool = False) -> dict[str, int]:
    """``{"total", "non_embedding"}`` parameters of a Hugging Face model (tied ones once); ``nonzero``: count
    only the entries that are not exactly zero, so masked heads and neurons count as removed (what
    :func:`~lightning_prune.shrink` would cut), as do unstructured zeros."""

    def size(p: torch.Tensor) -> int:
        return int(torch.count_nonzero(p.detach())) if nonzero else p.numel()

    embedding = {id(p) for p in layouts.embedding_parameters(hf_model)}
    params = list(hf_model.parameters())  # each once
    total = sum(size(p) for p in params)
    return {"total": total, "non_embedding": total - sum(size(p) for p in params if id(p) in embedding)}


def sizes(hf_model: nn.Module) -> dict[str, int | None]:
    """The sizes of :data:`AXES` in ``hf_model``'s config (``None`` where its architecture has no such key)."""
    keys = layouts.layout_of(hf_model).config_keys()
    config = hf_model.config
    found = {label: getattr(config, keys[key], None) if key in keys else None for label, key in AXES.items()}
    if found["kv heads"] is None:  # no separate key: every head has its own keys and values
        found["kv heads"] = found["attention heads"]
    return found


@torch.no_grad()
def held_out(hf_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """Perplexity of ``hf_model`` on ``batches`` (``{"input_ids"}`` windows): ``exp`` of the mean next-token
    cross-entropy over every predicted token, with the windows, their length and the tokens it read."""
    device = next(hf_model.parameters()).device
    was_training = hf_model.training
    hf_model.eval()
    try:
        total, predicted, windows, tokens, seq_len = 0.0, 0, 0, 0, 0
        for batch in batches:
            ids = batch["input_ids"].to(device)
            n = ids.numel() - ids.shape[0]  # one prediction fewer than tokens per window
            total += float(hf_model(input_ids=ids, labels=ids).loss) * n
            predicted, windows, tokens, seq_len = (
                predicted + n,
                windows + ids.shape[0],
                tokens + ids.numel(),
                ids.shape[1],
            )
    finally:
        hf_model.train(was_training)
    if not windows:
        raise ValueError("held-out perplexity: the validation data gave no batch")
    return {
        "perplexity": round(math.exp(total / predicted), 4),
        "windows": windows,
        "seq_len": seq_len,
        "tokens": tokens,
    }


def command(overrides: Iterable[str]) -> str:
    """The command line that made the run: ``lightning-prune`` and Hydra's task overrides, quoted for a shell."""
    return " ".join(["lightning-prune", *(shlex.quote(o) for o in overrides)])


def parent_of(cfg: DictConfig) -> tuple[str, str | None]:
    """What the run started from, and the ``base_model`` of the front matter (a checkpoint folder or Hub id)."""
    name = cfg.model._target_.rsplit(".", 1)[-1]
    if cfg.model.get("path"):
        return str(cfg.model.path), str(cfg.model.path)
    if cfg.get("ckpt_path"):
        return f"{cfg.ckpt_path} (a Lightning checkpoint of {name})", None
    return f"{name} built from its config (random init; trained in this run)", None


def eval_data(cfg: DictConfig, measured: Mapping[str, Any]) -> dict[str, Any]:
    """The text a :func:`held_out` measurement read: the data module and its settings, the split, its size."""
    settings = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(settings, dict)
    return {
        "source": cfg.data._target_.rsplit(".", 1)[-1],
        "settings": {k: v for k, v in settings.items() if k != "_target_"},
        "split": "validation",
        **{k: measured[k] for k in ("windows", "seq_len", "tokens")},
    }


def recovery_of(trainer: Any, batch_shape: tuple[int, ...] | None) -> dict[str, int] | None:
    """The recovery fit's size: optimizer steps, sequences per device and batch, their length, devices and
    accumulated batches (``None`` when it ran no step)."""
    if not trainer.global_step or batch_shape is None:
        return None
    return {
        "steps": int(trainer.global_step),
        "batch": int(batch_shape[0]),
        "seq_len": int(batch_shape[1]),
        "devices": int(trainer.world_size),
        "accumulate": int(trainer.accumulate_grad_batches),
    }


def publish(
    cfg: DictConfig,
    directory: str | Path,
    parent: Mapping[str, Any],
    result: nn.Module,
    perplexity: Mapping[str, float],
    measured: Mapping[str, Any],
    recovery: Mapping[str, int] | None,
) -> dict[str, Any]:
    """The card's facts for a run's ``save_hf`` folder, written there as ``README.md``; returns them for
    results.json. ``parent``: :func:`snapshot` of the model before the run changed it."""
    from hydra.core.hydra_config import HydraConfig

    name, base = parent_of(cfg)
    card = facts(
        parent=name,
        base_model=base,
        parent_model=parent,
        result=result,
        perplexity=perplexity,
        eval_data=eval_data(cfg, measured),
        recovery=recovery,
        command=command(HydraConfig.get().overrides.task),
        harness=harness(cfg, result, directory),
    )
    write(directory, card)
    return card


def harness(cfg: DictConfig, hf_model: nn.Module, directory: str | Path) -> dict[str, Any] | None:
    """lm-evaluation-harness on the saved model, where the config has a ``harness`` group
    (:mod:`lightning_prune.app.harness`): its results go into the card and results.json; ``None`` without."""
    if cfg.get("harness") is None:
        return None
    from lightning_prune.app.harness import run_from_config  # type: ignore[import-not-found]

    return run_from_config(cfg.harness, hf_model, str(directory))


def facts(
    *,
    parent: str,
    base_model: str | None,
    parent_model: nn.Module | Mapping[str, Any],
    result: nn.Module,
    perplexity: Mapping[str, float],
    eval_data: Mapping[str, Any],
    recovery: Mapping[str, int] | None,
    command: str,
    harness: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What the card states, as plain JSON values. ``parent_model``: the parent, or its :func:`sizes` and
    :func:`count_params` (``{"sizes", "params"}``, taken before pruning changed it in place); ``perplexity``:
    some of :data:`PERPLEXITY`'s keys; ``recovery``: ``{"steps", "batch", "seq_len", "devices", "accumulate"}``
    of the fit that recovered it (``None``: none); ``harness``: lm-evaluation-harness results, if it ran."""
    before = parent_model if isinstance(parent_model, Mapping) else snapshot(parent_model)
    after = snapshot(result)
    tokens = None
    if recovery is not None:
        tokens = math.prod(recovery[k] for k in ("steps", "batch", "seq_len", "devices", "accumulate"))
    return {
        "parent": parent,
        "base_model": base_model,
        "sizes": {k: [before["sizes"][k], after["sizes"][k]] for k in AXES},
        "params": {k: [before["params"][k], after["params"][k]] for k in PARAMS},
        "perplexity": {k: perplexity[k] for k in PERPLEXITY if k in perplexity},
        "eval_data": dict(eval_data),
        "recovery": {**recovery, "tokens": tokens} if recovery is not None else None,
        "command": command,
        "harness": dict(harness) if harness else None,
    }


def snapshot(hf_model: nn.Module) -> dict[str, Any]:
    """``{"sizes", "params"}`` of ``hf_model`` now (the parent's, before a run prunes it in place)."""
    nonzero = count_params(hf_model, nonzero=True)["non_embedding"]
    return {"sizes": sizes(hf_model), "params": {**count_params(hf_model), "non_embedding_nonzero": nonzero}}


def render(card: Mapping[str, Any]) -> str:
    """The card's Markdown, front matter first: every number is one of ``card``'s, printed whole."""
    front = ["---", "library_name: transformers"]
    if card["base_model"]:
        front.append(f"base_model: {card['base_model']}")
    front += ["tags:", "- pruned", "- lightning-prune", "---", ""]
    lines = [
        "# A pruned model made with lightning-prune",
        "",
        f"Parent: {card['parent']}",
        "",
        "| axis | parent | this model |",
        "|---|---|---|",
        *(f"| {k} | {_n(a)} | {_n(b)} |" for k, (a, b) in card["sizes"].items()),
        *(f"| parameters ({PARAMS[k]}) | {_n(a)} | {_n(b)} |" for k, (a, b) in card["params"].items()),
        "",
        "## Held-out perplexity",
        "",
        "| model | perplexity |",
        "|---|---|",
        *(f"| {PERPLEXITY[k]} | {v} |" for k, v in card["perplexity"].items()),
        "",
        f"Measured on {_describe(card['eval_data'])}.",
        "",
    ]
    r = card["recovery"]
    if r is not None:
        lines += [
            f"Recovery: {_n(r['tokens'])} tokens ({r['steps']} steps x {r['batch']} sequences x {r['seq_len']} "
            f"tokens x {r['devices']} devices x {r['accumulate']} accumulated batches).",
            "",
        ]
    if card["harness"]:
        lines += ["## lm-evaluation-harness", "", "```json", _json(card["harness"]), "```", ""]
    lines += ["## How it was made", "", "```bash", card["command"], "```", ""]
    return "\n".join(front + lines)


def write(directory: str | Path, card: Mapping[str, Any]) -> Path:
    """Write ``README.md`` into the Hugging Face folder ``directory``."""
    path = Path(directory) / "README.md"
    path.write_text(render(card))
    return path


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _describe(data: Mapping[str, Any]) -> str:
    """``the validation split of TextDataModule (max_files=150, ...): 12 windows of 128 tokens, 1,536 tokens``."""
    settings = ", ".join(f"{k}={v}" for k, v in data["settings"].items())
    return (
        f"the {data['split']} split of {data['source']} ({settings}): {_n(data['windows'])} windows of "
        f"{data['seq_len']} tokens, {_n(data['tokens'])} tokens"
    )


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, default=str)
