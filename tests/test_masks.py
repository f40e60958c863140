import pytest
import torch

from lightning_prune.engine import masks as M


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
    assert torch.all(st["exp_avg_sq"][~m] == 0) and torch.all(st["exp_avg_sq"][m] != 0)  # a scale: kept


def _adam_steps_after_reset(reset_all: bool, lr: float = 0.01, g: float = 0.5) -> list[float]:
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))  # float64: steps of 1e-3 read to 1e-12
    opt = torch.optim.Adam([p], lr=lr)
    for _ in range(2000):
        p.grad = torch.full((4,), g, dtype=torch.float64)
        opt.step()
    if reset_all:  # what "reset" did before: every moment zeroed, the step count running on
        for v in opt.state[p].values():
            if v.shape == p.shape:
                v.zero_()
    else:
        M.zero_optimizer_state_([opt], {"p": p}, {"p": torch.ones(4, dtype=torch.bool)}, reset_kept={"p": True})
    steps = []
    for _ in range(50):
        before = p.detach().clone()
        p.grad = torch.full((4,), g, dtype=torch.float64)
        opt.step()
        steps.append(float((p.detach() - before).abs().max()))
    return steps


def test_reset_after_a_move_keeps_adams_steps_within_the_learning_rate():
    """A weight OBS moved restarts its momentum, not its scale: with exp_avg_sq kept, Adam's next
    step is (1 - beta1) * lr (m = 0.1 g, v_hat = g^2 after 2000 steps of g) and none exceeds lr;
    zeroing exp_avg_sq as well gives steps of several times lr while v refills."""
    lr, b1, b2, t = 0.01, 0.9, 0.999, 2000
    steps = _adam_steps_after_reset(reset_all=False, lr=lr)
    v_hat = (b2 * (1 - b2**t) + (1 - b2)) / (1 - b2 ** (t + 1))  # in units of g^2
    m_hat = (1 - b1) / (1 - b1 ** (t + 1))
    assert steps[0] == pytest.approx(lr * m_hat / (v_hat**0.5 + 1e-8 / 0.5), rel=1e-4)
    assert max(steps) <= lr * (1 + 1e-6)
    assert max(_adam_steps_after_reset(reset_all=True, lr=lr)) > 3 * lr


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
