"""``prune()``: one round with no Trainer, for every criterion; and its equivalence with the callbacks."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, make_data, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning, Pruner, prune
from lightning_prune.criteria import OBS
from lightning_prune.engine.calibration import BatchError

# every criterion and option family, as the callbacks users pass to a Trainer
CRITERIA = {
    "magnitude": lambda **kw: MagnitudePruning(0.6, verbose=0, **kw),
    "obd-fisher": lambda **kw: OBDPruning(0.6, curvature="fisher", num_batches=4, verbose=0, **kw),
    "obd-kfac": lambda **kw: OBDPruning(0.6, curvature="kfac", num_batches=4, verbose=0, **kw),
    "obd-ekfac": lambda **kw: OBDPruning(0.6, curvature="ekfac", num_batches=4, verbose=0, **kw),
    "obd-hutchinson": lambda **kw: OBDPruning(
        0.6, curvature="hutchinson", num_batches=4, num_probes=2, verbose=0, **kw
    ),
    "obs-exact": lambda **kw: OBSPruning(0.6, solver="exact", num_batches=4, verbose=0, **kw),
    "obs-blocked": lambda **kw: OBSPruning(0.6, solver="blocked", block_size=8, num_batches=4, verbose=0, **kw),
    "obs-fast": lambda **kw: OBSPruning(0.6, solver="fast", block_size=8, num_batches=4, verbose=0, **kw),
    "obs-alloc-obs": lambda **kw: OBSPruning(0.6, allocation="obs", num_batches=4, verbose=0, **kw),
    "obs-alloc-kfac": lambda **kw: OBSPruning(0.6, allocation="kfac", num_batches=4, verbose=0, **kw),
    "obs-fisher": lambda **kw: OBSPruning(0.6, hessian="fisher", block_size=16, num_batches=4, verbose=0, **kw),
    "obs-kfac": lambda **kw: OBSPruning(0.6, hessian="kfac", num_batches=4, verbose=0, **kw),
    "obd-activations": lambda **kw: OBDPruning(
        0.6, curvature="activations", scope="row", num_batches=4, verbose=0, **kw
    ),
    "obd-fisher-mc": lambda **kw: OBDPruning(0.6, fisher_type="mc", mc_samples=2, num_batches=4, verbose=0, **kw),
    "obd-ekfac-exact": lambda **kw: OBDPruning(
        0.6, curvature="ekfac", fisher_type="exact", num_batches=4, verbose=0, **kw
    ),
    "obs-mc": lambda **kw: OBSPruning(0.6, fisher_type="mc", num_batches=4, verbose=0, **kw),
    "obs-fisher-exact": lambda **kw: OBSPruning(
        0.6, hessian="fisher", fisher_type="exact", block_size=16, num_batches=4, verbose=0, **kw
    ),
}


def sequential(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def loader(batch_size: int = 32) -> DataLoader:
    return DataLoader(make_data(256, 12, 4), batch_size=batch_size, shuffle=False)


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("name", list(CRITERIA))
def test_prune_every_criterion_on_a_plain_sequential(name):
    model = sequential()
    keys = {k: (v.dtype, v.shape) for k, v in model.state_dict().items()}
    pruner = CRITERIA[name]()
    record = prune(model, loader(), pruner, loss_fn=ce)
    masks = pruner.masks
    assert set(masks) == {"0.weight", "2.weight", "4.weight"}
    total = sum(m.numel() for m in masks.values())
    if pruner.scope == "row":  # each output row to its own count
        assert all((~m).sum(1).tolist() == [round(0.6 * m.shape[1])] * m.shape[0] for m in masks.values())
    else:
        assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * total)
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert torch.all(params[n].detach()[~m] == 0.0), n
    assert {k: (v.dtype, v.shape) for k, v in model.state_dict().items()} == keys  # plain keys, no reparam
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed
    assert dict(record) == dict(pruner.history[-1]) and record["trigger"] == "prune"
    assert record["sparsity"] == pytest.approx(0.6, abs=1e-2)
    assert torch.isfinite(torch.tensor([record["loss_before"], record["loss_after"]])).all()  # measured


def test_the_record_is_typed_and_reads_as_the_dict_it_was():
    """A RoundRecord: fields by attribute, and the mapping the history always was (keys in the same order,
    the structure counts only under a structured pattern), read-only, JSON through dict(), the same dict in a
    checkpoint."""
    import dataclasses
    import json

    from lightning_prune.engine.record import RoundRecord

    pruner = MagnitudePruning(0.5, verbose=0)
    record = prune(sequential(), loader(), pruner, loss_fn=ce)
    assert isinstance(record, RoundRecord) and record is pruner.history[-1]
    assert record.sparsity == record["sparsity"] == record.get("sparsity") and record.get("nope", 7) == 7
    assert list(record) == [
        "round", "trigger", "epoch", "global_step", "target", "target_sparsity", "pattern", "sparsity", "pruned",
        "total", "predicted_loss_increase", "actual_loss_increase", "loss_measured", "loss_before", "loss_after",
        "layer_sparsity", "monitor", "info", "seconds",
    ]  # fmt: skip
    assert "sparsity" in record and "structures_total" not in record and record.structures_total is None
    with pytest.raises(KeyError):
        record["structures_total"]
    assert record == dict(record) and json.loads(json.dumps(dict(record)))["pruned"] == record.pruned
    assert pruner.state_dict()["history"] == [dict(record)]
    with pytest.raises(TypeError):
        record["sparsity"] = 0.0  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.sparsity = 0.0  # type: ignore[misc]
    channels = prune(sequential(), loader(), MagnitudePruning(0.5, pattern="channels", verbose=0), loss_fn=ce)
    assert list(channels).index("structures_pruned") == list(channels).index("total") + 1
    assert channels["structures_pruned"] == channels.structures_pruned > 0


def test_run_round_takes_when_or_its_fields_one_by_one():
    from lightning_prune.engine.record import RoundWhen

    fields = {"trigger": "step", "point": 4, "epoch": 0, "global_step": 4, "monitor": {"val_loss": 1.5}}
    assert RoundWhen.of(None, fields) == RoundWhen(**fields)
    assert RoundWhen.of(None, {}) == RoundWhen() and RoundWhen().trigger == "prune"
    with pytest.raises(TypeError, match="got when= and its fields"):
        RoundWhen.of(RoundWhen(), {"point": 3})
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['pointt'\]"):
        RoundWhen.of(None, {"pointt": 3})


def test_record_has_the_fields_of_a_callback_round():
    pl.seed_everything(0, verbose=False)
    callback = MagnitudePruning(0.5, schedule="one_shot", verbose=0)
    make_trainer(max_epochs=1, callbacks=[callback], limit_val_batches=0).fit(TinyNet())
    record = prune(sequential(), loader(), MagnitudePruning(0.5, verbose=0), loss_fn=ce)
    assert set(record) == set(callback.history[-1])


@pytest.mark.parametrize("name", ["magnitude", "obs-reconstruction"])
def test_label_free_criteria_need_no_loss(name):
    """Batches of inputs only: magnitude and SparseGPT's objective prune; the loss is not measured."""
    model = sequential()
    data = [torch.randn(32, 12) for _ in range(4)]
    pruner = (
        MagnitudePruning(0.5, verbose=0)
        if name == "magnitude"
        else OBSPruning(0.5, allocation="reconstruction", scope="layer", num_batches=4, verbose=0)
    )
    record = prune(model, data, pruner)
    assert record["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert record["loss_before"] != record["loss_before"]  # NaN: no loss to measure


@pytest.mark.parametrize("num_batches, kept", [(3, 3), (32, 8)])
def test_magnitude_num_batches_is_the_batches_a_round_keeps_capped_by_eval_batches(num_batches, kept):
    """``MagnitudePruning(num_batches=...)`` as for every criterion: the round's batches, which for
    magnitude only measure the loss, so no more than ``eval_batches`` (8) are kept."""
    model, batches = sequential(), list(loader(batch_size=16))  # 16 batches
    pruner = MagnitudePruning(0.5, num_batches=num_batches, verbose=0)
    assert pruner.window_length == kept
    with torch.no_grad():
        expected = float(sum(ce(model, b) for b in batches[:kept]) / kept)
    taken = []
    record = prune(model, (taken.append(b) or b for b in batches), pruner, loss_fn=ce)
    assert len(taken) == kept and record["loss_before"] == pytest.approx(expected, rel=1e-6)
    # as a callback: the loss before and after the round each read the last `kept` training batches
    calls = []
    callback = MagnitudePruning(
        0.5, schedule="one_shot", num_batches=num_batches, verbose=0, loss_fn=lambda m, b: calls.append(1) or ce(m, b)
    )
    make_trainer(max_epochs=1, callbacks=[callback], limit_val_batches=0).fit(TinyNet(n=512, batch_size=32))
    assert len(calls) == 2 * kept


@pytest.mark.parametrize(
    "make", [lambda: OBDPruning(0.5, num_batches=2, verbose=0), lambda: OBSPruning(0.5, num_batches=2, verbose=0)]
)
def test_criteria_that_need_a_loss_refuse_before_any_work(make):
    model = sequential()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="needs gradients of a loss.*pass loss_fn="):
        prune(model, [torch.randn(8, 12)] * 2, make())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_activations_curvature_ranks_each_row_like_wanda_without_a_loss():
    """Wanda's score |w_ij| ||x_j||, compared within each output row: the same masks, from inputs only."""
    model = sequential()
    data = [torch.randn(32, 12, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    pruner = OBDPruning(0.5, curvature="activations", scope="row", num_batches=4, verbose=0)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs = {}  # every layer's inputs, by hooks, for the reference
    hooks = [
        model[i].register_forward_hook(lambda m, a, o, i=i: inputs.setdefault(i, []).append(a[0])) for i in (0, 2, 4)
    ]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    prune(model, data, pruner)
    for i in (0, 2, 4):
        X = torch.cat(inputs[i])
        wanda = weights[f"{i}.weight"].abs() * X.norm(dim=0)
        k = round(0.5 * wanda.shape[1])
        expected = torch.ones_like(wanda, dtype=torch.bool).scatter_(1, wanda.argsort(1)[:, :k], False)
        assert torch.equal(pruner.masks[f"{i}.weight"], expected), i
    with pytest.raises(ValueError, match="curvature='activations' .*pass scope='row'"):
        OBDPruning(0.5, curvature="activations")


def test_reconstruction_allocation_needs_layer_scope():
    with pytest.raises(ValueError, match="allocation='reconstruction'.*scope='layer'.*got scope='global'"):
        OBSPruning(0.5, allocation="reconstruction")
    with pytest.raises(ValueError, match="allocation='reconstruction'.*hessian='kfac'"):
        OBSPruning(0.5, hessian="kfac", allocation="reconstruction", scope="layer")


def test_loss_from_a_lightning_module_training_step():
    pl.seed_everything(0, verbose=False)
    model = TinyNet()
    record = prune(model, model.train_dataloader(), OBDPruning(0.5, num_batches=4, verbose=0))
    assert record["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert record["loss_before"] == record["loss_before"]  # measured (not NaN)


class HFLike(nn.Module):
    """A Hugging Face-style model: called with keyword batches, returns an output with ``.loss``."""

    def __init__(self):
        super().__init__()
        self.net = sequential()

    def forward(self, input_ids, labels=None):
        logits = self.net(input_ids)
        return SimpleNamespace(logits=logits, loss=None if labels is None else F.cross_entropy(logits, labels))


def test_loss_from_the_model_output():
    data = [{"input_ids": x, "labels": y} for x, y in loader()]
    record = prune(HFLike(), data, OBDPruning(0.5, num_batches=4, verbose=0))
    assert record["sparsity"] == pytest.approx(0.5, abs=1e-3) and record["loss_before"] == record["loss_before"]
    unlabelled = [{"input_ids": x} for x, _ in loader()]
    with pytest.raises(ValueError, match="needs gradients of a loss.*HFLike"):
        prune(HFLike(), unlabelled, OBDPruning(0.5, num_batches=4, verbose=0))


def test_layerwise_obs_is_the_least_squares_refit_on_the_kept_support():
    """y = W x, loss = 1/2 ||W x - y||^2 per sample: H = X^T X / N, and OBS equals the refit on its mask."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 10, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, 10, dtype=torch.float64)
    W0 = torch.randn(3, 10, generator=g, dtype=torch.float64)
    Y = X @ W0.T + 0.1 * torch.randn(512, 3, generator=g, dtype=torch.float64)
    lin = nn.Linear(10, 3, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.linalg.lstsq(X, Y).solution.T)  # converged: the dense least-squares fit
    model = nn.Sequential(lin)
    data = list(DataLoader(TensorDataset(X, Y), batch_size=64))
    for allocation, scope, loss_fn in (
        ("fisher", "global", lambda m, b: 0.5 * ((m(b[0]) - b[1]) ** 2).sum(1).mean()),
        ("reconstruction", "layer", None),  # label-free: refits the dense layer's own outputs
    ):
        m = copy.deepcopy(model)
        pruner = OBSPruning(
            0.5, solver="exact", allocation=allocation, scope=scope, damp=1e-10, num_batches=8, verbose=0
        )
        prune(m, data, pruner, loss_fn=loss_fn)
        keep = pruner.masks["0.weight"]
        target = Y if allocation == "fisher" else X @ lin.weight.detach().T
        ref = torch.zeros_like(W0)
        for r in range(3):  # refit each row on its kept columns
            cols = keep[r].nonzero().flatten()
            ref[r, cols] = torch.linalg.lstsq(X[:, cols], target[:, r : r + 1]).solution.flatten()
        torch.testing.assert_close(m[0].weight.detach(), ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", list(CRITERIA))
def test_callback_one_shot_round_equals_prune_bitwise(name):
    """Same weights, same batches: the callback's round and prune() compute the same masks and weights."""
    pl.seed_everything(0, verbose=False)
    reference = TinyNet(optimizer="sgd", lr=0.0)
    via_prune, via_fit = copy.deepcopy(reference), copy.deepcopy(reference)

    pruner = CRITERIA[name](schedule="one_shot")
    prune(via_prune, via_prune.train_dataloader(), pruner)

    callback = CRITERIA[name](schedule="one_shot")
    n = callback.window_length
    make_trainer(max_epochs=1, callbacks=[callback], limit_train_batches=n, limit_val_batches=0).fit(via_fit)

    for key, mask in pruner.masks.items():
        assert torch.equal(callback.masks[key], mask), key
    for (key, p), q in zip(via_prune.named_parameters(), via_fit.parameters()):
        assert torch.equal(p, q), key


def test_prune_then_fine_tune_with_the_same_pruner_keeps_masks_frozen():
    pl.seed_everything(0, verbose=False)
    model = TinyNet(optimizer="adam", lr=0.05)
    pruner = OBSPruning(0.7, num_batches=4, verbose=0)
    prune(model, model.train_dataloader(), pruner)
    masks, pruned = pruner.masks, {k: v.detach().clone() for k, v in model.named_parameters()}
    make_trainer(max_epochs=3, callbacks=[pruner]).fit(model)  # rounds to <= 0.7 have nothing left to remove
    assert len(pruner.history) == 1
    params = dict(model.named_parameters())
    for key, mask in masks.items():
        assert torch.equal(pruner.masks[key], mask)
        assert torch.all(params[key].detach()[~mask] == 0.0), key
        assert not torch.equal(params[key].detach(), pruned[key]), key  # the kept weights were fine-tuned


def test_prune_twice_only_shrinks_masks():
    model = sequential()
    prune(model, loader(), MagnitudePruning(0.5, verbose=0))
    pruner = OBSPruning(0.8, num_batches=4, verbose=0)
    first = prune(model, loader(), pruner, loss_fn=ce)
    before = pruner.masks
    again = OBSPruning(0.9, num_batches=4, verbose=0)
    again.load_state_dict(pruner.state_dict())
    prune(model, loader(), again, loss_fn=ce)
    for key, mask in again.masks.items():
        assert not torch.any(mask & ~before[key]), key  # nothing revived
    assert first["sparsity"] == pytest.approx(0.8, abs=1e-3) and again.sparsity == pytest.approx(0.9, abs=1e-3)


def test_prune_with_a_plain_pruner_and_criterion():
    """The core without any callback: a Pruner around a criterion."""
    model = sequential()
    pruner = Pruner(OBS(solver="fast", block_size=8), target=0.5, num_batches=4, verbose=0)
    assert prune(model, loader(), pruner, loss_fn=ce)["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_prune_shows_a_progress_bar_and_a_summary(capsys):
    prune(sequential(), loader(), OBDPruning(0.5, curvature="hutchinson", num_batches=2, num_probes=1), loss_fn=ce)
    out = capsys.readouterr()
    assert "Hutchinson calibration" in out.out + out.err
    assert "round 0 (one-shot): sparsity 50.00%" in out.out


def test_prune_arguments_and_short_data():
    with pytest.raises(ValueError, match="`num_batches` must be an integer >= 0, got -1"):
        prune(sequential(), loader(), MagnitudePruning(0.5, verbose=0), num_batches=-1)
    with pytest.raises(ValueError, match="`loss_fn` must be callable"):
        prune(sequential(), loader(), MagnitudePruning(0.5, verbose=0), loss_fn=3)
    with pytest.warns(UserWarning, match="gave 2 batches, fewer than num_batches=4"):
        prune(sequential(), list(loader())[:2], OBDPruning(0.5, num_batches=4, verbose=0), loss_fn=ce)
    with pytest.raises(RuntimeError, match="no batch was accumulated in the 0 batches of `data`"):
        prune(sequential(), [], OBDPruning(0.5, num_batches=4, verbose=0), loss_fn=ce)


@pytest.mark.parametrize("name", ["magnitude", "obs-exact"])
def test_a_model_on_the_meta_device_is_refused_naming_its_tensors_and_the_remedy(name):
    with torch.device("meta"):
        model = sequential()
    with pytest.raises(
        ValueError,
        match=r"Sequential has 6 parameters/buffers on the meta device \(shapes, no values\): "
        r"0.weight, 0.bias, 2.weight, 2.bias, 4.weight, \.\.\.\. Materialise .*to_empty",
    ):
        prune(model, loader(), CRITERIA[name](), loss_fn=ce)
    model.to_empty(device="cpu")  # what the message says: materialise, then load the weights
    model.load_state_dict(sequential().state_dict())
    assert prune(model, loader(), CRITERIA[name](), loss_fn=ce)["sparsity"] == pytest.approx(0.6, abs=1e-2)


def test_a_callback_binding_a_partly_meta_model_names_the_meta_tensors():
    """A callback binds the model at fit start (``Pruner.bind``); one layer left on meta is named."""
    model = sequential()
    model[2] = nn.Linear(32, 32, device="meta")  # e.g. a partial load
    pruner = OBSPruning(0.5, verbose=0)
    with pytest.raises(ValueError, match=r"OBSPruning: Sequential has 2 parameters.*: 2.weight, 2.bias\. Materialise"):
        pruner.bind(model)
    assert pruner.masks == {}  # nothing bound


@pytest.mark.slow
def test_prune_under_torch_distributed_gives_every_rank_the_union_masks(tmp_path):
    """Two gloo processes, each with half of every batch: identical masks and weights on both ranks,
    equal to one process pruning from the whole batches (statistics are sums with counts). Block by
    block on a decoder (SparseGPT, the defaults, 2:4), each rank solves half the layers and the
    results are broadcast: the same masks as one process, the weights equal to rounding."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    job = Path(__file__).resolve().parent / "prune_job.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(job),
            "--out",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import prune_job

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name, make in prune_job.PRUNERS.items():
        reference, pruner = prune_job.model(), make()  # one process, the whole batches
        prune(reference, prune_job.batches(), pruner, loss_fn=prune_job.loss)
        for key, mask in r0[name]["masks"].items():
            assert torch.equal(mask, r1[name]["masks"][key]), (name, key)
            assert torch.equal(mask, pruner.masks[key]), (name, key)
        for key, w in r0[name]["weights"].items():
            assert torch.equal(w, r1[name]["weights"][key]), (name, key)
    pytest.importorskip("transformers")
    for name, make in prune_job.BLOCK_PRUNERS.items():  # block by block: solves spread over the two ranks
        one = prune_job.run(make, prune_job.llama(), prune_job.token_batches())
        assert r0[name]["info"]["sequential_blocks"] == one["info"]["sequential_blocks"] == 3, name
        assert r0[name]["info"]["spread_solves"] == r1[name]["info"]["spread_solves"] > 0, name
        assert "spread_solves" not in one["info"], name
        for key, mask in one["masks"].items():
            assert torch.equal(mask, r0[name]["masks"][key]), (name, key)
            assert torch.equal(mask, r1[name]["masks"][key]), (name, key)
            assert 0 < mask.float().mean() < 1, (name, key)
        for key, w in one["weights"].items():  # statistics summed in another order: equal to rounding
            assert torch.equal(r0[name]["weights"][key], r1[name]["weights"][key]), (name, key)
            torch.testing.assert_close(r0[name]["weights"][key], w, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")


def _conv1d_twins():
    """The same MLP twice: with Hugging Face Conv1D layers (weight in x out) and with nn.Linear."""
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(32, 12), nn.ReLU(), Conv1D(32, 32), nn.ReLU(), Conv1D(4, 32))
    lin = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        for c, li in zip(conv[::2], lin[::2]):
            li.weight.copy_(c.weight.T)
            li.bias.copy_(c.bias)
    return conv, lin


def test_hf_conv1d_layers_are_default_targets():
    conv, _ = _conv1d_twins()
    pruner = MagnitudePruning(0.5, verbose=0)
    prune(conv, loader(), pruner)
    assert set(pruner.masks) == {"0.weight", "2.weight", "4.weight"}
    assert pruner.masks["0.weight"].shape == (12, 32)  # masks in the weight's own (in x out) layout


@pytest.mark.parametrize("name", list(CRITERIA))
def test_hf_conv1d_prunes_exactly_as_the_same_model_with_linear_layers(name):
    conv, lin = _conv1d_twins()
    a, b = CRITERIA[name](), CRITERIA[name]()
    prune(conv, loader(), a, loss_fn=ce)
    prune(lin, loader(), b, loss_fn=ce)
    for key, mask in b.masks.items():
        assert torch.equal(a.masks[key], mask.T), key  # identical, transposed
    for c, li in zip(conv[::2], lin[::2]):
        torch.testing.assert_close(c.weight.detach(), li.weight.detach().T, rtol=1e-4, atol=1e-6)


ZERO = {
    "magnitude": lambda: MagnitudePruning(0.0, verbose=0),
    "obd-fisher": lambda: OBDPruning(0.0, num_batches=4, verbose=0),
    "obs-exact": lambda: OBSPruning(0.0, solver="exact", num_batches=4, verbose=0),
    "obs-kfac": lambda: OBSPruning(0.0, hessian="kfac", num_batches=4, verbose=0),
    "obs-fisher": lambda: OBSPruning(0.0, hessian="fisher", block_size=16, num_batches=4, verbose=0),
}


@pytest.mark.parametrize("name", list(ZERO))
def test_a_round_with_nothing_to_remove_leaves_every_weight_bitwise(name):
    """target=0, and a second prune() at the target already reached: no weight moves (OBS refits nothing)."""
    model = sequential()
    before = copy.deepcopy(model.state_dict())
    record = prune(model, loader(), ZERO[name](), loss_fn=ce)
    assert record["pruned"] == 0 and record["info"].get("idle")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    pruner = CRITERIA[name]()
    prune(model, loader(), pruner, loss_fn=ce)
    after = copy.deepcopy(model.state_dict())
    again = prune(model, loader(), pruner, loss_fn=ce)
    assert again["info"].get("idle") and again["actual_loss_increase"] == 0.0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in after.items())


def test_a_prune_that_removes_nothing_says_so():
    """target=0, or a pruner whose masks already reach its target: the model is legitimately left as it is, and
    prune() says so (the record's info["idle"] was the only trace)."""
    model = sequential()
    with pytest.warns(UserWarning, match=r"prune\(\): MagnitudePruning\(target=0.0\) removes nothing.*unchanged"):
        prune(model, loader(), MagnitudePruning(0.0, verbose=0))
    pruner = MagnitudePruning(0.5, verbose=0)
    prune(model, loader(), pruner)
    with pytest.warns(UserWarning, match=r"removes nothing: its masks already reach sparsity 0.5000.*unchanged"):
        prune(model, loader(), pruner)


def test_a_batch_the_model_cannot_take_names_the_call_the_batch_and_its_structure():
    model = sequential()
    dict_batches = [{"x": torch.randn(8, 12), "y": torch.randint(0, 4, (8,))}]
    with pytest.raises(
        BatchError,
        match=r"loss_fn\(model, batch\) failed on batch 0.*\{'x': float32\[8, 12\], 'y': int64\[8\]\}.*KeyError: 0",
    ):
        prune(model, dict_batches, OBSPruning(0.5, verbose=0), loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    with pytest.raises(BatchError, match=r"Sequential: model\(\*\*batch\) failed on batch 0.*unexpected keyword"):
        prune(model, dict_batches, MagnitudePruning(0.5, verbose=0))
    assert all(bool(m.all()) for m in (model[0].weight != 0, model[2].weight != 0))  # nothing was pruned
