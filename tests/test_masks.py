import pytest
import torch

from lightning_prune import masks as M


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (2, 3, 4, 5)])
def test_pack_roundtrip(shape):
    m = torch.rand(shape) > 0.4
    packed = M.pack_mask(m)
    assert packed["bits"].dtype == torch.uint8 and packed["bits"].numel() == (m.numel() + 7) // 8
    assert torch.equal(M.unpack_mask(packed), m)


def test_apply_and_grads():
    p = torch.nn.Parameter(torch.randn(4, 4))
    p.grad = torch.randn(4, 4)
    m = torch.rand(4, 4) > 0.5
    M.apply_masks_({"p": p}, {"p": m})
    M.mask_grads_({"p": p}, {"p": m})
    assert torch.all(p[~m] == 0) and torch.all(p.grad[~m] == 0) and torch.all(p[m] != 0)


def test_zero_optimizer_state():
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.Adam([p])
    p.grad = torch.randn(5, 3)
    opt.step()
    m = torch.rand(5, 3) > 0.5
    touched = M.zero_optimizer_state_([opt], {"p": p}, {"p": m})
    st = opt.state[p]
    assert touched == 2
    assert torch.all(st["exp_avg"][~m] == 0) and torch.all(st["exp_avg_sq"][~m] == 0)
    assert torch.all(st["exp_avg"][m] != 0)
    M.zero_optimizer_state_([opt], {"p": p}, {"p": m}, reset_kept={"p": True})
    assert torch.all(st["exp_avg"] == 0) and float(st["step"]) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_pruned_entries_become_exactly_zero_even_when_not_finite(dtype):
    """nan * 0 is NaN: masking sets pruned entries to 0.0 and leaves kept ones bit for bit."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 7, generator=g).to(dtype)
    w.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, float("nan"), 1.0]).to(dtype)
    mask = torch.rand(6, 7, generator=g) > 0.5
    mask.view(-1)[:6] = torch.tensor([False, False, False, False, True, True])
    for masks in ({"w": mask}, {"w": M.multiplier(mask, w)}):  # bool masks and the per-step multiplier
        p = torch.nn.Parameter(w.clone())
        p.grad = w.clone() * float("inf")  # inf gradients, NaN where w was 0 or NaN
        M.apply_masks_({"w": p}, masks)
        M.mask_grads_({"w": p}, masks)
        for t in (p.detach(), p.grad):
            assert torch.all(t[~mask] == 0) and not torch.any(torch.signbit(t[~mask]))  # +0.0 exactly
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
        assert torch.equal(p.detach()[mask].view(bits), w[mask].view(bits))  # kept: bit for bit
