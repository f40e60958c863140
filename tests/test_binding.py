"""Masks belong to parameters, not to names; restored masks are what the pruner asks for.

A pruner's masks follow the parameters they were computed on into any wrapper (a LightningModule
around a Hugging Face model, ``torch.compile``, PEFT); checkpointed masks find their parameters by
a unique name suffix; anything ambiguous, mismatched or contradicting the pruner is refused.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TinyNet, make_trainer
from test_readme import Lit, hf
from torch import nn

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning, prune

transformers = pytest.importorskip("transformers")


def lm_batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    return [{"input_ids": ids.roll(i, 1), "labels": ids.roll(i, 1)} for i in range(n)]


BATCH = [(torch.randn(4, 12), torch.randint(0, 4, (4,)))]


def zeros_hold(pruner, model: nn.Module) -> bool:
    params = dict(model.named_parameters())
    return all(bool((params[n].detach()[~m] == 0).all()) for n, m in pruner.masks.items())


def sparsegpt(**kwargs) -> OBSPruning:
    return OBSPruning(
        target=0.5, allocation="reconstruction", scope="layer", blocks="auto", solver="fast", verbose=0, **kwargs
    )


@pytest.mark.parametrize("wrap", ["lightning", "compile"])
def test_masks_follow_their_parameters_into_a_wrapper(wrap):
    model, batches = hf("llama"), lm_batches()
    pruner = sparsegpt()
    prune(model, batches, pruner)
    before = pruner.masks
    lit = Lit(model if wrap == "lightning" else torch.compile(model, backend="eager"), batches)
    make_trainer(max_steps=3, max_epochs=-1, callbacks=[pruner]).fit(lit)
    assert len(pruner.history) == 1  # at its target: no round, no trigger needed
    now = pruner.masks  # under today's names: the LightningModule's
    prefix = "model._orig_mod." if wrap == "compile" else "model."
    assert set(now) == {prefix + n for n in before}
    assert all(torch.equal(now[prefix + n], m) for n, m in before.items())
    assert zeros_hold(pruner, lit)


def test_masks_survive_peft_lora_and_its_frozen_base_weights():
    peft = pytest.importorskip("peft")
    model, batches = hf("llama"), lm_batches()
    pruner = sparsegpt(pattern="2:4")
    prune(model, batches, pruner)
    before = pruner.masks
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    lit = Lit(lora, batches)
    make_trainer(max_steps=3, max_epochs=-1, callbacks=[pruner]).fit(lit)
    names = {n: m for n, m in pruner.masks.items()}
    assert len(names) == len(before)  # the base weights, never LoRA's A and B
    assert not any("lora_" in n for n in names)
    for n, m in before.items():
        (match,) = [k for k in names if k.replace(".base_layer", "").endswith(n)]
        assert torch.equal(names[match], m)
    assert zeros_hold(pruner, lit)


def test_a_new_pruner_on_a_peft_model_leaves_the_adapters_alone():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(hf("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="No parameters to prune.*adapter"):
        prune(model, lm_batches(), MagnitudePruning(0.5, include=["*lora_A*"], verbose=0))


def test_checkpointed_masks_find_their_parameters_by_a_unique_name_suffix():
    model, batches = hf("llama"), lm_batches()
    first = sparsegpt()
    prune(model, batches, first)
    state = first.state_dict()  # names of the bare Hugging Face model
    fresh = hf("llama", seed=1)
    fresh.load_state_dict(model.state_dict())
    second = sparsegpt()
    second.load_state_dict(state)
    lit = Lit(fresh, batches)
    make_trainer(max_steps=2, max_epochs=-1, callbacks=[second]).fit(lit)
    assert all(torch.equal(second.masks[f"model.{n}"], m) for n, m in first.masks.items())
    assert zeros_hold(second, lit)
    # and back: the LightningModule's names into the bare model
    third = sparsegpt()
    third.load_state_dict(second.state_dict())
    third.bind(hf("llama", seed=2))
    assert all(torch.equal(third.masks[n], m) for n, m in first.masks.items())


class TwoTowers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 4))
        self.b = nn.Sequential(nn.Linear(4, 4))


def test_an_ambiguous_or_missing_name_is_refused():
    state = MagnitudePruning(0.5, verbose=0)
    prune(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)], state)
    saved = state.state_dict()  # a mask named "0.weight"
    other = MagnitudePruning(0.5, verbose=0)
    other.load_state_dict(saved)
    with pytest.raises(ValueError, match=r"ambiguous \{'0.weight': \['a.0.weight', 'b.0.weight'\]\}"):
        other.bind(TwoTowers())
    other = MagnitudePruning(0.5, verbose=0)
    other.load_state_dict(saved)
    with pytest.raises(ValueError, match=r"no match for \['0.weight'\]"):
        other.bind(nn.Sequential(nn.Identity(), nn.Linear(4, 4)))


def test_a_checkpoint_that_selects_other_parameters_is_refused():
    model = TinyNet()
    saved = MagnitudePruning(0.5, verbose=0)
    prune(model, BATCH, saved)
    fewer = MagnitudePruning(0.5, include=["net.0.*"], verbose=0)
    fewer.load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match=r"do not match this model's targets.*unexpected \['net.2.weight'"):
        fewer.bind(model)


def test_state_of_another_pruner_type_is_refused():
    saved = MagnitudePruning(0.5, verbose=0)
    prune(TinyNet(), BATCH, saved)
    with pytest.raises(ValueError, match="written by MagnitudePruning, and this pruner is OBDPruning"):
        OBDPruning(0.5, verbose=0).load_state_dict(saved.state_dict())


def test_masks_sparser_than_the_target_warn_that_the_model_stays_sparser():
    model = TinyNet()
    saved = MagnitudePruning(0.5, verbose=0)
    prune(model, BATCH, saved)
    lower = MagnitudePruning(0.3, verbose=0)
    lower.load_state_dict(saved.state_dict())
    with pytest.warns(UserWarning, match=r"already 0.5000 sparse.*stays sparser than the target"):
        lower.bind(model)
    assert lower.sparsity == pytest.approx(0.5, abs=1e-3)


def test_unstructured_masks_are_refused_by_a_channels_pruner():
    model = TinyNet()
    saved = MagnitudePruning(0.5, verbose=0)
    prune(model, BATCH, saved)
    channels = MagnitudePruning(0.5, pattern="channels", scope="layer", verbose=0)
    channels.load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="prune parts of structures.*whole"):
        channels.bind(model)
    # masks that channels pruning made bind back
    whole = MagnitudePruning(0.5, pattern="channels", scope="layer", verbose=0)
    prune(model, BATCH, whole)
    again = MagnitudePruning(0.5, pattern="channels", scope="layer", verbose=0)
    again.load_state_dict(whole.state_dict())
    again.bind(model)
    assert all(torch.equal(again.masks[n], m) for n, m in whole.masks.items())


def test_fit_with_a_pruner_at_its_target_needs_no_trigger_and_keeps_training():
    model = TinyNet()
    pruner = OBSPruning(0.5, verbose=0)
    prune(model, [next(iter(model.train_dataloader()))], pruner)
    masks = pruner.masks
    make_trainer(max_steps=5, max_epochs=-1, callbacks=[pruner]).fit(model)  # no max_epochs, no end_epoch
    assert all(torch.equal(pruner.masks[n], m) for n, m in masks.items())
    assert zeros_hold(pruner, model)
    with pytest.raises(ValueError, match="`end_epoch` is required"):  # a pruner with rounds left still needs one
        make_trainer(max_steps=5, max_epochs=-1, callbacks=[OBSPruning(0.5, verbose=0)]).fit(TinyNet())


def test_parameters_left_out_for_one_reason_are_summarised_once():
    """A PEFT model leaves dozens of adapters out: one entry with a count and the first names, not a line each."""
    from lightning_prune.engine.binding import skipped_text

    skipped = [(f"layers.{i}.lora_A.weight", "adapter") for i in range(40)] + [("lm_head.weight", "output head")]
    text = skipped_text(skipped)
    assert text == (
        "40 parameters (layers.0.lora_A.weight, layers.1.lora_A.weight, layers.2.lora_A.weight, +37 more): adapter; "
        "lm_head.weight: output head"
    )
