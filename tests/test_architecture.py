"""The pruning core needs only torch and numpy; the library never imports the experiment app.

Every module outside ``callbacks/`` (the Lightning adapter) and ``app/`` (the ``cli`` extra) is the
core: it imports and prunes, with a preset, where Lightning, torchmetrics, the app's packages,
transformers and tqdm cannot be imported (``None`` in ``sys.modules``, as a fresh environment with
only torch and numpy would answer). Nothing is installed or uninstalled.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning_prune

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(lightning_prune.__file__).resolve().parent

# what a torch + numpy environment lacks: the callbacks' and the app's dependencies, and the optional ones
ABSENT = (
    "lightning",
    "lightning_fabric",
    "pytorch_lightning",
    "torchmetrics",
    "hydra",
    "omegaconf",
    "wandb",
    "sklearn",
    "matplotlib",
    "jsonargparse",
    "transformers",
    "tokenizers",
    "peft",
    "tqdm",
    "lm_eval",
    "datasets",
)
LIGHTNING = ("lightning", "lightning_fabric", "pytorch_lightning")


def core_modules() -> list[str]:
    """Every module of the package outside ``callbacks/`` and ``app/`` (and the CLI's ``__main__``)."""
    names = [m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="lightning_prune.")]
    outside = ("lightning_prune.callbacks", "lightning_prune.app", "lightning_prune.__main__")
    return ["lightning_prune", *sorted(n for n in names if not n.startswith(outside))]


def imported_names(path: Path) -> set[str]:
    """Every module an ``import`` statement in ``path`` names, at any depth (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_core_modules_are_found():
    core = core_modules()
    assert {"lightning_prune.engine.round", "lightning_prune.engine.pruner", "lightning_prune.presets"} <= set(core)
    assert "lightning_prune.criteria.obs" in core and "lightning_prune.stats.capture" in core
    assert not any(m.startswith(("lightning_prune.app", "lightning_prune.callbacks")) for m in core)


def test_core_sources_never_import_lightning_or_the_app():
    """Also the imports inside functions, which importing a module does not run."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).parts
        if relative[0] in ("callbacks", "app", "__main__.py"):
            continue
        for name in imported_names(path):
            if name.split(".")[0] in LIGHTNING or name.startswith("lightning_prune.app"):
                offenders.append(f"{'/'.join(relative)}: {name}")
    assert not offenders, offenders


SCRIPT = textwrap.dedent(
    """
    import importlib, sys

    # None in sys.modules: importing the package (or any submodule) raises ModuleNotFoundError and
    # importlib.util.find_spec answers None, as where it is not installed (torch probes some of them)
    assert not set(sys.modules) & set(ABSENT), sorted(set(sys.modules) & set(ABSENT))
    sys.modules.update(dict.fromkeys(ABSENT))
    for module in MODULES:
        importlib.import_module(module)

    import torch
    import torch.nn.functional as F
    from torch import nn

    import lightning_prune
    from lightning_prune import Pruner, SparseGPT, prune
    from lightning_prune.criteria import OBD, OBS, Magnitude

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.down(F.relu(self.up(x)))

    class Net(nn.Module):  # a decoder's shape: repeated blocks in a ModuleList, which SparseGPT's blocks="auto" finds
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    pruner = SparseGPT(target=0.5, num_batches=4)  # verbose=1: the round's line, no tqdm bar
    assert type(pruner) is Pruner, type(pruner)
    model = Net()
    record = prune(model, [torch.randn(16, 8) for _ in range(4)], pruner)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    assert all((w == 0).sum().item() == w.numel() // 2 for w in weights), [(w == 0).float().mean() for w in weights]
    assert abs(record["sparsity"] - 0.5) < 1e-6, record["sparsity"]

    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(4)]
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])
    for criterion in (Magnitude(), OBD(curvature="ekfac"), OBS(), OBS(hessian="kfac")):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        record = prune(model, data, Pruner(criterion, 0.5, num_batches=4, verbose=0), loss_fn=loss)
        assert abs(record["sparsity"] - 0.5) < 0.02, record["sparsity"]

    try:
        import lightning_prune.app
    except ModuleNotFoundError as err:
        assert "lightning-prune[cli]" in str(err) and "hydra-core" in str(err), err
    else:
        raise AssertionError("lightning_prune.app imported without its extra")
    loaded = {name for name, module in sys.modules.items() if module is not None and name.split(".")[0] in ABSENT}
    assert not loaded, sorted(loaded)
    print("ok")
    """
)


def test_core_prunes_with_only_torch_and_numpy():
    code = f"MODULES = {core_modules()!r}\nABSENT = {ABSENT!r}\n{SCRIPT}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


def test_the_import_graph_has_no_cycle():
    """Module-level and function-level imports between the package's modules form no cycle (a cycle is
    where one concept leaked into two places that now need each other)."""
    import ast
    import graphlib

    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lightning_prune":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in files else node.module)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.split(".")[0] == "lightning_prune")
        graph[name] = {e for e in edges if e != name and e in files}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
