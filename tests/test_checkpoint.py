"""Checkpoints: masks survive resume exactly, and pruned checkpoints load into the plain model."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_prune import MagnitudePruning

EPOCHS = 6


def _run(tmp_path, ckpt_path=None, save_on_train_epoch_end=None):
    pl.seed_everything(0, verbose=False)
    model = TinyNet(optimizer="sgd", lr=0.05)
    pruner = MagnitudePruning(target=0.9, verbose=0)  # rounds after epochs 0, 1, 2
    ckpt = ModelCheckpoint(
        dirpath=tmp_path, filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=save_on_train_epoch_end
    )
    trainer = make_trainer(tmp_path, max_epochs=EPOCHS, callbacks=[pruner, ckpt], enable_checkpointing=True)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, pruner


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref")
    model, pruner = _run(path)
    return path, model, pruner


@pytest.mark.parametrize("epoch", range(EPOCHS - 1))
def test_resume_from_any_epoch_matches_uninterrupted(reference, tmp_path, epoch):
    path, ref_model, ref = reference
    model, pruner = _run(tmp_path, ckpt_path=path / f"epoch={epoch}.ckpt")
    assert pruner.sparsity == ref.sparsity == pytest.approx(0.9, abs=1e-3)
    for name, mask in ref.masks.items():
        assert torch.equal(pruner.masks[name], mask), name
    assert [r["epoch"] for r in pruner.history] == [r["epoch"] for r in ref.history]
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("epoch", [0, 1])
def test_resume_when_checkpoint_saved_at_validation_end(tmp_path, epoch):
    ref_dir, ckpt_dir = tmp_path / "ref", tmp_path / "ckpt"
    _, ref = _run(ref_dir, save_on_train_epoch_end=False)
    _, pruner = _run(ckpt_dir, ckpt_path=ref_dir / f"epoch={epoch}.ckpt", save_on_train_epoch_end=False)
    for name, mask in ref.masks.items():
        assert torch.equal(pruner.masks[name], mask), name
    # the epoch-0 checkpoint already holds round 0
    state = torch.load(ref_dir / "epoch=0.ckpt", weights_only=False)["callbacks"]["MagnitudePruning"]
    assert len(state["history"]) == 1 and state["masks"] is not None


def test_checkpoint_loads_strictly_into_plain_model(reference):
    path, ref_model, ref = reference
    ckpt = torch.load(path / f"epoch={EPOCHS - 1}.ckpt", weights_only=True)
    plain = TinyNet()
    plain.load_state_dict(ckpt["state_dict"], strict=True)
    loaded = TinyNet.load_from_checkpoint(path / f"epoch={EPOCHS - 1}.ckpt")
    for name, mask in ref.masks.items():
        assert torch.all(dict(plain.named_parameters())[name][~mask] == 0)
        assert torch.equal(dict(loaded.named_parameters())[name], dict(ref_model.named_parameters())[name])
    state = ckpt["callbacks"]["MagnitudePruning"]
    packed = state["masks"]["net.0.weight"]
    assert packed["bits"].dtype == torch.uint8 and packed["bits"].numel() == (12 * 32 + 7) // 8
    assert [r["round"] for r in state["history"]] == [0, 1, 2]


def test_mismatched_checkpoint_is_refused(reference, tmp_path):
    path, _, _ = reference
    pruner = MagnitudePruning(target=0.9, include=["net.0.*"], verbose=0)
    trainer = make_trainer(tmp_path, max_epochs=EPOCHS, callbacks=[pruner])
    with pytest.raises(ValueError, match=r"holds the pruning state of \{'MagnitudePruning'.*none for this run's"):
        trainer.fit(TinyNet(optimizer="sgd", lr=0.05), ckpt_path=path / "epoch=1.ckpt")
