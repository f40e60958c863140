"""``blocks="auto"`` on a model without repeated blocks (an MLP, a CNN): one pass over the whole model.

SparseGPT and OBC set ``blocks="auto"`` (one decoder block at a time). A model with no ``nn.ModuleList``
of identical blocks holding targets has one block, the whole model: the round calibrates every target
once on the model's inputs and prunes them, which is the one-pass round (``blocks=None``), and says so
in its ``info["plan"]`` and in one warning. Every preset runs through ``prune()`` on both models.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, make_trainer
from torch import nn

from lightning_prune import GMP, OBC, OBD, SparseGPT, Wanda, WoodFisher, prune

PRESETS = [SparseGPT, OBC, Wanda, WoodFisher, OBD, GMP]
AUTO = {SparseGPT, OBC}  # the presets that set blocks="auto" (presets.py); the others run blocks=None
FALLBACK = "found no nn.ModuleList of identical blocks holding targets"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 4),
    )


MODELS = {"mlp": (mlp, (12,)), "cnn": (cnn, (3, 5, 5))}


def data(shape: tuple[int, ...], n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, *shape, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.__name__)
def test_every_preset_prunes_a_model_without_blocks_to_its_target(preset, kind):
    make, shape = MODELS[kind]
    model, pruner = make(), preset(0.5, num_batches=4, verbose=0)
    record = prune(model, data(shape), pruner, loss_fn=ce)
    masks, params = pruner.masks, dict(model.named_parameters())
    assert set(masks) == {n for n, p in params.items() if n.endswith("weight") and p.dim() > 1}  # conv and linear
    pruned = {n: int((~m).sum()) for n, m in masks.items()}
    if pruner.scope == "row":  # Wanda: each output row (a conv's output channel) to its own count
        assert all(((~m).flatten(1).sum(1) == round(0.5 * m[0].numel())).all() for m in masks.values())
    elif pruner.scope == "layer":  # SparseGPT, OBC, GMP: every layer to the target
        assert pruned == {n: round(0.5 * m.numel()) for n, m in masks.items()}
    else:  # WoodFisher, OBD: one ranking over all layers
        assert sum(pruned.values()) == round(0.5 * sum(m.numel() for m in masks.values()))
    assert record["sparsity"] == pytest.approx(0.5, abs=0.01) and pruner.sparsity == record["sparsity"]
    assert all(torch.all(params[n].detach()[~m] == 0) for n, m in masks.items())
    if preset in AUTO:
        assert FALLBACK in record["info"]["plan"] and "sequential_blocks" not in record["info"]
    else:
        assert "plan" not in record["info"]


@pytest.mark.parametrize("kind", list(MODELS))
def test_sparsegpt_without_blocks_is_exactly_the_one_pass_round(kind):
    """Bitwise: the fallback is the one-pass strategy itself, on the same criterion, scope and batches (the
    statistics of every layer from one pass at the dense weights, as SparseGPT's first block would have)."""
    make, shape = MODELS[kind]
    auto, one_pass = make(), make()
    record = prune(auto, data(shape), SparseGPT(0.5, num_batches=4, verbose=0), loss_fn=ce)
    reference = prune(one_pass, data(shape), SparseGPT(0.5, blocks=None, num_batches=4, verbose=0), loss_fn=ce)
    for (name, a), b in zip(auto.state_dict().items(), one_pass.state_dict().values()):
        assert torch.equal(a, b), name
    assert {k: v for k, v in record["info"].items() if k != "plan"} == reference["info"]
    assert record["layer_sparsity"] == reference["layer_sparsity"]


def test_the_fallback_warns_once_and_an_explicit_glob_still_must_match():
    x = data((12,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune(mlp(), x, OBC(0.5, num_batches=4, verbose=0))
    said = [str(w.message) for w in caught if FALLBACK in str(w.message)]
    assert len(said) == 1 and "Sequential" in said[0] and "one pass over the whole model" in said[0]
    untouched = mlp()
    with pytest.raises(ValueError, match=r"`blocks='layers\.\*'` matches no module of Sequential"):
        prune(untouched, x, SparseGPT(0.5, blocks="layers.*", verbose=0))
    assert all(bool((p != 0).all()) for p in untouched.parameters())  # refused before any work
    with pytest.raises(ValueError, match=rf"prune\(device='cpu'\) moves one block at a time.*{FALLBACK}"):
        prune(mlp(), x, SparseGPT(0.5, verbose=0), device="cpu")


def test_a_sparsegpt_callback_on_a_model_without_blocks_prunes_in_one_pass_each_round():
    model = TinyNet()
    pruner = SparseGPT(0.5, num_batches=2, every_n_steps=4, end_step=8, verbose=0)
    make_trainer(max_steps=10, max_epochs=-1, callbacks=[pruner]).fit(model)
    assert [r["global_step"] for r in pruner.history] == [4, 8]
    assert all(FALLBACK in r["info"]["plan"] for r in pruner.history)
    assert pruner.sparsity == pytest.approx(0.5, abs=0.01)
