"""The masked LoRA merge keeps every zero of the pruned base weights (unstructured and 2:4) and equals
PEFT's own merge on the kept entries; LoRA fine-tuning beside a pruner keeps the masks."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import make_trainer
from test_readme import Lit, hf

from lightning_prune import Distillation, MagnitudePruning, OBSPruning, prune
from lightning_prune.surgery.lora import masked_merge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

MODULES = ["q_proj", "v_proj", "up_proj", "down_proj"]


def lm_batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    return [{"input_ids": ids.roll(i, 1), "labels": ids.roll(i, 1)} for i in range(n)]


def pruned_lora(pattern: str) -> tuple[torch.nn.Module, MagnitudePruning]:
    model = hf("llama")
    pruner = MagnitudePruning(target=0.5, pattern=pattern, scope="layer", verbose=0)  # the merge is what is tested
    prune(model, lm_batches(1), pruner)
    # init_lora_weights=False: B random too, so the adapters' product is dense and non-zero
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODULES, init_lora_weights=False)
    return peft.get_peft_model(model, config), pruner


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapted base weights by their unwrapped name (``model.layers.0.self_attn.q_proj.weight``)."""
    out = {}
    for name, p in model.named_parameters():
        if ".base_layer." in name:
            out[name.replace(".base_layer", "").removeprefix("base_model.model.")] = p.detach().clone()
    return out


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("source", ["zeros", "pruner", "names"])
def test_masked_merge_keeps_every_zero_and_equals_the_plain_merge_elsewhere(pattern, source):
    lora, pruner = pruned_lora(pattern)
    before = base_weights(lora)
    masks = {n: w != 0 for n, w in before.items()}
    assert all(0.45 < 1 - m.float().mean() < 0.55 for m in masks.values())
    plain = copy.deepcopy(lora).merge_and_unload()
    arg = {"zeros": None, "pruner": pruner, "names": dict(pruner.masks)}[source]
    merged = masked_merge(lora, arg)
    assert type(merged).__name__ == "LlamaForCausalLM" and not any("lora_" in n for n, _ in merged.named_parameters())
    got, ref = dict(merged.named_parameters()), dict(plain.named_parameters())
    for name, mask in masks.items():
        w, p = got[name].detach(), ref[name].detach()
        assert bool((w[~mask] == 0).all())  # every zero kept
        assert bool((p[~mask] != 0).all())  # where PEFT's merge fills them in
        assert torch.equal(w[mask], p[mask])  # kept entries: bit for bit PEFT's merge
        if pattern == "2:4":
            assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())
    for name in ref:  # layers without adapters: untouched
        if name not in masks:
            assert torch.equal(got[name], ref[name])


def test_masked_merge_refuses_what_is_not_a_peft_model_and_bad_masks():
    with pytest.raises(ValueError, match="`model`"):
        masked_merge(hf("llama"))
    lora, _ = pruned_lora("unstructured")
    name = next(n for n, _ in lora.named_parameters() if n.endswith("q_proj.base_layer.weight"))
    with pytest.raises(ValueError, match="`masks"):
        masked_merge(lora, {name: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no match"):
        masked_merge(lora, {"model.nowhere.weight": torch.ones(3, 3, dtype=torch.bool)})


def test_lora_fine_tuning_with_the_pruner_and_a_teacher_keeps_the_masks_through_the_merge():
    """prune() -> get_peft_model -> fit (pruner at its target, Distillation from the dense model) -> masked merge."""
    model, batches = hf("llama"), lm_batches(6)
    dense = copy.deepcopy(model)
    pruner = OBSPruning(target=0.5, allocation="reconstruction", scope="layer", blocks="auto", solver="fast", verbose=0)
    prune(model, batches, pruner)
    before = dict(pruner.masks)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=MODULES))
    lit = Lit(lora, batches)
    distill = Distillation(teacher=dense, squarehead_weight=1.0)
    make_trainer(max_steps=4, max_epochs=-1, callbacks=[pruner, distill]).fit(lit)
    assert distill.last_terms["kd"] > 0
    adapters = [p for n, p in lora.named_parameters() if "lora_B" in n]
    assert any(bool((p != 0).any()) for p in adapters)  # the adapters trained (B starts at zero)
    merged = masked_merge(lora, pruner)
    params = dict(merged.named_parameters())
    for n, m in before.items():
        assert bool((params[n].detach()[~m] == 0).all())


# ---------------------------------------------------------------------------------------------- refusals at the edges
def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Every tensor (adapters included, so nothing was merged or unloaded) equal to ``before``."""
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


def test_masked_merge_refuses_masks_of_another_model_of_the_same_shapes_before_merging():
    """Masks of another model prune other entries: merging with them would zero about half of each layer's
    kept weights and leave its own pruned entries non-zero. The base weights must be zero wherever a mask
    says pruned; otherwise nothing is merged."""
    lora, _ = pruned_lora("unstructured")
    other = hf("llama", seed=1)
    other_pruner = MagnitudePruning(target=0.5, pattern="unstructured", scope="layer", verbose=0)
    prune(other, lm_batches(1), other_pruner)
    before = state(lora)
    with pytest.raises(ValueError, match=r"(?s)`masks`.*q_proj.*non-zero.*another model") as err:
        masked_merge(lora, dict(other_pruner.masks))
    message = str(err.value)
    assert re.search(r"\d+ of \d+", message) and "Nothing was merged" in message, message
    assert unchanged(lora, before)
    masked_merge(lora, None)  # the model is still a PEFT model that merges


def test_masked_merge_says_a_pruner_is_bound_to_another_copy_of_the_model():
    """get_peft_model(copy.deepcopy(model)): the pruner's masks are bound to the original's parameters, so
    it names neither; the masks by name (pruner.masks) fit the copy."""
    model = hf("llama")
    pruner = MagnitudePruning(target=0.5, pattern="unstructured", scope="layer", verbose=0)
    prune(model, lm_batches(1), pruner)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODULES, init_lora_weights=False)
    lora = peft.get_peft_model(copy.deepcopy(model), config)
    before = state(lora)
    with pytest.raises(ValueError, match=r"(?s)bound to .*not in this .*deepcopy.*pruner\.masks") as err:
        masked_merge(lora, pruner)
    assert "shape" not in str(err.value)
    assert unchanged(lora, before)
    merged = masked_merge(lora, pruner.masks)  # the advice works
    params = dict(merged.named_parameters())
    assert all(bool((params[n].detach()[~m] == 0).all()) for n, m in pruner.masks.items())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # PEFT skips an adapter name a layer does not have, then unloads every layer: the adapters would be dropped
        ({"adapter_names": ["nope"]}, r"`adapter_names=\['nope'\]`.*not adapters of this model.*\['default'\]"),
        ({"adapter_names": "default"}, r"`adapter_names='default'` must be a list.*\['default'\]"),
        ({"adapter_names": []}, r"`adapter_names=\[\]` names no adapter: nothing would be merged"),
        ({"masks": "float"}, r"`masks\['model.layers.0.self_attn.q_proj.weight'\]` is torch.float32.*bool"),
    ],
)
def test_masked_merge_refuses_bad_arguments_before_merging_anything(kwargs, message):
    lora, pruner = pruned_lora("unstructured")
    if kwargs.get("masks") == "float":  # 0/1 multipliers: the merge ran, then `~mask` failed
        kwargs = {"masks": {n: m.float() for n, m in pruner.masks.items()}}
    before = state(lora)
    with pytest.raises(ValueError, match=message):
        masked_merge(lora, **kwargs)
    assert unchanged(lora, before)


def test_masked_merge_warns_when_an_adapted_weight_with_zeros_has_no_mask():
    """Masks for some layers only: the merge fills the zeros of the others; masks=None would keep them."""
    lora, pruner = pruned_lora("unstructured")
    some = {n: m for n, m in pruner.masks.items() if "q_proj" in n}
    with pytest.warns(UserWarning, match=r"(?s)no mask.*v_proj.*zeros.*masks=None"):
        merged = masked_merge(lora, some)
    w = dict(merged.named_parameters())["model.layers.0.self_attn.q_proj.weight"].detach()
    assert bool((w[~some["model.layers.0.self_attn.q_proj.weight"]] == 0).all())


def test_safe_merge_checks_every_layer_before_any_merges():
    """PEFT's safe_merge raises at the first broken layer, after merging the ones before it."""
    lora, _ = pruned_lora("unstructured")
    last = lora.base_model.model.model.layers[-1].mlp.down_proj
    with torch.no_grad():
        last.lora_B["default"].weight[0, 0] = float("inf")
    before = state(lora)
    with pytest.raises(ValueError, match=r"safe_merge: adapter 'default' of .*layers\.1\.mlp\.down_proj.*non-finite"):
        masked_merge(lora, safe_merge=True)
    assert unchanged(lora, before)


def test_adapters_merged_already_are_masked_by_the_masks_given_and_masks_none_is_refused():
    """After merge_adapter() the base weights hold W + Δ: their zeros are gone, so masks=None has nothing
    to keep (it lost every zero) and the consistency check cannot apply (it blamed the masks)."""
    lora, pruner = pruned_lora("unstructured")
    reference = masked_merge(copy.deepcopy(lora), pruner.masks)
    lora.merge_adapter()
    before = state(lora)
    with pytest.raises(ValueError, match=r"(?s)merged already.*merge_adapter.*no zeros.*unmerge_adapter\(\)"):
        masked_merge(lora, None)
    assert unchanged(lora, before)
    merged = masked_merge(lora, pruner.masks)
    got, want = dict(merged.named_parameters()), dict(reference.named_parameters())
    for name, mask in pruner.masks.items():
        assert bool((got[name].detach()[~mask] == 0).all())
        torch.testing.assert_close(got[name], want[name])
