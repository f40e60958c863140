"""The ``lightning-prune`` command: Hydra composes data, model, pruner, trainer and logger.

    lightning-prune                                    # digits, MLP, OBS to 80%: no download
    lightning-prune pruner=obd pruner.curvature=ekfac pruner.target=0.9
    lightning-prune -m pruner=magnitude,obd,obs pruner.target=0.8,0.9   # sweep
    lightning-prune experiment=fmnist_mlp trainer=ddp_cpu logger=wandb
    lightning-prune trainer.max_epochs=-1 trainer.max_steps=200 pruner.every_n_steps=20   # step rounds
    lightning-prune pruner=none                        # dense; prints the checkpoint it saved
    lightning-prune mode=oneshot ckpt_path=CKPT pruner=obs pruner.target=0.5   # post-training, prune()
    lightning-prune mode=eval ckpt_path=CKPT           # evaluate a checkpoint
    lightning-prune experiment=oneshot model.path=DIR data.files='[docs/*.txt]'   # SparseGPT 50%, save_hf + card
    lightning-prune experiment=shrink_distill model.path=DIR data.files='[docs/*.txt]'   # shrink_to, then distil
    lightning-prune experiment=prune_while_distilling model.path=DIR data.files='[docs/*.txt]'   # heads/neurons + KD
    lightning-prune model=hf model.path=DIR data=text_files data.files='[docs/*.txt]' trainer=steps   # any HF LM

Every run writes ``results.json`` in its output directory; ``lightning-prune-report DIR`` turns a
sweep's results into a Markdown table and a plot. ``mode=oneshot`` loads a trained checkpoint,
prunes it once with :func:`lightning_prune.prune` on ``pruner.num_batches`` training batches,
evaluates before and after, and saves ``pruned.ckpt`` (plain state-dict keys, the pruner's masks in
its callback state) next to ``results.json``; a pretrained ``model=hf`` needs no ``ckpt_path``, and the
calibration batches are the data's calibration subset where it has one.

Three recipes for a pretrained model end in a Hugging Face folder (``save_hf``, default ``<run>/model``)
with a model card (``README.md``: the parent, what each axis lost, parameters, held-out perplexity, the
recovery's tokens, the command; :mod:`lightning_prune.app.card`) whose facts ``results.json`` holds too:
``experiment=oneshot`` (the SparseGPT preset, ``pruner=sparsegpt``, once), ``experiment=shrink_distill``
(``mode=shrink``, :mod:`lightning_prune.app.recipes`: ``shrink_to`` a budget, ``shrink.params``, then
``Distillation`` from the dense model for ``trainer.max_steps``, on one or several devices) and
``experiment=prune_while_distilling`` (heads and neurons removed by OBS in three rounds beside ``distill=kd``,
cut out by ``save_hf``).

``model=hf`` loads any Hugging Face causal LM from a checkpoint folder (``model.path``); ``data=text_files``
(local text or JSON-lines files) and ``data=hf_dataset`` (a ``datasets`` dataset) tokenise text with that
checkpoint's tokenizer and pack it into ``data.seq_len``-token windows.

This module holds the entry point and what composing the config needs (Hydra and the resolvers);
the runs themselves are in :mod:`lightning_prune.app.cli_run`, imported only once a run starts, so
``--help`` and an override Hydra cannot compose answer without importing Lightning.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

MODES = ("train", "oneshot", "eval", "shrink")


def dense_epochs(max_epochs: int | None, end_epoch: int | None = None, *step_triggers: int | None) -> int | None:
    """``pruner.start_epoch`` of the default config: train dense for the first fifth of the epochs
    (4 of 20), never past an explicit ``end_epoch``; ``None`` for step triggers or an unbounded run."""
    if any(v is not None for v in step_triggers) or max_epochs is None or max_epochs < 0:
        return None
    start = max_epochs // 5
    return start if end_epoch is None else min(start, end_epoch)


def _step_bounded(max_epochs: int | None, max_steps: int | None, *epoch_triggers: int | None) -> bool:
    return (
        (max_epochs is None or max_epochs < 0)
        and bool(max_steps and max_steps > 0)
        and all(v is None for v in epoch_triggers)
    )


def dense_steps(
    max_epochs: int | None, max_steps: int | None, end_epoch: int | None = None, every_n_epochs: int | None = None
) -> int | None:
    """``pruner.start_step`` of a step-bounded run (``trainer=steps``) without triggers: dense for the
    first fifth of the steps; ``None`` for epoch-bounded runs or epoch triggers."""
    return max(max_steps // 5, 1) if _step_bounded(max_epochs, max_steps, end_epoch, every_n_epochs) else None


def round_steps(
    max_epochs: int | None, max_steps: int | None, end_epoch: int | None = None, every_n_epochs: int | None = None
) -> int | None:
    """``pruner.every_n_steps`` of a step-bounded run without triggers: a round every 20th of the run."""
    return max(max_steps // 20, 1) if _step_bounded(max_epochs, max_steps, end_epoch, every_n_epochs) else None


def steps_at(max_steps: int, fraction: float, offset: int = 0) -> int:
    """``offset`` plus the steps in a ``fraction`` of a step-bounded run (at least 1): the round triggers of
    ``experiment=prune_while_distilling`` (every quarter from step 1 to half the run: three rounds)."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"this experiment is step-bounded: `trainer.max_steps` must be >= 1, got {max_steps!r}")
    return max(int(max_steps * fraction), 1) + offset


OmegaConf.register_new_resolver("lp.steps_at", steps_at, replace=True)
OmegaConf.register_new_resolver("lp.dense_epochs", dense_epochs, replace=True)
OmegaConf.register_new_resolver("lp.dense_steps", dense_steps, replace=True)
OmegaConf.register_new_resolver("lp.round_steps", round_steps, replace=True)


def config_dir() -> Path:
    """The configs: ``lightning_prune/app/conf`` in an installed wheel, ``<repo>/conf`` in a clone."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    repo = Path(__file__).resolve().parents[2] / "conf"
    if repo.is_dir():
        return repo
    raise FileNotFoundError(f"lightning-prune configs not found in {packaged} or {repo}; reinstall the package")


def run(cfg: DictConfig) -> dict[str, Any]:
    """One experiment (``mode=train``), one post-training round (``mode=oneshot``), an evaluation (``mode=eval``)
    or a shrink-and-distil recipe (``mode=shrink``); returns its summary."""
    mode = cfg.get("mode", "train")
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    from lightning_prune.app import cli_run  # imports Lightning: only once there is something to run

    if cfg.get("print_config", False):
        cli_run._print(f"lightning-prune config (mode={mode}):\n{OmegaConf.to_yaml(cfg, resolve=True)}")
    if (hint := cli_run.busy_hint()) is not None:
        cli_run._print(hint)
    try:
        if mode == "shrink":
            from lightning_prune.app.recipes import run_shrink

            return run_shrink(cfg)
        return {"train": cli_run.run_train, "oneshot": cli_run.run_oneshot, "eval": cli_run.run_eval}[mode](cfg)
    except ValueError as err:
        raise ValueError(_with_config_keys(str(err), cfg)) from err


def _with_config_keys(message: str, cfg: DictConfig) -> str:
    """Append the command-line keys for the arguments an error names (``start_epoch`` -> ``pruner.start_epoch``)."""
    keys = []
    for name in dict.fromkeys(re.findall(r"`(\w+)`", message)):
        if cfg.pruner and name in cfg.pruner:
            keys.append(f"pruner.{name}=...")
        elif cfg.get("distill") and name in cfg.distill:  # e.g. Distillation's `teacher`
            keys.append(f"distill.{name}=...")
    for name in dict.fromkeys(re.findall(r"Trainer\((\w+)=", message)):
        keys.append(f"trainer.{name}=...")
    return message + (f" [on the command line: {', '.join(keys)}]" if keys else "")


def main() -> None:
    """Console entry point (``lightning-prune``)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    decorated = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(run)
    decorated()


if __name__ == "__main__":
    sys.exit(main())
