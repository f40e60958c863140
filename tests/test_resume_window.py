"""Resuming from a checkpoint taken inside a round's capture window gives the uninterrupted round.

A round's statistics are sums over the last ``num_batches`` training batches before it, and the
round keeps those batches (loss before/after, recomputation, non-empirical Fisher passes). A
checkpoint taken while that window is open carries the partial sums and the kept batches, so the
resumed run continues the same window: the round sees the same statistics and batches, and masks
equal and weights within 1e-6 of a run never stopped follow.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_steps import Net

from lightning_prune import OBDPruning, OBSPruning

WINDOW = 4  # optimizer steps a window spans: num_batches = WINDOW * accumulate_grad_batches
ROUNDS = [6, 12]  # optimizer steps
PRUNERS = {
    "obd_fisher": lambda kw: OBDPruning(0.6, curvature="fisher", fisher_type="empirical", **kw),  # sums in the window
    "obs_layerwise": lambda kw: OBSPruning(0.6, **kw),  # K-FAC factors + Fisher diagonal in the window
    "obd_exact": lambda kw: OBDPruning(0.6, fisher_type="exact", **kw),  # the window only keeps batches
    "obd_ekfac": lambda kw: OBDPruning(0.6, curvature="ekfac", fisher_type="empirical", **kw),  # two phases
}


def spy(pruner):
    """Record what each round's criterion was given: the kept batches and every statistic."""
    seen = []
    prune = pruner.criterion.prune

    def spying(ctx):
        stats = [t.detach().clone() for t in ctx.stats.tensors()] if ctx.stats is not None else []
        seen.append(([b[0].clone() for b in ctx.batches], stats))
        return prune(ctx)

    pruner.criterion.prune = spying
    pruner.seen = seen
    return pruner


def _fit(tmp_path, pruner, ckpt_path=None, **trainer_kw):
    """A run that checkpoints after every optimizer step (the reference), or one resumed from ``ckpt_path``."""
    pl.seed_everything(0, verbose=False)
    model = Net(optimizer="adam", lr=0.02)  # 16 batches an epoch, resumable mid-epoch
    callbacks = [spy(pruner)]
    if ckpt_path is None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1))
    trainer = make_trainer(tmp_path, callbacks=callbacks, enable_checkpointing=ckpt_path is None, **trainer_kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, ckpt_path=ckpt_path)
    assert not [w for w in caught if "capture window" in str(w.message)], [str(w.message) for w in caught]
    return model, pruner


def _run(tmp_path, name: str, accumulate: int, ckpt_path=None):
    kw = dict(start_step=ROUNDS[0], every_n_steps=ROUNDS[1] - ROUNDS[0], end_step=ROUNDS[1])
    pruner = PRUNERS[name](dict(kw, num_batches=WINDOW * accumulate, verbose=0))
    return _fit(tmp_path, pruner, ckpt_path, max_steps=ROUNDS[1] + 1, max_epochs=-1, accumulate_grad_batches=accumulate)


def _inside_first_window(accumulate: int) -> list[int]:
    """Steps whose checkpoint is taken with the first round's window open (after some of its batches)."""
    last = ROUNDS[0] * accumulate - 1  # index of the batch whose step is the round's
    first = last + 1 - WINDOW * accumulate  # index of the window's first batch
    return [(b + 1) // accumulate for b in range(first, last) if (b + 1) % accumulate == 0]


def _same(ref, got, key: str, points: list[int]) -> None:
    (ref_model, ref_pruner), (model, pruner) = ref, got
    assert [r[key] for r in pruner.history] == [r[key] for r in ref_pruner.history] == points
    for (batches, stats), (ref_batches, ref_stats) in zip(pruner.seen, ref_pruner.seen, strict=True):
        assert len(batches) == len(ref_batches) and all(torch.equal(a, b) for a, b in zip(batches, ref_batches))
        for a, b in zip(stats, ref_stats, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for name, mask in ref_pruner.masks.items():
        assert torch.equal(pruner.masks[name], mask), name
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    for a, b in zip(pruner.history, ref_pruner.history):
        assert a["loss_before"] == pytest.approx(b["loss_before"], abs=1e-6)


CASES = [
    (name, accumulate)
    for name in PRUNERS
    for accumulate in ((1, 2) if name != "obd_ekfac" else (1,))  # ekfac: phase one, the switch, phase two at 1
]


@pytest.mark.parametrize("name,accumulate", CASES)
def test_every_resume_point_inside_a_step_window_gives_the_uninterrupted_round(tmp_path, name, accumulate):
    ref_dir = tmp_path / "ref"
    ref = _run(ref_dir, name, accumulate)
    steps = _inside_first_window(accumulate)
    assert steps == [3, 4, 5]
    for step in steps:
        state = torch.load(ref_dir / f"step={step}.ckpt", weights_only=False)["callbacks"][type(ref[1]).__name__]
        assert state["window"]["point"] == ROUNDS[0]
        got = _run(tmp_path / f"resumed{step}", name, accumulate, ckpt_path=ref_dir / f"step={step}.ckpt")
        _same(ref, got, "global_step", ROUNDS)


def _run_epochs(tmp_path, ckpt_path=None):
    pruner = OBDPruning(0.6, fisher_type="empirical", start_epoch=0, end_epoch=1, num_batches=WINDOW, verbose=0)
    return _fit(tmp_path, pruner, ckpt_path, max_epochs=2)


def test_every_resume_point_inside_an_epoch_window_gives_the_uninterrupted_round(tmp_path):
    """The epoch round's window is the epoch's last 4 batches (steps 13 to 16). Lightning resumes the
    checkpoint taken after the last one at the next epoch, skipping the epoch's end: the round runs at
    train start, with that window."""
    ref_dir = tmp_path / "ref"
    ref = _run_epochs(ref_dir)
    for step in (13, 14, 15, 16):
        state = torch.load(ref_dir / f"step={step}.ckpt", weights_only=False)["callbacks"]["OBDPruning"]
        assert state["window"]["point"] == 0 and len(state["window"]["batches"][0]) == step - 12
        got = _run_epochs(tmp_path / f"resumed{step}", ckpt_path=ref_dir / f"step={step}.ckpt")
        _same(ref, got, "epoch", [0, 1])
