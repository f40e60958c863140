import pytest
import torch

from lightning_prune.engine.selection import UnreachableSparsity, check_feasible, floor_count, select_masks


def _ones(*shapes, names="l0 l1"):
    return {n: torch.ones(s, dtype=torch.bool) for n, s in zip(names.split(), shapes)}


def test_global_exact_count_and_lowest_scores():
    g = torch.Generator().manual_seed(0)
    scores = {"l0": torch.rand(10, 7, generator=g), "l1": torch.rand(33, generator=g)}
    masks = _ones((10, 7), (33,))
    out = select_masks(scores, masks, 0.6, scope="global")
    total = 70 + 33
    assert sum(int((~m).sum()) for m in out.values()) == round(0.6 * total)
    pruned = torch.cat([scores[n][~out[n]] for n in out])
    kept = torch.cat([scores[n][out[n]] for n in out])
    assert pruned.max() < kept.min()


def test_layer_scope_same_sparsity_per_layer():
    scores = {"l0": torch.rand(100), "l1": torch.rand(40)}
    out = select_masks(scores, _ones((100,), (40,)), 0.75, scope="layer")
    assert int((~out["l0"]).sum()) == 75 and int((~out["l1"]).sum()) == 30


def test_ties_prune_earlier_positions_first():
    scores = {"a": torch.zeros(4), "b": torch.zeros(4)}
    out = select_masks(scores, _ones((4,), (4,), names="a b"), 0.25, scope="global")
    assert out["a"].tolist() == [False, False, True, True]
    assert out["b"].tolist() == [True, True, True, True]
    out = select_masks({"a": torch.tensor([1.0, 0.5, 0.5, 0.5])}, {"a": torch.ones(4, dtype=torch.bool)}, 0.5)
    assert out["a"].tolist() == [True, False, False, True]


def test_nan_scores_are_kept():
    scores = {"a": torch.tensor([float("nan"), 0.1, 0.2, float("nan")])}
    out = select_masks(scores, {"a": torch.ones(4, dtype=torch.bool)}, 0.5)
    assert out["a"].tolist() == [True, False, False, True]


def test_masks_only_shrink():
    masks = {"a": torch.tensor([False, True, True, True])}
    scores = {"a": torch.tensor([100.0, 0.1, 0.2, 0.3])}  # the pruned weight scores highest
    out = select_masks(scores, masks, 0.5)
    assert out["a"].tolist() == [False, False, True, True]
    # a lower sparsity than already reached never revives weights
    out = select_masks(scores, {"a": torch.tensor([False, False, False, True])}, 0.25)
    assert out["a"].tolist() == [False, False, False, True]


def test_floor_prevents_layer_collapse():
    # layer b has tiny scores: global selection would wipe it out without the floor
    scores = {"a": torch.arange(1, 101, dtype=torch.float), "b": torch.full((10,), 1e-6)}
    out = select_masks(scores, _ones((100,), (10,), names="a b"), 0.78, scope="global", min_density=0.2)
    assert int(out["b"].sum()) == 2 and floor_count(10, 0.2) == 2
    assert sum(int((~m).sum()) for m in out.values()) == round(0.78 * 110)
    with pytest.raises(UnreachableSparsity, match="only 88 entries can be pruned"):  # the floors keep 20 + 2
        select_masks(scores, _ones((100,), (10,), names="a b"), 0.9, scope="global", min_density=0.2)
    out = select_masks(scores, _ones((100,), (10,), names="a b"), 0.9, scope="global", min_density=0.0)
    assert int(out["b"].sum()) >= 1  # the floor is at least one weight


def test_infeasible_target_is_refused():
    with pytest.raises(ValueError, match="target=0.95 is unreachable.*min_density=0.1"):
        check_feasible({"a": 100, "b": 100}, 0.95, "global", 0.1)
    with pytest.raises(ValueError, match="layer 'b'"):
        check_feasible({"a": 1000, "b": 3}, 0.85, "layer", 0.1)
    check_feasible({"a": 100, "b": 100}, 0.9, "global", 0.1)


def test_bad_scope():
    with pytest.raises(ValueError, match="`scope` must be one of.*'net'"):
        select_masks({"a": torch.ones(2)}, {"a": torch.ones(2, dtype=torch.bool)}, 0.5, scope="net")


def test_row_scope_prunes_each_row_to_its_count_and_only_shrinks():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 40, generator=g)
    masks = torch.rand(16, 40, generator=g) > 0.2
    out = select_masks({"a": scores}, {"a": masks}, 0.6, scope="row", min_density=0.1)["a"]
    assert (~out).sum(1).tolist() == [24] * 16 and not bool((out & ~masks).any())
    for r in range(16):  # the lowest kept scores of each row, after the already pruned ones
        kept = scores[r][masks[r]]
        need = 24 - int((~masks[r]).sum())
        assert torch.equal(scores[r][masks[r] & ~out[r]].sort().values, kept.sort().values[:need])
    with pytest.raises(UnreachableSparsity, match="in row 0"):
        select_masks(
            {"a": torch.full((2, 4), float("nan"))}, {"a": torch.ones(2, 4, dtype=torch.bool)}, 0.5, scope="row"
        )


def test_linear_time_selection_picks_what_a_stable_sort_picks():
    """``_extreme`` (kthvalue, ties by index) against the stable sort it replaced, enumerated over random
    keys full of ties, pruned (-inf) and protected (+inf) entries, at every k."""
    from lightning_prune.engine.selection import _extreme, _prune_lowest

    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        n = int(torch.randint(1, 40, (1,), generator=g))
        key = torch.randint(-3, 4, (n,), generator=g).double()
        key[torch.rand(n, generator=g) < 0.1] = float("inf")
        key[torch.rand(n, generator=g) < 0.1] = -float("inf")
        order = torch.sort(key, stable=True).indices
        for k in range(1, n + 1):
            assert sorted(_extreme(key, k).tolist()) == sorted(order[:k].tolist())
            assert sorted(_extreme(key, k, lowest=False).tolist()) == sorted(order[-k:].tolist())
            assert sorted((~_prune_lowest(key, k)).nonzero().flatten().tolist()) == sorted(order[:k].tolist())
