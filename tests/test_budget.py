"""shrink_to: the budget is met exactly (every candidate within it, its MLP the widest that fits), the table lists
every candidate tried, the best is returned and loads back as a standard checkpoint; bad input is refused."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn

from lightning_prune import shrink_to
from lightning_prune.distill.losses import kd_loss
from lightning_prune.surgery.budget import _Counter, _distil, _shape_of, mean_loss, table

transformers = pytest.importorskip("transformers")

VOCAB = 64


def build(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
              num_hidden_layers=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1,
              tie_word_embeddings=False)  # fmt: skip
    kw.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()


def batches(n: int = 6) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (x := torch.randint(2, VOCAB, (4, 12), generator=g)), "labels": x} for _ in range(n)]


def run(model: nn.Module, params: float, **kw) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return shrink_to(model, batches(), params, eval_batches=2, verbose=0, **kw)


def non_embedding(model: nn.Module) -> int:
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def test_every_candidate_meets_the_budget_with_the_widest_mlp_that_fits_and_the_best_is_returned(tmp_path):
    model = build()
    dense = non_embedding(model)
    small = run(model, 0.5, candidates=4)
    budget = int(0.5 * dense)
    rows = small.candidates
    assert 2 <= len(rows) <= 4 and len({(r["hidden"], r["kv_heads"], r["blocks"]) for r in rows}) == len(rows)
    counter = _Counter(model, __import__("lightning_prune").models.layouts.layout_of(model), "non_embedding")
    shape0 = _shape_of(model, counter.arch)
    for r in rows:
        assert r["params"] <= budget
        shape = replace(shape0, **{k: r[k] for k in ("hidden", "kv_heads", "heads", "intermediate", "blocks")})
        assert counter(shape) == r["params"]
        if r["intermediate"] < shape0.intermediate:  # one more neuron per block would exceed the budget
            assert counter(replace(shape, intermediate=r["intermediate"] + 1)) > budget
    best = min(rows, key=lambda r: r["loss"])
    config = small.model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        best["hidden"], best["intermediate"], best["blocks"]
    )  # fmt: skip
    assert non_embedding(small.model) == best["params"] <= budget
    assert table(rows).count("\n") == len(rows) + 1 and "shrink_to(params=0.5" in small.notes[-1]
    small.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, small.model(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert model.config.hidden_size == 32 and non_embedding(model) == dense  # the model given is untouched


def test_the_axes_given_are_the_only_ones_cut_and_an_absolute_budget_counts_all_parameters():
    model = build()
    small = run(model, 0.6, axes=("neurons", "depth"), candidates=8)
    assert all(r["hidden"] == 32 and r["kv_heads"] == 4 for r in small.candidates)
    total = sum(p.numel() for p in model.parameters())
    budget = int(0.8 * total)
    small = run(model, budget, count="all", axes=("neurons",), candidates=2)
    assert len(small.candidates) == 1 and sum(p.numel() for p in small.model.parameters()) <= budget


def test_bad_input_is_refused_before_any_pass():
    model = build()
    for bad in (0, -0.5, float("nan"), True, 10**9):
        with pytest.raises(ValueError, match="`params"):
            run(model, bad)
    with pytest.raises(ValueError, match="`axes`"):
        run(model, 0.5, axes=("width",))
    with pytest.raises(ValueError, match="`count`"):
        run(model, 0.5, count="embedding")
    with pytest.raises(ValueError, match="`candidates`"):
        run(model, 0.5, candidates=0)
    with pytest.raises(ValueError, match="`eval_batches=6`"):  # every batch would rank, none prune
        shrink_to(model, batches(), 0.5, eval_batches=6)
    unlabeled = [{"input_ids": b["input_ids"]} for b in batches()]
    with pytest.raises(ValueError, match="gives none on `data`"):
        shrink_to(model, unlabeled, 0.5, eval_batches=2)
    with pytest.raises(ValueError, match="no shape"):
        run(model, 0.01, axes=("neurons",))


def test_gpt2_searches_the_axes_it_can_cut_and_refuses_the_others_by_name():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    small = run(model, 0.6, candidates=3)
    assert "axes=['neurons', 'depth']" in small.notes[-1]
    assert all(r["hidden"] == 32 and r["heads"] == 4 for r in small.candidates)
    with pytest.raises(ValueError, match=r"cannot cut \['hidden'\].*head size"):
        run(model, 0.6, axes=("hidden", "neurons"))


def test_recovered_candidates_are_ranked_by_their_loss_after_distillation_and_the_dense_model_is_untouched():
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = run(model, 0.5, candidates=3, recover_steps=3, recover_lr=1e-3)
    rows = small.candidates
    assert len(rows) >= 2 and all(r["loss"] != r["loss_oneshot"] for r in rows)
    best = min(rows, key=lambda r: r["loss"])
    assert mean_loss(small.model, batches()[-2:], None) == best["loss"]  # the recovered candidate is returned
    assert not any(m.training for m in small.model.modules())  # it came in eval mode, it leaves in eval mode
    assert all(p.grad is None for p in small.model.parameters())
    assert "recovered 3 steps" in small.notes[-1] and "| one-shot loss | loss |" in table(rows)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    oneshot = run(model, 0.5, candidates=3)  # without recovery: the same candidates, their one-shot losses
    assert [r["loss"] for r in oneshot.candidates] == [r["loss_oneshot"] for r in oneshot.candidates]
    assert [r["loss_oneshot"] for r in oneshot.candidates] == [r["loss_oneshot"] for r in rows]
    assert "one-shot" not in table(oneshot.candidates) and "recovered" not in oneshot.notes[-1]


def kd(student: nn.Module, teacher: nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    with torch.no_grad():
        return sum(float(kd_loss(student(**b).logits, teacher(**b).logits, 1.0)) for b in data) / len(data)


def test_distil_lowers_the_kd_loss_to_the_teacher_and_zero_steps_change_nothing():
    teacher, student = build(0), build(1, num_hidden_layers=2)
    data = [{"input_ids": b["input_ids"]} for b in batches(3)]
    start = kd(student, teacher, data)
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    _distil(student, teacher, data, 0, 1e-3)
    assert all(torch.equal(v, weights[k]) for k, v in student.state_dict().items())
    teacher_weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    _distil(student, teacher, data, 20, 3e-3)
    assert kd(student, teacher, data) < 0.5 * start  # two random LLaMAs: a large KL, most of it learnable
    assert not student.training and not teacher.training
    assert all(torch.equal(v, teacher_weights[k]) for k, v in teacher.state_dict().items())


def test_distil_leaves_the_padding_out_of_the_loss_and_restores_train_mode():
    teacher, ids = build(0), batches(1)[0]["input_ids"]
    padded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded["attention_mask"][:, -4:] = 0  # right padding: the other positions' logits are those of ids[:, :-4]
    steps = {}
    for name, batch in (("padded", padded), ("cut", {"input_ids": ids[:, :-4]}), ("unmasked", {"input_ids": ids})):
        student = build(1, num_hidden_layers=2).train()
        _distil(student, teacher, [batch], 1, 1e-3)
        assert all(m.training for m in student.modules())  # it came in train mode, it leaves in train mode
        steps[name] = torch.cat([p.detach().flatten() for p in student.parameters()])
    torch.testing.assert_close(steps["padded"], steps["cut"], atol=1e-5, rtol=0)  # 1% of a 1e-3 step
    assert (steps["padded"] - steps["unmasked"]).abs().max() > 1e-4  # the padding would count


def test_bad_recovery_input_is_refused_before_any_work(monkeypatch):
    import lightning_prune.surgery.budget as budget

    def never(*args, **kwargs):
        raise AssertionError("a candidate was built before the refusal")

    monkeypatch.setattr(budget, "build_candidate", never)
    monkeypatch.setattr(budget, "_block_order", never)
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=rf"`recover_steps`.*recover_steps={bad!r}"):
            run(model, 0.5, recover_steps=bad)
    for bad in (0, -1e-4, float("nan"), float("inf"), True, "1e-4"):
        with pytest.raises(ValueError, match=rf"`recover_lr`.*recover_lr={bad!r}"):
            run(model, 0.5, recover_steps=2, recover_lr=bad)
    pairs = [(b["input_ids"], b["labels"]) for b in batches()]
    loss_fn = lambda m, b: m(input_ids=b[0], labels=b[1]).loss  # noqa: E731
    with pytest.raises(ValueError, match=r"`recover_steps`.*batch 0 is a tuple"):
        shrink_to(model, pairs, 0.5, eval_batches=2, loss_fn=loss_fn, recover_steps=2)
    no_ids = [{"tokens": b["input_ids"], "labels": b["labels"]} for b in batches()]
    with pytest.raises(ValueError, match=r"`recover_steps`.*batch 0 is a dict with keys \['tokens', 'labels'\]"):
        shrink_to(model, no_ids, 0.5, eval_batches=2, loss_fn=loss_fn, recover_steps=2)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="`recover_steps`.*requires_grad=False"):
        run(model, 0.5, recover_steps=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
