"""GPU checks: run whenever CUDA is present, skipped otherwise (CI has no GPU)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, make_trainer
from test_engine import FrozenChecker

from lightning_prune import OBDPruning, OBSPruning, prune
from lightning_prune.solvers.obc import obc_prune, prepare_hessian, sparsegpt_prune

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("cls", [OBDPruning, OBSPruning])
def test_frozen_masks_and_rounds_on_gpu(precision, cls):
    pl.seed_everything(0, verbose=False)
    model = TinyNet(optimizer="adamw", weight_decay=0.01)
    pruner = cls(0.7, num_batches=4, verbose=0)
    checker = FrozenChecker(pruner)
    make_trainer(max_epochs=4, accelerator="gpu", precision=precision, callbacks=[pruner, checker]).fit(model)
    assert checker.checked > 0 and pruner.sparsity == pytest.approx(0.7, abs=1e-3)
    assert all(m.device.type == "cuda" for m in pruner.pruner._masks.values())


def test_solvers_agree_between_cuda_float32_and_cpu_float64():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 128, generator=g, dtype=torch.float64)
    H, W = X.T @ X / 2000, torch.randn(32, 128, generator=g, dtype=torch.float64)
    counts, forced = torch.full((32,), 64), torch.zeros(32, 128, dtype=torch.bool)
    for solver in (obc_prune, sparsegpt_prune):
        U, W1, _, _ = prepare_hessian(H, W, 0.01, "cpu")
        ref, ref_mask, _ = solver(W1, U, counts, forced)
        U, W1, _, _ = prepare_hessian(H.float().cuda(), W.float().cuda(), 0.01, "gpu")
        out, mask, _ = solver(W1, U, counts.cuda(), forced.cuda())
        assert (mask.cpu() == ref_mask).float().mean() > 0.99
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "make", [lambda: OBSPruning(0.6, num_batches=4, verbose=0), lambda: OBDPruning(0.6, num_batches=4, verbose=0)]
)
def test_prune_on_a_cuda_model_takes_cpu_batches(make):
    """prune() runs where the model is: CPU batches are moved to it, masks live there."""
    pl.seed_everything(0, verbose=False)
    model = TinyNet().cuda()
    pruner = make()
    record = prune(model, model.train_dataloader(), pruner)
    assert record["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert all(m.device.type == "cuda" for m in pruner.pruner._masks.values())
    params = dict(model.named_parameters())
    assert all(torch.all(params[n][~m.cuda()] == 0) for n, m in pruner.masks.items())


def test_semi_structured_export_round_trips():
    """2:4-pruned (OBS) Linear layers become semi-structured sparse tensors that compute the same outputs."""
    from torch.sparse import SparseSemiStructuredTensor

    from lightning_prune import export_semi_structured

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 kernels need compute capability >= 8.0")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)).cuda()
    pruner = OBSPruning(0.5, pattern="2:4", allocation="reconstruction", scope="layer", verbose=0)
    prune(net, [torch.randn(128, 256, device="cuda") for _ in range(4)], pruner)
    net = net.half()
    masked = {n: p.detach().clone() for n, p in net.named_parameters() if n.endswith("weight")}
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    expected = net(x)
    assert export_semi_structured(net) == ["0", "2"]
    assert isinstance(net[0].weight, SparseSemiStructuredTensor)
    assert torch.equal(net[0].weight.to_dense(), masked["0.weight"])
    out = net(x)
    assert float((out - expected).float().norm() / expected.float().norm()) < 5e-3
