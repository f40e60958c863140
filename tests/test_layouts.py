"""The layout registry (lightning_prune.models.layouts): every registered architecture's entries resolve to the
modules of a tiny random model built from its config, with the sizes they claim; fused layers (Phi-3) and
Gemma prune, shrink, save and load back as standard checkpoints; the shared helpers behave as their callers'
copies did."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_prune import MagnitudePruning, OBSPruning, load_shrunk, prune, prune_blocks, shrink
from lightning_prune.models import layouts
from lightning_prune.models.graph import Slot, discover, tiles

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN = 64, 24  # no other size of the tiny models is 24: a parameter with a dimension of 24 holds the stream
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1)
LLAMA_LIKE = dict(hidden_size=HIDDEN, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)
CONFIGS = {  # model_type -> config arguments (eos_token_id inside the vocabulary)
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "phi3": dict(hidden_size=HIDDEN, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2),
    "gemma2": dict(LLAMA_LIKE, query_pre_attn_scalar=8),
    "gemma3_text": dict(LLAMA_LIKE, query_pre_attn_scalar=8),
    "mixtral": dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(LLAMA_LIKE, **MOE, num_experts=4, shared_expert_intermediate_size=20, decoder_sparse_step=2),
    "olmoe": dict(LLAMA_LIKE, head_dim=6, num_experts=4, num_experts_per_tok=2),  # its q_norm needs heads*hd == hidden
    "gpt2": dict(n_embd=HIDDEN, n_head=4, n_inner=40, n_layer=2, n_positions=64),
    "bert": dict(hidden_size=HIDDEN, intermediate_size=40, num_attention_heads=4),
}


def build(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random model of ``model_type`` (a causal LM; BERT's bare encoder)."""
    torch.manual_seed(seed)
    kw = {**COMMON, "eos_token_id": 1, **CONFIGS[model_type], **overrides}
    config = transformers.AutoConfig.for_model(model_type, **kw)
    auto = transformers.AutoModel if model_type == "bert" else transformers.AutoModelForCausalLM
    return auto.from_config(config).eval()


def test_every_model_type_is_registered_once_and_a_second_registration_is_refused():
    assert set(CONFIGS) == set(layouts.REGISTRY)
    with pytest.raises(ValueError, match=r"model types \['phi3'\] are already registered \(as 'phi3'\)"):
        layouts.register(layouts.Architecture("again", ("phi3",), "layers"))


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_registered_entry_resolves_to_the_modules_of_a_model_built_from_its_config(model_type):
    model = build(model_type)
    arch = layouts.layout_of(model)
    assert model_type in arch.model_types
    s = layouts.stream(model)  # raises if the entry names a module the model lacks
    config = model.config
    assert s.hidden == getattr(config, arch.hidden_key) == HIDDEN
    for key in arch.config_keys().values():  # head_dim: written even where the class has no field (Phi-3)
        assert hasattr(config, key) or key == "head_dim", key
    blocks = model.get_submodule(layouts.block_list_path(model))
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == getattr(config, arch.layers_key) == 2
    get = model.get_submodule
    for port in (*s.readers, *s.writers):
        assert getattr(get(port.module), port.param).shape[port.dim] == HIDDEN, port
    ports = [(p.module, p.param) for p in (*s.readers, *s.writers)]
    assert len(set(ports)) == len(ports)  # each tensor once: read or written, never both
    for norm in s.norms:
        assert get(norm).weight.shape == (HIDDEN,), norm
    assert s.final_norm == (s.norms[-1] if arch.final_norm else None)
    for name in s.embeddings:
        assert get(name).weight.shape[1] == HIDDEN
    if arch.lm_head:
        assert get(s.lm_head).weight.shape == (VOCAB, HIDDEN)
        assert s.tied == bool(getattr(config, "tie_word_embeddings", False))
    if arch.complete:  # every parameter holding the hidden size is listed somewhere
        listed = {(p.module, p.param) for p in (*s.readers, *s.writers)}
        whole = {*s.embeddings, *s.norms, *s.derived, *([s.lm_head] if s.lm_head else [])}
        for name, p in model.named_parameters():
            module, _, param = name.rpartition(".")
            if HIDDEN in p.shape:
                assert module in whole or (module, param) in listed, name


def test_the_stream_of_a_model_outside_the_registry_is_refused_by_name():
    with pytest.raises(ValueError, match=r"Sequential \(model_type=None\) is not in the layout registry"):
        layouts.stream(nn.Sequential(nn.Linear(2, 2)))
    assert layouts.layout_of(nn.Sequential(nn.Linear(2, 2))) is layouts.GENERIC


def test_model_types_and_keys_of_the_entries():
    """The facts the next surgeries read: GPT-2's Conv1D orientation and its key names, Gemma's scaled embeddings
    and (1 + w) norms, Qwen2-MoE's shared expert and its size key."""
    gpt2 = layouts.stream(build("gpt2"))
    assert layouts.Port("transformer.h.0.attn.c_attn", "weight", 0) in gpt2.readers  # Conv1D: in x out
    assert layouts.Port("transformer.h.0.mlp.c_proj", "bias", 0) in gpt2.writers
    assert gpt2.embeddings == ("transformer.wte", "transformer.wpe") and gpt2.tied
    assert layouts.REGISTRY["gpt2"].config_keys() == {
        "hidden": "n_embd", "layers": "n_layer", "intermediate": "n_inner", "heads": "n_head",
    }  # fmt: skip
    gemma = layouts.REGISTRY["gemma3_text"]
    assert gemma.embed_scale and gemma.norm_offset == 1.0 and len(gemma.norms) == 4
    qwen = layouts.stream(build("qwen2_moe"))  # decoder_sparse_step=2: block 0 dense, block 1 MoE
    assert layouts.Port("model.layers.0.mlp.gate_proj", "weight", 1) in qwen.readers
    assert layouts.Port("model.layers.1.mlp.experts", "gate_up_proj", 2) in qwen.readers
    assert layouts.Port("model.layers.1.mlp.shared_expert_gate", "weight", 1) in qwen.readers
    assert layouts.Port("model.layers.1.mlp.shared_expert.down_proj", "weight", 0) in qwen.writers
    assert layouts.REGISTRY["qwen2_moe"].config_keys()["shared_intermediate"] == "shared_expert_intermediate_size"


# ---------------------------------------------------------------------------------------------- fused slots


def test_a_fused_layers_slots_view_and_clear_the_rows_and_columns_they_name():
    size, m = 3, torch.arange(10 * 12.0).reshape(10, 12)
    q, k = Slot("l", "out", 2, 0), Slot("l", "out", 1, 6)  # rows [q: 3 x 2 | k: 3 x 1 | 1 more]
    assert torch.equal(q.view(m, size)[1], m[2:4].flatten()) and torch.equal(k.view(m, size)[2], m[8])
    cols = Slot("l", "in", 4, 0)
    assert torch.equal(cols.view(m, size)[1], m[:, 4:8].reshape(-1))
    mask = torch.ones(10, 12, dtype=torch.bool)
    k.clear(mask, size, torch.tensor([False, True, False]))
    assert (~mask).nonzero()[:, 0].unique().tolist() == [7]
    stored = torch.ones(12, 10, dtype=torch.bool)  # a Conv1D weight is in x out: its matrix is a transposed view
    cols.clear(stored.T, size, torch.tensor([True, False, False]))
    assert not stored[:4].any() and stored[4:].all()
    out = {("l", "out"): 12}
    assert tiles([q, k, Slot("l", "out", 1, 9)], size, out)  # [q | k | a third part]: every row, once
    assert not tiles([q, k], size, out)  # rows 9.. in no slot
    assert not tiles([q, Slot("l", "out", 1, 7), Slot("l", "out", 1, 10)], size, out)  # a gap at row 6, past the end


def test_phi3_discovery_places_heads_and_neurons_at_their_offsets_in_the_fused_layers():
    families = {f.name: f for f in discover(build("phi3"))[0]}
    heads, mlp = families["model.layers.0.self_attn"], families["model.layers.0.mlp"]
    hd = HIDDEN // 4  # Phi3Config has no head_dim: hidden / heads
    slots = [(s.width, s.offset) for s in heads.producers]  # a kv head with its 2 query heads; k after 4 query
    assert heads.size == 2 and slots == [(2 * hd, 0), (hd, 4 * hd), (hd, 6 * hd)]  # heads, v after 2 key heads
    assert heads.reads_config == ("num_attention_heads",) and ("num_attention_heads", 2, 0) in heads.fields
    assert mlp.size == 40 and [s.offset for s in mlp.producers] == [0, 40]


# -------------------------------------------------------------------------------------------- round trips

IDS = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))


def batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (x := torch.randint(2, VOCAB, (4, 12), generator=g)), "labels": x} for _ in range(n)]


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def generate(model: nn.Module) -> torch.Tensor:
    return model.generate(IDS, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)


def reload(small, tmp_path) -> nn.Module:
    small.save_pretrained(tmp_path)
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()


CASES = [  # (model_type, config overrides, pruner)
    ("phi3", {"tie_word_embeddings": False}, lambda: OBSPruning(0.5, pattern="channels", verbose=0)),
    ("phi3", {"tie_word_embeddings": True}, lambda: MagnitudePruning(0.5, pattern="channels", verbose=0)),
    ("phi3", {"num_key_value_heads": 4}, lambda: OBSPruning(0.5, pattern="channels", verbose=0)),
    ("gemma2", {}, lambda: OBSPruning(0.5, pattern="channels", verbose=0)),
    ("gemma3_text", {"tie_word_embeddings": False}, lambda: MagnitudePruning(0.5, pattern="channels", verbose=0)),
]


@pytest.mark.parametrize(("model_type", "overrides", "pruner"), CASES)
def test_channels_prune_shrink_save_and_load_back_with_equal_logits_and_generation(
    model_type, overrides, pruner, tmp_path
):
    model = build(model_type, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune(model, batches(), pruner())
    masked = logits(model)
    small = shrink(model, example_inputs={"input_ids": IDS})
    kv = model.config.num_key_value_heads
    assert small.nonstandard == {} and small.hf_configs[""]["num_key_value_heads"] == kv // 2
    assert small.hf_configs[""]["num_attention_heads"] == 2 and small.hf_configs[""]["intermediate_size"] == 20
    assert small.params_after < small.params_before
    loaded = reload(small, tmp_path)
    assert (loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight) == overrides.get(
        "tie_word_embeddings", model_type == "gemma2"
    )
    torch.testing.assert_close(logits(loaded), logits(small.model), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(small.model), masked, atol=1e-5, rtol=1e-5)
    assert torch.equal(generate(loaded), generate(small.model))


@pytest.mark.parametrize("model_type", ["phi3", "gemma3_text"])
def test_prune_blocks_round_trips(model_type, tmp_path):
    model = build(model_type, num_hidden_layers=3)
    small = prune_blocks(model, batches(), 1, example_inputs={"input_ids": IDS})
    assert small.model.config.num_hidden_layers == 2
    loaded = reload(small, tmp_path)
    torch.testing.assert_close(logits(loaded), logits(small.model), atol=1e-5, rtol=0)
    assert torch.equal(generate(loaded), generate(small.model))


def test_phi3_blocks_that_keep_different_head_counts_are_refused_before_any_change():
    """Phi-3's attention reads num_attention_heads at run time from the config every block shares."""
    model = build("phi3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = {"model.layers.0.self_attn": [0], "model.layers.1.self_attn": [0, 1]}
    blocks = r"model.layers.0.self_attn: 2, model.layers.1.self_attn: 4"  # the block left whole keeps its 4
    with pytest.raises(ValueError, match=rf"read num_attention_heads at run time .*\({blocks}\)"):
        shrink(model, plan=plan, inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.config.num_attention_heads == 4


def test_phi3_with_differing_mlps_saves_with_its_plan_and_the_unpruned_head_count(tmp_path):
    """The shared config was written at once (num_attention_heads); a plan checkpoint keeps the unpruned value,
    so load_shrunk builds the unpruned model and shrinks it to the same shapes."""
    model = build("phi3")
    plan = {
        "model.layers.0.self_attn": [1], "model.layers.1.self_attn": [0],
        "model.layers.0.mlp": list(range(0, 40, 2)), "model.layers.1.mlp": list(range(30)),
    }  # fmt: skip
    with pytest.warns(UserWarning, match="differs between blocks"):
        small = shrink(model, plan=plan)
    assert small.model.config.num_attention_heads == 2 and small.config_before == {"": {"num_attention_heads": 4}}
    with pytest.warns(UserWarning, match="pruning_plan.json"):
        small.save_pretrained(tmp_path, with_plan=True)
    loaded = load_shrunk(tmp_path)
    torch.testing.assert_close(logits(loaded), logits(small.model), atol=1e-5, rtol=0)


def test_qwen2_moe_saves_its_shared_expert_under_its_own_key(tmp_path):
    model = build("qwen2_moe", decoder_sparse_step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune(model, batches(), MagnitudePruning(0.5, pattern="channels", verbose=0))
    small = shrink(model, example_inputs={"input_ids": IDS})
    assert small.nonstandard == {} and small.hf_configs[""]["shared_expert_intermediate_size"] == 10
    assert "intermediate_size" not in small.hf_configs[""]
    torch.testing.assert_close(logits(reload(small, tmp_path)), logits(small.model), atol=1e-5, rtol=0)


def test_olmoe_heads_are_left_alone_with_the_reason():
    families, notes = discover(build("olmoe"))
    assert families == [] and any("q_norm and k_norm normalise over all heads" in n for n in notes)


# ------------------------------------------------------------------------------------ blocks and their I/O


class Holder(nn.Module):
    """A Hugging Face decoder beside a larger list of identical modules."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = build("llama")
        self.bank = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))


def test_find_block_list_takes_the_registered_block_list_first_else_the_heaviest_list():
    holder = Holder()
    assert layouts.find_block_list(holder)[0] == "decoder.model.layers"
    bank_params = sum(p.numel() for p in holder.bank.parameters())
    assert bank_params > sum(p.numel() for p in holder.decoder.model.layers.parameters())
    plain = nn.Sequential(
        nn.ModuleList(nn.Linear(2, 2) for _ in range(3)), nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
    )
    assert layouts.find_block_list(plain)[0] == "1"  # the most parameters
    assert layouts.find_block_list(plain, weigh=len)[0] == "0"  # the most modules
    assert [n for n, _ in layouts.find_blocks(plain, "1.*")] == ["1.0", "1.1"]
    with pytest.raises(ValueError, match=r"`squarehead_blocks='auto'` found no nn.ModuleList of identical blocks in "):
        layouts.find_blocks(nn.Linear(2, 2), arg="squarehead_blocks")
    with pytest.raises(ValueError, match=r"name them with a glob, e.g. squarehead_blocks='model.layers.\*'"):
        layouts.find_blocks(nn.Linear(2, 2), arg="squarehead_blocks")
    with pytest.raises(ValueError, match=r"`blocks='0.0'` is not an nn.ModuleList of at least two blocks"):
        layouts.find_block_list(plain, "0.0")


def test_block_input_and_output_read_hidden_states_or_say_what_they_got():
    x = torch.ones(2, 3)
    assert layouts.block_output(x) is x and layouts.block_output((x, None)) is x
    assert layouts.block_output(transformers.modeling_outputs.BaseModelOutput(last_hidden_state=x)) is x
    assert layouts.block_input((x,), {}) is x and layouts.block_input((), {"hidden_states": x}) is x
    with pytest.raises(TypeError, match="SquareHead block returned dict, not hidden states"):
        layouts.block_output({"h": x}, "Distillation: a SquareHead block")
    with pytest.raises(TypeError, match="must be its first argument"):
        layouts.block_input((None,), {})
