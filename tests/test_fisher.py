"""Fisher types against closed forms: MSE regression (Fisher = GGN = Hessian), softmax regression (the
exact GGN is the Hessian of a model linear in its weights), Monte-Carlo convergence, K-FAC's G."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import make_trainer
from torch import nn
from torch.func import functional_call, hessian
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import OBDPruning, OBSPruning, prune
from lightning_prune.engine.calibration import Calibration
from lightning_prune.engine.targets import resolve_targets
from lightning_prune.stats import KFAC, DiagFisher
from lightning_prune.stats.passes import fisher_pass

N, D_IN, C = 96, 5, 4


def data(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    y = torch.randn(N, C, generator=g, dtype=torch.float64) if kind == "mse" else torch.randint(0, C, (N,), generator=g)
    return x, y


def linear(seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, C, bias=False)).double()


LOSSES = {
    "mse": lambda m, b: F.mse_loss(m(b[0]), b[1]),
    "ce": lambda m, b: F.cross_entropy(m(b[0]), b[1]),
}


def estimate(kind: str, fisher_type: str, estimator=DiagFisher, batch: int = 32, mc_samples: int = 1, seed=None, **kw):
    model = linear()
    if seed is not None:  # after building the model, which seeds torch itself
        pl.seed_everything(seed, verbose=False)
    targets = resolve_targets(model)
    x, y = data(kind)
    batches = list(DataLoader(TensorDataset(x, y), batch_size=batch))
    est = estimator(targets, **kw)
    fisher_pass(Calibration(model, LOSSES[kind]), batches, est, targets, fisher_type=fisher_type, mc_samples=mc_samples)
    return model, est


def true_hessian_diagonal(kind: str, model: nn.Module) -> torch.Tensor:
    """diag of d^2 L / dW^2 for the mean loss over all N samples, by torch.func."""
    x, y = data(kind)
    W = model[0].weight.detach()

    def loss(w):
        return LOSSES[kind](lambda inp: functional_call(model, {"0.weight": w}, (inp,)), (x, y))

    return torch.diagonal(hessian(loss)(W).reshape(W.numel(), W.numel())).reshape(W.shape)


@pytest.mark.parametrize("kind", ["mse", "ce"])
def test_exact_fisher_diagonal_is_the_hessian_of_a_linear_model(kind):
    """MSE: Fisher = GGN = Hessian exactly; softmax regression: the GGN is the Hessian (linear in W)."""
    model, est = estimate(kind, "exact")
    torch.testing.assert_close(est.diagonal("0.weight"), true_hessian_diagonal(kind, model), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["mse", "ce"])
def test_mc_fisher_converges_to_the_exact_one(kind):
    """2,000 sampled labels per input, 96 inputs: the diagonal's relative error is a few percent."""
    model, exact = estimate(kind, "exact")
    _, mc = estimate(kind, "mc", mc_samples=2000)
    ref, got = exact.diagonal("0.weight"), mc.diagonal("0.weight")
    assert float((got - ref).norm() / ref.norm()) < 0.03


def test_empirical_fisher_is_not_the_hessian_at_the_observed_labels():
    model, empirical = linear(), DiagFisher(resolve_targets(linear()))
    x, y = data("ce")
    from lightning_prune.stats.passes import calibration_pass

    targets = resolve_targets(model)
    est = calibration_pass(Calibration(model, LOSSES["ce"]), [(x, y)], DiagFisher(targets), targets)
    assert not torch.allclose(est.diagonal("0.weight"), true_hessian_diagonal("ce", model), rtol=0.1)
    del empirical


def test_kfac_exact_g_is_the_mean_output_hessian_of_softmax_regression():
    """One layer whose output is the logits: G = E_n[diag(p_n) - p_n p_n^T] exactly, A = E[x x^T]."""
    model, est = estimate("ce", "exact", estimator=KFAC)
    x, _ = data("ce")
    p = model(x).softmax(-1).detach()
    G = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    A, G_est = est.factors("0.weight")
    torch.testing.assert_close(G_est, G, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(A, x.T @ x / N, rtol=1e-5, atol=1e-9)


def test_invariant_to_batch_splitting():
    for kind in ("mse", "ce"):
        _, whole = estimate(kind, "exact", batch=N)
        _, split = estimate(kind, "exact", batch=16)
        torch.testing.assert_close(split.diagonal("0.weight"), whole.diagonal("0.weight"), rtol=1e-5, atol=1e-9)


def test_mc_sampling_is_deterministic_under_seed_everything():
    _, a = estimate("ce", "mc", seed=3)
    _, b = estimate("ce", "mc", seed=3)
    _, c = estimate("ce", "mc", seed=4)
    assert torch.equal(a.diagonal("0.weight"), b.diagonal("0.weight"))
    assert not torch.equal(a.diagonal("0.weight"), c.diagonal("0.weight"))


class Classifier(pl.LightningModule):
    """A LightningModule whose training_step uses F.cross_entropy: found without any new argument."""

    def __init__(self, batch_size=32):
        super().__init__()
        self.net = linear().float()
        self.batch_size = batch_size

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        x, y = data("ce")
        return DataLoader(TensorDataset(x.float(), y), batch_size=self.batch_size)


@pytest.mark.parametrize("accumulate,batch", [(1, 32), (2, 16)])
def test_callback_rounds_use_the_window_batches_and_ignore_accumulation(accumulate, batch):
    """OBD with the exact Fisher inside a fit (a pass over the window's batches at the round): its
    saliencies are the closed-form Hessian's, whatever the accumulation and batch size."""
    pl.seed_everything(0, verbose=False)
    model = Classifier(batch)
    pruner = OBDPruning(0.5, fisher_type="exact", schedule="one_shot", num_batches=N // batch, verbose=0)
    seen = {}
    prune_fn = pruner.criterion._estimate

    def spy(ctx):
        seen["est"] = prune_fn(ctx)
        return seen["est"]

    pruner.criterion._estimate = spy
    make_trainer(max_epochs=1, callbacks=[pruner], accumulate_grad_batches=accumulate, limit_val_batches=0).fit(model)
    ref = true_hessian_diagonal("ce", linear())
    torch.testing.assert_close(seen["est"].diagonal("net.0.weight"), ref, rtol=1e-4, atol=1e-7)


class HFLike(nn.Module):
    """A Hugging Face-style model computing its own ``.loss`` with F.cross_entropy in forward."""

    def __init__(self):
        super().__init__()
        self.net = linear().float()

    def forward(self, inputs, labels=None):
        logits = self.net(inputs)
        from types import SimpleNamespace

        return SimpleNamespace(logits=logits, loss=None if labels is None else F.cross_entropy(logits, labels))


def test_the_loss_type_comes_from_a_hugging_face_style_output():
    x, y = data("ce")
    batches = [{"inputs": x[i : i + 32].float(), "labels": y[i : i + 32]} for i in range(0, N, 32)]
    for fisher_type in ("mc", "exact"):
        record = prune(HFLike(), batches, OBSPruning(0.5, fisher_type=fisher_type, num_batches=3, verbose=0))
        assert record["sparsity"] == pytest.approx(0.5, abs=1e-2)


def test_clear_errors():
    x, y = data("mse")
    batches = [(x.float(), y.float())]
    model = linear().float()
    hand_made = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731 - no F.mse_loss call to read
    with pytest.raises(ValueError, match="take the logits and the loss type from the loss's own call.*made none"):
        prune(model, batches, OBDPruning(0.5, fisher_type="mc", num_batches=1, verbose=0), loss_fn=hand_made)
    seq = nn.Linear(D_IN, C)  # a sequence model: (batch, time, classes) logits, one sample per sequence
    tokens = [(torch.randn(4, 6, D_IN), torch.randint(0, C, (4, 6)))]
    per_token = lambda m, b: F.cross_entropy(m(b[0]).reshape(-1, C), b[1].reshape(-1))  # noqa: E731
    with pytest.raises(ValueError, match="'exact' needs one output row per sample.*24 rows for 4 samples.*'mc'"):
        prune(seq, tokens, OBDPruning(0.5, fisher_type="exact", num_batches=1, verbose=0), loss_fn=per_token)
    prune(nn.Linear(D_IN, C), tokens, OBDPruning(0.5, fisher_type="mc", num_batches=1, verbose=0), loss_fn=per_token)
    with pytest.raises(ValueError, match="`fisher_type` applies to curvature='fisher', 'kfac' and 'ekfac'"):
        OBDPruning(0.5, curvature="hutchinson", fisher_type="mc")
    with pytest.raises(ValueError, match="`fisher_type` must be one of .*'true'"):
        OBSPruning(0.5, fisher_type="true")
    with pytest.raises(ValueError, match="`mc_samples` must be an integer >= 1, got 0"):
        OBDPruning(0.5, fisher_type="mc", mc_samples=0)


def test_auto_picks_exact_for_classifiers_mc_for_sequences_and_empirical_without_a_loss_call():
    x, y = data("ce")
    classifier = [(x[:32].float(), y[:32])]
    record = prune(linear().float(), classifier, OBDPruning(0.5, num_batches=1, verbose=0), loss_fn=LOSSES["ce"])
    assert record["info"]["fisher_type"] == "exact"  # OBD's default: "auto"
    tokens = [(torch.randn(4, 6, D_IN), torch.randint(0, C, (4, 6)))]
    per_token = lambda m, b: F.cross_entropy(m(b[0]).reshape(-1, C), b[1].reshape(-1))  # noqa: E731
    record = prune(nn.Linear(D_IN, C), tokens, OBDPruning(0.5, num_batches=1, verbose=0), loss_fn=per_token)
    assert record["info"]["fisher_type"] == "mc"
    hand_made = lambda m, b: ((m(b[0]) - b[1].float()[:, None]) ** 2).mean()  # noqa: E731
    record = prune(linear().float(), classifier, OBDPruning(0.5, num_batches=1, verbose=0), loss_fn=hand_made)
    assert record["info"]["fisher_type"] == "empirical"
    record = prune(linear().float(), classifier, OBSPruning(0.5, num_batches=1, verbose=0), loss_fn=LOSSES["ce"])
    assert record["info"]["fisher_type"] == "empirical"  # OBS's default, measured as good and cheaper
