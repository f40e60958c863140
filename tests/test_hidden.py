"""prune_hidden: a smaller hidden size. Channels the residual stream never uses are removed exactly (every
registered decoder, tied and untied heads, GQA, MoE); the smaller model saves and loads back with equal logits
and cached generation; the OBS refit is the least-squares one; sizes the config refuses are refused."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_prune import prune_hidden
from lightning_prune.models import layouts
from lightning_prune.surgery.hidden import allowed_sizes, collect_hidden_stats, hidden_stream

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN = 64, 32
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1)
# eps 1e-12: the norms' epsilon is the only difference between the dense and the smaller model on dead channels
LLAMA_LIKE = dict(hidden_size=HIDDEN, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
CONFIGS = {
    "llama": dict(LLAMA_LIKE, rms_norm_eps=1e-12, tie_word_embeddings=False),
    "llama-tied": dict(LLAMA_LIKE, rms_norm_eps=1e-12, tie_word_embeddings=True),
    "mistral": dict(LLAMA_LIKE, rms_norm_eps=1e-12),
    "qwen2": dict(LLAMA_LIKE, rms_norm_eps=1e-12),
    "phi3": dict(hidden_size=HIDDEN, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                 rms_norm_eps=1e-12, tie_word_embeddings=False),
    "gemma2": dict(LLAMA_LIKE, rms_norm_eps=1e-12, query_pre_attn_scalar=8, tie_word_embeddings=False),
    "mixtral": dict(LLAMA_LIKE, rms_norm_eps=1e-12, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(LLAMA_LIKE, rms_norm_eps=1e-12, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=20, decoder_sparse_step=1),
}  # fmt: skip
DEAD = [3, 11, 20, 21]  # channels no embedding column or writer row feeds


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model_type = kind.split("-")[0]
    config = transformers.AutoConfig.for_model(model_type, **COMMON, eos_token_id=1, **CONFIGS[kind])
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def kill(model: nn.Module, channels: list[int]) -> None:
    """Make ``channels`` of the residual stream always zero: no embedding column or writer row feeds them."""
    s = layouts.stream(model)
    index = torch.tensor(channels)
    with torch.no_grad():
        for name in s.embeddings:
            model.get_submodule(name).weight[:, index] = 0.0
        for port in s.writers:
            getattr(model.get_submodule(port.module), port.param).index_fill_(port.dim, index, 0.0)


def batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(2, VOCAB, (4, 12), generator=g)} for _ in range(n)]


IDS = torch.tensor([[5, 9, 14, 3, 22, 7, 30, 2], [8, 8, 41, 17, 6, 2, 19, 33]])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("score", ["obs", "activation"])
def test_channels_nothing_feeds_are_removed_exactly_and_the_checkpoint_loads_back(kind, score, tmp_path):
    """Both data-driven scores find the dead channels (cost 0: they are chosen first); with the norms rescaled
    (exactly sqrt(H / H') on dead channels) the smaller model computes the dense one's logits."""
    model = build(kind)
    kill(model, DEAD)
    dense = logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = prune_hidden(model, batches(), len(DEAD), score=score)
    assert f"removed {DEAD}" in small.notes[-1]
    assert small.model.config.hidden_size == HIDDEN - len(DEAD) and model.config.hidden_size == HIDDEN
    torch.testing.assert_close(logits(small.model), dense, atol=2e-5, rtol=1e-4)
    fresh = type(small.model)(small.model.config)
    assert small.params_after == sum(p.numel() for p in fresh.parameters()) < small.params_before
    small.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(loaded), logits(small.model), atol=1e-6, rtol=0)
    tied = loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight
    assert tied == bool(model.config.tie_word_embeddings)
    kw = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(loaded.generate(IDS, **kw), small.model.generate(IDS, **kw))


def test_keeping_the_norms_differs_where_rescaling_is_exact():
    model = build("llama")
    kill(model, DEAD)
    kept = prune_hidden(model, batches(), len(DEAD), score="activation", norms="keep")
    assert (logits(kept.model) - logits(model)).abs().max() > 1e-3


def test_the_obs_refit_of_a_reader_is_the_least_squares_fit_of_its_outputs_from_the_kept_channels():
    """For the lm_head (it reads the final norm alone): the refitted columns minimise the calibration error
    ``sum ||W x - W' x_K||^2`` (the normal equations, with a vanishing damping)."""
    model = build("llama")
    data = batches(4)
    _, hf_model, s = hidden_stream(model)
    from lightning_prune.engine.calibration import batch_runner

    stats = collect_hidden_stats(model, hf_model, s, data, batch_runner(model, None, "test"))
    head = [g for g in stats.groups if g == [len(s.readers)]]
    assert head, stats.groups
    small = prune_hidden(model, data, 8, score="obs", damp=1e-9, norms="keep")
    removed = [int(c) for c in small.notes[-1].split("removed [")[1].split("]")[0].split(", ")]
    keep = [c for c in range(HIDDEN) if c not in removed]
    A = stats.covariance[stats.groups.index(head[0])]
    W = model.lm_head.weight.detach().double()
    expected = W @ A[:, keep] @ torch.linalg.inv(A[keep][:, keep])
    torch.testing.assert_close(small.model.lm_head.weight.double(), expected, atol=1e-4, rtol=1e-4)


def test_the_groups_are_the_readers_of_one_tensor():
    model = build("mixtral")
    _, hf_model, s = hidden_stream(model)
    from lightning_prune.engine.calibration import batch_runner

    stats = collect_hidden_stats(model, hf_model, s, batches(2), batch_runner(model, None, "test"))
    named = [[s.readers[i].module.rsplit(".", 1)[-1] if i < len(s.readers) else "lm_head" for i in g]
             for g in stats.groups]  # fmt: skip
    assert named == [["q_proj", "k_proj", "v_proj"], ["gate", "experts"]] * 2 + [["lm_head"]]
    assert stats.rows == [96] * 5  # 2 batches x 4 x 12 tokens, each group counted once


def test_sizes_the_config_refuses_are_refused_and_fractions_rounded_to_allowed_ones():
    model = build("llama")  # LlamaConfig: hidden size a multiple of the 4 heads
    _, hf_model, s = hidden_stream(model)
    assert allowed_sizes(hf_model, s) == [4, 8, 12, 16, 20, 24, 28]
    with pytest.raises(ValueError, match=r"would leave hidden size 29.*remove \[4, 8\]|remove \[.*4.*\] channels"):
        prune_hidden(model, batches(), 3)
    small = prune_hidden(model, batches(), 0.3, score="magnitude")  # 32 * 0.7 = 22.4 -> 24
    assert small.model.config.hidden_size == 24 and small.removed == {"hidden": 8}
    for bad in (0, -1, 1.0 * HIDDEN, float("nan"), True):
        with pytest.raises(ValueError, match="`n"):
            prune_hidden(model, batches(), bad)
    with pytest.raises(ValueError, match="`score`"):
        prune_hidden(model, batches(), 4, score="taylor")
    with pytest.raises(ValueError, match="`norms`"):
        prune_hidden(model, batches(), 4, norms="exact")


def test_models_whose_head_size_follows_the_hidden_size_are_refused_by_name():
    config = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=VOCAB, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(ValueError, match=r"derives the head size from the hidden size"):
        prune_hidden(model, batches(), 4)


def test_a_tied_and_scaled_embedding_is_refused_before_any_pass():
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        "gemma2", **COMMON, eos_token_id=1, **dict(CONFIGS["gemma2"], tie_word_embeddings=True)
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match=r"scaled by sqrt\(hidden_size\) and tied"):
        prune_hidden(model, batches(), 4)


def test_the_model_given_is_untouched():
    model = build("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_hidden(model, batches(), 8)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.hidden_size == HIDDEN
