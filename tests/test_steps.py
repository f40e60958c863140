"""Step triggers: rounds keyed by optimizer step, exact capture windows, mid-epoch resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, make_data, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning
from lightning_prune.engine.calibration import Calibration
from lightning_prune.engine.targets import resolve_targets
from lightning_prune.stats import DiagFisher
from lightning_prune.stats.passes import calibration_pass

BATCH = 16


def batches(n_samples: int = 256) -> list:
    return list(DataLoader(make_data(n_samples, 12, 4), batch_size=BATCH, shuffle=False))


class ResumableLoader:
    """An ordered iterable of batches with ``state_dict``/``load_state_dict``: Lightning resumes it mid-epoch."""

    def __init__(self, items: list) -> None:
        self.items, self.start, self.pos = items, 0, 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        start, self.start = self.start, 0
        for i in range(start, len(self.items)):
            self.pos = i + 1
            yield self.items[i]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["pos"] % len(self.items)  # after an epoch's last batch: the next epoch from its first


class Stream(IterableDataset):
    """No ``__len__``: an epoch never announces its end (a streaming corpus)."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self):
        while True:
            yield from self.items


class Net(TinyNet):
    def __init__(self, loader: str = "list", n_samples: int = 256, **kwargs) -> None:
        super().__init__(batch_size=BATCH, **kwargs)
        self.loader, self.n_samples = loader, n_samples

    def train_dataloader(self):
        items = batches(self.n_samples)
        if self.loader == "stream":
            return DataLoader(Stream(items), batch_size=None)
        return ResumableLoader(items)


def spy(pruner):
    """Record the estimator (number of batches, Fisher diagonal) each round's criterion was given."""
    seen = []
    prune = pruner.criterion.prune

    def spying(ctx):
        diagonals = {n: ctx.stats.diagonal(n).clone() for n in ctx.stats.targets}
        weights = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        seen.append((ctx.stats.batches, diagonals, ctx.batches, weights))
        return prune(ctx)

    pruner.criterion.prune = spying
    return seen


def reference_fisher(model, weights, items):
    """Diagonal Fisher of exactly these batches at these weights (a calibration pass)."""
    model.load_state_dict(weights)
    targets = resolve_targets(model)
    est = calibration_pass(
        Calibration(model, lambda m, b: F.cross_entropy(m(b[0]), b[1])), items, DiagFisher(targets), targets
    )
    return {t.name: est.diagonal(t.name) for t in targets}


def test_mixing_epoch_and_step_triggers_is_refused():
    with pytest.raises(ValueError, match="epoch triggers or step triggers, not both.*start_epoch=1.*every_n_steps=10"):
        OBSPruning(0.5, start_epoch=1, every_n_steps=10)
    with pytest.raises(ValueError, match="step triggers need `every_n_steps`"):
        MagnitudePruning(0.5, start_step=3, end_step=9)
    with pytest.raises(ValueError, match="`start_step` must be an integer >= 1, got 0"):
        MagnitudePruning(0.5, start_step=0, every_n_steps=2)
    with pytest.raises(ValueError, match="`end_step` \\(4\\) must be >= `start_step` \\(6\\)"):
        MagnitudePruning(0.5, start_step=6, end_step=4, every_n_steps=2)


def test_rounds_at_steps_with_only_max_steps():
    """max_steps=40, every 5 steps: default end 5 + (40 - 5) // 2 = 22, so rounds at 5, 10, 15, 20."""
    pl.seed_everything(0, verbose=False)
    pruner = MagnitudePruning(0.8, every_n_steps=5, verbose=0)
    make_trainer(max_steps=40, max_epochs=-1, callbacks=[pruner]).fit(Net())
    assert [r["global_step"] for r in pruner.history] == [5, 10, 15, 20]
    assert all(r["trigger"] == "step" for r in pruner.history)
    assert [r["target_sparsity"] for r in pruner.history] == pytest.approx(
        [0.8 * (1 - (1 - p) ** 3) for p in (0.25, 0.5, 0.75, 1)]
    )
    assert pruner.sparsity == pytest.approx(0.8, abs=1e-3)


def test_step_rounds_with_max_epochs_use_the_estimated_steps():
    pl.seed_everything(0, verbose=False)
    pruner = MagnitudePruning(0.5, every_n_steps=4, verbose=0)
    make_trainer(max_epochs=2, callbacks=[pruner], accumulate_grad_batches=2).fit(Net())  # 2 x 16/2 = 16 steps
    assert [r["global_step"] for r in pruner.history] == [4, 8]  # end 4 + (16 - 4) // 2 = 10


def test_a_run_of_unknown_length_needs_an_explicit_end():
    with pytest.raises(ValueError, match="`end_step` is required when the run's length in optimizer steps is unknown"):
        make_trainer(max_steps=-1, max_epochs=-1, callbacks=[MagnitudePruning(0.5, every_n_steps=4)]).fit(Net())
    with pytest.raises(ValueError, match="`end_epoch` is required.*or step triggers \\(every_n_steps=...\\)"):
        make_trainer(max_steps=20, max_epochs=-1, callbacks=[MagnitudePruning(0.5)]).fit(Net())


@pytest.mark.parametrize(
    "n_samples,accumulate,rounds,windows",
    [
        (256, 1, [9, 18], [[6, 7, 8], [15, 16, 17]]),  # 16 batches an epoch: the second window spans two epochs
        (240, 2, [4, 9], [[5, 6, 7], [14, 15, 16]]),  # 15 batches: the epoch's last batch steps alone
    ],
)
def test_window_is_exactly_the_last_batches_before_the_round_step(n_samples, accumulate, rounds, windows):
    pl.seed_everything(0, verbose=False)
    model = Net(n_samples=n_samples, optimizer="sgd", lr=0.0)  # weights fixed: statistics depend on batches only
    pruner = OBDPruning(  # the empirical Fisher: captured by hooks on the training steps, the window under test
        0.5,
        start_step=rounds[0],
        every_n_steps=rounds[1] - rounds[0],
        end_step=rounds[1],
        num_batches=3,
        fisher_type="empirical",
        verbose=0,
    )
    seen = spy(pruner)
    make_trainer(max_steps=rounds[1] + 2, max_epochs=-1, callbacks=[pruner], accumulate_grad_batches=accumulate).fit(
        model
    )
    assert [r["global_step"] for r in pruner.history] == rounds
    items = batches(n_samples)
    for (count, diagonals, kept, weights), window in zip(seen, windows):
        assert count == 3
        assert all(torch.equal(a[0], items[i % len(items)][0]) for a, i in zip(kept, window))
        expected = reference_fisher(model, weights, [items[i % len(items)] for i in window])
        for name, diag in diagonals.items():
            torch.testing.assert_close(diag, expected[name], rtol=1e-5, atol=1e-10)


def test_streaming_dataset_and_mid_epoch_validation():
    """An IterableDataset without length, validation every 4 batches inside the window: exact window."""
    pl.seed_everything(0, verbose=False)
    model = Net(loader="stream", optimizer="sgd", lr=0.0)
    pruner = OBDPruning(0.5, every_n_steps=9, num_batches=3, fisher_type="empirical", verbose=0)
    seen = spy(pruner)
    make_trainer(max_steps=20, max_epochs=-1, callbacks=[pruner], val_check_interval=4, limit_val_batches=2).fit(model)
    assert [r["global_step"] for r in pruner.history] == [9]
    count, diagonals, _, weights = seen[0]
    expected = reference_fisher(model, weights, batches()[6:9])
    assert count == 3
    for name, diag in diagonals.items():
        torch.testing.assert_close(diag, expected[name], rtol=1e-5, atol=1e-10)


def _run(tmp_path, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    model = Net(optimizer="adam", lr=0.02)
    pruner = OBSPruning(0.8, every_n_steps=6, end_step=18, num_batches=2, verbose=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)
    trainer = make_trainer(tmp_path, max_steps=26, max_epochs=-1, callbacks=[pruner, ckpt], enable_checkpointing=True)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, pruner


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("steps")
    return (path, *_run(path))


@pytest.mark.parametrize("step", [8, 12])  # mid-epoch between rounds; right after the round at step 12
def test_resume_from_a_mid_epoch_step_checkpoint(uninterrupted, tmp_path, step):
    path, ref_model, ref = uninterrupted
    model, pruner = _run(tmp_path, ckpt_path=path / f"step={step}.ckpt")
    assert [r["global_step"] for r in pruner.history] == [r["global_step"] for r in ref.history] == [6, 12, 18]
    for name, mask in ref.masks.items():
        assert torch.equal(pruner.masks[name], mask), name
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
