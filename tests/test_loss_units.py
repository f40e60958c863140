"""Predicted damage in the loss's own units.

A language model's loss averages over tokens; the Fisher identity holds for each sequence's joint
likelihood, so the curvature of the mean loss is ``(1/s) sum_n h_n h_n^T`` over the sequences' hook
gradients ``h_n`` (``capture.per_sample_factor``), not their mean times the batch size, which was the
tokens per sequence times too small. Checked here against torch.func references, the Fisher identity
on sampled labels, and the measured loss of models at their own data's minimum (data sampled from the
model itself); and every number a round reports names its unit.
"""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import make_trainer
from torch import nn
from torch.func import functional_call, hessian
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning, prune
from lightning_prune.engine.calibration import Calibration
from lightning_prune.engine.summary import round_metrics, round_summary
from lightning_prune.engine.targets import resolve_targets
from lightning_prune.stats import DiagFisher
from lightning_prune.stats.passes import calibration_pass

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 32, 32


def tiny_llama(layers: int = 1, seed: int = 0, sharp: float = 4.0) -> nn.Module:
    """A LLaMA with O(1) activations and a fairly confident head (a random init predicts ~uniformly)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
        model.lm_head.weight.mul_(sharp)
    return model


@torch.no_grad()
def sample_tokens(model: nn.Module, n: int, length: int = SEQ, seed: int = 1) -> torch.Tensor:
    """Sequences drawn from the model itself: its data distribution, so it sits at its population minimum
    (no first-order term beyond sampling noise) and the Fisher is its Hessian there."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 1), generator=g)
    for _ in range(length - 1):
        p = model(input_ids=ids).logits[:, -1].softmax(-1)
        ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
    return ids


def lm_batches(ids: torch.Tensor, labels: torch.Tensor | None = None, rows: int = 8) -> list[dict[str, torch.Tensor]]:
    labels = ids if labels is None else labels
    return [{"input_ids": ids[i : i + rows], "labels": labels[i : i + rows]} for i in range(0, len(ids), rows)]


def sequence_fisher(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The reference: per batch, ``sum_n (grad S_n)^2 / K_b`` with ``S_n`` sequence ``n``'s summed token
    NLL and ``K_b`` the batch's predicted (non-ignored) tokens; the mean over the (equal-sized) batches."""
    targets = resolve_targets(model)
    out = {t.name: torch.zeros(t.param.shape, dtype=torch.float64) for t in targets}
    for b in batches:
        valid = (b["labels"][:, 1:] != -100).sum(1)  # the model shifts: position t predicts label t+1
        for n in range(len(valid)):
            nll = model(input_ids=b["input_ids"][n : n + 1], labels=b["labels"][n : n + 1]).loss * valid[n]
            for t, g in zip(targets, torch.autograd.grad(nll, [t.param for t in targets])):
                out[t.name] += g.double() ** 2 / (valid.sum() * len(batches))
    return out


# ================================================================ the curvature counts tokens
def test_empirical_fisher_of_a_language_model_counts_its_predicted_tokens():
    """Ignored labels (padding) are not terms: two batches with different numbers of them."""
    model = tiny_llama()
    ids = sample_tokens(model, 8, length=12)
    labels = ids.clone()
    labels[1, 6:] = -100
    labels[5, 3:] = -100
    labels[6, :] = -100
    labels[6, 5] = ids[6, 5]  # one predicted token
    batches = lm_batches(ids, labels, rows=4)
    targets = resolve_targets(model)
    est = calibration_pass(Calibration(model, output_loss=True), batches, DiagFisher(targets), targets)
    ref = sequence_fisher(model, batches)
    for t in targets:
        torch.testing.assert_close(est.diagonal(t.name), ref[t.name], rtol=2e-4, atol=1e-12)
    tokens = int((labels[:, 1:] != -100).sum())
    assert est.terms_per_sample == pytest.approx(tokens / 8)


def test_empirical_fisher_of_token_predictions_is_the_hessian_at_sampled_labels():
    """The Fisher identity, per sequence: softmax regression on every token (logits_t = W x_t), labels
    drawn from the model. Over the labels, the empirical Fisher's mean is the Hessian of the mean token
    loss (the GGN of a model linear in W); 6,400 tokens put it within a few percent."""
    torch.manual_seed(0)
    n, length, d, classes = 800, 8, 5, 4
    model = nn.Sequential(nn.Linear(d, classes, bias=False)).double()
    x = torch.randn(n, length, d, dtype=torch.float64)
    with torch.no_grad():
        y = torch.distributions.Categorical(logits=model(x)).sample()

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]).reshape(-1, classes), b[1].reshape(-1))

    batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, n, 100)]
    targets = resolve_targets(model)
    est = calibration_pass(Calibration(model, loss_fn), batches, DiagFisher(targets), targets)
    W = model[0].weight.detach()
    H = hessian(lambda w: loss_fn(lambda inp: functional_call(model, {"0.weight": w}, (inp,)), (x, y)))(W)
    ref = torch.diagonal(H.reshape(W.numel(), W.numel())).reshape(W.shape)
    assert float((est.diagonal("0.weight") - ref).norm() / ref.norm()) < 0.05
    assert est.terms_per_sample == length


# ================================================================ predicted vs actual
@pytest.fixture(scope="module")
def near_minimum_lm() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """256 sequences of 32 tokens from a 1-block LLaMA (8,192 tokens: little first-order noise)."""
    model = tiny_llama()
    return model, lm_batches(sample_tokens(model, 256))


def near_minimum_classifier() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """An MLP and 8,192 inputs labelled by sampling from it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 6))
    with torch.no_grad():
        model[0].weight.mul_(2)
        model[-1].weight.mul_(3)
    x = torch.randn(8192, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = torch.multinomial(model(x).softmax(-1), 1, generator=torch.Generator().manual_seed(2))[:, 0]
    return model, [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(x), 256)]


LOSS_UNIT = {
    "obd fisher empirical": lambda t: OBDPruning(t, fisher_type="empirical"),
    "obd fisher mc": lambda t: OBDPruning(t, fisher_type="mc", mc_samples=4),
    "obd kfac": lambda t: OBDPruning(t, curvature="kfac", fisher_type="empirical"),
    "obd ekfac": lambda t: OBDPruning(t, curvature="ekfac", fisher_type="empirical"),
    "obs layerwise, obs allocation": lambda t: OBSPruning(t, allocation="obs", reconstruct="current"),
    "obs layerwise, fisher allocation": lambda t: OBSPruning(t, allocation="fisher", reconstruct="current"),
    "obs woodfisher": lambda t: OBSPruning(t, hessian="fisher", block_size=16),
    "obs kfac": lambda t: OBSPruning(t, hessian="kfac"),
}


def predicted_and_actual(model: nn.Module, batches: list, make, target: float, loss_fn=None) -> tuple[float, float]:
    pruner = make(target)
    pruner.num_batches = pruner.eval_batches = len(batches)
    pruner.verbose = 0
    record = prune(copy.deepcopy(model), batches, pruner, loss_fn=loss_fn)
    return record["predicted_loss_increase"], record["actual_loss_increase"]


@pytest.mark.parametrize("method", list(LOSS_UNIT))
def test_predicted_loss_increase_of_a_language_model_is_the_measured_one(method, near_minimum_lm):
    """20% of a 1-block LLaMA at its own data's minimum: the quadratic model holds, and its prediction
    is within a factor of 2 of the measured increase (measured 1.07-1.61). Before the token count, the
    empirical Fisher's predictions were 31x (the tokens per sequence) smaller for the same removals."""
    model, batches = near_minimum_lm
    predicted, actual = predicted_and_actual(model, batches, LOSS_UNIT[method], 0.2)
    assert 0.5 < actual / predicted < 2, (predicted, actual)


@pytest.mark.xfail(
    strict=True,
    reason="reconstruct='original' refits later layers to W C (A + damping)^-1, which "
    "shrinks them even where nothing upstream changed; that cost is in no prediction",
)
def test_predicted_loss_increase_of_obs_defaults_on_a_language_model(near_minimum_lm):
    model, batches = near_minimum_lm
    predicted, actual = predicted_and_actual(model, batches, OBSPruning, 0.2)
    assert 0.5 < actual / predicted < 2, (predicted, actual)


@pytest.mark.parametrize("method", [*LOSS_UNIT, "obd fisher exact"])
def test_predicted_loss_increase_of_a_classifier_is_the_measured_one(method):
    make = LOSS_UNIT.get(method, lambda t: OBDPruning(t, fisher_type="exact"))
    model, batches = near_minimum_classifier()
    predicted, actual = predicted_and_actual(
        model, batches, make, 0.2, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1])
    )
    assert 0.5 < actual / predicted < 2, (predicted, actual)


# ================================================================ sums and the training window
def test_a_summed_loss_predicts_in_its_own_units():
    """The same classifier, its loss summed over the batch instead of averaged: the same masks, and the
    prediction (like the measured increase) is the batch size times larger, for every Fisher type and
    with a loss the library cannot read (hand-made, ``loss_reduction`` says how it reduces)."""
    model, batches = near_minimum_classifier()
    batches = batches[:4]
    rows = len(batches[0][0])
    mean = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    summed = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="sum")  # noqa: E731
    hand_mean = lambda m, b: -m(b[0]).log_softmax(-1).gather(1, b[1][:, None]).mean()  # noqa: E731
    hand_sum = lambda m, b: -m(b[0]).log_softmax(-1).gather(1, b[1][:, None]).sum()  # noqa: E731
    cases = {
        "empirical": (mean, summed, {}),
        "exact": (mean, summed, {}),
        "hand-made": (hand_mean, hand_sum, {"fisher_type": "empirical"}),
    }
    for name, (loss_mean, loss_sum, kw) in cases.items():
        fisher_type = kw.get("fisher_type", name)
        a = OBDPruning(0.3, fisher_type=fisher_type, num_batches=4, verbose=0)
        b = OBDPruning(0.3, fisher_type=fisher_type, num_batches=4, loss_reduction="sum", verbose=0)
        ra = prune(copy.deepcopy(model), batches, a, loss_fn=loss_mean)
        rb = prune(copy.deepcopy(model), batches, b, loss_fn=loss_sum)
        assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks), name
        assert rb["actual_loss_increase"] == pytest.approx(rows * ra["actual_loss_increase"], rel=1e-4), name
        assert rb["predicted_loss_increase"] == pytest.approx(rows * ra["predicted_loss_increase"], rel=1e-4), name


class TinyLM(pl.LightningModule):
    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, rows: int = 4) -> None:
        super().__init__()
        self.model = tiny_llama()
        self.data = TensorDataset(ids, labels)
        self.rows = rows

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.rows)


class Keep(OBDPruning):
    """OBD that keeps its round's statistics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        estimate = self.criterion._estimate
        self.stats = []
        self.criterion._estimate = lambda ctx: self.stats.append(estimate(ctx)) or self.stats[-1]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_window_counts_tokens_as_prune_does(accumulate):
    """The window watches the loss calls of the training steps themselves: the same Fisher as the
    sequence reference, with ignored labels and gradient accumulation."""
    model = tiny_llama()
    ids = sample_tokens(model, 8, length=12)
    labels = ids.clone()
    labels[2, 7:] = -100
    labels[5, 2:] = -100
    lit = TinyLM(ids, labels)
    pruner = Keep(0.3, fisher_type="empirical", schedule="one_shot", num_batches=2, verbose=0)
    make_trainer(max_epochs=1, callbacks=[pruner], accumulate_grad_batches=accumulate, limit_val_batches=0).fit(lit)
    ref = sequence_fisher(tiny_llama(), lm_batches(ids, labels, rows=4))
    for t in pruner.targets:
        name = t.name.removeprefix("model.")
        torch.testing.assert_close(pruner.stats[0].diagonal(t.name), ref[name], rtol=2e-4, atol=1e-12)
    assert pruner.history[0]["info"]["loss_terms_per_sample"] == pytest.approx(int((labels[:, 1:] != -100).sum()) / 8)
    assert torch.overrides._get_current_function_mode_stack() == []


def test_two_pruners_watch_the_same_steps():
    """Two windows open on the same steps (their callbacks begin and end batches in the same order):
    each counts the tokens, and no function mode outlives the fit."""
    ids = sample_tokens(tiny_llama(), 8, length=12)
    lit = TinyLM(ids, ids)
    attn = Keep(0.3, fisher_type="empirical", schedule="one_shot", num_batches=2, include=["*attn*"], verbose=0)
    mlp = OBSPruning(0.3, schedule="one_shot", num_batches=2, include=["*mlp*"], verbose=0)
    make_trainer(max_epochs=1, callbacks=[attn, mlp], limit_val_batches=0).fit(lit)
    assert attn.history[0]["info"]["loss_terms_per_sample"] == 11
    assert mlp.history[0]["info"]["loss_terms_per_sample"] == 11
    assert torch.overrides._get_current_function_mode_stack() == []


def test_a_mode_left_above_the_watch_is_never_popped():
    """A function mode that a training step entered and did not exit stays on top: the watch is not
    popped from under it (that would pop the other one), it goes inert and says so."""
    from lightning_prune.stats.capture import LOSS_WATCH, LossTerms

    owner = object()
    watch = LOSS_WATCH.hold(owner)
    other = LossTerms()
    other.__enter__()
    try:
        with pytest.warns(UserWarning, match="loss-term watch stays under it"):
            LOSS_WATCH.release(owner)
        assert torch.overrides._get_current_function_mode_stack()[-2:] == [watch, other] and watch.inert
        F.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]))
        assert watch.calls == [] and len(other.calls) == 1
    finally:
        other.__exit__(None, None, None)
        watch.__exit__(None, None, None)
    assert torch.overrides._get_current_function_mode_stack() == []


# ================================================================ units in what a round reports
def test_wanda_reports_a_reconstruction_error_and_no_loss_without_labels(capsys):
    """No labels: the loss is 'not measured' (no NaN printed); Wanda's score sum is a reconstruction
    error in the layers' output units, labelled so, and never a predicted loss."""
    model = tiny_llama()
    batches = [{"input_ids": b["input_ids"]} for b in lm_batches(sample_tokens(model, 16, length=12))]
    record = prune(model, batches, OBDPruning(0.5, curvature="activations", scope="row", num_batches=2))
    line = capsys.readouterr().out
    assert "loss not measured" in line and "reconstruction error +" in line and "not a loss" in line
    assert "nan" not in line and "predicted" not in line
    assert not record["loss_measured"] and math.isnan(record["predicted_loss_increase"])
    assert record["info"]["reconstruction_error"] > 0
    metrics = round_metrics(record)
    assert "prune/predicted_loss_increase" not in metrics and "prune/actual_loss_increase" not in metrics
    assert metrics["prune/reconstruction_error"] == pytest.approx(record["info"]["reconstruction_error"])


def test_summary_line_says_what_was_not_measured():
    base = {
        "round": 0,
        "trigger": "prune",
        "sparsity": 0.5,
        "target_sparsity": 0.5,
        "target": 0.5,
        "seconds": 1.0,
        "info": {},
    }
    nan = math.nan
    measured = dict(base, loss_measured=True, loss_before=1.0, loss_after=1.5, actual_loss_increase=0.5)
    assert "loss 1.0000 -> 1.5000 | predicted +0.4 / actual +0.5" in round_summary(
        dict(measured, predicted_loss_increase=0.4)
    )
    blank = dict(base, loss_measured=False, loss_before=nan, loss_after=nan, actual_loss_increase=nan)
    line = round_summary(dict(blank, predicted_loss_increase=0.4))  # a window without a loss to measure
    assert "loss not measured | predicted +0.4 / actual not measured" in line and "nan" not in line
    # a loss that was measured and became NaN is printed as such
    broke = dict(measured, loss_after=nan, actual_loss_increase=nan, predicted_loss_increase=0.4)
    assert "loss 1.0000 -> nan | predicted +0.4 / actual +nan" in round_summary(broke)


def test_wandb_chart_plots_loss_units_only_and_the_table_names_units():
    from lightning_prune.callbacks.wandb_charts import loss_series, round_rows

    model = tiny_llama()
    batches = lm_batches(sample_tokens(model, 16, length=12))
    wanda = prune(copy.deepcopy(model), batches, OBDPruning(0.5, curvature="activations", scope="row", verbose=0))
    obd = prune(copy.deepcopy(model), batches, OBDPruning(0.5, fisher_type="empirical", verbose=0))
    magnitude = prune(copy.deepcopy(model), batches, MagnitudePruning(0.5, verbose=0))
    assert loss_series([wanda]) == [] and loss_series([magnitude]) == []
    series = dict(loss_series([obd]))
    assert series == {
        "predicted (quadratic model)": [obd["predicted_loss_increase"]],
        "actual (measured)": [obd["actual_loss_increase"]],
    }
    columns, rows = round_rows([wanda, obd])
    assert "predicted loss increase (loss)" in columns and any("not a loss" in c for c in columns)
    by = dict(zip(columns, zip(*rows)))  # an empty cell: not predicted by that criterion
    assert by["predicted loss increase (loss)"] == (None, obd["predicted_loss_increase"])
    recon = next(c for c in columns if c.startswith("reconstruction error"))
    assert by[recon] == (wanda["info"]["reconstruction_error"], None)
    blind = dict(wanda, loss_measured=False, loss_before=math.nan, loss_after=math.nan, actual_loss_increase=math.nan)
    assert round_rows([blind])[1][0][2:5] == [None, None, None]  # not measured: empty, not NaN
