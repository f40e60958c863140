"""``mode=shrink`` (``experiment=shrink_distill``): the best smaller shape of a Hugging Face decoder for a parameter
budget (:func:`~lightning_prune.surgery.budget.shrink_to`), then that smaller model distilled from the dense one in
``Trainer.fit`` (:class:`~lightning_prune.Distillation` with the dense model as its ``teacher``), and saved with its
model card (``save_hf``). Held-out perplexity of the dense model, of the shrunk one, and after distillation.

Several devices (``trainer=ddp_cpu``, ``trainer=ddp``): Lightning starts the other ranks when rank 0 reaches
``fit``, each running this command again. The search runs once, on rank 0, which saves the shrunk model in the run's
folder (``shrunk/``) before ``fit``; the other ranks read it there (DDP then broadcasts rank 0's weights), so every
rank trains the same shape whatever the search's arithmetic would give elsewhere. Each rank builds its own dense
teacher (the same weights: the checkpoint, or the run's seed), which is no part of DDP's gradients.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_prune.app import card, export
from lightning_prune.app.cli_run import _fmt, _load, _loggers, _print, _quality, calibration_loader
from lightning_prune.app.curves import SizeCurve
from lightning_prune.surgery.budget import shrink_to, table

HANDOFF = "shrunk"  # the folder in the run's output directory where rank 0 leaves the shrunk model


def run_shrink(cfg: DictConfig) -> dict[str, Any]:
    """Shrink the dense model to ``shrink.params`` with :func:`shrink_to`, distil it for ``trainer.max_steps``
    steps from the dense model, measure the three, save the result (``save_hf``) and ``results.json``."""
    if not (cfg.get("distill") and cfg.distill.get("_target_")):
        raise ValueError("mode=shrink distils the shrunk model from the dense one: add distill=kd (or squarehead)")
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    datamodule, module, _, _ = _load(cfg, "shrink")
    if not export.holds_hf(module):
        raise ValueError(
            f"mode=shrink shrinks a Hugging Face decoder, and {cfg.model._target_} holds no transformers model in "
            "`.model`: use model=hf model.path=DIR (or model=llama_tiny with ckpt_path=...)"
        )
    export.hf_model(cfg, module)  # save_hf checked before the search
    dense = module.model
    size = SizeCurve(reference=card.count_params(dense)["non_embedding"])  # density: of the dense model
    callbacks = [instantiate(cfg.distill, teacher=dense), size]
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = _loggers(cfg)
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(output_dir)
    )
    found = _search(cfg, dense, datamodule, trainer, output_dir)
    module.model = found.pop("model")  # the student: the LightningModule's training logic, the smaller model
    trainer.fit(module, datamodule=datamodule)
    summary = {
        "mode": "shrink",
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "data": cfg.data._target_.rsplit(".", 1)[-1],
        "seed": cfg.seed,
        **_quality(trainer.callback_metrics, "val"),
        "output_dir": str(output_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if trainer.is_global_zero:
        ppl = {**found["perplexity"], "recovered": export.perplexity(module.model, datamodule)}
        summary.update(shrink=found["shrink"], perplexity=ppl)
        if cfg.get("save_hf"):
            recovery = card.recovery_of(trainer, size.batch_shape)
            summary.update(export.publish(cfg, module, None, datamodule, found["parent"], ppl, recovery))
        (output_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str))
        _print(_report(summary))
    return summary


def _search(
    cfg: DictConfig, dense: nn.Module, datamodule: Any, trainer: pl.Trainer, output_dir: Path
) -> dict[str, Any]:
    """On rank 0: the dense model measured, :func:`shrink_to` on the calibration batches, the shrunk model
    measured (and left in ``HANDOFF`` for the other ranks when there are any). On the others: the model left
    there. ``{"model", "parent", "perplexity", "shrink"}`` (only ``"model"`` on the other ranks)."""
    handoff = output_dir / HANDOFF
    if rank_zero_only.rank != 0:
        from transformers import AutoModelForCausalLM

        return {"model": AutoModelForCausalLM.from_pretrained(handoff, dtype=next(dense.parameters()).dtype)}
    dense.to(trainer.strategy.root_device)
    parent = export.measure(dense, datamodule)
    n = int(cfg.shrink.num_batches)
    batches = list(itertools.islice(calibration_loader(datamodule), n))
    if len(batches) < n:
        raise ValueError(f"shrink.num_batches={n}: the calibration data has only {len(batches)} batches")
    axes = list(cfg.shrink.axes) if cfg.shrink.get("axes") is not None else None
    shrunk = shrink_to(dense, batches, cfg.shrink.params, axes=axes, candidates=int(cfg.shrink.candidates))
    small = shrunk.model
    if trainer.world_size > 1:
        small.save_pretrained(handoff)
    return {
        "model": small,
        "parent": parent,
        "perplexity": {"dense": parent["held_out"]["perplexity"], "pruned": export.perplexity(small, datamodule)},
        "shrink": {"params": cfg.shrink.params, "axes": axes, "notes": shrunk.notes, "candidates": shrunk.candidates},
    }


def _report(summary: dict[str, Any]) -> str:
    ppl = summary["perplexity"]
    lines = [
        "",
        "=" * 72,
        f"lightning-prune shrink: {summary['model']} / {summary['data']}",
        table(summary["shrink"]["candidates"]),
        "",
        f"held-out perplexity: dense {ppl['dense']}, shrunk {ppl['pruned']}, after distillation {ppl['recovered']}",
        f"final {_fmt(summary, 'val')}",
        *(
            [f"Hugging Face checkpoint: {summary['hf_checkpoint']} (and its README.md)"]
            if summary.get("hf_checkpoint")
            else []
        ),
        f"results.json: {Path(summary['output_dir']) / 'results.json'}",
        "=" * 72,
    ]
    return "\n".join(lines)
