"""What ``lightning-prune`` runs once Hydra has composed the config: ``mode=train``, ``oneshot``, ``eval``.

Imported by :func:`lightning_prune.app.cli.run` when a run starts, not by the entry point, so that
``lightning-prune --help`` does not import Lightning.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_prune.app import card, export
from lightning_prune.app.curves import SizeCurve
from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.engine.calibration import eval_mode
from lightning_prune.engine.round import prune
from lightning_prune.engine.summary import when


class RoundEvaluator(Callback):
    """Validation quality right after each pruning round (before any fine-tuning).

    The model's own ``round_metric(dataloader) -> (key, value)`` if it has one (accuracy for the
    classifiers, perplexity for :class:`~lightning_prune.app.models.CausalLM`), else top-1 accuracy.

    Listed after the pruner, so its hooks see the round's result: step rounds at the end of their
    training batch, epoch rounds at the end of their epoch.
    """

    def __init__(self, pruner: PruningCallback, datamodule: pl.LightningDataModule) -> None:
        self.pruner, self.datamodule = pruner, datamodule
        self.after: list[dict[str, Any]] = []

    @torch.no_grad()
    def measure(self, pl_module: pl.LightningModule) -> tuple[str, float]:
        if callable(metric := getattr(pl_module, "round_metric", None)):
            with eval_mode(pl_module):
                return metric(self.datamodule.val_dataloader())
        correct = total = 0
        with eval_mode(pl_module):
            for x, y in self.datamodule.val_dataloader():
                x, y = x.to(pl_module.device), y.to(pl_module.device)
                correct += int((pl_module(x).argmax(1) == y).sum())
                total += len(y)
        return "val_acc", correct / max(total, 1)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        history = self.pruner.history
        if len(history) == len(self.after):
            return
        record = history[-1]
        key, value = self.measure(pl_module)
        self.after.append(
            {
                "round": record["round"],
                "when": when(record),
                "epoch": record["epoch"],
                "global_step": record["global_step"],
                "sparsity": record["sparsity"],
                key: value,
            }
        )
        for logger in trainer.loggers:
            logger.log_metrics({f"prune/{key}_after_round": value}, step=trainer.global_step)
        _print(f"[lightning-prune] round {record['round']}: {_fmt({key: value}, 'val')} right after pruning")


@rank_zero_only
def method_label(cfg: DictConfig) -> str:
    """Short name of the pruning method for tables: ``obs[kfac]``, ``obd[ekfac]``, ``magnitude``."""
    target = cfg.pruner.get("_target_") if cfg.pruner else None
    if not target:
        return "dense"
    name = target.rsplit(".", 1)[-1].replace("Pruning", "").lower()
    if name == "obd":
        return f"obd[{cfg.pruner.curvature}]"
    if name == "obs":
        return f"obs[{cfg.pruner.hessian}]"
    return name


def _print(text: str) -> None:
    print(text, flush=True)


def busy_hint() -> str | None:
    """A one-line hint when other processes already load every core and torch runs several threads: those
    threads wait for each other (a run many times slower, README). Said, never acted on: the thread count is
    the user's (``OMP_NUM_THREADS``); ``None`` when it is set, or the machine has a core to spare."""
    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "getloadavg"):
        return None
    threads, cores, load = torch.get_num_threads(), os.cpu_count() or 1, os.getloadavg()[0]
    if threads < 2 or load < cores:
        return None
    return (
        f"[lightning-prune] this machine is busy (load {load:.1f} on {cores} cores) and torch runs {threads} threads, "
        "which then mostly wait for each other: OMP_NUM_THREADS=1 in front of the command may run it several "
        "times faster"
    )


QUALITY = {"acc": "accuracy", "ppl": "perplexity"}


def _quality(metrics: Mapping[str, Any], stage: str) -> dict[str, float]:
    """``{stage}_acc`` and/or ``{stage}_ppl`` from the logged ``{stage}/acc`` and ``{stage}/ppl``."""
    out = {f"{stage}_{k}": float(metrics[f"{stage}/{k}"]) for k in QUALITY if f"{stage}/{k}" in metrics}
    return out or {f"{stage}_acc": math.nan}


def _fmt(values: Mapping[str, Any], stage: str) -> str:
    """``"val accuracy 97.10%"`` or ``"val perplexity 12.34"``: whichever ``values`` holds; ``"val: not measured"``
    when it holds none, or only NaN (results.json keeps ``val_acc: NaN`` when no validation ran, whatever the
    model: "val accuracy nan%" would misname a language model's metric and hide that nothing was measured)."""
    parts = []
    for k, word in QUALITY.items():
        v = values.get(f"{stage}_{k}")
        if v is not None and not math.isnan(v):
            parts.append(f"{stage} {word} {v:.2%}" if k == "acc" else f"{stage} {word} {v:.2f}")
    return ", ".join(parts) or f"{stage}: not measured"


def _loggers(cfg: DictConfig) -> list[Any]:
    """Instantiate the logger list; W&B gets the resolved config, a run name, and a sweep group."""
    if not cfg.logger:
        return []
    resolved = OmegaConf.to_container(cfg, resolve=True)
    loggers = []
    for entry in cfg.logger:
        overrides: dict[str, Any] = {}
        if entry.get("_target_", "").endswith("wandb_logger"):
            if entry.get("group") is None and HydraConfig.get().mode == RunMode.MULTIRUN:
                overrides["group"] = Path(HydraConfig.get().sweep.dir).name
            if entry.get("name") is None:
                target = cfg.pruner.get("target", 0) if cfg.pruner else 0
                overrides["name"] = f"{method_label(cfg)}-{target}-seed{cfg.seed}"
        logger = instantiate(entry, **overrides)
        logger.log_hyperparams(resolved)  # W&B: the resolved Hydra config becomes the run config
        loggers.append(logger)
    return loggers


def run_train(cfg: DictConfig) -> dict[str, Any]:
    """Fit with the pruner as a callback (resuming from ``ckpt_path`` if given), test, report."""
    output_dir = HydraConfig.get().runtime.output_dir
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = _model(cfg, datamodule)
    hf = export.hf_model(cfg, model)  # save_hf=DIR checked before the fit
    callbacks, pruner, evaluator = _callbacks(cfg, datamodule, model)
    loggers = _loggers(cfg)
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=output_dir
    )
    # the model card's parent: the model as the fit gets it, measured where it will train (rank 0 writes the card)
    parent = None
    if hf is not None and rank_zero_only.rank == 0:
        parent = export.measure(hf.to(trainer.strategy.root_device), datamodule)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    val = _quality(trainer.callback_metrics, "val")
    test = _quality(trainer.test(model, datamodule=datamodule, verbose=False)[0], "test") if cfg.test else {}

    summary = {
        "method": method_label(cfg),
        "target": float(cfg.pruner.get("target", 0.0)) if pruner is not None else 0.0,
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "data": cfg.data._target_.rsplit(".", 1)[-1],
        "seed": cfg.seed,
        "distill": _distill_label(cfg),
        "sparsity": pruner.sparsity if pruner is not None else 0.0,
        **_dense(pruner),
        "rounds": evaluator.after if evaluator else [],
        **val,
        **test,
        "history": [dict(r) for r in pruner.history] if pruner is not None else [],
        "checkpoint": _checkpoint_path(trainer),
        "output_dir": output_dir,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if trainer.is_global_zero:
        if cfg.get("save_hf"):
            assert parent is not None
            size = next(c for c in callbacks if isinstance(c, SizeCurve))
            ppl = {"dense": parent["held_out"]["perplexity"], "recovered": export.perplexity(hf, datamodule)}
            if cfg.get("ckpt_path"):  # resumed: the weights measured before the fit were not yet the checkpoint's
                del ppl["dense"]
            summary.update(
                export.publish(cfg, model, pruner, datamodule, parent, ppl, card.recovery_of(trainer, size.batch_shape))
            )
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "results.json").write_text(json.dumps(summary, indent=2, default=str))
        _print(_final_report(summary, pruner, loggers))
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()  # flush now: the next sweep job starts a new run
    return summary


def _callbacks(
    cfg: DictConfig, datamodule: pl.LightningDataModule, model: pl.LightningModule
) -> tuple[list[Callback], PruningCallback | None, RoundEvaluator | None]:
    """The fit's callbacks (the pruner, its evaluator, distillation, the size curve of a Hugging Face model, the
    config's ``callbacks``), the pruner and the evaluator."""
    callbacks: list[Callback] = []
    pruner = instantiate(cfg.pruner) if cfg.pruner and cfg.pruner.get("_target_") else None
    evaluator = None
    if pruner is not None:
        callbacks.append(pruner)
        if cfg.eval_after_round:
            evaluator = RoundEvaluator(pruner, datamodule)
            callbacks.append(evaluator)
    if cfg.get("distill") and cfg.distill.get("_target_"):  # distill=kd|squarehead: beside the pruner
        callbacks.append(instantiate(cfg.distill))
    if export.holds_hf(model):
        callbacks.append(SizeCurve())  # after the pruner: a round's result is seen the step it happens
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    return callbacks, pruner, evaluator


def _load(cfg: DictConfig, mode: str) -> tuple[pl.LightningDataModule, pl.LightningModule, dict[str, Any], Path | None]:
    """The data, and the model with ``ckpt_path``'s weights (a pretrained model's own without it: ``None``), for
    ``mode=oneshot``, ``eval`` and ``shrink``."""
    if not cfg.get("ckpt_path") and not cfg.model.get("path"):
        raise ValueError(
            f"mode={mode} needs ckpt_path=... (a checkpoint of a trained model, e.g. from `pruner=none`), "
            "or a pretrained model (model=hf model.path=DIR)"
        )
    ckpt_path = Path(cfg.ckpt_path) if cfg.get("ckpt_path") else None  # None: the pretrained model's own weights
    if ckpt_path is not None and not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r} is not a file")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = _model(cfg, datamodule)
    if ckpt_path is None:
        return datamodule, model, {}, None
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"ckpt_path={str(ckpt_path)!r} holds Python objects besides tensors, so it is not loaded "
            f"(weights_only=True): save a checkpoint with plain hyper-parameters ({err})"
        ) from None
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return datamodule, model, ckpt, ckpt_path


def _evaluate(cfg: DictConfig, model: pl.LightningModule, datamodule: pl.LightningDataModule) -> dict[str, float]:
    output_dir = HydraConfig.get().runtime.output_dir
    evaluator = instantiate(
        cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False, default_root_dir=output_dir
    )
    val = evaluator.validate(model, datamodule=datamodule, verbose=False)[0]
    test = evaluator.test(model, datamodule=datamodule, verbose=False)[0] if cfg.test else {}
    return {**_quality(val, "val"), **(_quality(test, "test") if cfg.test else {})}


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``ckpt_path``: validation and test accuracy, and the zeros of its Linear/Conv weights."""
    from lightning_prune.engine.targets import resolve_targets

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    datamodule, model, _, ckpt_path = _load(cfg, "eval")
    weights = [t.param.detach() for t in resolve_targets(model)]
    sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    summary = {"mode": "eval", "checkpoint": str(ckpt_path), "sparsity": sparsity, **_evaluate(cfg, model, datamodule)}
    if rank_zero_only.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
        _print(
            f"\n{'=' * 72}\nlightning-prune eval: {ckpt_path}\n"
            f"sparsity of the Linear/Conv weights {sparsity:.2%}, {_fmt(summary, 'val')}, {_fmt(summary, 'test')}"
            f"\nresults.json: {output_dir / 'results.json'}\n{'=' * 72}"
        )
    return summary


def run_oneshot(cfg: DictConfig) -> dict[str, Any]:
    """Load ``ckpt_path`` (or a pretrained model), prune it once with :func:`prune` on the calibration data,
    evaluate before and after, save it (and with ``save_hf`` a Hugging Face folder with its model card)."""
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    if not (cfg.pruner and cfg.pruner.get("_target_")):
        raise ValueError("mode=oneshot needs a pruner: pruner=magnitude|obd|obs|sparsegpt")
    datamodule, model, ckpt, ckpt_path = _load(cfg, "oneshot")
    hf = export.hf_model(cfg, model)
    pruner: PruningCallback = instantiate(cfg.pruner)
    state = ckpt.get("callbacks", {}).get(pruner.state_key)
    if state is not None:  # a checkpoint of a pruning run: its masks only shrink from here
        pruner.load_state_dict(state)
    parent = export.measure(hf, datamodule) if hf is not None and rank_zero_only.rank == 0 else None
    before = _evaluate(cfg, model, datamodule)
    record = prune(model, calibration_loader(datamodule), pruner)
    after = _evaluate(cfg, model, datamodule)
    source = str(ckpt_path) if ckpt_path is not None else str(cfg.model.path)
    summary = {
        "mode": "oneshot",
        "method": method_label(cfg),
        "target": float(cfg.pruner.target),
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "data": cfg.data._target_.rsplit(".", 1)[-1],
        "seed": cfg.seed,
        "sparsity": pruner.sparsity,
        "before": before,
        "after": after,
        **{f"dense_{k}": v for k, v in before.items() if k.startswith("val_")},
        **after,
        "history": [dict(r) for r in pruner.history],
        "source_checkpoint": source,
        "checkpoint": str(output_dir / "pruned.ckpt"),
        "output_dir": str(output_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if rank_zero_only.rank == 0:
        if parent is not None:
            ppl = {"dense": parent["held_out"]["perplexity"], "pruned": export.perplexity(hf, datamodule)}
            summary.update(export.publish(cfg, model, pruner, datamodule, parent, ppl, None))
        output_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "state_dict": model.state_dict(),
                "hyper_parameters": ckpt.get("hyper_parameters", dict(model.hparams)),
                "pytorch-lightning_version": pl.__version__,
                "callbacks": {pruner.state_key: pruner.state_dict()},
                "lightning_prune": {"source_checkpoint": source, "round": dict(record)},
            },
            summary["checkpoint"],
        )
        (output_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str))
        _print(_oneshot_report(summary, pruner))
    return summary


def _oneshot_report(summary: dict[str, Any], pruner: PruningCallback) -> str:
    before, after = summary["before"], summary["after"]
    lines = [
        "",
        "=" * 72,
        f"lightning-prune one-shot: {summary['method']} on {summary['model']} / {summary['data']}",
        f"before: {_fmt(before, 'val')}, {_fmt(before, 'test')}",
        f"after:  sparsity {summary['sparsity']:.2%}, {_fmt(after, 'val')}, {_fmt(after, 'test')}",
        "",
        pruner.layer_table(),
        "",
        f"pruned checkpoint: {summary['checkpoint']}",
        *([f"Hugging Face checkpoint: {summary['hf_checkpoint']}"] if summary.get("hf_checkpoint") else []),
        f"results.json: {Path(summary['output_dir']) / 'results.json'}",
        "=" * 72,
    ]
    return "\n".join(lines)


def calibration_loader(datamodule: Any) -> Iterable[Any]:
    """The calibration data of a round or a search: the data module's ``calibration_dataloader()`` where it has
    one (a subset meant for it), else its training batches (the first ``num_batches`` of them are read)."""
    calibration = getattr(datamodule, "calibration_dataloader", None)
    return calibration() if callable(calibration) else datamodule.train_dataloader()


def _model(cfg: DictConfig, datamodule: pl.LightningDataModule) -> pl.LightningModule:
    # plain containers, so the hyper-parameters Lightning saves load with torch.load(weights_only=True)
    args = getattr(datamodule, "model_args", None)
    if args is None:
        args = {"input_shape": list(datamodule.input_shape), "num_classes": datamodule.num_classes}
    model = instantiate(cfg.model, **args, _convert_="all")
    if hasattr(datamodule, "check_model"):  # e.g. the tokenizer fits the model's vocabulary
        datamodule.check_model(getattr(model, "model", model))
    return model


def _distill_label(cfg: DictConfig) -> str:
    """``"none"``, ``"kd"`` or ``"kd+squarehead"``: the recovery loss of a run, for results.json."""
    d = cfg.get("distill")
    if not d or not d.get("_target_"):
        return "none"
    return "kd+squarehead" if d.get("squarehead_weight") else "kd"


def _checkpoint_path(trainer: pl.Trainer) -> str | None:
    """Where the run's ModelCheckpoint saved the final model, if it did."""
    ckpt = trainer.checkpoint_callback
    if ckpt is None:
        return None
    return getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "") or None


def _float(value: Any) -> float:
    return float(value) if value is not None else math.nan


def _dense(pruner: PruningCallback | None) -> dict[str, float]:
    """Validation quality logged before the first round pruned (``dense_val_acc``/``dense_val_ppl``)."""
    monitor = pruner.history[0]["monitor"] if pruner is not None and pruner.history else {}
    found = {f"dense_val_{k}": float(monitor[f"val/{k}"]) for k in QUALITY if f"val/{k}" in monitor}
    return found or {"dense_val_acc": math.nan}


def _final_report(summary: dict[str, Any], pruner: PruningCallback | None, loggers: list[Any]) -> str:
    lines = ["", "=" * 72, f"lightning-prune: {summary['method']} on {summary['model']} / {summary['data']}"]
    if pruner is not None:
        dense = {k.removeprefix("dense_"): v for k, v in summary.items() if k.startswith("dense_val_")}
        if all(math.isnan(v) for v in dense.values()):
            lines.append("dense: not validated before the first round (validation ran later)")
        else:
            lines.append(f"dense {_fmt(dense, 'val')} (before the first round)")
        for r in summary["rounds"]:
            lines.append(
                f"  round {r['round']} ({r['when']}): sparsity {r['sparsity']:.2%}, "
                f"{_fmt(r, 'val')} right after pruning"
            )
    lines.append(f"final: sparsity {summary['sparsity']:.2%}, {_fmt(summary, 'val')}, {_fmt(summary, 'test')}")
    if pruner is not None and pruner.verbose == 0:  # verbose pruners already printed it at fit end
        lines += ["", pruner.layer_table()]
    lines += ["", f"outputs and results.json: {summary['output_dir']}"]
    if summary.get("checkpoint"):
        # quoted: Lightning's checkpoint names contain '=', which Hydra's override grammar needs quoted
        lines.append(f"checkpoint: {summary['checkpoint']}")
        lines.append(
            f"  prune it post-training: lightning-prune mode=oneshot \"ckpt_path='{summary['checkpoint']}'\" pruner=obs"
        )
    if summary.get("hf_checkpoint"):
        lines.append(f"Hugging Face checkpoint: {summary['hf_checkpoint']} (AutoModelForCausalLM.from_pretrained)")
    for logger in loggers:
        where = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            mode = getattr(getattr(run, "settings", None), "mode", "")
            where = (
                f"{Path(run.dir).parent} (W&B {mode or 'run'}{'; sync with `wandb sync`' if mode == 'offline' else ''})"
            )
        lines.append(f"{type(logger).__name__}: {where}")
    lines.append("=" * 72)
    return "\n".join(lines)
