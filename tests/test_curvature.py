"""Curvature estimators against closed forms, torch.func references and brute force."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import make_trainer
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import OBDPruning
from lightning_prune.criteria.obd import sanitize_curvature
from lightning_prune.engine.targets import resolve_targets
from lightning_prune.stats import EKFAC, KFAC, DiagFisher
from lightning_prune.stats.capture import LayerCapture, unfold_conv_input

# ---------------------------------------------------------------- linear regression, closed forms
N, D_IN, D_OUT = 128, 6, 3


def regression_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g) * torch.linspace(0.5, 2.0, D_IN)
    y = torch.randn(N, D_OUT, generator=g)
    return x, y


class Regression(pl.LightningModule):
    """y = W x with loss mean_n 1/2 ||W x_n - y_n||^2: H = I (x) X^T X / N exactly."""

    def __init__(self, batch_size=32, lr=0.0):
        super().__init__()
        self.lin = nn.Linear(D_IN, D_OUT, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(1)))
        self.batch_size, self.lr = batch_size, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * ((self.lin(x) - y) ** 2).sum(1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(*regression_data()), batch_size=self.batch_size, shuffle=False)


class Spy(OBDPruning):
    """Keeps the round's estimator for inspection."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        estimate = self.criterion._estimate

        def spy(ctx):
            self.est = estimate(ctx)
            return self.est

        self.criterion._estimate = spy


def estimate(curvature, batch_size=32, accumulate=1, num_batches=None, precision="32-true", accelerator="cpu", **kw):
    pl.seed_everything(0, verbose=False)
    num_batches = num_batches or N // batch_size
    spy = Spy(0.1, curvature=curvature, schedule="one_shot", num_batches=num_batches, verbose=0, **kw)
    make_trainer(
        max_epochs=1,
        callbacks=[spy],
        accumulate_grad_batches=accumulate,
        precision=precision,
        limit_val_batches=0,
        accelerator=accelerator,
    ).fit(Regression(batch_size))
    return spy.est


def residuals():
    x, y = regression_data()
    w = Regression().lin.weight.detach()
    return x.double(), (x @ w.T - y).double()


def test_fisher_matches_per_sample_definition():
    x, r = residuals()
    expected = ((r[:, :, None] * x[:, None, :]) ** 2).mean(0)  # E_n[(r_n x_n^T)^2]
    torch.testing.assert_close(estimate("fisher").diagonal("lin.weight"), expected, rtol=1e-5, atol=1e-8)


def test_fisher_is_not_the_squared_batch_gradient():
    x, r = residuals()
    batch_grad_sq = ((r.T @ x) / N) ** 2
    assert not torch.allclose(estimate("fisher").diagonal("lin.weight"), batch_grad_sq, rtol=0.1)


def test_kfac_factors_and_diagonal():
    x, r = residuals()
    obd = estimate("kfac")  # OBD keeps the factors' diagonals only
    assert obd.diagonal_only
    torch.testing.assert_close(
        obd.diagonal("lin.weight"), torch.outer(torch.diag(r.T @ r / N), torch.diag(x.T @ x / N)), rtol=1e-5, atol=1e-8
    )
    (t,) = resolve_targets(Regression())
    est = KFAC([t])  # the full factors, as OBS and EKFAC use them
    est.update(t.name, x.float()[:, None], r.float()[:, None])
    A, G = est.factors("lin.weight")
    torch.testing.assert_close(A, x.T @ x / N, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(G, r.T @ r / N, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(
        est.diagonal("lin.weight"), torch.outer(torch.diag(r.T @ r / N), torch.diag(x.T @ x / N)), rtol=1e-5, atol=1e-8
    )


def test_ekfac_two_phases_match_definition():
    x, r = residuals()
    est = estimate("ekfac", num_batches=4)  # phase one: batches 0-1, phase two: batches 2-3
    h = N // 2
    qa = torch.linalg.eigh(x[:h].T @ x[:h] / h).eigenvectors
    qg = torch.linalg.eigh(r[:h].T @ r[:h] / h).eigenvectors
    per_sample = torch.einsum("no,ni->noi", r[h:] @ qg, x[h:] @ qa)
    S = (per_sample**2).mean(0)
    torch.testing.assert_close(est.S["lin.weight"].double() / est.s_count["lin.weight"], S, rtol=1e-4, atol=1e-7)
    expected = (qg**2) @ S @ (qa**2).T
    torch.testing.assert_close(est.diagonal("lin.weight"), expected, rtol=1e-4, atol=1e-7)


def test_ekfac_diagonal_equals_explicit_kronecker_form():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=False)
    (t,) = resolve_targets(nn.Sequential(lin))
    est = EKFAC([t], num_batches=2)
    x, g = torch.randn(50, 1, 4), torch.randn(50, 1, 3)
    est.update(t.name, x, g)
    est.end_batch()
    est.update(t.name, torch.randn(40, 2, 4), torch.randn(40, 2, 3))
    est.end_batch()
    S = est.S[t.name].double() / est.s_count[t.name]
    Q = torch.kron(est.QG[t.name], est.QA[t.name])  # row-major vec(W): index i * d_in + j
    H = Q @ torch.diag(S.flatten()) @ Q.T
    torch.testing.assert_close(est.diagonal(t.name).flatten(), torch.diagonal(H), rtol=1e-9, atol=1e-12)


def test_hutchinson_matches_hessian_within_statistical_tolerance():
    x, _ = residuals()
    A = x.T @ x / N  # H = I_out (x) A for the mean loss
    probes, bs = 64, 32
    est = estimate("hutchinson", num_probes=probes, eval_batches=0)
    h = est.diagonal("lin.weight")
    # each draw uses one batch's Hessian H_b; Var[z_j (H_b z)_j] = sum_{k != j} (H_b)_jk^2, so the
    # mean over B batches x P probes has variance sum_b sum_{k!=j} (H_b)_jk^2 / (B^2 P).
    hb = torch.stack([x[i : i + bs].T @ x[i : i + bs] / bs for i in range(0, N, bs)])
    off = (hb**2).sum(2) - torch.diagonal(hb, dim1=1, dim2=2) ** 2
    std = (off.sum(0) / (len(hb) ** 2 * probes)).sqrt()
    # 4 standard errors: a false alarm has probability ~6e-5 per entry
    assert torch.all((h - torch.diag(A)).abs() <= 4 * std + 1e-9)
    assert not torch.allclose(h, torch.diag(A).expand_as(h), rtol=1e-6)  # it is an estimate, not a copy


@pytest.mark.parametrize("curvature", ["fisher", "kfac", "ekfac"])
def test_invariant_to_accumulation_and_batch_split(curvature):
    ref = estimate(curvature, batch_size=32, num_batches=4)
    split = estimate(curvature, batch_size=16, num_batches=8)
    accum = estimate(curvature, batch_size=16, num_batches=8, accumulate=2)
    summed = estimate(curvature, batch_size=32, num_batches=4, loss_reduction="mean")
    for other in (split, accum, summed):
        torch.testing.assert_close(other.diagonal("lin.weight"), ref.diagonal("lin.weight"), rtol=1e-5, atol=1e-9)


def test_bf16_training_still_accumulates_in_float32():
    ref = estimate("fisher")
    bf16 = estimate("fisher", precision="bf16-mixed")
    assert bf16.sq["lin.weight"].dtype == torch.float32 and bf16.diagonal("lin.weight").dtype == torch.float64
    torch.testing.assert_close(bf16.diagonal("lin.weight"), ref.diagonal("lin.weight"), rtol=5e-2, atol=1e-3)


def test_loss_scale_and_accumulation_are_divided_out():
    from types import SimpleNamespace

    from lightning_prune.callbacks.base import loss_scaling
    from lightning_prune.stats.capture import per_sample_factor

    def hook_grad_multiplier(trainer, module, batch_size, reduction):
        accumulate, scale = loss_scaling(trainer, module)
        return per_sample_factor(batch_size, reduction=reduction, accumulate=accumulate, loss_scale=scale or 1.0)

    scaler = SimpleNamespace(get_scale=lambda: 1024.0, is_enabled=lambda: True)
    trainer = SimpleNamespace(accumulate_grad_batches=4, precision_plugin=SimpleNamespace(scaler=scaler))
    module = SimpleNamespace(automatic_optimization=True)
    assert hook_grad_multiplier(trainer, module, 32, "mean") == 32 * 4 / 1024
    # a summed loss: the estimators' mean over the 32 samples is the sum's Fisher, 32 times the mean's
    assert hook_grad_multiplier(trainer, module, 32, "sum") == pytest.approx(32**0.5 * 4 / 1024)
    # a mean over 32 x 127 tokens: sqrt(samples x terms) (capture.per_sample_factor)
    tokens = per_sample_factor(32, reduction="mean", accumulate=4, loss_scale=1024.0, terms=32 * 127)
    assert tokens == pytest.approx(32 * 127**0.5 * 4 / 1024)
    module.automatic_optimization = False  # manual optimization: Lightning does not divide the loss
    assert hook_grad_multiplier(trainer, module, 32, "mean") == 32 / 1024


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed (GradScaler) needs CUDA")
def test_16_mixed_loss_scale_is_divided_out_on_gpu():
    ref = estimate("fisher")
    amp = estimate("fisher", precision="16-mixed", accelerator="gpu")
    torch.testing.assert_close(amp.diagonal("lin.weight").cpu(), ref.diagonal("lin.weight"), rtol=1e-2, atol=1e-4)


# ---------------------------------------------------------------- per-sample statistics vs torch.func
class ConvNet(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


LAYERS = {
    "linear": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), (5,)),
    "linear_seq": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)), (2, 5)),
    "conv1d": (lambda: ConvNet(nn.Conv1d(2, 3, 3, stride=2, padding=1)), (2, 9)),
    "conv2d": (lambda: ConvNet(nn.Conv2d(2, 3, 3, stride=1, padding=1, dilation=2)), (2, 6, 6)),
    "conv2d_same_reflect": (
        lambda: ConvNet(nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode="reflect")),
        (2, 5, 5),
    ),
    "conv3d": (lambda: ConvNet(nn.Conv3d(2, 2, 2, stride=(1, 2, 1))), (2, 4, 4, 3)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_per_sample_fisher_matches_torch_func(kind):
    torch.manual_seed(0)
    build, shape = LAYERS[kind]
    model = build()
    x = torch.randn(10, *shape)
    y = torch.randint(0, 3, (10,))
    model(x)  # materialise lazy layers
    targets = resolve_targets(model)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    est = DiagFisher(targets)
    cap = LayerCapture(targets)
    cap.attach()
    F.cross_entropy(model(x), y).backward()
    for t, xr, gr in cap.drain():
        est.update(t.name, xr, gr * x.shape[0])
    cap.detach()
    for t in targets:
        expected = (per_sample[t.name].double() ** 2).mean(0)
        torch.testing.assert_close(est.diagonal(t.name), expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "conv2d_same_reflect", "conv3d"])
def test_unfold_reproduces_convolution(kind):
    torch.manual_seed(0)
    build, shape = LAYERS[kind]
    conv = build().conv
    x = torch.randn(3, *shape)
    rows = unfold_conv_input(conv, x)
    out = rows @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias
    ref = conv(x)
    torch.testing.assert_close(out.transpose(1, 2).reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)


def test_inplace_activation_after_layer_is_supported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 2))
    targets = resolve_targets(model)
    cap = LayerCapture(targets)
    cap.attach()
    model(torch.randn(8, 4)).sum().backward()
    assert {t.name for t, _, _ in cap.drain()} == {"0.weight", "2.weight"}


# ---------------------------------------------------------------- OBD itself
class DiagonalQuadratic(pl.LightningModule):
    """loss = 1/2 sum_i h_i (w_i - w0_i)^2 at its minimum w = w0: Hutchinson is exact (z * Hz = z^2 h = h)."""

    def __init__(self, h, w):
        super().__init__()
        self.lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w)
        self.register_buffer("h", h)
        self.register_buffer("w0", w.clone())

    def training_step(self, batch, batch_idx):
        return 0.5 * (self.h * (self.lin.weight - self.w0) ** 2).sum() + 0.0 * batch[0].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=2)


def test_obd_removes_exactly_the_lowest_saliencies():
    g = torch.Generator().manual_seed(0)
    h = torch.rand(6, 9, generator=g) * 10
    w = torch.randn(6, 9, generator=g)
    pruner = OBDPruning(0.4, curvature="hutchinson", schedule="one_shot", num_batches=2, num_probes=1, verbose=0)
    make_trainer(max_epochs=1, callbacks=[pruner], limit_val_batches=0).fit(DiagonalQuadratic(h, w))
    saliency = 0.5 * h * w**2
    k = round(0.4 * w.numel())
    expected = torch.ones(w.numel(), dtype=torch.bool)
    expected[saliency.flatten().argsort()[:k]] = False
    assert torch.equal(pruner.masks["lin.weight"], expected.view_as(w))
    rec = pruner.history[0]
    assert rec["predicted_loss_increase"] == pytest.approx(float(saliency.flatten().sort().values[:k].sum()), rel=1e-5)
    # the quadratic is exact here, so the prediction equals the measured loss change
    assert rec["actual_loss_increase"] == pytest.approx(rec["predicted_loss_increase"], rel=1e-4)


def test_negative_and_nonfinite_curvature_rule():
    h = torch.tensor([1.0, -2.0, float("nan"), float("inf"), 0.0])
    out, neg, bad = sanitize_curvature(h)
    assert neg == 1 and bad == 2
    assert out[:2].tolist() == [1.0, 2.0] and out[4] == 0.0 and torch.isnan(out[2:4]).all()


def test_obd_with_indefinite_curvature_warns_and_keeps_going():
    h = torch.tensor([[1.0, -3.0, 2.0, -0.5]])
    w = torch.ones(1, 4)
    pruner = OBDPruning(
        0.5, curvature="hutchinson", schedule="one_shot", num_batches=1, num_probes=1, min_density=0.0, verbose=0
    )
    with pytest.warns(UserWarning, match="2 negative curvature entries"):
        make_trainer(max_epochs=1, callbacks=[pruner], limit_val_batches=0).fit(DiagonalQuadratic(h, w))
    assert pruner.masks["lin.weight"].tolist() == [[False, True, True, False]]


class UnusedLayer(Regression):
    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(3, 3)


def test_layer_without_data_is_a_clear_error():
    pruner = OBDPruning(0.5, schedule="one_shot", num_batches=2, verbose=0)
    trainer = make_trainer(max_epochs=1, callbacks=[pruner], limit_val_batches=0)
    with pytest.raises(ValueError, match="\\['unused.weight'\\] got none at the first optimizer step"):
        trainer.fit(UnusedLayer())  # in a fit: at the first step, not at the round an epoch later
    assert trainer.global_step == 0
    from lightning_prune import prune

    model = UnusedLayer()
    data = DataLoader(TensorDataset(*regression_data()), batch_size=32)
    with pytest.raises(RuntimeError, match="layers \\['unused.weight'\\] received no data in the 2 batches"):
        prune(model, data, OBDPruning(0.5, num_batches=2, verbose=0), loss_fn=lambda m, b: m.training_step(b, 0))


def test_curvature_needs_layer_weights():
    m = Regression()
    pruner = OBDPruning(0.5, parameters=[m.lin.weight], schedule="one_shot", verbose=0)
    make_trainer(max_epochs=1, callbacks=[pruner], limit_val_batches=0).fit(m)  # fine: a Linear weight
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    from lightning_prune.stats.capture import check_hookable

    with pytest.raises(ValueError, match="grouped convolution.*exclude"):
        check_hookable(resolve_targets(grouped))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(curvature="gauss"), "`curvature` must be one of .*'gauss'"),
        (dict(num_probes=0), "`num_probes`.*0"),
        (dict(curvature="ekfac", num_batches=1), "ekfac.*`num_batches` >= 2"),
        (dict(loss_reduction="none"), "`loss_reduction`.*'none'"),
        (dict(num_batches=0), "`num_batches` must be an integer >= 1, got 0"),
    ],
)
def test_bad_obd_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OBDPruning(0.5, **kwargs)


def test_kfac_statistics_are_sums_with_counts():
    lin = nn.Linear(3, 2)
    (t,) = resolve_targets(nn.Sequential(lin))
    a, b = KFAC([t]), KFAC([t])
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(20, 1, 3, generator=gen), torch.randn(20, 1, 2, generator=gen)
    a.update(t.name, x[:7], g[:7])
    b.update(t.name, x[7:], g[7:])
    for ta, tb in zip(a.tensors(), b.tensors()):
        ta += tb  # what an all-reduce does
    whole = KFAC([t])
    whole.update(t.name, x, g)
    # the sums are float32: two partial sums and one whole sum agree to float32 rounding
    torch.testing.assert_close(a.diagonal(t.name), whole.diagonal(t.name), rtol=1e-6, atol=1e-7)


def test_calibration_pass_shows_a_progress_bar(capsys):
    pruner = OBDPruning(0.3, curvature="hutchinson", schedule="one_shot", num_batches=4, num_probes=1, verbose=1)
    make_trainer(max_epochs=1, callbacks=[pruner], limit_val_batches=0, enable_progress_bar=True).fit(Regression())
    out = capsys.readouterr()
    assert "Hutchinson calibration" in out.out + out.err
    assert "round 0 (epoch 0): sparsity" in out.out
