"""N:M patterns: selection against brute force, OBS against enumerated masks, every criterion in training."""

from __future__ import annotations

import itertools

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, make_trainer
from lightning.pytorch.callbacks import Callback
from sparsegpt_reference import sparsegpt_reference
from test_engine import FrozenChecker
from test_obs import loss, problem, refit
from torch import nn

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning, prune
from lightning_prune.engine.selection import UnreachableSparsity
from lightning_prune.patterns import NM, UNSTRUCTURED, parse_pattern
from lightning_prune.solvers.obc import blocked_prune, obc_prune, prepare_hessian, sparsegpt_prune


def per_group(keep: torch.Tensor, m: int) -> torch.Tensor:
    """Zeros in each group of ``m`` consecutive entries of each row of a (rows, d) mask."""
    return (~keep).reshape(keep.shape[0], -1, m).sum(2)


# ---------------------------------------------------------------- parsing and refusals
def test_parse_pattern():
    assert parse_pattern("unstructured") is UNSTRUCTURED
    assert parse_pattern("2:4") == NM(2, 4) and parse_pattern(" 4 : 8 ") == NM(4, 8)
    assert str(NM(2, 4)) == "2:4" and NM(2, 4).sparsity == 0.5
    with pytest.raises(ValueError, match=r"`ramp` must be one of \('capped', 'groups'\), got 'fast'"):
        NM(2, 4, ramp="fast")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pattern="2-4"), r"`pattern` must be 'unstructured', 'channels' or 'N:M' \(e.g. '2:4'\), got '2-4'"),
        (dict(pattern="4:4"), r"`pattern='4:4'` needs 0 < N < M"),
        (dict(pattern="0:4"), r"`pattern='0:4'` needs 0 < N < M"),
        (dict(target=0.7, pattern="2:4"), r"target=0.7 contradicts pattern='2:4'.*pass target=0.5"),
        (dict(target=0.75, pattern="3:4", min_density=0.3), r"min_density=0.3 cannot hold under pattern='3:4'"),
    ],
)
@pytest.mark.parametrize("cls", [MagnitudePruning, OBDPruning, OBSPruning])
def test_bad_patterns_are_refused_at_construction(cls, kwargs, match):
    kwargs = {"target": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        cls(verbose=0, **kwargs)


def test_layers_whose_input_is_not_a_multiple_of_m_are_named_unless_excluded():
    net = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    data = [torch.randn(4, 10) for _ in range(2)]
    with pytest.raises(ValueError, match=r"not a multiple of 4: \['0.weight \(input dimension 10\)'\].*exclude"):
        prune(net, data, MagnitudePruning(0.5, pattern="2:4", verbose=0))
    assert torch.all(net[0].weight != 0)  # refused before any work
    pruner = MagnitudePruning(0.5, pattern="2:4", exclude=["0.*"], verbose=0)
    prune(net, data, pruner, num_batches=2)
    assert torch.all(per_group(pruner.masks["2.weight"], 4) == 2)


def test_conv_groups_run_along_the_unfolded_input_and_hf_conv1d_along_its_rows():
    from transformers.pytorch_utils import Conv1D

    conv, c1d = nn.Conv2d(2, 3, 2), Conv1D(6, 8)  # conv: in 2*2*2 = 8; Conv1D: weight (8 in, 6 out)
    net = nn.ModuleDict({"conv": conv, "c1d": c1d})
    pruner = MagnitudePruning(0.5, pattern="2:4", verbose=0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = net

        def forward(self, x):
            return self.m["conv"](x).sum() + self.m["c1d"](x.flatten(1)[:, :8]).sum()

    prune(Net(), [torch.randn(2, 2, 3, 3)], pruner, num_batches=1)
    conv_mask = pruner.masks["m.conv.weight"]
    assert torch.all(per_group(conv_mask.reshape(3, -1), 4) == 2)
    c1d_mask = pruner.masks["m.c1d.weight"]  # stored in x out: groups of 4 input rows per output column
    assert torch.all(per_group(c1d_mask.T, 4) == 2)
    with pytest.raises(ValueError, match=r"'0.weight \(input dimension 18\)'"):
        prune(nn.Sequential(nn.Conv2d(2, 3, 3)), [torch.randn(1, 2, 4, 4)], MagnitudePruning(0.5, pattern="2:4"))


# ---------------------------------------------------------------- selection
def _capped_brute_force(score: torch.Tensor, k: int, n: int, m: int) -> float:
    """Lowest total score of ``k`` entries with at most ``n`` in any group."""
    flat = score.flatten()
    best = float("inf")
    for chosen in itertools.combinations(range(flat.numel()), k):
        pruned = torch.zeros(flat.numel(), dtype=torch.bool)
        pruned[list(chosen)] = True
        if int(pruned.view(score.shape[0], -1, m).sum(2).max()) <= n:
            best = min(best, float(flat[list(chosen)].sum()))
    return best


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_capped_selection_is_the_exact_minimum_under_the_group_cap(k):
    g = torch.Generator().manual_seed(k)
    score = torch.rand(2, 8, generator=g, dtype=torch.float64)
    keep = NM(2, 4).select({"a": score}, {"a": torch.ones(2, 8, dtype=torch.bool)}, k / 16)["a"]
    assert int((~keep).sum()) == k and int(per_group(keep, 4).max()) <= 2
    assert float(score[~keep].sum()) == pytest.approx(_capped_brute_force(score, k, 2, 4), abs=1e-12)


def test_groups_ramp_completes_the_cheapest_groups():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(3, 8, generator=g, dtype=torch.float64)  # 6 groups of 4
    keep = NM(2, 4, "groups").select({"a": score}, {"a": torch.ones(3, 8, dtype=torch.bool)}, 0.25)["a"]
    zeros = per_group(keep, 4).flatten()
    assert sorted(zeros.tolist()) == [0, 0, 0, 2, 2, 2]  # half the groups complete, the others dense
    cost = torch.sort(score.reshape(3, 2, 4), dim=2).values[:, :, :2].sum(2).flatten()
    assert set(torch.nonzero(zeros == 2).flatten().tolist()) == set(torch.argsort(cost)[:3].tolist())
    inside = score.reshape(6, 4)[zeros == 2]  # each complete group lost its two lowest
    assert torch.equal((~keep).reshape(6, 4)[zeros == 2], inside <= torch.sort(inside, 1).values[:, 1:2])


@pytest.mark.parametrize("ramp", ["capped", "groups"])
@pytest.mark.parametrize("scope", ["global", "layer", "row"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_every_round_keeps_the_pattern_and_the_last_completes_it(ramp, scope, nm):
    n, m = nm
    pattern = NM(n, m, ramp)
    g = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(6, 16, generator=g), "b": 3 * torch.rand(4, 8, generator=g)}
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in scores.items()}
    for s in (0.3 * n / m, 0.7 * n / m, n / m):
        new = pattern.select(scores, masks, s, scope=scope)
        for name, keep in new.items():
            assert torch.all(keep <= masks[name])  # only shrinks
            assert int(per_group(keep, m).max()) <= n
        masks = new
    for keep in masks.values():
        assert torch.all(per_group(keep, m) == n)


def test_masks_that_break_the_pattern_are_refused_and_nonfinite_scores_never_pruned():
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, :3] = False  # 3 zeros in one group
    with pytest.raises(ValueError, match=r"groups of 4 with up to 3 zeros, more than pattern='2:4' allows"):
        NM(2, 4).select({"a": torch.rand(2, 8)}, {"a": keep}, 0.5)
    score = torch.rand(2, 8)
    score[1, 4:7] = float("nan")  # only one finite entry in that group: 2:4 is unreachable
    with pytest.raises(UnreachableSparsity, match="the pattern keeps"):
        NM(2, 4).select({"a": score}, {"a": torch.ones(2, 8, dtype=torch.bool)}, 0.5)


# ---------------------------------------------------------------- OBS against enumerated masks
def _all_row_masks(d: int, n: int, m: int) -> list[torch.Tensor]:
    groups = [list(itertools.combinations(range(m), n))] * (d // m)
    out = []
    for choice in itertools.product(*groups):
        pruned = torch.zeros(d, dtype=torch.bool)
        for gi, cols in enumerate(choice):
            pruned[[gi * m + c for c in cols]] = True
        out.append(pruned)
    return out


def _row_losses(X, Y, W) -> torch.Tensor:
    return 0.5 * ((X @ W.T - Y) ** 2).mean(0)


def test_exact_obs_1_of_4_is_the_brute_force_optimum():
    """One removal per group of one: greedy OBS is exact, so it must find the best of the 4 masks."""
    X, Y, W, H = problem(d=4, rows=8, seed=2)
    U, W1, _, _ = prepare_hessian(H, W, 1e-12, "t")
    quotas = torch.ones(8, 1, dtype=torch.long)
    W_obs, pruned, _ = obc_prune(W1, U, quotas.sum(1), pruned_like(W), (4, quotas))
    ours = _row_losses(X, Y, W_obs)
    for r in range(8):
        brute = min(float(_row_losses(X, Y, refit(X, Y, ~p.expand(8, 4)))[r]) for p in _all_row_masks(4, 1, 4))
        assert float(ours[r]) == pytest.approx(brute, rel=1e-6)


def pruned_like(W):
    return torch.zeros_like(W, dtype=torch.bool)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (2, 3)])
def test_exact_obs_2_of_4_refits_its_support_and_beats_magnitude(nm):
    """Every N:M mask of an 8- or 6-column row enumerated and refitted: the exact solver's weights
    are the refit on its own support, never better than the best mask, and better than the
    magnitude N:M support refitted; it finds the best mask in most rows."""
    n, m = nm
    d, rows = 2 * m, 40
    X, Y, W, H = problem(d=d, rows=rows, seed=3, corr=1.0)
    U, W1, _, _ = prepare_hessian(H, W, 1e-12, "t")
    quotas = torch.full((rows, 2), n)
    W_obs, pruned, _ = obc_prune(W1, U, quotas.sum(1), pruned_like(W), (m, quotas))
    assert torch.all(per_group(~pruned, m) == n)
    torch.testing.assert_close(W_obs, refit(X, Y, ~pruned), rtol=1e-6, atol=1e-8)
    ours = _row_losses(X, Y, W_obs)
    best = torch.full((rows,), float("inf"), dtype=torch.float64)
    for p in _all_row_masks(d, n, m):
        best = torch.minimum(best, _row_losses(X, Y, refit(X, Y, ~p.expand(rows, d))))
    assert torch.all(ours >= best - 1e-10)
    magnitude = NM(n, m).select({"w": W.abs()}, {"w": ~pruned_like(W)}, n / m, scope="row")["w"]
    mag = _row_losses(X, Y, refit(X, Y, magnitude))
    assert float(ours.sum()) < float(mag.sum())
    assert float((ours <= best + 1e-9).double().mean()) > 0.6


@pytest.mark.parametrize("solver", ["blocked", "fast"])
def test_blocked_and_fast_keep_the_pattern_and_stay_close_to_exact(solver):
    X, Y, W, H = problem(n=600, d=48, rows=16, seed=4, corr=1.0)
    U, W1, _, _ = prepare_hessian(H, W, 0.01, "t")
    quotas, forced = torch.full((16, 12), 2), pruned_like(W)
    forced[3, 5] = forced[7, 40] = True  # earlier rounds' zeros count towards their group's quota
    exact, p_exact, _ = obc_prune(W1, U, quotas.sum(1), forced, (4, quotas))
    if solver == "blocked":
        out, pruned, _ = blocked_prune(W1, U, quotas.sum(1), forced, 10, (4, quotas))  # block cut to 8
    else:
        out, pruned, _ = sparsegpt_prune(W1, U, quotas.sum(1), forced, 10, groups=(4, quotas))
    assert torch.all(per_group(~pruned, 4) == 2) and torch.all(pruned[forced]) and torch.all(out[pruned] == 0)
    # compensation flows only to later columns (blocked: later blocks), so they trail the exact solver
    # but must beat magnitude 2:4 by far: 103.4 for magnitude, 47.4 exact, 70.9 blocked, 72.5 fast
    magnitude = W * NM(2, 4).select({"w": W.abs()}, {"w": ~forced}, 0.5, scope="row")["w"]
    assert loss(X, Y, exact) < loss(X, Y, out) < 0.8 * loss(X, Y, magnitude)


def test_fast_n_m_is_sparsegpts_prunen_prunem_reference():
    """``groups`` reproduces SparseGPT's fasterprune with prunen=2, prunem=4 (written out here): at the
    first column of each group, the 2 lowest w^2 / U_jj^2 from the weights as compensated so far."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(400, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    W0 = torch.randn(10, 24, generator=g, dtype=torch.float64)
    U, W, _, _ = prepare_hessian(X.T @ X / 400, W0, 0.01, "layer")
    quotas = torch.full((10, 6), 2)
    ours, pruned, _ = sparsegpt_prune(W, U, quotas.sum(1), pruned_like(W), blocksize=8, groups=(4, quotas))

    def groups_of_4(W1, U1, i, m1, b):
        if i % 4 == 0:
            tmp = W1[:, i : i + 4] ** 2 / torch.diagonal(U1)[i : i + 4] ** 2
            m1.scatter_(1, i + torch.topk(tmp, 2, dim=1, largest=False)[1], True)

    ref, mask = sparsegpt_reference(W, U, 8, groups_of_4)
    assert torch.equal(pruned, mask)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_obs_round_on_least_squares_is_2_4_and_beats_magnitude():
    X, Y, W, _ = problem(n=400, d=16, rows=6, seed=6, corr=1.0)
    data = [(X[i : i + 100].float(), Y[i : i + 100].float()) for i in range(0, 400, 100)]

    def make():
        lin = nn.Linear(16, 6, bias=False)
        with torch.no_grad():
            lin.weight.copy_(W)
        return lin

    def fn(model, batch):
        return 0.5 * ((model(batch[0]) - batch[1]) ** 2).sum(1).mean()

    results = {}
    for name, pruner in {
        "obs": OBSPruning(0.5, pattern="2:4", allocation="reconstruction", scope="layer", solver="exact", verbose=0),
        "magnitude": MagnitudePruning(0.5, pattern="2:4", verbose=0),
    }.items():
        lin = make()
        prune(lin, data, pruner, loss_fn=fn, num_batches=4)
        assert torch.all(per_group(pruner.masks["weight"], 4) == 2)
        results[name] = loss(X.float(), Y.float(), lin.weight.detach())
    assert results["obs"] < 0.8 * results["magnitude"]


# ---------------------------------------------------------------- every criterion, in training
class PatternChecker(Callback):
    """After every training batch: at most N pruned entries per group (the capped ramp), and every
    pruned entry exactly 0. A kept weight may be 0.0 too: OBS zeroes the weights of inputs that are
    dead on the round's batches (OBC/SparseGPT), and a dead input's weight gets no gradient."""

    def __init__(self, pruner, n: int, m: int):
        self.pruner, self.n, self.m, self.rounds = pruner, n, m, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.pruner.history:  # no masks before the first round
            return
        for t in self.pruner.targets:
            mask = t.matrix(self.pruner.masks[t.name])
            assert int(per_group(mask, self.m).max()) <= self.n
            assert torch.all(t.matrix(t.param.detach())[~mask] == 0)
        self.rounds = len(self.pruner.history)


@pytest.mark.parametrize(
    "make",
    [
        lambda num_batches, **kw: MagnitudePruning(**kw),
        lambda **kw: OBDPruning(curvature="fisher", **kw),
        lambda **kw: OBSPruning(**kw),
        lambda **kw: OBSPruning(hessian="fisher", block_size=16, **kw),
        lambda **kw: OBSPruning(hessian="kfac", **kw),
    ],
    ids=["magnitude", "obd", "obs-layerwise", "obs-fisher", "obs-kfac"],
)
def test_gradual_n_m_training_with_every_criterion(make):
    pl.seed_everything(0, verbose=False)
    model = TinyNet()
    pruner = make(target=0.5, pattern="2:4", start_epoch=0, end_epoch=2, num_batches=4, verbose=0)
    checks = [FrozenChecker(pruner), PatternChecker(pruner, 2, 4)]
    make_trainer(max_epochs=5, callbacks=[pruner, *checks]).fit(model)
    assert [r["pattern"] for r in pruner.history] == ["2:4"] * 3
    sparsities = [r["sparsity"] for r in pruner.history]
    assert sparsities[0] < sparsities[1] < sparsities[2] == pytest.approx(0.5)
    for t in pruner.targets:
        assert torch.all(per_group(t.matrix(pruner.masks[t.name]), 4) == 2), t.name
        assert torch.all(per_group(t.matrix(t.param.detach() != 0), 4) >= 2)  # still 2:4 after fine-tuning


def test_restored_unstructured_masks_are_refused_by_an_n_m_pruner():
    pl.seed_everything(0, verbose=False)
    model = TinyNet()
    first = MagnitudePruning(0.5, verbose=0)
    prune(model, model.train_dataloader(), first, num_batches=1)
    second = MagnitudePruning(0.5, pattern="2:4", verbose=0)
    second.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match=r"restored mask of 'net.0.weight' has groups of 4 with up to [34] zeros"):
        second.bind(model)


# ---------------------------------------------------------------- export to semi-structured kernels
def _two_four_mlp(dtype=torch.float16, d=64, hidden=128) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d), nn.Linear(d, 8))
    pruner = MagnitudePruning(0.5, pattern="2:4", exclude=["3.*"], verbose=0)
    prune(net, [torch.randn(4, d)], pruner, num_batches=1)
    return net.to(dtype)


def test_export_refuses_what_the_kernels_cannot_take_and_converts_nothing():
    from lightning_prune import export_semi_structured

    net = _two_four_mlp()
    before = {n: p for n, p in net.named_parameters()}
    with pytest.raises(RuntimeError, match=r"CUDA GPUs only, and '0' ... is on \['cpu'\].*Nothing was converted"):
        export_semi_structured(net)
    with pytest.raises(ValueError, match=r"not 2:4 sparse: \['3'\]"):
        export_semi_structured(net, include=["0", "3"])
    with pytest.raises(ValueError, match=r"not nn.Linear: \['1'\]"):
        export_semi_structured(net, include=["1"])
    with pytest.raises(ValueError, match=r"layer '0' is torch.float32; 2:4 kernels take"):
        export_semi_structured(_two_four_mlp(torch.float32))
    with pytest.raises(ValueError, match=r"no nn.Linear of Sequential has 2:4-sparse weights"):
        export_semi_structured(nn.Sequential(nn.Linear(64, 64)).half())
    small = nn.Sequential(nn.Linear(8, 8)).half()
    with torch.no_grad():
        small[0].weight[:, ::2] = 0
    with pytest.raises(ValueError, match=r"layer '0' has weight shape \(8, 8\); 2:4 kernels need multiples of"):
        export_semi_structured(small)
    assert all(p is before[n] for n, p in net.named_parameters())  # nothing was touched


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # a string is iterated as its characters: include="*2" would take every module ("*")
        ({"include": "*2"}, r"`include` must be a list of glob patterns, got the string '\*2': pass \['\*2'\]"),
        ({"exclude": "3"}, r"`exclude` must be a list of glob patterns, got the string '3'"),
        # a pattern that matches nothing (a typo) leaves the layer it meant converted, or not
        ({"exclude": ["3", "lm_haed"]}, r"`exclude` pattern 'lm_haed' matches no module of Sequential"),
        ({"include": ["0", "9"]}, r"`include` pattern '9' matches no module of Sequential"),
        ({"include": ["0"], "exclude": ["0"]}, r"`exclude=\['0'\]` leaves none of the 1 2:4-sparse Linear layers"),
        ({"check_rows": 0}, r"`check_rows=0`: each converted layer is verified on at least 1 row"),
    ],
)
def test_export_refuses_arguments_that_would_convert_other_layers_or_skip_the_check(kwargs, message, monkeypatch):
    from lightning_prune.surgery import export

    monkeypatch.setattr(export, "_check_device", lambda weights, names: None)  # past the GPU check, as on a GPU
    monkeypatch.setattr(export, "_to_sparse", lambda w: w.clone())
    net = _two_four_mlp()
    before = {n: p for n, p in net.named_parameters()}
    with pytest.raises(ValueError, match=message):
        export.export_semi_structured(net, **kwargs)
    assert all(p is before[n] for n, p in net.named_parameters())


def test_export_replaces_and_verifies_each_layer_and_restores_on_mismatch(monkeypatch):
    """The conversion itself needs a GPU (tests/test_gpu.py); here it is stood in for, to check the
    replacement, the output check and the restore."""
    from lightning_prune.surgery import export

    monkeypatch.setattr(export, "_check_device", lambda weights, names: None)
    monkeypatch.setattr(export, "_to_sparse", lambda w: w.clone())
    net = _two_four_mlp(torch.bfloat16)
    assert export.export_semi_structured(net) == ["0", "2"]
    assert not net[0].weight.requires_grad and net[3].weight.requires_grad  # the dense head is left alone

    net = _two_four_mlp(torch.bfloat16)
    before = {n: p for n, p in net.named_parameters()}
    calls = []

    def corrupt(w):
        calls.append(w)
        return w * (1.0 if len(calls) == 1 else 1.5)  # the second layer comes back wrong

    monkeypatch.setattr(export, "_to_sparse", corrupt)
    with pytest.raises(RuntimeError, match=r"layer '2': the semi-structured weight's outputs differ .* restored"):
        export.export_semi_structured(net)
    assert all(p is before[n] for n, p in net.named_parameters())


def test_export_names_2_4_layers_it_cannot_serve():
    from transformers.pytorch_utils import Conv1D

    from lightning_prune import export_semi_structured

    net = nn.Sequential(Conv1D(8, 16))
    with torch.no_grad():
        net[0].weight[::2] = 0  # weight is in x out: every other input row zero
    with pytest.raises(ValueError, match=r"\['0'\] are 2:4 but not nn.Linear .*Conv1D"):
        export_semi_structured(net.half())
