"""Shrunk Hugging Face models as standard checkpoints: prune (pattern="channels"), shrink, save_pretrained,
from_pretrained with no custom code, and the loaded model computes what the pruned (masked) model computes."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning, load_shrunk, prune, shrink
from lightning_prune.app.models import MLPClassifier

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, FFN = 64, 32, 48
CAUSAL = {"llama", "mistral", "qwen2", "gpt2"}
# what a loader says when a checkpoint does not fit the model built from its config
LOAD_PROBLEMS = re.compile(r"newly initiali[sz]ed|mismatch|LOAD REPORT|MISSING|UNEXPECTED|not used|not initiali", re.I)


def build(arch: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random model of ``arch``: 2 blocks, hidden 32, 4 heads of 8, an MLP of 48."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64)
    if arch == "llama":
        kw = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=4, num_key_value_heads=4)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, **{**kw, **overrides}))
    if arch == "mistral":  # grouped-query attention: 2 key/value heads, each shared by 2 query heads
        kw = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=4, num_key_value_heads=2)
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common, **{**kw, **overrides}))
    if arch == "qwen2":  # grouped-query, and q/k/v have biases
        kw = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=4, num_key_value_heads=2)
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, **{**kw, **overrides}))
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_inner=FFN, n_positions=64
        )
        return transformers.GPT2LMHeadModel(config)
    if arch in ("bert", "bert_encoder"):  # the masked-LM head, or the bare encoder (AutoModel)
        config = transformers.BertConfig(**common, hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=4)
        return (transformers.BertForMaskedLM if arch == "bert" else transformers.BertModel)(config)
    if arch == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            **common, hidden_size=HIDDEN, intermediate_size=FFN, moe_intermediate_size=16,
            shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2, num_attention_heads=4,
            num_key_value_heads=2,
        )  # fmt: skip
        return transformers.Qwen2MoeForCausalLM(config)
    raise ValueError(arch)


def auto_class(arch: str):
    if arch == "bert_encoder":
        return transformers.AutoModel
    return transformers.AutoModelForCausalLM if arch in CAUSAL else transformers.AutoModelForMaskedLM


def batches(n: int = 3, size: int = 4, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, VOCAB, (size, length), generator=g) for _ in range(n)]
    return [{"input_ids": x, "labels": x} for x in ids]


IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    """The logits, or the bare encoder's last hidden states."""
    with torch.no_grad():
        out = model.eval()(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def load_messages():
    """Everything transformers logs (at warning level and above) or warns while loading."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger, handler = logging.getLogger("transformers"), Keep(logging.WARNING)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages += [str(w.message) for w in caught]
    finally:
        logger.removeHandler(handler)
        transformers.logging.set_verbosity(verbosity)


def load_cleanly(arch: str, directory, **kwargs) -> nn.Module:
    """from_pretrained with no custom code; nothing missing, unexpected, mismatched or re-initialised."""
    with load_messages() as messages:
        loaded, info = auto_class(arch).from_pretrained(directory, output_loading_info=True, **kwargs)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert not [m for m in messages if LOAD_PROBLEMS.search(m)], messages
    return loaded.eval()


# the config of each tiny model after half its heads and neurons are gone (GPT-2 and BERT: MLPs only)
EXPECTED = {
    "llama": {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 24},
    "mistral": {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 24},
    "qwen2": {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 24},
    "gpt2": {"n_inner": 24},
    "bert": {"intermediate_size": 24},
    "bert_encoder": {"intermediate_size": 24},
}


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("arch", list(EXPECTED))
def test_shrunk_model_saves_and_loads_with_from_pretrained_and_computes_the_pruned_outputs(arch, tmp_path):
    model = build(arch)
    dense = n_params(model)
    pruner = MagnitudePruning(target=0.5, pattern="channels", verbose=0)
    if arch == "bert_encoder":  # no head, no labels: any loss of the hidden states
        data = [{"input_ids": b["input_ids"]} for b in batches()]
        prune(model, data, pruner, loss_fn=lambda m, b: m(**b).last_hidden_state.pow(2).mean())
    else:
        prune(model, batches(), pruner)
    assert pruner.scope == "layer"  # the default on Hugging Face models: the same count in every block
    small = shrink(model, example_inputs={"input_ids": IDS})
    assert small.nonstandard == {} and small.hf_configs == {"": EXPECTED[arch]}
    for attr, value in EXPECTED[arch].items():
        assert getattr(small.model.config, attr) == value
    small.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in EXPECTED[arch]} == EXPECTED[arch]  # head_dim written explicitly
    loaded = load_cleanly(arch, tmp_path)
    assert type(loaded) is type(model)
    assert n_params(loaded) == small.params_after == n_params(small.model) < dense
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    if arch in CAUSAL:  # a cached generation: the cache is sized from the new head counts
        kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        mask = torch.ones_like(IDS)
        expected = model.generate(IDS, attention_mask=mask, **kw)
        assert torch.equal(loaded.generate(IDS, attention_mask=mask, **kw), expected)
    if arch in ("gpt2", "bert", "bert_encoder"):  # their heads stay: the configs derive the head size from hidden_size
        assert any("heads of this layout" in n and "no config of theirs describes" in n for n in small.notes)
        assert loaded.config.num_attention_heads == 4


def test_obs_shrunk_grouped_query_model_round_trips(tmp_path):
    model = build("mistral")
    pruner = OBSPruning(target=0.5, pattern="channels", verbose=0)
    prune(model, batches(), pruner)
    small = shrink(model, example_inputs={"input_ids": IDS})
    assert small.hf_configs == {"": EXPECTED["mistral"]}
    small.save_pretrained(tmp_path)
    loaded = load_cleanly("mistral", tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


def test_lightning_module_around_the_hf_model_saves_the_hf_model(tmp_path):
    from lightning_prune.app.models import CausalLM

    torch.manual_seed(0)
    lit = CausalLM(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=2, num_heads=4, intermediate_size=FFN)
    pruner = OBDPruning(target=0.5, pattern="channels", verbose=0)
    prune(lit, batches(), pruner, loss_fn=lambda m, b: m(**b).loss)
    assert pruner.scope == "layer"
    small = shrink(lit, example_inputs={"input_ids": IDS})
    assert small.hf_configs == {"model": {**EXPECTED["llama"]}}
    small.save_pretrained(tmp_path)
    loaded = load_cleanly("llama", tmp_path)
    torch.testing.assert_close(logits(loaded), logits(lit.model), rtol=1e-5, atol=1e-5)


def test_the_load_check_sees_a_checkpoint_whose_config_does_not_fit(tmp_path):
    """The checks above can fail: the shrunk weights under the old config are reported (and refused)."""
    model = build("llama")
    prune(model, batches(), MagnitudePruning(target=0.5, pattern="channels", verbose=0))
    small = shrink(model)
    old = build("llama").config
    old.save_pretrained(tmp_path)
    from safetensors.torch import save_model

    save_model(small.model, str(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(AssertionError, match="mismatched_keys"):  # re-initialised: the check fails
        load_cleanly("llama", tmp_path, ignore_mismatched_sizes=True)
    with load_messages() as messages:
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    assert [m for m in messages if LOAD_PROBLEMS.search(m)]


# ---------------------------------------------------------------------------------------------- the uniform default
def test_scope_defaults_to_the_same_count_per_block_on_hf_models_only():
    model = build("mistral", intermediate_size=64)
    pruner = MagnitudePruning(target=0.3, pattern="channels", verbose=0)
    assert pruner.scope == "global"  # until it meets a model
    prune(model, batches(), pruner)
    units = pruner.pattern.units(pruner.masks)
    assert pruner.scope == "layer"
    assert {units[f"model.layers.{i}.mlp"] for i in (0, 1)} == {(round(0.3 * 64), 64)}
    assert {units[f"model.layers.{i}.self_attn"] for i in (0, 1)} == {(1, 2)}
    # elsewhere the default stays global; explicit scopes are kept as given
    mlp = MLPClassifier((1, 8, 8), 10, hidden=(20, 12))
    data = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    obs = OBSPruning(target=0.5, pattern="channels", verbose=0)
    prune(mlp, data, obs, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    assert obs.scope == "global"
    assert MagnitudePruning(target=0.5, scope="layer").scope == "layer"
    assert MagnitudePruning(target=0.5).scope == "global"


def test_an_explicit_global_scope_on_an_hf_model_warns_and_save_refuses_then_writes_the_plan(tmp_path):
    model = build("llama")
    with torch.no_grad():  # small weights in block 0's MLP: one global ranking takes more of its neurons
        for p in model.model.layers[0].mlp.parameters():
            p.mul_(0.1)
    pruner = MagnitudePruning(target=0.5, pattern="channels", scope="global", verbose=0)
    with pytest.warns(UserWarning, match="different numbers of heads and neurons in different blocks"):
        prune(model, batches(), pruner)
    units = pruner.pattern.units(pruner.masks)
    assert units["model.layers.0.mlp"][0] > units["model.layers.1.mlp"][0]
    with pytest.warns(UserWarning, match="no standard Hugging Face config describes"):
        small = shrink(model, example_inputs={"input_ids": IDS})
    assert small.hf_configs == {} and "differs between blocks" in small.nonstandard[""]
    assert small.model.config.intermediate_size == FFN  # left as it was, not half-updated
    with pytest.raises(ValueError, match=r"cannot be saved as a standard .* differs between blocks.*with_plan=True"):
        small.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    with pytest.warns(UserWarning, match="plain from_pretrained cannot load it"):
        small.save_pretrained(tmp_path / "planned", with_plan=True)
    record = json.loads((tmp_path / "planned" / "pruning_plan.json").read_text())
    assert record["plan"] == small.plan
    with pytest.raises(OSError, match="no file named"):  # never silently re-initialised
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "planned")
    loaded = load_shrunk(tmp_path / "planned")
    assert type(loaded) is transformers.LlamaForCausalLM and n_params(loaded) == small.params_after
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    auto = load_shrunk(tmp_path / "planned", model_class=transformers.AutoModelForCausalLM)
    torch.testing.assert_close(logits(auto), logits(model), rtol=1e-5, atol=1e-5)


def test_head_counts_the_config_class_refuses_are_said_at_bind_and_at_save(tmp_path):
    """LlamaConfig (transformers 5) needs hidden_size to be a multiple of num_attention_heads: 3 heads of
    32 cannot be saved, whatever head_dim says."""
    model = build("llama")
    pruner = MagnitudePruning(target=0.25, pattern="channels", verbose=0)  # 1 of 4 heads per block
    with pytest.warns(UserWarning, match=r"LlamaConfig refuses .*choose another target") as said:
        prune(model, batches(), pruner)
    # 4 heads of 8 dimensions in a hidden size of 32: 2 or 1 heads kept (targets whose rounding keeps them)
    (hint,) = [str(w.message) for w in said if "choose another target" in str(w.message)]
    ranges = hint.split("targets that save here: ")[1].split(")")[0].split(", ")
    bounds = [tuple(float(x) for x in r.split("-")) for r in ranges]
    saves = {t / 100 for t in range(1, 100) if any(b[0] <= t / 100 <= b[-1] for b in bounds)}
    assert {0.5, 0.75} <= saves and 0.25 not in saves, hint  # 2 or 1 heads of 4 save (divide 32), 3 do not
    assert saves == {t / 100 for t in range(1, 100) if 4 - round(4 * t / 100) in (1, 2, 4)}, hint
    assert "include=['*mlp*']" in hint
    with pytest.warns(UserWarning, match="no standard Hugging Face config"):
        small = shrink(model, example_inputs={"input_ids": IDS})
    assert "LlamaConfig refuses" in small.nonstandard[""] and "multiple" in small.nonstandard[""]
    with pytest.raises(ValueError, match="LlamaConfig refuses"):
        small.save_pretrained(tmp_path)
    small.save_pretrained(tmp_path, with_plan=True)
    torch.testing.assert_close(logits(load_shrunk(tmp_path)), logits(model), rtol=1e-5, atol=1e-5)


def test_the_config_class_refusing_the_head_count_gets_the_bind_time_advice_at_save(tmp_path):
    """8 heads over 4 key/value heads at target 0.3 keep 3 of 4 key/value heads, 6 heads: the blocks agree (the
    default scope), but LlamaConfig needs hidden_size 64 to be a multiple of 6. The refusal says that, with
    the targets that would save (the bind-time warning's) and the MLP-only alternative, not "prune with the
    default scope", which was done."""
    model = build("llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=4)
    with pytest.warns(UserWarning, match="choose another target") as said:
        prune(model, batches(), MagnitudePruning(target=0.3, pattern="channels", verbose=0))
    (hint,) = [str(w.message) for w in said if "choose another target" in str(w.message)]
    targets = re.search(r"targets that save here: [^)]*", hint).group(0)
    with pytest.warns(UserWarning, match="no standard Hugging Face config"):
        small = shrink(model, example_inputs={"input_ids": IDS})
    with pytest.raises(ValueError) as err:
        small.save_pretrained(tmp_path / "plain")
    message = str(err.value)
    for part in ("LlamaConfig refuses", "'num_attention_heads': 6", "'num_key_value_heads': 3", "not a multiple",
                 targets, "include=['*mlp*']", "with_plan=True"):  # fmt: skip
        assert part in message, (part, message)
    assert "default scope" not in message, message
    assert not (tmp_path / "plain").exists()


def test_the_plain_hf_save_of_a_model_no_config_describes_refuses_instead_of_writing_a_broken_checkpoint(tmp_path):
    """small.model.config keeps the dense sizes when no standard config describes the shrunk model, so
    the model's own save_pretrained would write a checkpoint from_pretrained cannot load (size mismatch):
    it raises Shrunk.save_pretrained's explanation instead, also on a copy; once a further shrink makes the
    sizes describable, it writes a checkpoint that loads."""
    model = build("llama")
    with pytest.warns(UserWarning, match="choose another target"):  # 3 heads of 4 in a hidden size of 32
        prune(model, batches(), MagnitudePruning(target=0.25, pattern="channels", verbose=0))
    with pytest.warns(UserWarning, match="no standard Hugging Face config"):
        small = shrink(model, example_inputs={"input_ids": IDS})
    explanation = r"(?s)cannot be saved as a standard Hugging Face checkpoint: LlamaConfig refuses.*with_plan=True"
    for hf_model in (small.model, copy.deepcopy(small.model)):
        with pytest.raises(ValueError, match=explanation):
            hf_model.save_pretrained(tmp_path / "plain")
        assert not (tmp_path / "plain").exists()
    # 2 heads of the 3 and 24 neurons of the 36 left: a standard config describes it, and the plain call writes it
    prune(small.model, batches(), MagnitudePruning(target=0.34, pattern="channels", verbose=0))
    smaller = shrink(small.model, example_inputs={"input_ids": IDS})
    assert smaller.nonstandard == {} and smaller.hf_configs[""]["num_attention_heads"] == 2
    smaller.model.save_pretrained(tmp_path / "plain")
    loaded = load_cleanly("llama", tmp_path / "plain")
    torch.testing.assert_close(logits(loaded), logits(small.model), rtol=1e-5, atol=1e-5)


def test_save_pretrained_refuses_a_directory_whose_files_would_be_loaded_instead(tmp_path):
    """A plan beside a standard checkpoint's weights: from_pretrained loaded the old model.safetensors with
    the plan's unpruned config (silently, the old model); a standard save beside an old plan: load_shrunk
    read the old plan. A file for a directory: transformers logged and wrote nothing."""
    model = build("llama")
    with pytest.warns(UserWarning):
        prune(model, batches(), MagnitudePruning(target=0.25, pattern="channels", verbose=0))
        odd = shrink(model)
    standard = build("llama", seed=1)
    prune(standard, batches(), MagnitudePruning(target=0.5, pattern="channels", verbose=0))
    even = shrink(standard)
    old = tmp_path / "old"
    build("llama").save_pretrained(old)
    files = sorted(f.name for f in old.iterdir())
    with pytest.raises(ValueError, match=r"(?s)`directory`.*holds \['model.safetensors'\].*from_pretrained would load"):
        odd.save_pretrained(old, with_plan=True)
    assert sorted(f.name for f in old.iterdir()) == files
    planned = tmp_path / "planned"
    with pytest.warns(UserWarning, match="plain from_pretrained cannot load it"):
        odd.save_pretrained(planned, with_plan=True)
    files = sorted(f.name for f in planned.iterdir())
    with pytest.raises(ValueError, match=r"(?s)`directory`.*holds \['pruning_plan.json', 'shrunk_model.safetensors'\]"):
        even.save_pretrained(planned)
    assert sorted(f.name for f in planned.iterdir()) == files
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"`directory`.* is a file"):
        even.save_pretrained(tmp_path / "file")
    even.save_pretrained(tmp_path / "new")  # an empty or new folder: written and loaded
    torch.testing.assert_close(logits(load_cleanly("llama", tmp_path / "new")), logits(standard), rtol=1e-5, atol=1e-5)


def test_an_architecture_whose_sizes_the_config_update_does_not_know_is_refused_not_saved_wrong(tmp_path, monkeypatch):
    """Qwen2-MoE's shared expert is a gated MLP sized by shared_expert_intermediate_size: read by its layers'
    names alone (as a model the layout registry does not describe), the update would write intermediate_size,
    so a model built from that config has other shapes, and it says so. (The registry's entry knows the key:
    tests/test_layouts.py saves it.)"""
    from lightning_prune.models import layouts

    monkeypatch.delitem(layouts.REGISTRY, "qwen2_moe")
    model = build("qwen2_moe")
    prune(model, batches(), MagnitudePruning(target=0.5, pattern="channels", verbose=0))
    with pytest.warns(UserWarning, match="has other shapes"):
        small = shrink(model, example_inputs={"input_ids": IDS})
    assert "shared_expert" in small.nonstandard[""]
    with pytest.raises(ValueError, match="cannot be saved as a standard"):
        small.save_pretrained(tmp_path)


def test_save_pretrained_needs_a_hugging_face_model():
    mlp = MLPClassifier((1, 8, 8), 10, hidden=(6, 4))
    small = shrink(mlp, plan={"net.1": [0, 1]})
    assert small.hf_configs == {} and small.nonstandard == {}
    with pytest.raises(ValueError, match="holds no transformers.PreTrainedModel"):
        small.save_pretrained("unused")


def test_load_shrunk_refuses_a_directory_without_a_plan(tmp_path):
    build("llama").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no pruning_plan.json"):
        load_shrunk(tmp_path)


@pytest.mark.slow
def test_the_example_prunes_shrinks_saves_and_loads(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "small"
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "shrink_to_hf.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cached generate() identical: True" in proc.stdout
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 48
