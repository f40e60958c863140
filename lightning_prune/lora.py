"""The documented import path of :func:`masked_merge` (``from lightning_prune.lora import masked_merge``);
it lives in :mod:`lightning_prune.surgery.lora`."""

from lightning_prune.surgery.lora import masked_merge

__all__ = ["masked_merge"]
