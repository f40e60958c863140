"""Sparsity patterns: which weights may be zero together (the protocol is :class:`~.base.Pattern`).

Every module in this package is imported here, so a pattern registers its ``pattern=`` string by
existing: adding one is adding its module.
"""

import importlib
import pkgutil

from lightning_prune.patterns.base import Pattern, parse_pattern, register
from lightning_prune.patterns.unstructured import UNSTRUCTURED  # first: the forms' order in error messages

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from lightning_prune.patterns.channels import Channels  # noqa: E402
from lightning_prune.patterns.nm import NM  # noqa: E402

__all__ = ["NM", "UNSTRUCTURED", "Channels", "Pattern", "parse_pattern", "register"]
