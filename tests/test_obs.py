"""OBS against closed forms: least squares (H = X^T X / n exactly) and brute force on tiny problems."""

from __future__ import annotations

import copy
import itertools

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from sparsegpt_reference import sparsegpt_reference
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import OBSPruning
from lightning_prune.engine.targets import resolve_targets
from lightning_prune.solvers.blockfisher import block_set_update
from lightning_prune.solvers.kronecker import DENSE_MAX, kfac_set_update
from lightning_prune.solvers.linalg import damped_cholesky
from lightning_prune.solvers.obc import (
    LAYER_BUDGET,
    blocked_prune,
    choose_solvers,
    obc_prune,
    prepare_hessian,
    single_saliency,
    solver_work,
    sparsegpt_prune,
)
from lightning_prune.stats.blockfisher import BlockFisher
from lightning_prune.stats.estimators import _chunks, per_sample_grads

TINY = 1e-12


def problem(n=200, d=12, rows=5, seed=0, corr=0.5, dtype=torch.float64):
    """Correlated Gaussian inputs, targets from a random linear map plus noise, W = least-squares fit."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + corr * torch.randn(d, d, generator=g) / d**0.5
    X = (torch.randn(n, d, generator=g) @ mix).to(dtype)
    Y = X @ torch.randn(d, rows, generator=g, dtype=dtype) + 0.1 * torch.randn(n, rows, generator=g, dtype=dtype)
    W = torch.linalg.lstsq(X, Y).solution.T  # (rows, d)
    return X, Y, W, X.T @ X / n


def loss(X, Y, W):
    return float(0.5 * ((X @ W.T - Y) ** 2).sum(1).mean())


def refit(X, Y, keep):
    """Least-squares refit of each row on its kept support."""
    W = torch.zeros(keep.shape, dtype=X.dtype)
    for r in range(keep.shape[0]):
        K = keep[r].nonzero().flatten()
        if len(K):
            W[r, K] = torch.linalg.lstsq(X[:, K], Y[:, r : r + 1]).solution.flatten()
    return W


def test_single_weight_saliency_equals_brute_force_refit():
    X, Y, W, H = problem()
    U, _, _, _ = prepare_hessian(H, W, TINY, "test")
    sal = single_saliency(W, U)
    base = loss(X, Y, W)
    for r, q in itertools.product(range(W.shape[0]), range(W.shape[1])):
        keep = torch.ones_like(W, dtype=torch.bool)
        keep[r, q] = False
        brute = loss(X, Y, refit(X, Y, keep)) - base
        assert sal[r, q] == pytest.approx(brute, rel=1e-6, abs=1e-12)


def test_exact_round_equals_least_squares_refit_and_beats_magnitude():
    X, Y, W, H = problem(d=16, rows=6)
    U, _, _, _ = prepare_hessian(H, W, TINY, "test")
    counts = torch.tensor([3, 5, 8, 10, 12, 14])
    forced = torch.zeros_like(W, dtype=torch.bool)
    W_obs, pruned, losses = obc_prune(W, U, counts, forced)
    assert torch.equal(pruned.sum(1), counts)
    ref = refit(X, Y, ~pruned)
    assert float((W_obs - ref).norm() / ref.norm()) < 1e-4
    assert torch.all(W_obs[pruned] == 0)
    base = loss(X, Y, W)
    assert float(losses.sum()) == pytest.approx(loss(X, Y, W_obs) - base, rel=1e-6)
    mag_keep = torch.ones_like(pruned)
    for r, c in enumerate(counts):
        mag_keep[r, W[r].abs().argsort()[: int(c)]] = False
    assert loss(X, Y, W_obs) <= loss(X, Y, refit(X, Y, mag_keep)) + 1e-12


def _plain_greedy(W, U, counts, forced, groups=None):
    """The textbook loop, one row at a time: remove the lowest ``w_q^2 / [H^-1]_qq`` (forced first,
    closed groups skipped), ``w -= w_q / M_qq M[:, q]``, ``M -= M[:, q] M[q, :] / M_qq``."""
    W, pruned = W.clone(), torch.zeros_like(forced)
    for r in range(W.shape[0]):
        M, w = U.T @ U, W[r]
        for _ in range(int(max(counts[r], forced[r].sum()))):
            score = w**2 / torch.diagonal(M)
            score[pruned[r]] = torch.inf
            if groups is not None:
                m, quota = groups
                full = pruned[r].view(-1, m).sum(1) >= quota[r]
                score[full.repeat_interleave(m)] = torch.inf
            score[forced[r] & ~pruned[r]] = -torch.inf
            q = int(score.argmin())
            mq = M[:, q].masked_fill(pruned[r], 0.0)
            w -= w[q] / M[q, q] * mq
            M -= torch.outer(mq, mq) / M[q, q]
            w[q], pruned[r, q] = 0.0, True
    return W, pruned


@pytest.mark.parametrize("seed", range(4))
def test_exact_solver_makes_the_plain_greedy_choices(seed):
    """Deferred downdates, rows set aside and the shrinking inverse change the arithmetic, not the
    choices: the same masks and weights as the one-row rank-1 loop, with ragged counts (0 to the
    whole row), forced entries and N:M quotas."""
    g = torch.Generator().manual_seed(seed)
    X, Y, W, H = problem(n=400, d=72, rows=9, seed=seed, corr=1.0)
    U, W, _, _ = prepare_hessian(H, W, 1e-3, "test")
    counts = torch.randint(0, 73, (9,), generator=g)
    counts[:2] = torch.tensor([0, 72])
    forced = (torch.rand(W.shape, generator=g) < 0.15) & (counts[:, None] > 20)
    for groups in (None, (4, torch.randint(0, 5, (9, 18), generator=g))):
        if groups is not None:
            forced = torch.zeros_like(forced)
            counts = groups[1].sum(1)
        ref_W, ref_pruned = _plain_greedy(W, U, counts, forced, groups)
        new_W, new_pruned, _ = obc_prune(W, U, counts, forced, groups)
        assert torch.equal(new_pruned, ref_pruned)
        assert torch.allclose(new_W, ref_W, atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_removal_costs_rank_each_rows_greedy_removals_first(seed):
    """Whatever count c a row is given, the greedy's c removals are the row's c lowest costs (ties
    allowed), and the costs grow along the removal order, so a global threshold on them hands each
    row a count of the greedy's own choosing; forced entries cost nothing and go first."""
    from lightning_prune.solvers.obc import removal_costs

    g = torch.Generator().manual_seed(seed)
    X, Y, W, H = problem(n=300, d=24, rows=6, seed=seed, corr=1.0)
    U, W, _, _ = prepare_hessian(H, W, 1e-6, "test")
    forced = torch.rand(W.shape, generator=g) < 0.2
    W = W.masked_fill(forced, 0.0)
    cost = removal_costs(W, U, forced)
    assert torch.all(cost[forced] == 0) and torch.all(cost[~forced] >= 0)
    for c in range(int(forced.sum(1).max()), 25):
        counts = torch.maximum(torch.full((6,), c), forced.sum(1))
        _, pruned, losses = obc_prune(W, U, counts, forced)
        for r in range(6):
            if 0 < int(counts[r]) < 24:
                assert float(cost[r][pruned[r]].max()) <= float(cost[r][~pruned[r]].min())
            # the largest cost so far bounds each removal's loss: the summed losses never exceed c x it
            assert float(losses[r]) <= float(cost[r][pruned[r]].max()) * int(counts[r]) + 1e-12


def test_forced_weights_stay_pruned_and_still_constrain_the_refit():
    X, Y, W, H = problem(d=10, rows=3)
    forced = torch.zeros_like(W, dtype=torch.bool)
    forced[:, :3] = True
    W = W.clone()
    W[forced] = 0.0
    U, _, _, _ = prepare_hessian(H, W, TINY, "test")
    for solver in (obc_prune, blocked_prune, sparsegpt_prune):
        W_new, pruned, _ = solver(W, U, torch.tensor([6, 6, 6]), forced)
        assert torch.all(pruned[forced]) and torch.equal(pruned.sum(1), torch.tensor([6, 6, 6]))
        assert torch.all(W_new[pruned] == 0)


@pytest.mark.parametrize("seed,sparsity", [(0, 0.5), (1, 0.5), (2, 0.9), (3, 0.9)])
def test_fast_solvers_close_to_exact_on_random_problems(seed, sparsity):
    """Measured on i.i.d. random problems (the issue asked for 1%; see benchmarks/RESULTS.md):
    blocked OBS loses only cross-block compensation (1-2.5% above exact), SparseGPT's column sweep
    also the within-block backward compensation (2-5%). Both recover most of what magnitude loses."""
    X, Y, W, H = problem(n=4000, d=256, rows=64, seed=seed, corr=0.0)
    U, _, _, _ = prepare_hessian(H, W, 1e-6, "test")
    counts = torch.full((64,), int(sparsity * 256))
    forced = torch.zeros_like(W, dtype=torch.bool)
    base = loss(X, Y, W)
    exact = loss(X, Y, obc_prune(W, U, counts, forced)[0]) - base
    blocked = loss(X, Y, blocked_prune(W, U, counts, forced, blocksize=128)[0]) - base
    fast = loss(X, Y, sparsegpt_prune(W, U, counts, forced, blocksize=128)[0]) - base
    one_block = loss(X, Y, blocked_prune(W, U, counts, forced, blocksize=256)[0]) - base
    kth = W.abs().kthvalue(int(counts[0]), dim=1, keepdim=True).values
    magnitude = loss(X, Y, W * (W.abs() > kth)) - base
    assert exact <= blocked <= exact * 1.025
    assert exact <= fast <= exact * 1.05
    assert blocked < magnitude - 0.5 * (magnitude - exact)  # recovers most of what compensation can
    assert fast < magnitude
    assert one_block == pytest.approx(exact, rel=1e-9)  # one block is OBC


def test_sparsegpt_is_block_size_invariant_for_a_fixed_mask():
    """Lazy batch updates are an implementation detail: with the mask fixed (all forced), every
    block size gives the same weights and the predicted loss equals the actual one."""
    X, Y, W, H = problem(n=500, d=64, rows=8, corr=1.0)
    U, _, _, _ = prepare_hessian(H, W, 1e-9, "test")
    forced = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    outs = [sparsegpt_prune(W, U, forced.sum(1), forced, blocksize=b) for b in (1, 8, 64)]
    for w, _, _ in outs[1:]:
        torch.testing.assert_close(w, outs[0][0])
    assert float(outs[0][2].sum()) == pytest.approx(loss(X, Y, outs[0][0]) - loss(X, Y, W), rel=1e-5)


def test_auto_solver_choice_scales_with_work():
    def choose(shape, count):
        work = solver_work(torch.zeros(shape), torch.full((shape[0],), count), 128)
        return choose_solvers([work], LAYER_BUDGET, per_layer=True)[0]

    assert choose((300, 784), 700) == "exact"  # ~10 s on 2 cores
    assert choose((1024, 1024), 512) == "blocked"
    assert choose((16, 150), 100) == "exact"
    assert choose((4096, 4096), 2048) == "fast"


def test_round_budget_upgrades_the_cheapest_layers_first_and_never_exceeds_it():
    works = [
        solver_work(torch.zeros(10, 100), torch.full((10,), 90), 128),  # exact 3.3e6
        solver_work(torch.zeros(100, 300), torch.full((100,), 270), 128),  # blocked 1.6e8, exact 9.0e8
        solver_work(torch.zeros(300, 784), torch.full((300,), 700), 128),  # blocked 1.3e9, exact 4.8e10
    ]
    for budget, expected in (
        (1e6, ["fast", "fast", "fast"]),
        (5e8, ["exact", "blocked", "fast"]),
        (6e9, ["exact", "exact", "blocked"]),
    ):
        chosen = choose_solvers(works, budget)
        assert chosen == expected, budget
        assert sum(w[s] for w, s in zip(works, chosen)) <= budget
    # a round's budget is shared: ten copies of a layer do not each get it
    assert choose_solvers([works[1]] * 10, 1e9).count("blocked") == 6


def test_gradual_rounds_spend_a_share_of_training_and_one_shot_keeps_the_layer_budget():
    """TinyNet: 256 samples an epoch, 1,536 weights -> a round may spend 0.25 * 3 * 1536 * 256 updates."""
    from conftest import TinyNet, make_trainer

    from lightning_prune import prune

    pl.seed_everything(0, verbose=False)
    gradual = OBSPruning(0.8, num_batches=4, verbose=0)
    make_trainer(max_epochs=4, callbacks=[gradual]).fit(TinyNet())
    assert all(r["info"]["solver"] != "exact" for r in gradual.history)  # net.2's exact work exceeds the share
    pl.seed_everything(0, verbose=False)
    model = TinyNet()
    assert (
        prune(model, model.train_dataloader(), OBSPruning(0.8, num_batches=4, verbose=0))["info"]["solver"] == "exact"
    )


def test_float32_and_float64_agree():
    X, Y, W, H = problem(d=32, rows=8, corr=0.2)
    counts = torch.full((8,), 16)
    forced = torch.zeros_like(W, dtype=torch.bool)
    out = {}
    for dtype in (torch.float32, torch.float64):
        U, W_, _, _ = prepare_hessian(H.to(dtype), W.to(dtype), 0.01, "test")
        out[dtype] = [
            obc_prune(W_, U, counts, forced),
            blocked_prune(W_, U, counts, forced, blocksize=8),
            sparsegpt_prune(W_, U, counts, forced, blocksize=8),
        ]
    for (w32, m32, _), (w64, m64, _) in zip(out[torch.float32], out[torch.float64]):
        assert torch.equal(m32, m64)
        torch.testing.assert_close(w32.double(), w64, rtol=1e-4, atol=1e-5)


def test_dead_inputs_and_rank_deficient_hessian_do_not_crash():
    X, Y, W, _ = problem(n=6, d=12, rows=4)  # n < d: rank-deficient
    X[:, 3] = 0.0  # a dead input
    H = X.T @ X / 6
    U, W_, damped, dead = prepare_hessian(H, W, 0.01, "test")
    assert dead.tolist().count(True) == 1 and torch.all(W_[:, 3] == 0)
    for solver in (obc_prune, blocked_prune, sparsegpt_prune):
        W_new, pruned, losses = solver(W_, U, torch.full((4,), 6), torch.zeros_like(W, dtype=torch.bool))
        assert torch.isfinite(W_new).all() and torch.isfinite(losses).all()
        assert torch.all(pruned[:, 3])  # free to remove: pruned first


def test_failed_cholesky_raises_damping_with_a_warning_and_never_falls_back():
    H = torch.diag(torch.tensor([1.0, 1.0, -0.2], dtype=torch.float64))  # indefinite, mean diag 0.6
    with pytest.warns(UserWarning, match="Cholesky of layer failed with damp=0.01; succeeded with damp=1"):
        d = damped_cholesky(H, 0.01, "layer")
    assert d.increases == 2 and d.damp == 1.0
    with pytest.raises(RuntimeError, match="not positive definite.*no silent fallback"):
        damped_cholesky(torch.full((3, 3), float("nan"), dtype=torch.float64), 0.01, "layer")


def test_only_the_failing_block_gets_more_damping():
    good = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    bad = torch.diag(torch.tensor([1.0, -0.2], dtype=torch.float64))  # indefinite
    with pytest.warns(UserWarning, match="succeeded with damp=1"):
        d = damped_cholesky(torch.stack([good, bad]), 0.01, "blocks")
    assert d.increases == 2 and d.damp == 1.0
    # the healthy block keeps exactly the requested damping: 0.01 * mean(diag) = 0.02
    torch.testing.assert_close(d.L[0] @ d.L[0].T, good + 0.02 * torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(d.L[1] @ d.L[1].T, bad + 0.4 * torch.eye(2, dtype=torch.float64))


def test_all_zero_block_is_damped_with_the_batch_scale_not_inverted_to_infinity():
    F = torch.stack([torch.eye(3, dtype=torch.float64) * 4.0, torch.zeros(3, 3, dtype=torch.float64)])
    d = damped_cholesky(F, 0.01, "blocks")
    Finv = torch.cholesky_inverse(d.L)
    assert torch.isfinite(Finv).all() and d.increases == 0
    torch.testing.assert_close(torch.diagonal(Finv[1]), torch.full((3,), 1 / 0.04, dtype=torch.float64))
    new, loss = block_set_update(
        torch.ones(2, 3, dtype=torch.float64), Finv, torch.tensor([[1, 0, 0], [1, 1, 0]]).bool()
    )
    assert torch.isfinite(new).all() and torch.isfinite(loss).all()


def test_block_set_update_is_the_constrained_minimum():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    F = M @ M.transpose(1, 2) + 0.5 * torch.eye(6, dtype=torch.float64)
    w = torch.randn(2, 6, generator=g, dtype=torch.float64)
    Z = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    new, block_loss = block_set_update(w, torch.linalg.inv(F), Z)
    for b in range(2):
        K = (~Z[b]).nonzero().flatten()
        # minimise 1/2 (v - w)^T F (v - w) with v_Z = 0  =>  v_K = w_K + F_KK^-1 F_KZ w_Z
        Zi = Z[b].nonzero().flatten()
        expected = torch.zeros(6, dtype=torch.float64)
        expected[K] = w[b, K] + torch.linalg.solve(F[b][K][:, K], F[b][K][:, Zi] @ w[b, Zi])
        torch.testing.assert_close(new[b], expected)
        d = new[b] - w[b]
        assert float(block_loss[b]) == pytest.approx(float(0.5 * d @ F[b] @ d))


def _kfac_reference(W, G, A, Z):
    """The set update from the explicit ``H = G (x) A``: refit the kept entries, ``(new W, loss)``."""
    H = torch.kron(G, A)  # row-major vec(W)
    z, w = Z.flatten(), W.flatten()
    K = (~z).nonzero().flatten()
    expected = torch.zeros_like(w)
    expected[K] = w[K] + torch.linalg.solve(H[K][:, K], H[K][:, z] @ w[z])
    d = expected - w
    return expected.view_as(W), float(0.5 * d @ H @ d)


@pytest.mark.parametrize("removed", [0.1, 0.5, 0.8, 1.0])  # 1.0: the whole layer
@pytest.mark.parametrize("dense_max", [0, DENSE_MAX])
def test_kfac_set_update_matches_dense_solve(removed, dense_max):
    """Every path (CG; the system over the removed entries; the one over the kept) is the exact update."""
    g = torch.Generator().manual_seed(0)
    A = (lambda m: m @ m.T + torch.eye(5, dtype=torch.float64))(torch.randn(5, 5, generator=g, dtype=torch.float64))
    G = (lambda m: m @ m.T + torch.eye(4, dtype=torch.float64))(torch.randn(4, 4, generator=g, dtype=torch.float64))
    W = torch.randn(4, 5, generator=g, dtype=torch.float64).T.contiguous().T  # strided, as HF Conv1D weights
    Z = torch.rand(4, 5, generator=g) < removed
    Ginv, Ainv = torch.linalg.inv(G), torch.linalg.inv(A)
    new, pred, iters, residual = kfac_set_update(W, G, A, Ginv, Ainv, Z, dense_max=dense_max)
    expected, loss = _kfac_reference(W, G, A, Z)
    torch.testing.assert_close(new, expected, rtol=1e-7, atol=1e-9)
    assert pred == pytest.approx(loss, rel=1e-7)
    direct = min(int(Z.sum()), int((~Z).sum())) <= dense_max  # with 0: only when every weight is removed
    assert iters == 0 if direct else 0 < iters < 50
    assert residual <= 1e-9


def test_kfac_set_update_solves_nearly_whole_layer_removals_directly():
    """Issue #31: late rounds remove most of a layer (the old zeros stay in the set), where CG on
    ``[H^-1]_ZZ`` needs ~sqrt(cond G cond A) iterations and stopped unconverged at its limit. With few
    weights kept, the system over the kept ones is solved directly: no CG iteration, the exact update."""
    g = torch.Generator().manual_seed(0)

    def factor(n, cond):  # SPD with eigenvalues spread log-uniformly over [1, cond]
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return Q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)) @ Q.T

    G, A = factor(20, 1e4), factor(80, 1e4)
    W = torch.randn(20, 80, generator=g, dtype=torch.float64)
    Z = torch.rand(20, 80, generator=g) < 0.95  # 1,520 removed, 80 kept
    W[torch.rand(20, 80, generator=g) < 0.8] = 0.0  # most removed entries were pruned before: w = 0
    Ginv, Ainv = torch.linalg.inv(G), torch.linalg.inv(A)
    new, pred, iters, residual = kfac_set_update(W, G, A, Ginv, Ainv, Z)
    expected, loss = _kfac_reference(W, G, A, Z)
    assert iters == 0 and residual == 0.0
    torch.testing.assert_close(new, expected, rtol=1e-7, atol=1e-9)
    assert pred == pytest.approx(loss, rel=1e-7)
    # CG on the same system (what was used before): 1,000 iterations, far from the update, and it says so
    cg, _, cg_iters, cg_residual = kfac_set_update(W, G, A, Ginv, Ainv, Z, dense_max=0)
    assert cg_iters == 1000 and cg_residual > 1e-9
    assert float((cg - expected).abs().max()) > 1e-3


def test_block_fisher_equals_woodbury_recursion():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2, bias=False)
    (t,) = resolve_targets(nn.Sequential(lin))
    est = BlockFisher([t], block_size=4)  # 6 weights -> blocks of 4 (+2 padding)
    x, gr = torch.randn(30, 1, 3), torch.randn(30, 1, 2)
    est.update(t.name, x, gr)
    grads = torch.cat([per_sample_grads(a, b).flatten(1) for a, b in _chunks(x, gr)]).double()
    lam, m = 0.1, grads.shape[0]
    Finv = torch.eye(4, dtype=torch.float64) / lam  # WoodFisher: start from (lam I)^-1, add g g^T / m
    for gn in torch.nn.functional.pad(grads, (0, 2))[:, :4]:
        v = Finv @ gn
        Finv = Finv - torch.outer(v, v) / (m + gn @ v)
    direct = torch.linalg.inv(est.blocks(t.name)[0] + lam * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(direct, Finv, rtol=1e-5, atol=1e-6)  # float32 sums


# ---------------------------------------------------------------- through the callback
N, D_IN, D_OUT = 256, 10, 4


class LeastSquares(pl.LightningModule):
    def __init__(self, optimizer="sgd"):
        super().__init__()
        self.X, self.Y, W, _ = problem(n=N, d=D_IN, rows=D_OUT, dtype=torch.float32)
        self.lin = nn.Linear(D_IN, D_OUT, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(W)
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * ((self.lin(x) - y) ** 2).sum(1).mean()

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.0)
        return torch.optim.SGD(self.parameters(), lr=0.0, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.X, self.Y), batch_size=64)


@pytest.mark.parametrize("solver", ["exact", "blocked", "fast"])
def test_callback_layerwise_round_is_the_least_squares_refit(solver):
    model = LeastSquares()
    pruner = OBSPruning(
        0.5,
        solver=solver,
        damp=1e-9,
        schedule="one_shot",
        num_batches=4,
        recompute_steps=1,
        solver_dtype="float64",
        verbose=0,
    )
    make_trainer(max_epochs=1, callbacks=[pruner], limit_val_batches=0).fit(model)
    keep = pruner.masks["lin.weight"]
    assert int((~keep).sum()) == round(0.5 * keep.numel())
    ref = refit(model.X.double(), model.Y.double(), keep).float()
    W = model.lin.weight.detach()
    rel = float((W - ref).norm() / ref.norm())
    assert rel < (1e-4 if solver == "exact" else 0.2)  # fast solvers compensate within blocks or forward only
    rec = pruner.history[0]
    # layer-wise OBS predicts the reconstruction loss, weighted by G_ii = E[g_i^2] (residuals ~ 0.1)
    assert rec["predicted_loss_increase"] > 0 and rec["actual_loss_increase"] > 0


@pytest.mark.parametrize("hessian", ["fisher", "kfac"])
def test_callback_fisher_and_kfac_reach_target_and_keep_pruned_at_zero(hessian):
    model = LeastSquares(optimizer="adam")
    pruner = OBSPruning(
        0.6, hessian=hessian, schedule="one_shot", num_batches=4, block_size=D_IN, recompute_steps=3, verbose=0
    )
    make_trainer(max_epochs=1, callbacks=[pruner], limit_val_batches=0).fit(model)
    keep = pruner.masks["lin.weight"]
    assert int((~keep).sum()) == round(0.6 * keep.numel())
    assert torch.all(model.lin.weight.detach()[~keep] == 0)
    assert pruner.history[0]["info"]["recomputes"] == 2
    if hessian == "kfac":  # a small layer: every set update is solved directly, no CG iteration
        assert pruner.history[0]["info"]["cg_iterations"] == 0 and pruner.history[0]["info"]["cg_unconverged"] == 0
    # the update compensates: better than zeroing the same weights without moving the others
    X, Y = model.X, model.Y
    _, _, W0, _ = problem(n=N, d=D_IN, rows=D_OUT, dtype=torch.float32)
    assert loss(X, Y, model.lin.weight.detach()) < loss(X, Y, W0 * keep)


@pytest.mark.parametrize("policy", ["reset", "keep"])
def test_optimizer_state_policy_after_weight_update(policy):
    pl.seed_everything(0, verbose=False)
    model = LeastSquares(optimizer="adam")
    pruner = OBSPruning(0.5, schedule="one_shot", num_batches=4, optimizer_state=policy, verbose=0)
    make_trainer(max_epochs=1, callbacks=[pruner], limit_val_batches=0).fit(model)  # ends right after the round
    state = model.trainer.optimizers[0].state[model.lin.weight]
    keep = pruner.masks["lin.weight"]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.all(state[key][~keep] == 0)
        kept_zero = bool(torch.all(state[key][keep] == 0))
        assert kept_zero == (policy == "reset" and key == "exp_avg"), key  # the scale stays


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hessian="diag"), "`hessian` must be one of .*'diag'"),
        (dict(solver="cg"), "`solver` must be one of .*'cg'"),
        (dict(allocation="random"), "`allocation`.*'random'"),
        (dict(damp=-1), "`damp` must be a number in \\[0, 10\\], got -1"),
        (dict(block_size=0), "`block_size` must be an integer >= 1, got 0"),
        (dict(recompute_steps=0), "`recompute_steps`.*0"),
        (dict(optimizer_state="zero"), "`optimizer_state`.*'zero'"),
        (dict(solver_dtype="float16"), "`solver_dtype`.*'float16'"),
    ],
)
def test_bad_obs_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OBSPruning(0.5, **kwargs)


def test_adaptive_fast_solver_is_sparsegpts_reference_mask_selection():
    """``adaptive=True`` reproduces SparseGPT's fasterprune (right-looking, written out here): each
    column block's mask is the block's lowest w^2 / [U]_jj^2 over all rows, from the weights as
    compensated by the blocks before it; the layer's total count is exact."""
    from lightning_prune.solvers.obc import _block_totals

    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    W0 = torch.randn(10, 24, generator=g, dtype=torch.float64)
    U, W, _, _ = prepare_hessian(X.T @ X / 400, W0, 0.01, "layer")
    counts = torch.full((10,), 14)  # 60%: only the sum matters to the adaptive solver
    forced = torch.zeros_like(W, dtype=torch.bool)
    ours, pruned, _ = sparsegpt_prune(W, U, counts, forced, blocksize=8, adaptive=True)
    assert int(pruned.sum()) == 140 and not torch.all(pruned.sum(1) == 14)  # rows differ; the total is exact

    def lowest_of_the_block(W1, U1, i, m1, b):
        if i == 0:
            tmp = W1**2 / torch.diagonal(U1) ** 2
            m1.view(-1)[torch.topk(tmp.reshape(-1), _block_totals(counts, forced, 8)[b], largest=False).indices] = True

    ref, mask = sparsegpt_reference(W, U, 8, lowest_of_the_block)
    assert torch.equal(pruned, mask)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


class ThreeLayers(pl.LightningModule):
    """A ReLU MLP on fixed data: pruning a layer changes what the later layers see."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.X = torch.randn(512, 12, generator=g)
        self.y = torch.randint(0, 4, (512,), generator=g)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.X, self.y), batch_size=128)


@pytest.mark.parametrize("reconstruct", ["original", "current"])
def test_later_layers_fit_the_outputs_they_are_asked_to(reconstruct):
    """Layer-wise OBS over three layer groups: each later layer ends at the least-squares refit of
    its kept weights, on the inputs the pruned layers before it give, to its original outputs
    (``"original"``: W x_orig) or to its own outputs on those inputs (``"current"``: W x)."""
    from lightning_prune import prune

    original = ThreeLayers()
    model = copy.deepcopy(original)
    pruner = OBSPruning(0.7, solver="exact", damp=1e-10, recompute_steps=3, reconstruct=reconstruct, verbose=0)
    prune(model, model.train_dataloader(), pruner, num_batches=4)

    def inputs(m):
        with torch.no_grad():
            h1 = torch.relu(m.net[0](m.X))
            return {2: h1.double(), 4: torch.relu(m.net[2](h1)).double()}

    X, X_orig = inputs(model), inputs(original)
    for i in (2, 4):
        W0, W = original.net[i].weight.detach().double(), model.net[i].weight.detach().double()
        Y = (X_orig[i] if reconstruct == "original" else X[i]) @ W0.T
        assert 0 < int((W == 0).sum()) < W.numel()
        torch.testing.assert_close(W, refit(X[i], Y, W != 0), rtol=0, atol=3e-4 * float(W0.abs().max()))


def test_reconstruct_is_layerwise_only():
    with pytest.raises(ValueError, match="`reconstruct`"):
        OBSPruning(0.5, hessian="kfac", reconstruct="current")
    with pytest.raises(ValueError, match="`reconstruct` must be one of"):
        OBSPruning(0.5, reconstruct="dense")


@pytest.mark.parametrize(
    "options, named",
    [
        ({"solver": "exact"}, "`solver='exact'`"),
        ({"allocation": "kfac"}, "`allocation='kfac'`"),
        ({"solver": "fast", "allocation": "obs"}, "`solver='fast'`, `allocation='obs'`"),
    ],
)
@pytest.mark.parametrize("hessian", ["fisher", "kfac"])
def test_layerwise_options_with_another_hessian_are_refused_not_ignored(hessian, options, named):
    """``OBS(hessian="kfac", solver="exact")`` used to build K-FAC OBS and ignore the solver silently."""
    from lightning_prune.criteria import OBS

    with pytest.raises(ValueError, match=f"{named}.*hessian='{hessian}' does not use"):
        OBS(hessian=hessian, **options)
    with pytest.raises(ValueError, match="does not use"):
        OBSPruning(0.5, hessian=hessian, **options)


def test_each_hessian_is_its_own_class_with_its_options():
    from lightning_prune.criteria import OBS
    from lightning_prune.criteria.obs import KFACOBS, LayerwiseOBS, WoodFisherOBS

    assert isinstance(OBS(), LayerwiseOBS) and OBS(solver="exact").solver == "exact"
    assert isinstance(OBS(hessian="fisher", block_size=16), WoodFisherOBS) and OBS(hessian="fisher").hessian == "fisher"
    assert isinstance(OBS(hessian="kfac", damp=0.1), KFACOBS) and OBS(hessian="kfac", damp=0.1).damp == 0.1
    assert not hasattr(OBS(hessian="kfac"), "solver")
    with pytest.raises(ValueError, match="`hessian` must be one of"):
        OBS(hessian="diag")
