"""No silent wrong results: every case here gave a wrong answer without a word before it was fixed."""

from __future__ import annotations

import csv
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, make_data, make_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning, prune
from lightning_prune.engine.selection import UnreachableSparsity, select_masks
from lightning_prune.engine.targets import resolve_targets


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def sequential() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))


def loader() -> DataLoader:
    return DataLoader(make_data(128, 12, 4), batch_size=32)


# ---------------------------------------------------------------- 1. NaN/inf are never pruned by position
def test_non_finite_scores_are_never_pruned():
    scores = torch.cat([torch.full((90,), math.nan), torch.arange(10.0)])
    ones = {"a": torch.ones(100, dtype=torch.bool)}
    with pytest.raises(UnreachableSparsity, match=r"only 10 entries can be pruned.*\{'a': 90\}"):
        select_masks({"a": scores}, ones, 0.5)
    kept = select_masks({"a": scores}, ones, 0.05)["a"]
    assert kept[:90].all() and int((~kept).sum()) == 5  # the five lowest finite scores
    inf = torch.tensor([math.inf, -math.inf, 1.0, 2.0])
    assert select_masks({"a": inf}, {"a": torch.ones(4, dtype=torch.bool)}, 0.5)["a"].tolist() == [
        True,
        True,
        False,
        False,
    ]


def test_nan_weights_refuse_a_round_they_would_decide():
    model = sequential()
    with torch.no_grad():
        model[0].weight[:30] = math.nan  # 360 of 512 weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnreachableSparsity, match="non-finite"):
        prune(model, loader(), MagnitudePruning(0.8, verbose=0))
    assert all(torch.equal(v, before[k]) or v.isnan().any() for k, v in model.state_dict().items())
    assert torch.equal(model[2].weight, before["2.weight"])


class SkipNonFinite(torch.optim.SGD):
    """Like an AMP scaler: no update from a step whose gradients are not finite."""

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if all(bool(torch.isfinite(g).all()) for g in grads):
            super().step()
        return loss


class NaNBatch(TinyNet):
    """A NaN loss on training batch ``bad``, without AMP."""

    def __init__(self, bad: int, **kw):
        super().__init__(**kw)
        self.bad = bad

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if batch_idx == self.bad else loss

    def configure_optimizers(self):
        return SkipNonFinite(self.parameters(), lr=0.0)


@pytest.mark.parametrize(
    "make", [lambda: OBDPruning(0.5, num_batches=4, verbose=0), lambda: OBSPruning(0.5, num_batches=4, verbose=0)]
)
def test_a_nan_loss_in_the_window_is_skipped_and_counted_without_amp(make):
    pl.seed_everything(0, verbose=False)
    model = NaNBatch(bad=6)  # 8 batches an epoch: the window is batches 4-7
    pruner = make()
    make_trainer(max_epochs=1, callbacks=[pruner], limit_val_batches=0).fit(model)
    record = pruner.history[0]
    assert record["info"]["skipped_batches"] == 1
    assert math.isfinite(record["loss_before"]) and math.isfinite(record["loss_after"])  # the batch is not reused
    params = dict(model.named_parameters())
    for name, mask in pruner.masks.items():
        assert int((~mask).sum()) > 0 and torch.isfinite(params[name]).all()


def test_non_finite_statistics_refuse_before_touching_a_weight():
    """Finite inputs whose squares overflow float32: the Fisher sums are inf, the round refuses."""
    model = sequential()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.full((8, 12), 1e25), torch.zeros(8, dtype=torch.long))] * 2
    with pytest.raises(RuntimeError, match="statistics of .*0.weight.* are not finite.*refusing before touching"):
        prune(model, data, OBSPruning(0.5, num_batches=2, verbose=0), loss_fn=ce)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- 3. shared parameters
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # a language model's tied lm_head

    def forward(self, tokens):
        return self.head(torch.relu(self.body(self.embed(tokens))))


def tokens():
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 10, (16,), generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]


def test_a_tied_weight_is_left_out_of_the_defaults_and_the_table_says_so():
    model, pruner = Tied(), MagnitudePruning(0.5, verbose=0)
    with pytest.warns(UserWarning, match=r"not pruned by default: embed.weight: tied: held by \['embed', 'head'\]"):
        prune(model, tokens(), pruner)
    assert set(pruner.masks) == {"body.weight"}
    assert "not pruned: embed.weight (tied" in pruner.layer_table()
    with pytest.raises(ValueError, match="matched none.*left out of the defaults.*tied"):
        resolve_targets(model, include=["head.*"])  # the alias matches, and the user is told why nothing is pruned


def test_a_tied_weight_named_explicitly_keeps_one_mask_through_the_tie():
    model = Tied()
    pruner = MagnitudePruning(0.5, parameters=[model.head.weight], verbose=0)
    prune(model, tokens(), pruner)
    state = model.state_dict()
    assert torch.equal(state["embed.weight"] == 0, state["head.weight"] == 0)
    assert int((state["head.weight"] == 0).sum()) == 40
    with pytest.raises(ValueError, match=r"'embed.weight' is tied: modules \['embed', 'head'\] all hold it"):
        other = Tied()
        prune(other, tokens(), OBDPruning(0.5, parameters=[other.head.weight], verbose=0), loss_fn=ce)


def test_one_parameter_in_two_linear_layers_is_refused_by_curvature_criteria():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    model[2].weight = model[0].weight
    names = [t.name for t in resolve_targets(model)]
    assert names == ["3.weight"]  # the shared one is left out of the defaults
    data = [(torch.randn(4, 8), torch.randint(0, 2, (4,)))]
    with pytest.raises(ValueError, match=r"'0.weight' is tied: modules \['0', '2'\]"):
        prune(model, data, OBSPruning(0.5, parameters=[model[0].weight], verbose=0), loss_fn=ce)


# ---------------------------------------------------------------- 4. state that belongs to another model
def test_a_callback_reused_on_another_model_starts_fresh():
    pl.seed_everything(0, verbose=False)
    pruner = MagnitudePruning(0.5, verbose=0)
    make_trainer(max_epochs=2, callbacks=[pruner]).fit(TinyNet())
    first = pruner.masks
    with pytest.warns(UserWarning, match="pruned another model before.*starts dense"):
        make_trainer(max_epochs=2, callbacks=[pruner]).fit(TinyNet(hidden=32))  # same architecture, new weights
    assert [r["round"] for r in pruner.history] == [0]  # its own round, not the first model's masks
    assert any(not torch.equal(pruner.masks[n], m) for n, m in first.items())
    with pytest.warns(UserWarning, match="pruned another model before"):
        make_trainer(max_epochs=2, callbacks=[pruner]).fit(TinyNet(hidden=16))  # another width: no crash
    assert pruner.sparsity == pytest.approx(0.5, abs=1e-2)


def test_the_same_model_keeps_its_masks_across_fits(recwarn):
    pl.seed_everything(0, verbose=False)
    model, pruner = TinyNet(), MagnitudePruning(0.5, verbose=0)
    make_trainer(max_epochs=2, callbacks=[pruner]).fit(model)
    masks = pruner.masks
    make_trainer(max_epochs=2, callbacks=[pruner]).fit(model)  # continue training
    assert all(torch.equal(pruner.masks[n], m) for n, m in masks.items())
    assert not [w for w in recwarn if "another model" in str(w.message)]


# ---------------------------------------------------------------- 5. a missed target is reported
class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_early_stopping_before_the_target_warns_and_logs(tmp_path):
    pl.seed_everything(0, verbose=False)
    logger = CSVLogger(tmp_path, name="run")
    pruner = MagnitudePruning(0.9, verbose=1)
    with pytest.warns(UserWarning, match=r"ended the fit at sparsity 0\.6\d+, short of target=0.9: 1 of its 3"):
        make_trainer(max_epochs=6, callbacks=[pruner, StopAfterFirstEpoch()], logger=logger).fit(TinyNet())
    with open(f"{logger.log_dir}/metrics.csv") as f:
        reached = [float(r["prune/target_reached"]) for r in csv.DictReader(f) if r.get("prune/target_reached")]
    assert reached == [0.0, 0.0]  # after the round, and at fit end


def test_a_schedule_that_ends_after_the_run_warns_at_fit_start(capsys):
    with pytest.warns(UserWarning, match=r"last round is at epoch 5, but Trainer\(max_epochs=5\) ends the run"):
        make_trainer(max_epochs=5, callbacks=[MagnitudePruning(0.5, end_epoch=5, verbose=1)]).fit(TinyNet())
    assert "final target 50.00%" in capsys.readouterr().out


# ---------------------------------------------------------------- 6. checked at fit start (or the first step)
class Frozen(TinyNet):
    def __init__(self):
        super().__init__()
        self.net[0].weight.requires_grad_(False)


def test_frozen_weights_are_skipped_by_default_and_refused_by_curvature_when_named():
    pruner = MagnitudePruning(0.5, verbose=0)
    with pytest.warns(UserWarning, match=r"net.0.weight: frozen \(requires_grad=False\)"):
        make_trainer(max_epochs=1, callbacks=[pruner]).fit(Frozen())
    assert "net.0.weight" not in pruner.masks
    model = Frozen()
    named = MagnitudePruning(0.5, parameters=[model.net[0].weight], verbose=0)
    make_trainer(max_epochs=1, callbacks=[named]).fit(model)  # named explicitly: pruned
    assert int((model.net[0].weight == 0).sum()) == round(0.5 * model.net[0].weight.numel())
    for cls in (OBDPruning, OBSPruning):
        model = Frozen()
        trainer = make_trainer(max_epochs=1, callbacks=[cls(0.5, parameters=[model.net[0].weight], verbose=0)])
        with pytest.raises(ValueError, match="'net.0.weight' is frozen"):
            trainer.fit(model)
        assert trainer.global_step == 0


class Unused(TinyNet):
    def __init__(self):
        super().__init__()
        self.spare = nn.Linear(12, 12)  # a target the loss never uses


@pytest.mark.parametrize(
    "make", [lambda: OBDPruning(0.5, curvature="hutchinson", verbose=0), lambda: OBSPruning(0.5, verbose=0)]
)
def test_a_target_without_gradient_fails_at_the_first_step(make):
    trainer = make_trainer(max_epochs=2, callbacks=[make()])
    with pytest.raises(ValueError, match=r"\['spare.weight'\] got none at the first optimizer step"):
        trainer.fit(Unused())
    assert trainer.global_step == 0


class Manual(TinyNet):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = F.cross_entropy(self(batch[0]), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_without_loss_fn_fails_at_fit_start():
    trainer = make_trainer(max_epochs=2, callbacks=[OBSPruning(0.5, hessian="kfac", verbose=0)])
    with pytest.raises(ValueError, match="training_step cannot be borrowed under manual optimization: pass loss_fn"):
        trainer.fit(Manual())
    assert trainer.global_step == 0


# ---------------------------------------------------------------- 7. checkpoint integrity
@pytest.fixture
def checkpoint(tmp_path):
    pl.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1)
    trainer = make_trainer(
        tmp_path, max_epochs=2, callbacks=[MagnitudePruning(0.5, verbose=0), ckpt], enable_checkpointing=True
    )
    trainer.fit(TinyNet())
    return tmp_path / "last.ckpt"


def _resume(path, pruner):
    make_trainer(path.parent, max_epochs=3, callbacks=[pruner]).fit(TinyNet(), ckpt_path=path)


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda s: s["masks"]["net.0.weight"]["bits"].__setitem__(0, s["masks"]["net.0.weight"]["bits"][0] ^ 1),
            "'net.0.weight' is corrupted.*checksum",
        ),
        (
            lambda s: s["masks"]["net.2.weight"].__setitem__("shape", [32, 64]),
            "'net.2.weight' is corrupted.*shape \\[32, 64\\]",
        ),
        (lambda s: s.pop("history"), "missing \\['history'\\].*corrupted or hand-edited"),
    ],
)
def test_corrupted_pruning_state_is_refused_naming_the_parameter(checkpoint, edit, match):
    blob = torch.load(checkpoint, weights_only=True)
    edit(blob["callbacks"]["MagnitudePruning"])
    torch.save(blob, checkpoint)
    with pytest.raises(ValueError, match=match):
        _resume(checkpoint, MagnitudePruning(0.5, verbose=0))


def test_a_checkpoint_of_another_pruner_is_refused(checkpoint):
    with pytest.raises(
        ValueError, match=r"holds the pruning state of \{'MagnitudePruning': 'MagnitudePruning'\}.*'OBDPruning'"
    ):
        _resume(checkpoint, OBDPruning(0.5, verbose=0))


# ---------------------------------------------------------------- 8. a schedule callable that raises
def test_a_raising_schedule_callable_names_schedule_and_point():
    def schedule(epoch):
        raise ZeroDivisionError("boom")

    with pytest.raises(ValueError, match=r"`schedule` callable raised at epoch 0: ZeroDivisionError: boom") as err:
        MagnitudePruning(0.5, schedule=schedule, end_epoch=2)
    assert isinstance(err.value.__cause__, ZeroDivisionError)


# ---------------------------------------------------------------- 7. SIGTERM inside a round
@pytest.mark.parametrize("hessian", ["layerwise", "kfac"])
def test_sigterm_inside_a_round_stops_within_one_layer_and_restores_the_weights(tmp_path, hessian):
    """The signal arrives while the first layer is solved: the round stops before the next layer,
    every weight is back to its value before the round, no mask changed, and Lightning's
    on-exception checkpoint holds exactly that state."""
    import os
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    pl.seed_everything(0, verbose=False)
    model = TinyNet()
    solver = {"solver": "exact"} if hessian == "layerwise" else {}  # K-FAC OBS has no layer-wise solver
    pruner = OBSPruning(0.5, hessian=hessian, num_batches=2, verbose=0, **solver)
    solves, state = [], {}
    prune_round = pruner.criterion.prune

    def spy(ctx):
        state.update({k: v.clone() for k, v in model.state_dict().items()})
        return prune_round(ctx)

    pruner.criterion.prune = spy
    target = "solve_layer" if hessian == "layerwise" else "step"
    inner = getattr(pruner.criterion, target)

    def solve(*args, **kwargs):
        solves.append(1)
        out = inner(*args, **kwargs)
        if len(solves) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler sets trainer.received_sigterm
        return out

    setattr(pruner.criterion, target, solve)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_on_exception=True, save_top_k=0, save_last=False)
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[pruner, ckpt], enable_checkpointing=True)
    with pytest.raises(SIGTERMException, match="round.*stopped"):
        trainer.fit(model)
    assert len(solves) == 1 < len(pruner.targets) if hessian == "layerwise" else len(solves) == 1
    assert not pruner.history and pruner.sparsity == 0.0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    (saved,) = list(tmp_path.glob("*.ckpt"))
    weights = torch.load(saved, weights_only=False)["state_dict"]
    assert all(torch.equal(weights[k], v) for k, v in state.items())
