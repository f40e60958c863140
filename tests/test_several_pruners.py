"""Several pruners on one model: own targets, own checkpoint keys, independent resume, overlaps refused."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning

EPOCHS = 6


def pruners():
    return (
        OBSPruning(0.9, include=["net.0.*"], num_batches=4, verbose=0),  # rounds after epochs 0-2
        MagnitudePruning(0.5, exclude=["net.0.*"], verbose=0),
    )


def _run(tmp_path, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    model = TinyNet(optimizer="adam", lr=0.02)
    obs, mag = pruners()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    trainer = make_trainer(tmp_path, max_epochs=EPOCHS, callbacks=[obs, mag, ckpt], enable_checkpointing=True)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, obs, mag


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("two")
    return (path, *_run(path))


def test_each_pruner_reaches_its_own_target_under_its_own_key(uninterrupted):
    path, model, obs, mag = uninterrupted
    assert set(obs.masks) == {"net.0.weight"} and set(mag.masks) == {"net.2.weight", "net.4.weight"}
    params = dict(model.named_parameters())
    for pruner, target in ((obs, 0.9), (mag, 0.5)):  # exact counts, in the masks and in the model
        total = sum(m.numel() for m in pruner.masks.values())
        assert sum(int((~m).sum()) for m in pruner.masks.values()) == round(target * total)
        assert sum(int((params[n] == 0).sum()) for n in pruner.masks) == round(target * total)
    assert obs.state_key == "OBSPruning{'include': ['net.0.*']}"
    assert mag.state_key == "MagnitudePruning{'exclude': ['net.0.*']}"
    states = torch.load(path / f"epoch={EPOCHS - 1}.ckpt", weights_only=True)["callbacks"]
    assert len(states[obs.state_key]["history"]) == 3 and len(states[mag.state_key]["history"]) == 3


@pytest.mark.parametrize("epoch", [0, 1, 3])
def test_both_resume_independently(uninterrupted, tmp_path, epoch):
    path, ref_model, ref_obs, ref_mag = uninterrupted
    model, obs, mag = _run(tmp_path, ckpt_path=path / f"epoch={epoch}.ckpt")
    for ref, got in ((ref_obs, obs), (ref_mag, mag)):
        assert [r["epoch"] for r in got.history] == [r["epoch"] for r in ref.history] == [0, 1, 2]
        for name, mask in ref.masks.items():
            assert torch.equal(got.masks[name], mask), name
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_overlapping_pruners_are_refused_at_fit_start():
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(max_epochs=2, callbacks=[MagnitudePruning(0.5, verbose=0), OBDPruning(0.8, verbose=0)])
    with pytest.raises(
        ValueError, match=r"MagnitudePruning and OBDPruning both prune \['net.0.weight', 'net.2.weight'"
    ):
        trainer.fit(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before any step


def test_partial_overlap_names_only_the_shared_parameters():
    trainer = make_trainer(
        max_epochs=2,
        callbacks=[
            MagnitudePruning(0.5, include=["net.0.*", "net.2.*"], verbose=0),
            MagnitudePruning(0.5, include=["net.2.*"], verbose=0),
        ],
    )
    with pytest.raises(ValueError, match=r"both prune \['net.2.weight'\]: a weight can have only one pruner"):
        trainer.fit(TinyNet())


def test_default_state_key_is_the_class_name():
    assert MagnitudePruning(0.5).state_key == "MagnitudePruning"
    model = TinyNet()
    explicit = OBDPruning(0.5, parameters=[model.net[2].weight], verbose=0)
    make_trainer(max_epochs=1, callbacks=[explicit], limit_train_batches=2).fit(model)
    assert explicit.state_key == "OBDPruning{'parameters': ['net.2.weight']}"
