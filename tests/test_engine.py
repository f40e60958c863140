"""The engine under real Lightning training: frozen masks, targets, exact targets, logging."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, make_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_prune import MagnitudePruning
from lightning_prune.engine.targets import resolve_targets


class FrozenChecker(Callback):
    """After every training batch: pruned weights and their optimizer state are exactly zero."""

    def __init__(self, pruner):
        self.pruner, self.checked = pruner, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.pruner.history:  # no masks before the first round
            return
        params = dict(pl_module.named_parameters())
        opt = trainer.optimizers[0]
        for name, mask in self.pruner.current_masks().items():
            p = params[name]
            assert torch.all(p.detach()[~mask] == 0.0), f"{name} revived at step {trainer.global_step}"
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    assert torch.all(value[~mask] == 0.0), f"{name} optimizer state {key} is non-zero"
        self.checked += 1


SETTINGS = {
    "plain": {},
    "accumulate": {"accumulate_grad_batches": 3},
    "clip": {"gradient_clip_val": 0.05},
    "bf16": {"precision": "bf16-mixed"},
}


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_pruned_weights_stay_exactly_zero(optimizer, setting):
    pl.seed_everything(0, verbose=False)
    model = TinyNet(optimizer=optimizer, lr=0.05, weight_decay=0.01 if optimizer != "adam" else 0.0)
    pruner = MagnitudePruning(target=0.7, verbose=0)
    checker = FrozenChecker(pruner)
    make_trainer(max_epochs=4, callbacks=[pruner, checker], **SETTINGS[setting]).fit(model)
    assert checker.checked >= 8  # epochs 1-3 after the first round
    assert pruner.sparsity == pytest.approx(0.7, abs=1e-3)
    zeros = sum(int((p.detach() == 0).sum()) for n, p in model.named_parameters() if n in pruner.masks)
    assert zeros == round(0.7 * sum(m.numel() for m in pruner.masks.values()))


def test_exact_target_count_global_and_layer():
    for scope in ("global", "layer"):
        pl.seed_everything(0, verbose=False)
        model = TinyNet()
        pruner = MagnitudePruning(target=0.83, scope=scope, verbose=0)
        make_trainer(max_epochs=3, callbacks=[pruner]).fit(model)
        masks = pruner.masks
        total = sum(m.numel() for m in masks.values())
        pruned = sum(int((~m).sum()) for m in masks.values())
        if scope == "global":
            assert pruned == round(0.83 * total)
        else:
            for m in masks.values():
                assert int((~m).sum()) == round(0.83 * m.numel())
        assert [r["epoch"] for r in pruner.history] == [0, 1]
        assert pruner.history[-1]["target_sparsity"] == 0.83


def test_state_dict_keys_and_types_unchanged():
    pl.seed_everything(0, verbose=False)
    model = TinyNet()
    before = {k: (v.dtype, v.shape) for k, v in model.state_dict().items()}
    make_trainer(max_epochs=2, callbacks=[MagnitudePruning(0.5, verbose=0)]).fit(model)
    after = {k: (v.dtype, v.shape) for k, v in model.state_dict().items()}
    assert before == after
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


class ManyLayers(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.c1 = nn.Conv1d(4, 4, 3)
        self.c2 = nn.Conv2d(4, 4, 3)
        self.c3 = nn.Conv3d(4, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2, bias=False))


def test_default_targets_are_linear_and_conv_weights_only():
    names = [t.name for t in resolve_targets(ManyLayers())]
    assert names == ["c1.weight", "c2.weight", "c3.weight", "head.0.weight", "head.1.weight"]


def test_include_exclude_and_explicit_parameters():
    m = ManyLayers()
    assert [t.name for t in resolve_targets(m, include=["head.*"])] == ["head.0.weight", "head.1.weight"]
    assert [t.name for t in resolve_targets(m, exclude=["c?.weight"])] == ["head.0.weight", "head.1.weight"]
    got = resolve_targets(m, parameters=[m.emb.weight, m.head[0].bias])
    assert [t.name for t in got] == ["emb.weight", "head.0.bias"]
    with pytest.raises(ValueError, match="include=\\['decoder.\\*'\\].*matched none"):
        resolve_targets(m, include=["decoder.*"])
    with pytest.raises(ValueError, match="`parameters\\[0\\]`.*not a parameter"):
        resolve_targets(m, parameters=[nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="`include` must be a list"):
        resolve_targets(m, include="head.*")


def test_nothing_matched_fails_at_fit_start():
    with pytest.raises(ValueError, match="No parameters to prune"):
        make_trainer(max_epochs=1, callbacks=[MagnitudePruning(0.5, include=["nope"])]).fit(TinyNet())


class BuiltInConfigureModel(TinyNet):
    def __init__(self):
        super().__init__()
        del self.net

    def configure_model(self):
        if not hasattr(self, "net"):
            self.net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))


def test_model_built_in_configure_model():
    pl.seed_everything(0, verbose=False)
    model = BuiltInConfigureModel()
    pruner = MagnitudePruning(0.6, verbose=0)
    make_trainer(max_epochs=2, callbacks=[pruner]).fit(model)
    assert set(pruner.masks) == {"net.0.weight", "net.2.weight"}
    assert pruner.sparsity == pytest.approx(0.6, abs=1e-3)


def test_metrics_reach_csv_logger(tmp_path):
    pl.seed_everything(0, verbose=False)
    logger = CSVLogger(tmp_path, name="run")
    make_trainer(max_epochs=3, logger=logger, callbacks=[MagnitudePruning(0.5, verbose=0)]).fit(TinyNet())
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    sparsity = [float(r["prune/sparsity"]) for r in rows if r.get("prune/sparsity")]
    assert sparsity == pytest.approx([0.5 * (1 - (1 - 0.5) ** 3), 0.5], abs=1e-3)
    assert any(r.get("prune/layer/net.0.weight") for r in rows)
    assert [float(r["prune/round"]) for r in rows if r.get("prune/round")] == [0.0, 1.0]
    assert any(r.get("prune/actual_loss_increase") for r in rows)


def test_verbose_prints_table(capsys):
    pl.seed_everything(0, verbose=False)
    make_trainer(max_epochs=2, callbacks=[MagnitudePruning(0.5, verbose=2)]).fit(TinyNet())
    out = capsys.readouterr().out
    assert "round 0 (epoch 0): sparsity 50.00%" in out
    assert "net.2.weight" in out and "kept / total" in out


def test_masks_and_history_are_read_only():
    pruner = MagnitudePruning(0.5, verbose=0)
    make_trainer(max_epochs=2, callbacks=[pruner]).fit(TinyNet())
    with pytest.raises(TypeError):
        pruner.masks["x"] = None  # type: ignore[index]
    with pytest.raises(AttributeError):
        pruner.masks = {}  # type: ignore[misc]
    pruner.masks["net.0.weight"].fill_(True)  # a copy: the callback's mask is untouched
    assert not bool(pruner.current_masks()["net.0.weight"].all())
    with pytest.raises(TypeError):
        pruner.history[0]["sparsity"] = 0.0  # type: ignore[index]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scope="model"), "`scope` must be one of .* got 'model'"),
        (dict(min_density=1.5), "`min_density`.*1.5"),
        (dict(eval_batches=-1), "`eval_batches` must be an integer >= 0, got -1"),
        (dict(verbose=3), "`verbose` must be 0, 1 or 2, got 3"),
        (dict(loss_fn=3), "`loss_fn` must be callable"),
    ],
)
def test_bad_callback_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MagnitudePruning(0.5, **kwargs)


def test_floor_infeasible_fails_before_training():
    with pytest.raises(ValueError, match="unreachable"):
        make_trainer(max_epochs=2, callbacks=[MagnitudePruning(0.95, min_density=0.2)]).fit(TinyNet())


def test_metrics_reach_tensorboard_logger(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(tmp_path, name="tb")
    make_trainer(max_epochs=3, logger=logger, callbacks=[MagnitudePruning(0.5, verbose=0)]).fit(TinyNet())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"prune/sparsity", "prune/round", "prune/layer/net.0.weight", "prune/actual_loss_increase"} <= set(tags)
    assert [round(e.value, 3) for e in events.Scalars("prune/sparsity")] == [round(0.5 * (1 - 0.5**3), 3), 0.5]


class Metered(TinyNet):
    """A training_step that logs and updates a torchmetrics Metric: what a round's re-runs must not do."""

    def __init__(self) -> None:
        super().__init__()
        import torchmetrics

        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.accuracy.update(logits, y)
        self.log("train_accuracy", self.accuracy)
        return torch.nn.functional.cross_entropy(logits, y)


def test_a_borrowed_training_step_neither_logs_nor_moves_metrics():
    """The core borrows training_step under the guards the adapter registered (lightning_prune.callbacks.
    isolation): prune() on a LightningModule, before and after a fit, leaves its metrics and logger alone.
    Without the guard the same call moves the metric and logs."""
    import warnings

    from lightning_prune import OBDPruning, prune
    from lightning_prune.callbacks.isolation import quiet_training_step
    from lightning_prune.engine.calibration import Calibration

    pl.seed_everything(0, verbose=False)
    model = Metered()
    batches = list(model.train_dataloader())[:2]
    assert Calibration(model, training_step=True).step_guards == (quiet_training_step,)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune(model, batches, OBDPruning(0.3, num_batches=2, verbose=0))
        Calibration(model, training_step=True, step_guards=()).loss(batches[0], 0)  # unguarded: logs, and counts
    logged = [str(w.message) for w in caught if "self.log" in str(w.message)]
    assert len(logged) == 1 and model.accuracy._update_count == 1, (logged, model.accuracy._update_count)
    model.accuracy.reset()
    make_trainer(max_epochs=1, callbacks=[OBDPruning(0.5, schedule="one_shot", num_batches=2, verbose=0)]).fit(model)
    count, state = model.accuracy._update_count, model.accuracy.tp.clone()
    prune(model, batches, OBDPruning(0.6, num_batches=2, verbose=0))  # attached to a finished Trainer: no log call
    assert model.accuracy._update_count == count and torch.equal(model.accuracy.tp, state)


def _face() -> set[str]:
    """The names of the PrunerLike contract (its settable attributes, properties and methods)."""
    from lightning_prune.engine.facade import PrunerLike

    members = {
        k for k, v in vars(PrunerLike).items() if not k.startswith("_") and (callable(v) or isinstance(v, property))
    }
    return members | set(PrunerLike.__annotations__)


def test_the_callback_shows_the_pruners_public_state_and_nothing_private():
    """Explicit properties read the wrapped pruner's state; its private names are not reachable; the settings a
    run may change reach the pruner; any other attribute of the pruner is refused, never shadowed."""
    from lightning_prune import Pruner
    from lightning_prune.callbacks.base import PruningCallback

    pruner = MagnitudePruning(0.5, verbose=0)
    make_trainer(max_epochs=2, callbacks=[pruner]).fit(TinyNet())
    core = pruner.pruner
    assert not hasattr(PruningCallback, "__getattr__")
    assert _face() <= set(dir(type(pruner))) and _face() <= set(dir(core)) and isinstance(core, Pruner)
    for name in ("criterion", "target", "schedule", "scope", "pattern", "targets", "history", "sparsity", "sharded"):
        assert getattr(pruner, name) == getattr(core, name), name
    assert pruner.masks.keys() == core.masks.keys() and pruner.layer_table() == core.layer_table()
    for private in ("_masks", "_history", "_params", "_targets", "_last_point", "_record", "_schedule"):
        with pytest.raises(AttributeError):
            getattr(pruner, private)
    pruner.verbose, pruner.num_batches, pruner.eval_batches, pruner.loss_fn = 2, 5, 3, len
    assert (core.verbose, core.num_batches, core.eval_batches, core.loss_fn) == (2, 5, 3, len)
    for name, value in (("scope", "layer"), ("min_density", 0.5), ("round_strategy", None), ("_masks", {})):
        with pytest.raises(AttributeError, match=f"MagnitudePruning.{name} is read-only: it is its pruner's"):
            setattr(pruner, name, value)
    assert core.scope == "global" and core.min_density == 0.001 and core.round_strategy is not None
    assert core.current_masks() is core._masks  # the refused `_masks` set reached nothing
    pruner.note = "mine"  # the callback's own attributes stay its own
    assert pruner.note == "mine" and not hasattr(core, "note")


def test_prune_takes_a_pruner_or_a_callback_and_names_anything_else():
    from lightning_prune import prune

    model, batches = TinyNet(), [(torch.randn(4, 12), torch.randint(0, 4, (4,)))]
    callback = MagnitudePruning(0.5, eval_batches=1, verbose=0)
    assert prune(model, batches, callback)["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert callback.history == callback.pruner.history and len(callback.history) == 1
    with pytest.raises(TypeError, match=r"`pruner` must be a Pruner or a pruning callback .*got 'magnitude'"):
        prune(model, batches, "magnitude")  # type: ignore[arg-type]
