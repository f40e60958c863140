"""The pruning core imports nothing from Lightning: it imports and prunes with Lightning blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CORE = [
    "lightning_prune",
    "lightning_prune.targets",
    "lightning_prune.schedule",
    "lightning_prune.selection",
    "lightning_prune.masks",
    "lightning_prune.stats.capture",
    "lightning_prune.stats",
    "lightning_prune.calibration",
    "lightning_prune.obs.layerwise",
    "lightning_prune.obs.blockfisher",
    "lightning_prune.obs.kronecker",
    "lightning_prune.criteria",
    "lightning_prune.pruner",
    "lightning_prune.round",
    "lightning_prune.distributed",
    "lightning_prune.summary",
    "lightning_prune.lora",
]

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
                raise ImportError(f"the core imported {name}")

    sys.meta_path.insert(0, Block())
    for module in MODULES:
        importlib.import_module(module)

    import torch
    import torch.nn.functional as F
    from torch import nn
    from lightning_prune import Pruner, prune
    from lightning_prune.criteria import OBD, OBS, Magnitude

    torch.manual_seed(0)
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(4)]
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])
    for criterion in (Magnitude(), OBD(curvature="ekfac"), OBS(), OBS(hessian="kfac")):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        record = prune(model, data, Pruner(criterion, 0.5, num_batches=4, verbose=0), loss_fn=loss)
        assert abs(record["sparsity"] - 0.5) < 0.02, record["sparsity"]
    assert not any(m.split(".")[0] == "lightning" for m in sys.modules)
    print("ok")
    """
)


def test_core_runs_without_lightning():
    code = f"MODULES = {CORE!r}\n{SCRIPT}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
