"""The experiment app: the ``lightning-prune`` (Hydra) and ``lightning-prune-cli`` (LightningCLI) commands,
reference data and models, the W&B logger factory and the sweep report.

None of the library imports it; it needs the ``cli`` extra (``pip install "lightning-prune[cli]"``:
Hydra, W&B, scikit-learn, matplotlib), so importing it without that extra fails here, naming the
extra, rather than deep inside a run.
"""

from __future__ import annotations

import importlib.util

# module -> the package of the `cli` extra (pyproject.toml) that provides it
CLI_EXTRA = {
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "wandb": "wandb",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_missing = [package for module, package in CLI_EXTRA.items() if not _installed(module)]
if _missing:
    raise ModuleNotFoundError(
        f"lightning_prune.app (the lightning-prune commands, data, models and report) needs the `cli` extra; "
        f"missing: {', '.join(_missing)}. Install it with: pip install 'lightning-prune[cli]' "
        "(in a clone: pip install -e '.[cli]')"
    )
