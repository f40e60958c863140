"""pattern="channels": structure discovery, structured OBS against brute force, selection, shrink, freezing."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, make_trainer
from torch import nn

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning, prune, shrink
from lightning_prune.app.models import LeNet5Classifier, MLPClassifier
from lightning_prune.models.graph import discover
from lightning_prune.patterns import Channels
from lightning_prune.solvers.structured import group_update, structured_prune

warnings.filterwarnings("ignore", ".*leaves alone.*")


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def image_batches(n=4, size=16, shape=(1, 28, 28), classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, classes, (size,), generator=g)) for _ in range(n)]


def llama(kv_heads=4, layers=2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
    )
    return transformers.LlamaForCausalLM(config).eval()


def token_batches(n=3, size=4, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 64, (size, length), generator=g) for _ in range(n)]
    return [{"input_ids": x, "labels": x} for x in ids]


# ---------------------------------------------------------------------------------------------- discovery
def test_sequential_mlp_families_are_the_hidden_layers():
    families, notes = discover(MLPClassifier((1, 8, 8), 10, hidden=(20, 12)))
    assert [(f.name, f.kind, f.size) for f in families] == [("net.1", "neurons", 20), ("net.3", "neurons", 12)]
    assert [(s.module, s.axis, s.width) for s in families[0].consumers] == [("net.3", "in", 1)]
    assert any(n.startswith("net.5") for n in notes)  # the classifier's outputs are left alone, and listed


def test_cnn_families_follow_pooling_batchnorm_and_flatten():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3),  # 4x4 -> 2x2
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    )
    families, _ = discover(net)
    got = [(f.name, f.kind, f.size, f.consumers[0].module, f.consumers[0].width, f.norms) for f in families]
    assert got == [
        ("0", "channels", 4, "4", 9, ("1",)),  # a channel is 3x3 unfolded columns of the next conv
        ("4", "channels", 6, "7", 4, ()),  # and 2x2 columns of the Linear after Flatten
        ("7", "neurons", 5, "9", 1, ()),
    ]


def test_lenet5_families():
    families, _ = discover(LeNet5Classifier((1, 28, 28), 10))
    assert [(f.name, f.size, f.consumers[0].width) for f in families] == [
        ("net.0", 6, 25),
        ("net.3", 16, 25),
        ("net.7", 120, 1),
        ("net.9", 84, 1),
    ]


def test_what_the_grouping_does_not_understand_is_left_alone_and_listed():
    shared = nn.Linear(4, 4)
    net = nn.Sequential(
        nn.Linear(3, 4),
        nn.LayerNorm(4),  # couples the features: not per-neuron
        nn.Linear(4, 4),
        nn.Conv1d(4, 4, 1, groups=2) if False else nn.Identity(),
        shared,
        nn.ReLU(),
        shared,  # held twice
        nn.Linear(4, 2),
    )
    families, notes = discover(net)
    assert families == []
    assert any("LayerNorm" in n for n in notes)
    assert any("several modules" in n for n in notes)

    class Custom(nn.Sequential):  # a Sequential whose forward is not a chain
        def forward(self, x):
            return self[1](x) + self[0](x)

    assert discover(Custom(nn.Linear(3, 3), nn.Linear(3, 3)))[0] == []
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 2, 3))
    assert [f.name for f in discover(grouped)[0]] == []


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_families_are_mlp_neurons_and_heads_with_gqa_groups(kv_heads):
    model = llama(kv_heads)
    families, notes = discover(model)
    assert notes == []
    by = {f.name: f for f in families}
    attn, mlp = by["model.layers.0.self_attn"], by["model.layers.0.mlp"]
    assert (mlp.kind, mlp.size, [s.module.rsplit(".", 1)[1] for s in mlp.producers]) == (
        "neurons",
        48,
        ["gate_proj", "up_proj"],
    )
    rep = 4 // kv_heads
    assert attn.kind == "heads" and attn.size == kv_heads  # a kv head with the query heads that share it
    assert [(s.module.rsplit(".", 1)[1], s.width) for s in attn.producers] == [
        ("q_proj", 8 * rep),
        ("k_proj", 8),
        ("v_proj", 8),
    ]
    assert attn.consumers[0].width == 8 * rep


# ---------------------------------------------------------------------------------------------- structured OBS
def _least_squares(seed=0, n=40, size=5, width=2, rows=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, size * width, generator=g, dtype=torch.float64)
    X[:, 1] += 0.8 * X[:, 4]  # correlated inputs: compensation matters
    W = torch.randn(rows, size * width, generator=g, dtype=torch.float64)
    return X, W, X.T @ X


def _refit(X, W, kept_cols):
    """Least squares: the best weights on the kept columns for the dense layer's outputs."""
    Y = X @ W.T
    sol = torch.linalg.lstsq(X[:, kept_cols], Y).solution
    out = torch.zeros_like(W)
    out[:, kept_cols] = sol.T
    return out, 0.5 * float(((X @ out.T - Y) ** 2).sum())


def _cols(structures, width):
    return torch.tensor([j * width + r for j in structures for r in range(width)], dtype=torch.long)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_group_update_equals_the_refit_for_every_choice_of_structures(k):
    X, W, H = _least_squares()
    size, width = 5, 2
    for removed in itertools.combinations(range(size), k):
        W_new, _, losses = group_update(W, torch.linalg.inv(H), _cols(removed, width))
        kept = _cols([j for j in range(size) if j not in removed], width)
        expected, error = _refit(X, W, kept)
        torch.testing.assert_close(W_new, expected, rtol=1e-8, atol=1e-8)
        assert float(losses.sum()) == pytest.approx(error, rel=1e-8)


def test_greedy_structured_obs_picks_the_cheapest_structure_and_ends_at_the_refit_of_its_support():
    X, W, H = _least_squares(seed=1)
    size, width = 5, 2
    # one removal: the brute-force cheapest structure
    errors = [_refit(X, W, _cols([i for i in range(size) if i != j], width))[1] for j in range(size)]
    none = torch.zeros(size, dtype=torch.bool)
    (W1,), gone, cost, _ = structured_prune([W], [H], [width], 1, none, [None], 0.0, ["l"])
    assert int(gone.nonzero()) == min(range(size), key=errors.__getitem__)
    assert float(cost[0]) == pytest.approx(min(errors), rel=1e-8)
    # three removals, one already pruned: the result is the refit on what is left, costs add up to its error
    forced = torch.tensor([False, False, True, False, False])
    W0, _ = _refit(X, W, _cols([0, 1, 3, 4], width))
    (W3,), gone, cost, _ = structured_prune([W0], [H], [width], 2, forced, [None], 0.0, ["l"])
    assert int(gone.sum()) == 3 and bool(gone[2])
    kept = [j for j in range(size) if not gone[j]]
    expected, error = _refit(X, W, _cols(kept, width))
    torch.testing.assert_close(W3, expected, rtol=1e-7, atol=1e-8)
    base = _refit(X, W, _cols([0, 1, 3, 4], width))[1]
    assert base + float(cost.sum()) == pytest.approx(error, rel=1e-7)
    # and the greedy pair is the brute-force best pair whenever the best pair contains the best single
    pairs = {
        pair: _refit(X, W, _cols([j for j in range(size) if j not in (2, *pair)], width))[1]
        for pair in itertools.combinations([0, 1, 3, 4], 2)
    }
    assert error >= min(pairs.values()) - 1e-9


def test_structured_cost_is_the_sum_over_consumers_with_row_weights():
    X, W, H = _least_squares(seed=2)
    X2, W2, H2 = _least_squares(seed=3)
    g = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    size, width = 5, 2
    forced = torch.zeros(size, dtype=torch.bool)
    _, gone, cost, _ = structured_prune([W, W2], [H, H2], [width, width], 1, forced, [g, None], 0.0, ["a", "b"])
    totals = []
    for j in range(size):
        _, _, la = group_update(W, torch.linalg.inv(H), _cols([j], width))
        _, _, lb = group_update(W2, torch.linalg.inv(H2), _cols([j], width))
        totals.append(float((la * g).sum() + lb.sum()))
    assert int(gone.nonzero()) == min(range(size), key=totals.__getitem__)
    assert float(cost[0]) == pytest.approx(min(totals), rel=1e-8)


# ---------------------------------------------------------------------------------------------- selection
def test_magnitude_removes_the_structures_with_the_lowest_l1_norm_with_a_floor_per_family():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(8, 3)
    pruner = MagnitudePruning(target=4 / 7, pattern="channels", verbose=0, min_density=0.25)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prune(model, [(x, torch.zeros(8, dtype=torch.long))], pruner)
    # brute force over every choice of 4 of the 7 structures that leaves each family its floor (1)
    norms = [float(before["0.weight"][j].abs().sum() + before["2.weight"][:, j].abs().sum()) for j in range(4)]
    norms += [float(before["2.weight"][j].abs().sum() + before["4.weight"][:, j].abs().sum()) for j in range(3)]
    choices = [
        c for c in itertools.combinations(range(7), 4) if sum(j < 4 for j in c) <= 3 and sum(j >= 4 for j in c) <= 2
    ]
    best = min(choices, key=lambda c: sum(norms[j] for j in c))
    gone = pruner.pattern.pruned(pruner.masks)
    got = tuple(j for j in range(4) if gone["0"][j]) + tuple(4 + j for j in range(3) if gone["2"][j])
    assert got == best
    assert pruner.history[-1]["structures_pruned"] == 4
    w = dict(model.named_parameters())
    for j in range(4):  # a pruned neuron: its row and its consumer column are exactly zero
        assert bool((w["0.weight"][j] == 0).all()) == bool(gone["0"][j]) == bool((w["2.weight"][:, j] == 0).all())


def test_scope_layer_removes_the_fraction_of_every_family():
    model = llama(kv_heads=2)
    pruner = OBDPruning(target=0.5, pattern="channels", scope="layer", verbose=0)
    record = prune(model, token_batches(), pruner)
    units = pruner.pattern.units(pruner.masks)
    assert units["model.layers.0.self_attn"] == (1, 2) and units["model.layers.1.mlp"] == (24, 48)
    assert record["structures_pruned"] == 2 * (1 + 24) and record["structures_total"] == 2 * (2 + 48)


# ---------------------------------------------------------------------------------------------- shrink
@pytest.mark.parametrize("criterion", [MagnitudePruning, OBDPruning, OBSPruning])
def test_shrunk_mlp_and_cnn_compute_what_the_masked_models_compute(criterion):
    for model in (MLPClassifier((1, 28, 28), 10), LeNet5Classifier((1, 28, 28), 10)):
        batches = image_batches()
        pruner = criterion(target=0.5, pattern="channels", verbose=0)
        record = prune(model, batches, pruner, loss_fn=ce)
        assert record["structures_pruned"] == round(0.5 * record["structures_total"])
        small = shrink(model, example_inputs=batches[0][0])
        x = torch.randn(5, 1, 28, 28)
        model.eval()
        torch.testing.assert_close(small.model(x), model(x), rtol=1e-5, atol=1e-5)
        assert small.params_after < small.params_before
        assert sum(small.removed.values()) == record["structures_pruned"]


def test_shrink_removes_batchnorm_channels_and_the_state_dict_loads_into_the_rebuilt_architecture():
    def build():
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(6 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3),
        )  # fmt: skip

    model = build()
    model[1].running_mean.uniform_(-1, 1)
    x = torch.randn(16, 1, 8, 8)
    batches = [(x, torch.randint(0, 3, (16,)))]
    prune(model, batches, OBSPruning(target=0.5, pattern="channels", verbose=0), loss_fn=ce)
    small = shrink(model, example_inputs=x)
    assert small.model[1].num_features == len(small.plan["0"]) < 6
    assert small.model[5].in_features == 16 * len(small.plan["0"])
    fresh = shrink(build(), plan=small.plan).model
    fresh.load_state_dict(small.model.state_dict())
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("criterion", [MagnitudePruning, OBSPruning])
def test_shrunk_llama_with_fewer_heads_and_neurons_computes_what_the_masked_model_computes(criterion, kv_heads):
    model = llama(kv_heads)
    pruner = criterion(target=0.5, pattern="channels", scope="layer", verbose=0)
    prune(model, token_batches(), pruner)
    ids = torch.randint(0, 64, (2, 12))
    small = shrink(model, example_inputs={"input_ids": ids})
    attn = small.model.model.layers[0].self_attn
    assert attn.o_proj.in_features == 32 // 2 and attn.k_proj.out_features == 8 * kv_heads // 2
    torch.testing.assert_close(small.model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    fresh = shrink(llama(kv_heads), plan=small.plan).model
    fresh.load_state_dict(small.model.state_dict())
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_shrink_refuses_a_plan_for_another_model_and_leaves_the_model_untouched():
    model = MLPClassifier((1, 8, 8), 10, hidden=(6, 4))
    with pytest.raises(ValueError, match=r"`plan` names families \['encoder'\]"):
        shrink(model, plan={"encoder": [0]})
    with pytest.raises(ValueError, match=r"plan\['net.1'\]"):
        shrink(model, plan={"net.1": [7]})
    assert model.net[1].out_features == 6


@pytest.mark.parametrize(
    "kept, message",
    [
        ([0, 2, 2, 3, 3], r"`plan\['net.3'\]` repeats indices \[2, 3\]"),
        ([], r"`plan\['net.3'\]` keeps no structure of the 4"),
        ([0, -1, 4], r"`plan\['net.3'\]` has indices \[-1, 4\] outside 0..3"),
        ([0, 1.5], r"`plan\['net.3'\]` must hold integer structure indices, got \[1.5\]"),
        ("012", r"`plan\['net.3'\]` must be a list of kept structure indices, got '012'"),
    ],
)
def test_shrink_refuses_a_plan_with_repeated_missing_or_outside_indices_before_changing_anything(kept, message):
    """A repeated index would duplicate a neuron (another model), an empty family a layer with no
    outputs; the plan is checked whole before any layer changes, so inplace=True loses nothing."""
    model = MLPClassifier((1, 8, 8), 10, hidden=(6, 4))  # families net.1 (6 neurons), net.3 (4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        shrink(model, plan={"net.1": [0, 1, 2], "net.3": kept}, inplace=True)
    assert model.net[1].out_features == 6 and model.net[3].in_features == 6
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_shrink_verifies_outputs_and_refuses_a_mismatch():
    class Doubled(nn.Module):  # the producer's output also leaves through a path the grouping cannot see
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))

        def forward(self, x):
            return self.seq(x) + self.seq[0](x).sum(1, keepdim=True)

    model = Doubled()
    with torch.no_grad():
        model.seq[2].weight[:, 1] = 0.0
    with pytest.raises(RuntimeError, match="differ from the original"):
        shrink(model, example_inputs=torch.randn(4, 3))
    assert model.seq[0].out_features == 4


def test_shrink_says_when_nothing_could_be_removed():
    """Unstructured masks (or none) zero single weights, no whole neuron: shrink returns the model as it was,
    and says why, instead of nothing at all."""
    model = MLPClassifier((1, 8, 8), 10, hidden=(6, 4))
    data = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    prune(model, data, MagnitudePruning(target=0.5, verbose=0), loss_fn=ce)
    for m in (model, MLPClassifier((1, 8, 8), 10, hidden=(6, 4))):
        with pytest.warns(UserWarning, match=r"(?s)nothing could be removed.*no whole .*is zero.*pattern='channels'"):
            small = shrink(m)
        assert small.removed == {} and small.params_after == small.params_before
    with pytest.warns(UserWarning, match=r"(?s)nothing could be removed.*finds no structure"):  # no family at all
        shrink(nn.Sequential(nn.Linear(3, 2)))


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_pruned_structures_stay_frozen_through_training(optimizer, tmp_path):
    torch.manual_seed(0)
    model = TinyNet(optimizer=optimizer, lr=0.05)
    pruner = OBSPruning(target=0.5, pattern="channels", start_epoch=0, end_epoch=1, num_batches=4, verbose=0)
    make_trainer(tmp_path, max_epochs=4, callbacks=[pruner]).fit(model)
    gone = pruner.pattern.pruned(pruner.masks)
    assert sum(int(g.sum()) for g in gone.values()) == round(0.5 * 64)
    w = dict(model.net.named_parameters())
    for family, producer, consumer in (("net.0", "0.weight", "2.weight"), ("net.2", "2.weight", "4.weight")):
        g = gone[family]
        assert bool((w[producer][g] == 0).all()) and bool((w[consumer][:, g] == 0).all())
        assert bool((w[consumer][:, ~g] != 0).any())
    small = shrink(model, example_inputs=torch.randn(8, 12))
    assert small.model.net[0].out_features + small.model.net[2].out_features == 64 - 32


def test_bad_input_is_refused_early_with_the_argument_named():
    with pytest.raises(ValueError, match="scope='row'"):
        MagnitudePruning(target=0.5, pattern="channels", scope="row")
    with pytest.raises(ValueError, match="blocks="):
        OBSPruning(target=0.5, pattern="channels", allocation="reconstruction", scope="layer", blocks="auto")
    with pytest.raises(ValueError, match="found no structure"):
        prune(nn.Linear(3, 2), [(torch.randn(4, 3), torch.zeros(4))], MagnitudePruning(target=0.5, pattern="channels"))
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="unreachable under pattern='channels'"):
        prune(model, [(torch.randn(4, 3),)], MagnitudePruning(target=0.9, pattern="channels", min_density=0.5))
    # a family whose consumer is excluded is left dense, and said so
    pruner = MagnitudePruning(target=0.5, pattern="channels", exclude=["2.*"], verbose=0)
    with pytest.raises(ValueError, match="consumer"):
        prune(model, [(torch.randn(4, 3),)], pruner)
    assert isinstance(pruner.pattern, Channels)


def test_structured_masks_survive_resume_exactly(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(folder, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        model = TinyNet(optimizer="sgd", lr=0.05)
        pruner = OBDPruning(target=0.75, pattern="channels", num_batches=4, verbose=0)  # rounds after epochs 0-2
        ckpt = ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1)
        trainer = make_trainer(folder, max_epochs=4, callbacks=[pruner, ckpt], enable_checkpointing=True)
        trainer.fit(model, ckpt_path=ckpt_path)
        return model, pruner

    ref_model, ref = run(tmp_path / "ref")
    model, pruner = run(tmp_path / "resumed", ckpt_path=tmp_path / "ref" / "epoch=1.ckpt")
    assert ref.history[-1]["structures_pruned"] == pruner.history[-1]["structures_pruned"] == 48
    for name, mask in ref.masks.items():
        assert torch.equal(pruner.masks[name], mask), name
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
