"""Experts: whole MoE experts removed (lightning_prune.prune_experts), saved as standard Hugging Face checkpoints.

The model without an expert must compute what the model computes when its router never picks that expert
(the expert's logit at -inf, the softmax renormalising over the rest): outputs, cached generation, and after
save_pretrained/from_pretrained. The masking here is written out by hand, independently of the library's."""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from test_hf_export import IDS, LOAD_PROBLEMS, VOCAB, batches, load_messages, logits
from torch import nn

from lightning_prune import prune_experts
from lightning_prune.engine.calibration import Calibration
from lightning_prune.surgery.experts import expert_scores, find_moe_layers, masked_experts, remove_experts

transformers = pytest.importorskip("transformers")

ARCHS = ("mixtral", "qwen2_moe", "olmoe")
EXPERTS, TOP_K = 6, 2


def moe(arch: str, seed: int = 0, layers: int = 2) -> nn.Module:
    """A tiny random MoE causal LM: hidden 32, 6 experts of 16 (top-2) in every block."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, num_experts_per_tok=TOP_K,
    )  # fmt: skip
    if arch == "mixtral":
        return transformers.MixtralForCausalLM(
            transformers.MixtralConfig(**common, intermediate_size=16, num_local_experts=EXPERTS)
        )
    if arch == "qwen2_moe":  # a shared expert beside the routed ones; top-k probabilities not renormalised
        config = transformers.Qwen2MoeConfig(
            **common, intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_experts=EXPERTS,
        )  # fmt: skip
        return transformers.Qwen2MoeForCausalLM(config)
    if arch == "olmoe":
        return transformers.OlmoeForCausalLM(
            transformers.OlmoeConfig(**common, intermediate_size=16, num_experts=EXPERTS, norm_topk_prob=True)
        )
    raise ValueError(arch)


def routers(model: nn.Module) -> list[nn.Module]:
    return [m.mlp.gate for m in model.model.layers]


@contextlib.contextmanager
def never_picked(model: nn.Module, drop: dict[int, list[int]]):
    """By hand: the routers of blocks ``drop`` give the listed experts a logit of -inf (softmax, top-k, and
    renormalise where the model does), as if they were gone."""
    saved = {}

    def forward(router: nn.Module, gone: list[int]):
        def fn(hidden):
            h = hidden.reshape(-1, router.hidden_dim)
            z = F.linear(h, router.weight)
            z[:, gone] = float("-inf")
            top, index = torch.topk(torch.softmax(z.float(), dim=-1), router.top_k, dim=-1)
            if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises
                top = top / top.sum(dim=-1, keepdim=True)
            return z, top.to(z.dtype), index

        return fn

    for i, gone in drop.items():
        router = routers(model)[i]
        saved[i] = router
        router.forward = forward(router, gone)
    try:
        yield
    finally:
        for router in saved.values():
            del router.forward


def load_moe(directory) -> nn.Module:
    """AutoModelForCausalLM.from_pretrained with no custom code; nothing missing, unexpected, mismatched or
    re-initialised."""
    with load_messages() as messages:
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert not [m for m in messages if LOAD_PROBLEMS.search(m)], messages
    return loaded.eval()


def generate(model: nn.Module) -> torch.Tensor:
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    return model.eval().generate(IDS, attention_mask=torch.ones_like(IDS), **kw)


def mlp_inputs(model: nn.Module, data) -> dict[int, list[torch.Tensor]]:
    """The hidden states each MoE block receives, per batch."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(model.model.layers))}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().clone()))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        for b in data:
            model.eval()(**b)
    for h in hooks:
        h.remove()
    return seen


DROP = {0: [1, 4], 1: [0, 5]}


@pytest.mark.parametrize("arch", ARCHS)
def test_removed_experts_round_trip_through_from_pretrained_with_the_masked_outputs(arch, tmp_path):
    model = moe(arch)
    names = [f"model.layers.{i}.mlp" for i in DROP]
    small = remove_experts(model, {n: DROP[i] for i, n in enumerate(names)}, example_inputs={"input_ids": IDS})
    assert small.max_abs_diff < 1e-5
    key = "num_local_experts" if arch == "mixtral" else "num_experts"
    assert small.hf_configs == {"": {key: 4}} and getattr(small.model.config, key) == 4
    assert small.model.config.num_experts_per_tok == TOP_K
    assert small.experts_kept == {names[0]: [0, 2, 3, 5], names[1]: [1, 2, 3, 4]}
    assert small.removed == {n: 2 for n in names}
    for i, layer in enumerate(small.model.model.layers):  # the router's rows and the experts' slices went together
        kept = small.experts_kept[names[i]]
        old = model.model.layers[i].mlp
        assert torch.equal(layer.mlp.gate.weight, old.gate.weight[kept])
        assert torch.equal(layer.mlp.experts.gate_up_proj, old.experts.gate_up_proj[kept])
        assert torch.equal(layer.mlp.experts.down_proj, old.experts.down_proj[kept])
        if arch == "qwen2_moe":  # the shared expert is not a routed expert: it stays whole
            assert torch.equal(layer.mlp.shared_expert.up_proj.weight, old.shared_expert.up_proj.weight)
    assert model.model.layers[0].mlp.gate.weight.shape[0] == EXPERTS  # the original is untouched
    small.save_pretrained(tmp_path)
    loaded = load_moe(tmp_path)
    assert sum(p.numel() for p in loaded.parameters()) == small.params_after < small.params_before
    with never_picked(model, DROP):
        expected, expected_ids = logits(model), generate(model)
    assert not torch.allclose(logits(model), expected, atol=1e-3)  # the removed experts mattered
    torch.testing.assert_close(logits(small.model), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(loaded), expected_ids)
    # the load-balancing loss (training) counts the experts left, in the pruned model as in the loaded one
    b = batches(n=1)[0]
    with torch.no_grad():
        aux = small.model(**b, output_router_logits=True).aux_loss
        torch.testing.assert_close(aux, loaded(**b, output_router_logits=True).aux_loss)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_the_librarys_masking_is_the_hand_written_one(arch):
    model = moe(arch)
    with never_picked(model, DROP):
        expected = logits(model)
    with masked_experts(model, {f"model.layers.{i}.mlp": e for i, e in DROP.items()}):
        got = logits(model)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_the_reconstruction_score_is_the_blocks_relative_error_without_the_expert(arch):
    model, data = moe(arch), batches()
    scores = expert_scores(model, data, score="reconstruction")
    inputs = mlp_inputs(model, data)
    for i, layer in enumerate(model.model.layers):
        with torch.no_grad():
            full = [layer.mlp(x) for x in inputs[i]]
            for e in range(EXPERTS):
                with never_picked(model, {i: [e]}):
                    err = sum(float((layer.mlp(x) - y).pow(2).sum()) for x, y in zip(inputs[i], full))
                want = err / sum(float(y.pow(2).sum()) for y in full)
                assert scores[f"model.layers.{i}.mlp"][e] == pytest.approx(want, rel=1e-5)
    assert len({s for row in scores.values() for s in row}) == 2 * EXPERTS


def test_the_loss_score_is_the_calibration_loss_without_the_expert():
    model, data = moe("qwen2_moe"), batches()
    scores = expert_scores(model, data, score="loss")
    base = Calibration(model, output_loss=True).mean_loss(data)
    for i in range(2):
        for e in range(EXPERTS):
            with never_picked(model, {i: [e]}):
                without = Calibration(model, output_loss=True).mean_loss(data)
            assert scores[f"model.layers.{i}.mlp"][e] == pytest.approx(without - base, abs=1e-6)
    assert any(abs(s) > 1e-5 for row in scores.values() for s in row)


def test_reap_and_frequency_against_a_hand_computation_of_the_routing():
    """REAP: mean over the tokens routed to expert j of g_j * ||f_j(x)||, g_j the renormalised top-k
    probability, f_j = down_j (silu(gate_j x) * up_j x); frequency: the share of tokens that picked j."""
    model, data = moe("mixtral"), batches()
    reap = expert_scores(model, data, score="reap")
    freq = expert_scores(model, data, score="frequency")
    inputs = mlp_inputs(model, data)
    for i, layer in enumerate(model.model.layers):
        x = torch.cat([t.reshape(-1, 32) for t in inputs[i]]).double()
        p = torch.softmax(x @ layer.mlp.gate.weight.detach().double().T, dim=-1)
        top, index = torch.topk(p, TOP_K, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        w13, w2 = layer.mlp.experts.gate_up_proj.detach().double(), layer.mlp.experts.down_proj.detach().double()
        for e in range(EXPERTS):
            tok, slot = torch.where(index == e)
            g, u = (x[tok] @ w13[e].T).chunk(2, dim=-1)
            f = (F.silu(g) * u) @ w2[e].T
            want = float((top[tok, slot] * f.norm(dim=-1)).mean()) if tok.numel() else 0.0
            assert reap[f"model.layers.{i}.mlp"][e] == pytest.approx(want, rel=1e-4)
            assert freq[f"model.layers.{i}.mlp"][e] == pytest.approx(tok.numel() / x.shape[0], abs=1e-12)
    assert sum(freq["model.layers.0.mlp"]) == pytest.approx(TOP_K)


@pytest.mark.parametrize("score", ["reap", "frequency", "reconstruction", "loss"])
def test_prune_experts_removes_the_lowest_scores_of_every_block(score):
    model, data = moe("olmoe"), batches()
    scores = expert_scores(model, data, score=score)
    small = prune_experts(model, data, 0.5, score=score, example_inputs={"input_ids": IDS})
    for name, row in scores.items():
        order = sorted(range(EXPERTS), key=lambda e: (row[e], e))
        assert small.experts_kept[name] == sorted(order[3:])
    assert small.model.config.num_experts == 3 and f"score={score!r}, 3 per block" in small.notes[-1]


def test_an_expert_with_no_output_goes_first_by_reap():
    model, data = moe("mixtral"), batches()
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[3].zero_()
    reap = expert_scores(model, data, score="reap")["model.layers.1.mlp"]
    assert reap[3] == 0.0 and min(reap[e] for e in range(EXPERTS) if e != 3) > 0
    small = prune_experts(model, data, 1, score="reap")
    assert small.experts_kept["model.layers.1.mlp"] == [0, 1, 2, 4, 5]


def test_num_batches_takes_the_first_batches():
    model, data = moe("mixtral"), batches(n=3)
    assert expert_scores(model, data, score="frequency", num_batches=1) == expert_scores(
        model, data[:1], score="frequency"
    )
    assert expert_scores(model, data, score="frequency", num_batches=1) != expert_scores(model, data, score="frequency")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n=0), r"`n`=0 must remove between 1 and 4 of the 6 experts per block.*top_k=2"),
        (dict(n=5), r"`n`=5 must remove between 1 and 4 .*at least 2 must stay"),
        (dict(n=0.05), r"`n`=0.05 must remove between 1 and 4"),  # rounds to no expert
        (dict(n=True), r"`n` must be a number of experts"),
        (dict(n="2"), r"`n` must be a number of experts"),
        (dict(n=1, score="gate"), r"`score` must be one of \('reconstruction', 'loss', 'reap', 'frequency'\)"),
        (dict(n=1, num_batches=0), r"`num_batches` must be a positive integer or None.*got 0"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_experts(moe("mixtral"), batches(), **kwargs)


def test_remove_experts_refuses_bad_drops_and_loses_nothing():
    model = moe("mixtral")
    a, b = "model.layers.0.mlp", "model.layers.1.mlp"
    for drop, match in (
        ({a: [1], b: [1, 2]}, r"same number of experts .*\{'model.layers.0.mlp': 1, 'model.layers.1.mlp': 2\}"),
        ({a: [1]}, r"same number of experts"),  # the other block keeps all six
        ({a: [6], b: [0]}, r"`drop\['model.layers.0.mlp'\]` must hold expert indices in 0..5, got \[6\]"),
        ({a: [1, 1], b: [0, 2]}, r"repeats experts"),
        ({a: [0, 1, 2, 3, 4], b: [0, 1, 2, 3, 4]}, r"leaving fewer than the router's top_k=2"),
        ({"model.layers.0": [1], b: [1]}, r"`drop` names \['model.layers.0'\], not MoE blocks"),
    ):
        with pytest.raises(ValueError, match=match):
            remove_experts(model, drop)
    assert model.model.layers[0].mlp.gate.weight.shape[0] == EXPERTS and model.config.num_local_experts == EXPERTS


def test_models_whose_experts_it_cannot_remove_are_refused():
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4)
    )  # fmt: skip
    with pytest.raises(ValueError, match="found no Mixture-of-Experts block in LlamaForCausalLM"):
        prune_experts(llama, batches(), 1)

    class ListMoE(nn.Module):  # experts as a list of modules (older transformers, custom code)
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 4, bias=False)
            self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    with pytest.raises(ValueError, match=r"ListMoE\) keeps its experts as ModuleList.*3-D parameters"):
        find_moe_layers(nn.Sequential(ListMoE()))
    grouped = moe("mixtral")
    grouped.config.n_group = 2  # group-limited routing (DeepSeek-V3 style)
    with pytest.raises(ValueError, match=r"MixtralConfig.n_group=2: group-limited routing"):
        prune_experts(grouped, batches(), 1)


def test_prune_experts_refuses_a_config_it_could_not_write_before_scoring():
    """A config whose expert count does not describe its blocks used to be refused after every scoring pass: it
    is refused before the first."""
    model, calls = moe("mixtral"), []
    model.config.num_local_experts = EXPERTS + 2
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"MixtralConfig.num_local_experts is 8, but its MoE blocks hold 6"):
        prune_experts(model, batches(), 1)
    assert not calls


def test_the_loss_score_without_a_loss_says_what_to_pass():
    data = [{"input_ids": b["input_ids"]} for b in batches()]
    with pytest.raises(ValueError, match="score='loss' needs a loss.*score='reconstruction'"):
        prune_experts(moe("mixtral"), data, 1, score="loss")


def test_a_router_that_does_not_compute_its_logits_with_its_weight_is_refused_not_ignored():
    model = moe("mixtral")
    router = model.model.layers[0].mlp.gate

    def matmul_router(hidden):  # the same routing, its logits by matmul: nothing for the masking to catch
        z = hidden.reshape(-1, 32) @ router.weight.T
        top, index = torch.topk(torch.softmax(z, dim=-1), TOP_K, dim=-1)
        return z, top / top.sum(-1, keepdim=True), index

    router.forward = matmul_router
    match = r"routers of \['model.layers.0.mlp'\] did not compute their logits"
    with pytest.raises(RuntimeError, match=match), masked_experts(model, {"model.layers.0.mlp": [1]}):
        logits(model)


class StepOnly(pl.LightningModule):
    """A LightningModule around a Hugging Face model that implements ``training_step`` and no ``forward``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        self.log("loss", loss := self.model(**batch).loss)  # muted in the passes, as in prune()
        return loss


@pytest.mark.parametrize("score", ["reconstruction", "reap", "frequency", "loss"])
def test_a_lightning_module_with_only_a_training_step_is_scored_as_its_hf_model(score):
    """Every score runs the module as prune() does (its training_step); example_inputs are checked on the
    Hugging Face model inside. Scores and the model left are the bare model's, bitwise."""
    bare, lit, example = moe("mixtral"), StepOnly(moe("mixtral")), {"input_ids": IDS}
    want = expert_scores(bare, batches(), score=score)
    assert expert_scores(lit, batches(), score=score) == {f"model.{k}": v for k, v in want.items()}
    want = prune_experts(bare, batches(), 2, score=score, example_inputs=example)
    got = prune_experts(lit, batches(), 2, score=score, example_inputs=example)
    assert got.experts_kept == {f"model.{k}": v for k, v in want.experts_kept.items()}
    assert got.hf_configs == {"model": want.hf_configs[""]} and got.max_abs_diff == want.max_abs_diff
    for (name, a), b in zip(got.model.model.state_dict().items(), want.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_module_with_no_forward_and_no_training_step_is_refused_before_any_pass():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = moe("mixtral")

    holder, calls = Holder(), []
    holder.model.register_forward_pre_hook(lambda *a: calls.append(1))
    for score in ("reconstruction", "reap", "frequency", "loss"):
        with pytest.raises(ValueError, match=r"Holder implements neither forward nor training_step.*loss_fn="):
            prune_experts(holder, batches(), 1, score=score)
    assert not calls


def test_a_module_around_the_hf_model_saves_the_hf_model_without_its_experts(tmp_path):
    class Wrapper(nn.Module):  # what a LightningModule around a Hugging Face model looks like
        def __init__(self) -> None:
            super().__init__()
            self.model = moe("mixtral")

        def forward(self, input_ids, labels=None):
            return self.model(input_ids=input_ids, labels=labels)

    wrapped = Wrapper()
    small = prune_experts(wrapped, batches(), 2, example_inputs={"input_ids": IDS})
    assert small.hf_configs == {"model": {"num_local_experts": 4}}
    assert list(small.experts_kept) == ["model.model.layers.0.mlp", "model.model.layers.1.mlp"]
    small.save_pretrained(tmp_path)
    loaded = load_moe(tmp_path)
    drop = {i: [e for e in range(EXPERTS) if e not in kept] for i, kept in enumerate(small.experts_kept.values())}
    with never_picked(wrapped.model, drop):
        torch.testing.assert_close(logits(loaded), logits(wrapped.model), rtol=1e-5, atol=1e-5)
