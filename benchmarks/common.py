"""The harness every benchmark script shares: models and data, dense baselines, one-shot and gradual
runs, cached cells, alternated timing and memory, Markdown tables and the RESULTS.md blocks.

Gradual and short runs go through the real callbacks inside a real ``Trainer``. One-shot pruning of
a trained model is :func:`lightning_prune.prune` on the first ``num_batches`` training batches,
with the same callback objects. Lightning's ``ModelPruning``, a peer with no one-shot API, prunes
one-shot in a one-epoch ``fit`` whose optimizer has lr 0 (the weights it sees are the dense ones).

The library internals the scripts read (the default target layers) are imported here only, so a
move inside ``lightning_prune`` is one edit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from process import alternated, alternation, commit, make_resident, reset_peak_rss, rss_mib  # noqa: F401  (the harness's; gpu.py's)

from lightning_prune import Pruner, prune
from lightning_prune.app.data import FashionMNISTDataModule
from lightning_prune.app.models import LeNet5Classifier, MLPClassifier
from lightning_prune.callbacks import PruningCallback

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
CELLS = CACHE / "cells"
MODELS = {
    "mlp": lambda shape, classes: MLPClassifier(shape, classes, hidden=(300, 100), lr=1e-3),
    "lenet5": lambda shape, classes: LeNet5Classifier(shape, classes, kernel_size=5, lr=1e-3),
}
DENSE_EPOCHS = 8
BATCH = 128

_DATA: dict[tuple[int, int | None], FashionMNISTDataModule] = {}


def data(seed: int = 0, subset: int | None = None) -> FashionMNISTDataModule:
    """Fashion-MNIST split by ``seed``; ``subset`` keeps only that many training images."""
    if (seed, subset) not in _DATA:
        dm = FashionMNISTDataModule(batch_size=BATCH, seed=seed, train_subset=subset)
        dm.setup()
        _DATA[seed, subset] = dm
    return _DATA[seed, subset]


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def build(model: str, seed: int) -> pl.LightningModule:
    pl.seed_everything(seed, verbose=False)
    dm = data(seed)
    return MODELS[model](dm.input_shape, dm.num_classes)


def dense(
    model: str, seed: int, epochs: int = DENSE_EPOCHS, subset: int | None = None
) -> tuple[dict[str, torch.Tensor], float]:
    """Dense weights and test accuracy after ``epochs`` (cached on disk per model/seed/epochs/subset)."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / (
        f"dense-{model}-s{seed}-e{epochs}.pt" if subset is None else f"dense-{model}-s{seed}-e{epochs}-n{subset}.pt"
    )
    if path.exists():
        blob = torch.load(path, weights_only=True)
        return blob["state"], float(blob["acc"])
    net = build(model, seed)
    trainer(max_epochs=epochs, limit_val_batches=0).fit(net, data(seed, subset))
    acc = test_accuracy(net, seed)
    torch.save({"state": net.state_dict(), "acc": acc}, path)
    return net.state_dict(), acc


def test_accuracy(net: pl.LightningModule, seed: int) -> float:
    out = trainer().test(net, data(seed), verbose=False)
    return float(out[0]["test/acc"])


def one_shot(model: str, seed: int, callback: Callback, num_batches: int = 32) -> tuple[float, pl.LightningModule]:
    """Prune the cached dense model in one round (no weight updates besides the pruner's)."""
    net = dense_net(model, seed)
    if isinstance(callback, (Pruner, PruningCallback)):
        prune(net, data(seed).train_dataloader(), callback, num_batches=min(num_batches, callback.window_length))
    else:  # a peer callback (Lightning's ModelPruning)
        one_shot_fit(net, seed, callback, num_batches)
    return test_accuracy(net, seed), net


def dense_net(model: str, seed: int) -> pl.LightningModule:
    net = build(model, seed)
    net.load_state_dict(dense(model, seed)[0])
    return net


def one_shot_fit(net: pl.LightningModule, seed: int, callback: Callback, num_batches: int = 32) -> None:
    """A one-epoch ``fit`` at lr 0 whose epoch is the curvature window: one round on the dense weights."""
    net.lr = 0.0
    trainer(max_epochs=1, limit_train_batches=num_batches, limit_val_batches=0, callbacks=[callback]).fit(
        net, data(seed)
    )


def train_with(
    model: str,
    seed: int,
    epochs: int,
    callbacks: list[Callback],
    from_dense: bool = False,
    lr: float | None = None,
    optimizer: str | None = None,
    **trainer_kwargs: Any,
) -> tuple[float, pl.LightningModule]:
    """Train (from scratch or from the cached dense model) with the given callbacks; test accuracy."""
    net = build(model, seed)
    if from_dense:
        net.load_state_dict(dense(model, seed)[0])
    if optimizer is not None:
        net.optimizer_name = optimizer
        if optimizer == "sgd":
            net.lr = 0.05
    if lr is not None:
        net.lr = lr
    ckpt_path = trainer_kwargs.pop("ckpt_path", None)
    trainer(max_epochs=epochs, limit_val_batches=0, callbacks=callbacks, **trainer_kwargs).fit(
        net, data(seed), ckpt_path=ckpt_path
    )
    return test_accuracy(net, seed), net


def targets(net: torch.nn.Module, **kwargs: Any) -> list[Any]:
    """The layers a pruner targets by default (``.name``, ``.param``, ``.shape2d``), the library's own choice."""
    from lightning_prune.engine.targets import resolve_targets

    return resolve_targets(net, **kwargs)


def sparsity_of(net: torch.nn.Module) -> float:
    """Fraction of zeros over all Linear/Conv weights (what a user would measure)."""
    ws = [t.param.detach() for t in targets(net)]
    return float(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}"


def cell(
    name: str,
    compute: Callable[[], dict[str, Any]],
    folder: Path = CELLS,
    reuse: Callable[[dict[str, Any]], bool] = lambda r: True,
) -> dict[str, Any]:
    """One benchmark result, computed once and kept as ``folder/name.json``; read back, it carries
    ``cached: True``.

    Tables are rebuilt from these files: a new row or seed computes only what is new, and a cell
    timed alone keeps its timing. ``compute`` may set ``seconds`` itself (to leave evaluation out);
    otherwise the whole call is timed. ``commit`` records the code that measured it. A stored cell
    that ``reuse`` rejects (it lacks what this call asks for) is computed again.
    """
    path = folder / f"{name}.json"
    if path.exists():
        r = json.loads(path.read_text())
        if reuse(r):
            return {**r, "cached": True}
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    r = compute()
    r.setdefault("seconds", time.perf_counter() - start)
    r.setdefault("commit", commit())
    path.write_text(json.dumps(r))
    return r


def fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------- tables
def fmt(values: list[float]) -> str:
    """Accuracies (fractions) as %: one value, or mean ± std over seeds; NaNs dropped, ``-`` if none."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table: ``header`` and ``rows`` of cells (each cell ``str()``-ed; an empty one is ``| |``)."""

    def line(cells: list[Any]) -> str:
        return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(row) for row in rows)])


def write_block(name: str, body: str, path: Path | None = None) -> None:
    """Put ``body`` between the ``<!-- name:start -->`` and ``<!-- name:end -->`` markers of
    ``path`` (RESULTS.md; appended, with the markers, the first time); the rest of the file is kept."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    path = path or ROOT / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
