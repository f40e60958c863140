"""Depth: whole blocks removed (lightning_prune.prune_blocks), saved as standard Hugging Face checkpoints.

The model without a block must compute what the model computes with that block replaced by the
identity: outputs, cached generation (layer_idx renumbered), and after save_pretrained/from_pretrained."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from test_hf_export import IDS, VOCAB, auto_class, batches, build, load_cleanly, logits
from torch import nn

from lightning_prune import MagnitudePruning, Pruner, prune, prune_blocks, shrink
from lightning_prune.criteria.magnitude import Magnitude
from lightning_prune.engine.calibration import Calibration
from lightning_prune.surgery.depth import as_identity, block_scores, find_block_list, remove_blocks

transformers = pytest.importorskip("transformers")

CAUSAL = ("llama", "qwen2", "gpt2")


def deep(arch: str, layers: int = 4, seed: int = 0) -> nn.Module:
    """A tiny random model of ``arch`` (as test_hf_export builds them) with ``layers`` blocks."""
    model = build(arch, seed=seed)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers  # GPT-2: n_layer, through the config's attribute map
    if hasattr(config, "layer_types"):
        config.layer_types = [config.layer_types[0]] * layers
    torch.manual_seed(seed)
    return type(model)(config)


def generate(model: nn.Module) -> torch.Tensor:
    """Greedy, cached, in eval mode (GPT-2's dropout would make it random)."""
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    return model.eval().generate(IDS, attention_mask=torch.ones_like(IDS), **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
def test_removed_blocks_round_trip_through_from_pretrained_with_the_identity_outputs(arch, tmp_path):
    model = deep(arch)
    blocks = find_block_list(model)[1]
    small = remove_blocks(model, [1, 2], example_inputs={"input_ids": IDS})
    assert small.max_abs_diff == 0.0 or small.max_abs_diff < 1e-5
    assert small.hf_configs[""]["num_hidden_layers"] == 2 and small.model.config.num_hidden_layers == 2
    assert len(find_block_list(small.model)[1]) == 2 and len(blocks) == 4  # the original is untouched
    if arch == "qwen2":  # the per-block attention types travel with their blocks
        assert small.model.config.layer_types == [model.config.layer_types[i] for i in (0, 3)]
    # the renumbered layer_idx: a fresh model of 2 blocks numbers them 0, 1
    idx = [m.layer_idx for m in small.model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert idx == [0, 1]
    small.save_pretrained(tmp_path)
    assert transformers.AutoConfig.from_pretrained(tmp_path).num_hidden_layers == 2  # GPT-2 writes n_layer
    loaded = load_cleanly(arch, tmp_path)
    assert sum(p.numel() for p in loaded.parameters()) == small.params_after < small.params_before
    with as_identity([blocks[1], blocks[2]]):
        expected = logits(model)
        expected_ids = generate(model) if arch in CAUSAL else None
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-5, atol=1e-5)
    if arch in CAUSAL:  # a key/value cache sized for 2 blocks, indexed by the renumbered layer_idx
        assert torch.equal(generate(small.model), expected_ids)
        assert torch.equal(generate(loaded), expected_ids)


def test_the_loss_score_is_the_loss_of_the_model_without_the_block():
    """Brute force: each block's score is the mean calibration loss of the model without it, minus the full model's."""
    model, data = deep("llama"), batches()
    scores = block_scores(model, data, score="loss")
    base = Calibration(model, output_loss=True).mean_loss(data)
    for i, s in enumerate(scores):
        without = remove_blocks(model, [i]).model
        assert s == pytest.approx(Calibration(without, output_loss=True).mean_loss(data) - base, abs=1e-5)
    assert len(set(scores)) == len(scores)


def test_the_reconstruction_score_is_the_relative_output_error_without_the_block():
    model, data = deep("llama"), batches()
    scores = block_scores(model, data, score="reconstruction")
    for i, s in enumerate(scores):
        without = remove_blocks(model, [i]).model
        errs = [
            float(
                (logits(without, b["input_ids"]) - (r := logits(model, b["input_ids"]))).pow(2).sum() / r.pow(2).sum()
            )
            for b in data
        ]
        assert s == pytest.approx(sum(errs) / len(errs), rel=1e-4)


def test_greedy_removal_scores_the_rest_with_the_chosen_blocks_gone():
    """Brute force: the second block greedy removes is the one whose removal together with the first gives
    the smallest output error against the full model (each pair's model built without the blocks)."""
    model, data = deep("llama"), batches(n=2)
    first = min(range(4), key=block_scores(model, data, score="reconstruction").__getitem__)
    scores = block_scores(model, data, score="reconstruction", removed=[first])
    assert scores[first] == float("inf")
    full = [logits(model, b["input_ids"]) for b in data]
    pairs = {}
    for i in set(range(4)) - {first}:
        without = remove_blocks(model, sorted([first, i])).model
        errs = [float((logits(without, b["input_ids"]) - r).pow(2).sum() / r.pow(2).sum()) for b, r in zip(data, full)]
        pairs[i] = sum(errs) / len(errs)
        assert scores[i] == pytest.approx(pairs[i], rel=1e-4)
    second = min(pairs, key=pairs.__getitem__)
    small = prune_blocks(model, data, 2, score="reconstruction", greedy=True)
    assert small.blocks_kept == {"model.layers": sorted(set(range(4)) - {first, second})}
    assert "greedy" in small.notes[-1]


def test_greedy_removal_reads_a_one_pass_iterable_once():
    """A generator of batches used to be read by the first greedy step only: the second refused with "`data` gave
    no batches" after the first step's passes. It is read once, and greedy removal equals the list's."""
    model = deep("llama")
    want = prune_blocks(model, batches(), 2, score="influence", greedy=True)
    got = prune_blocks(model, (b for b in batches()), 2, score="influence", greedy=True)
    assert got.blocks_kept == want.blocks_kept and got.notes == want.notes


def test_block_influence_is_one_minus_the_cosine_of_each_blocks_input_and_output():
    """ShortGPT's BI against the hidden states the model reports (its last entry is after the final norm)."""
    model, data = deep("llama"), batches(n=2)
    scores = block_scores(model, data, score="influence")
    sums = torch.zeros(4)
    for b in data:
        with torch.no_grad():
            hidden = model(input_ids=b["input_ids"], output_hidden_states=True).hidden_states
        for i in range(3):
            sums[i] += (1 - torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)).mean()
    for i in range(3):
        assert scores[i] == pytest.approx(float(sums[i]) / len(data), rel=1e-4)


@pytest.mark.parametrize("score", ["loss", "reconstruction", "influence"])
def test_a_block_that_is_already_the_identity_goes_first(score):
    """Zero output projections make a pre-norm LLaMA block the identity: every score ranks it cheapest
    (loss: its increase is exactly 0; the labels are the full model's own greedy predictions, so removing
    any block that matters raises the loss)."""
    model = deep("llama")
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
        for i in (0, 1, 3):  # make the other blocks matter
            model.model.layers[i].mlp.down_proj.weight.mul_(20)
    data = []
    for b in batches():
        predicted = logits(model, b["input_ids"]).argmax(-1)  # labels[t] is what position t - 1 predicts
        data.append({"input_ids": b["input_ids"], "labels": torch.cat([b["input_ids"][:, :1], predicted[:, :-1]], 1)})
    scores = block_scores(model, data, score=score)
    assert scores[2] == pytest.approx(0.0, abs=1e-6)
    assert min(scores[i] for i in (0, 1, 3)) > 1e-4
    small = prune_blocks(model, data, 1, score=score, example_inputs={"input_ids": IDS})
    assert small.removed == {"model.layers": 1} and small.blocks_kept == {"model.layers": [0, 1, 3]}
    assert "blocks removed [2]" in small.notes[-1]
    torch.testing.assert_close(logits(small.model), logits(model), rtol=1e-5, atol=1e-5)


def test_a_fraction_of_the_blocks_and_width_then_depth_save_as_one_checkpoint(tmp_path):
    model = deep("llama")
    prune(model, batches(), MagnitudePruning(target=0.5, pattern="channels", verbose=0))
    width = shrink(model, example_inputs={"input_ids": IDS})
    small = prune_blocks(width.model, batches(), 0.25, score="influence", example_inputs={"input_ids": IDS})
    assert small.model.config.num_hidden_layers == 3 and small.model.config.intermediate_size == 24
    small.save_pretrained(tmp_path)
    loaded = load_cleanly("llama", tmp_path)
    (kept,) = small.blocks_kept.values()
    assert len(kept) == 3
    with as_identity([layer for i, layer in enumerate(model.model.layers) if i not in kept]):
        torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    assert auto_class("llama") is transformers.AutoModelForCausalLM


def test_a_lightning_module_around_the_hf_model_saves_the_hf_model_without_its_blocks(tmp_path):
    from lightning_prune.app.models import CausalLM

    torch.manual_seed(0)
    lit = CausalLM(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48)
    small = prune_blocks(lit, batches(), 1, loss_fn=lambda m, b: m.model(**b).loss, example_inputs={"input_ids": IDS})
    assert small.hf_configs == {"model": {"num_hidden_layers": 2}} and list(small.blocks_kept) == ["model.model.layers"]
    small.save_pretrained(tmp_path)
    loaded = load_cleanly("llama", tmp_path)
    (kept,) = small.blocks_kept.values()
    with as_identity([b for i, b in enumerate(lit.model.model.layers) if i not in kept]):
        torch.testing.assert_close(logits(loaded), logits(lit.model), rtol=1e-5, atol=1e-5)


class StepOnly(pl.LightningModule):
    """A LightningModule around a Hugging Face model that implements ``training_step`` and no ``forward``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        self.log("loss", loss := self.model(**batch).loss)  # muted in the passes, as in prune()
        return loss


@pytest.mark.parametrize("score", ["reconstruction", "influence", "loss"])
def test_a_lightning_module_with_only_a_training_step_is_scored_as_its_hf_model(score):
    """Every score runs the module as prune() does (its training_step) and reads the output of the Hugging
    Face model inside; example_inputs are checked on that model. The result is the bare model's, bitwise."""
    bare, lit, example = deep("llama"), StepOnly(deep("llama")), {"input_ids": IDS}
    assert block_scores(lit, batches(), score=score) == block_scores(bare, batches(), score=score)
    want = prune_blocks(bare, batches(), 2, score=score, example_inputs=example)
    got = prune_blocks(lit, batches(), 2, score=score, example_inputs=example)
    assert got.blocks_kept == {f"model.{k}": v for k, v in want.blocks_kept.items()} and got.notes == want.notes
    assert got.hf_configs == {"model": want.hf_configs[""]}
    for (name, a), b in zip(got.model.model.state_dict().items(), want.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_module_with_no_forward_and_no_training_step_is_refused_before_any_pass():
    """Nothing runs it but a loss_fn, which then runs every score (example_inputs go through the Hugging Face
    model inside); without one it is refused by name before any pass. A module whose blocks sit in no
    submodule with a forward cannot take example_inputs: refused before the scores' passes."""

    class Holder(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

    holder, calls = Holder(deep("llama")), []
    handle = holder.model.register_forward_pre_hook(lambda *a: calls.append(1))
    for score in ("reconstruction", "influence", "loss"):
        with pytest.raises(ValueError, match=r"Holder implements neither forward nor training_step.*loss_fn="):
            prune_blocks(holder, batches(), 1, score=score)
    assert not calls
    handle.remove()
    example, loss_fn = {"input_ids": IDS}, lambda m, b: m.model(**b).loss
    got = prune_blocks(holder, batches(), 1, score="reconstruction", loss_fn=loss_fn, example_inputs=example)
    want = prune_blocks(deep("llama"), batches(), 1, score="reconstruction", example_inputs=example)
    assert got.notes == want.notes and got.max_abs_diff == want.max_abs_diff

    class Stack(nn.Module):  # blocks, and nothing that implements forward around them
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    stack = Stack()
    stack.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(
        ValueError, match=r"`example_inputs` are run as model\(\*\*example_inputs\).*Stack implements no"
    ):
        prune_blocks(
            stack,
            [torch.ones(2, 4)],
            1,
            loss_fn=lambda m, x: sum(b(x).sum() for b in m.layers),
            example_inputs=torch.ones(2, 4),
        )
    assert not calls


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n=0), r"`n`=0 must remove between 1 and 3 of the 4 blocks"),
        (dict(n=4), r"`n`=4 must remove between 1 and 3"),
        (dict(n=0.1), r"`n`=0.1 must remove between 1 and 3"),  # rounds to no block
        (dict(n=1.0), r"`n`=1.0 must remove"),
        (dict(n=True), r"`n` must be a number of blocks"),
        (dict(n="2"), r"`n` must be a number of blocks"),
        (dict(n=1, score="cosine"), r"`score` must be one of \('loss', 'reconstruction', 'influence'\)"),
        (dict(n=1, blocks="model.norm"), r"`blocks='model.norm'` is not an nn.ModuleList"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_blocks(deep("llama"), batches(), **kwargs)


def test_remove_blocks_refuses_bad_indices():
    model = deep("llama")
    for drop, match in (([4], r"indices in 0..3, got \[4\]"), ([1, 1], "distinct"), ([0, 1, 2, 3], "at most 3")):
        with pytest.raises(ValueError, match=match):
            remove_blocks(model, drop)


def test_a_model_whose_blocks_depend_on_their_position_is_refused():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, scale_attn_by_inverse_layer_idx=True
    )
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        remove_blocks(transformers.GPT2LMHeadModel(config), [1])


def test_prune_blocks_refuses_what_it_could_not_remove_before_scoring():
    """A model whose blocks cannot be removed (position-dependent attention, per-block config settings) used to be
    scored first, every pass of it, and refused after: it is refused before the first pass, the model untouched."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, scale_attn_by_inverse_layer_idx=True
    )
    llama = deep("llama")
    llama.config.rope_per_block = [True, False, True, False]
    for model, match in (
        (transformers.GPT2LMHeadModel(config), "scale_attn_by_inverse_layer_idx"),
        (llama, r"per-block settings \['rope_per_block'\].*not removed"),
    ):
        calls = []
        model.register_forward_pre_hook(lambda *a: calls.append(1))
        for score in ("loss", "influence"):
            with pytest.raises(ValueError, match=match):
                prune_blocks(model, batches(), 1, score=score)
        assert not calls


def test_a_config_with_per_block_settings_it_cannot_cut_is_refused():
    model = deep("llama")
    model.config.rope_per_block = [True, False, True, False]  # a setting the reloaded model would read per block
    with pytest.raises(ValueError, match=r"per-block settings \['rope_per_block'\].*not removed"):
        remove_blocks(model, [1])
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4  # nothing lost


def test_the_loss_score_without_a_loss_says_what_to_pass():
    data = [{"input_ids": b["input_ids"]} for b in batches()]  # no labels
    with pytest.raises(ValueError, match="score='loss' needs a loss.*score='reconstruction'"):
        prune_blocks(deep("llama"), data, 1)
    small = prune_blocks(deep("llama"), data, np.int64(1), score="reconstruction")  # any integer type
    assert small.model.config.num_hidden_layers == 3


def test_pattern_blocks_in_a_pruner_points_to_prune_blocks():
    with pytest.raises(ValueError, match=r"pattern='blocks' removes whole blocks.*lightning_prune.prune_blocks"):
        Pruner(Magnitude(), 0.5, pattern="blocks")
    with pytest.raises(ValueError, match=r"`pattern` must be 'unstructured', 'channels' or 'N:M'"):
        Pruner(Magnitude(), 0.5, pattern="block")
