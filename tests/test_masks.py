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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_multiplier_has_the_weight_dtype_and_zeroes_exactly_what_the_mask_prunes(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g).to(dtype)
    mask = torch.rand(5, 7, generator=g) > 0.6
    mult = M.multiplier(mask, w)
    assert mult.dtype == dtype and mult.shape == mask.shape
    by_bool, by_mult = {"w": w.clone()}, {"w": w.clone()}
    M.apply_masks_(by_bool, {"w": mask})
    M.apply_masks_(by_mult, {"w": mult})
    assert torch.equal(by_bool["w"], by_mult["w"])
    assert torch.all(by_mult["w"][~mask] == 0) and torch.equal(by_mult["w"][mask], w[mask])
