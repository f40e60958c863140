"""What a borrowed ``training_step`` must not do outside Lightning's loop: log, or move torchmetrics' state.

A round re-runs the LightningModule's own ``training_step`` on stored batches (the loss before and after,
Hutchinson's probes, recomputed curvature; ``prune()`` and ``prune_blocks`` on a LightningModule). Those
calls are not training steps: ``self.log`` would reach the logger (or raise outside a Trainer hook), and
every torchmetrics ``Metric`` would accumulate the stored batches. :func:`quiet_training_step` mutes the
first and restores the second; it is registered with the core's
:func:`~lightning_prune.engine.calibration.guard_borrowed_steps` when ``lightning_prune`` is imported. It
imports neither Lightning nor torchmetrics: a module that holds a ``Metric`` has imported torchmetrics already.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator

from torch import nn

from lightning_prune.engine.calibration import guard_borrowed_steps


@guard_borrowed_steps
@contextlib.contextmanager
def quiet_training_step(module: nn.Module) -> Iterator[None]:
    """Mute ``module.log``/``log_dict`` and snapshot every torchmetrics ``Metric`` state around the call."""
    metric_type = getattr(sys.modules.get("torchmetrics"), "Metric", None)
    metrics = [m for m in module.modules() if isinstance(m, metric_type)] if metric_type is not None else []
    saved = [(m, {k: copy.deepcopy(getattr(m, k)) for k in m._defaults}, m._update_count, m._computed) for m in metrics]
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log, module.log_dict
        for m, state, count, computed in saved:
            for k, v in state.items():
                setattr(m, k, v)
            m._update_count, m._computed = count, computed
