"""Logger factories: W&B that works without an account or a network."""

from __future__ import annotations

import netrc
import os
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import WandbLogger

WANDB_MODES = ("online", "offline", "disabled")


def wandb_logged_in() -> bool:
    """True if an API key is available (``WANDB_API_KEY`` or a ``wandb login`` netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        return netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str | None = None) -> str:
    """``WANDB_MODE`` wins, then an explicit ``mode``, then online if logged in, else offline."""
    chosen = os.environ.get("WANDB_MODE") or mode or ("online" if wandb_logged_in() else "offline")
    if chosen == "dryrun":
        chosen = "offline"
    if chosen not in WANDB_MODES:
        raise ValueError(f"W&B `mode` must be one of {WANDB_MODES} (or WANDB_MODE), got {chosen!r}")
    return chosen


def wandb_logger(
    project: str = "lightning-prune",
    entity: str | None = None,
    group: str | None = None,
    name: str | None = None,
    mode: str | None = None,
    save_dir: str = ".",
    tags: Sequence[str] = (),
    **kwargs: Any,
) -> WandbLogger:
    """A ``WandbLogger`` that is offline by default without an API key (see :func:`resolve_wandb_mode`)."""
    resolved = resolve_wandb_mode(mode)
    os.makedirs(save_dir, exist_ok=True)
    logger = WandbLogger(
        project=os.environ.get("WANDB_PROJECT", project),
        entity=os.environ.get("WANDB_ENTITY", entity),
        group=os.environ.get("WANDB_RUN_GROUP", group),
        name=name,
        save_dir=save_dir,
        mode=resolved,
        tags=list(tags),
        **kwargs,
    )
    if logger._wandb_init.get("anonymous") is None:
        # Lightning always passes anonymous=None, which wandb >= 0.19 warns about on every run
        logger._wandb_init.pop("anonymous", None)
    return logger
