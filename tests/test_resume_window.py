"""Resuming from a checkpoint taken inside a round's capture window gives the uninterrupted round.

A round's statistics are sums over the last ``num_batches`` training batches before it, and the
round keeps those batches (loss before/after, recomputation, non-empirical Fisher passes). A
checkpoint taken while that window is open carries the partial sums and the kept batches, so the
resumed run continues the same window: the round sees the same statistics and batches, and masks
equal and weights within 1e-6 of a run never stopped follow.
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from collections import namedtuple

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_steps import Net, ResumableLoader
from test_steps import batches as training_batches
from torch import nn

from lightning_prune import OBDPruning, OBSPruning
from lightning_prune.engine.targets import resolve_targets
from lightning_prune.runtime.distributed import LOCAL, Collectives
from lightning_prune.stats import EKFAC, KFAC, Composite, CrossCovariance, DiagFisher, Hutchinson, InputCovariance
from lightning_prune.stats.blockfisher import BlockFisher

WINDOW = 4  # optimizer steps a window spans: num_batches = WINDOW * accumulate_grad_batches
ROUNDS = [6, 12]  # optimizer steps
PRUNERS = {
    "obd_fisher": lambda kw: OBDPruning(0.6, **{"curvature": "fisher", "fisher_type": "empirical", **kw}),  # sums
    "obs_layerwise": lambda kw: OBSPruning(0.6, **kw),  # K-FAC factors + Fisher diagonal in the window
    "obd_exact": lambda kw: OBDPruning(0.6, fisher_type="exact", **kw),  # the window only keeps batches
    "obd_ekfac": lambda kw: OBDPruning(0.6, curvature="ekfac", fisher_type="empirical", **kw),  # two phases
}


def spy(pruner):
    """Record what each round's criterion was given: the kept batches and every statistic."""
    seen = []
    prune = pruner.criterion.prune

    def spying(ctx):
        stats = [t.detach().clone() for t in ctx.stats.tensors()] if ctx.stats is not None else []
        seen.append(([b[0].clone() for b in ctx.batches], stats))
        return prune(ctx)

    pruner.criterion.prune = spying
    pruner.seen = seen
    return pruner


def _fit(tmp_path, pruner, ckpt_path=None, dropped: str | None = None, net=Net, weights_only=None, **trainer_kw):
    """A run that checkpoints after every optimizer step (the reference), or one resumed from ``ckpt_path``;
    ``dropped``: the reason the resumed run must warn with when it drops the checkpoint's window."""
    pl.seed_everything(0, verbose=False)
    model = net(optimizer="adam", lr=0.02)  # 16 batches an epoch, resumable mid-epoch
    callbacks = [spy(pruner)]
    if ckpt_path is None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1))
    trainer = make_trainer(tmp_path, callbacks=callbacks, enable_checkpointing=ckpt_path is None, **trainer_kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, ckpt_path=ckpt_path, weights_only=weights_only)
    pruner.warned = [str(w.message) for w in caught]
    drops = [m for m in pruner.warned if "taken inside the capture window" in m]
    if dropped is None:
        assert not drops, drops
    else:
        assert len(drops) == 1 and re.search(dropped, drops[0]) and "are dropped" in drops[0], drops
    return model, pruner


def _run(
    tmp_path, name: str, accumulate: int, ckpt_path=None, dropped: str | None = None, accelerator="cpu", **changes
):
    kw = dict(start_step=ROUNDS[0], every_n_steps=ROUNDS[1] - ROUNDS[0], end_step=ROUNDS[1])
    pruner = PRUNERS[name]({**kw, "num_batches": WINDOW * accumulate, "verbose": 0, **changes})
    return _fit(
        tmp_path,
        pruner,
        ckpt_path,
        dropped,
        max_steps=ROUNDS[1] + 1,
        max_epochs=-1,
        accumulate_grad_batches=accumulate,
        accelerator=accelerator,
    )


def _inside_first_window(accumulate: int) -> list[int]:
    """Steps whose checkpoint is taken with the first round's window open (after some of its batches)."""
    last = ROUNDS[0] * accumulate - 1  # index of the batch whose step is the round's
    first = last + 1 - WINDOW * accumulate  # index of the window's first batch
    return [(b + 1) // accumulate for b in range(first, last) if (b + 1) % accumulate == 0]


def _same(ref, got, key: str, points: list[int]) -> None:
    (ref_model, ref_pruner), (model, pruner) = ref, got
    assert [r[key] for r in pruner.history] == [r[key] for r in ref_pruner.history] == points
    for (batches, stats), (ref_batches, ref_stats) in zip(pruner.seen, ref_pruner.seen, strict=True):
        assert len(batches) == len(ref_batches) and all(torch.equal(a, b) for a, b in zip(batches, ref_batches))
        for a, b in zip(stats, ref_stats, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for name, mask in ref_pruner.masks.items():
        assert torch.equal(pruner.masks[name], mask), name
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    for a, b in zip(pruner.history, ref_pruner.history):
        assert a["loss_before"] == pytest.approx(b["loss_before"], abs=1e-6)


CASES = [
    (name, accumulate)
    for name in PRUNERS
    for accumulate in ((1, 2) if name != "obd_ekfac" else (1,))  # ekfac: phase one, the switch, phase two at 1
]


@pytest.mark.parametrize("name,accumulate", CASES)
def test_every_resume_point_inside_a_step_window_gives_the_uninterrupted_round(tmp_path, name, accumulate):
    ref_dir = tmp_path / "ref"
    ref = _run(ref_dir, name, accumulate)
    steps = _inside_first_window(accumulate)
    assert steps == [3, 4, 5]
    for step in steps:
        state = torch.load(ref_dir / f"step={step}.ckpt", weights_only=False)["callbacks"][type(ref[1]).__name__]
        assert state["window"]["point"] == ROUNDS[0]
        got = _run(tmp_path / f"resumed{step}", name, accumulate, ckpt_path=ref_dir / f"step={step}.ckpt")
        _same(ref, got, "global_step", ROUNDS)


@pytest.fixture(scope="module")
def step4(tmp_path_factory):
    """A checkpoint at step 4: the window of the round at step 6 holds batches 2 and 3."""
    path = tmp_path_factory.mktemp("step4")
    _run(path, "obd_fisher", 1)
    return path / "step=4.ckpt"


def _edited(path, tmp_path, edit):
    ckpt = torch.load(path, weights_only=False)
    edit(ckpt["callbacks"]["OBDPruning"]["window"])
    torch.save(ckpt, tmp_path / "edited.ckpt")
    return tmp_path / "edited.ckpt"


@pytest.mark.parametrize(
    "changes,edit,dropped",
    [
        (dict(num_batches=3), None, "it spans 4 batches and this run's windows 3 \\(num_batches\\)"),
        (dict(curvature="kfac"), None, "statistics do not fit this window's 'kfac' estimator: they are 'fisher'"),
        (dict(fisher_type="exact"), None, "this run's criterion computes its statistics at round time"),
        ({}, lambda w: w.update(world_size=2, batches=w["batches"] * 2), "taken on 2 ranks and this run has 1"),
        ({}, lambda w: w.update(point=5), "this run's next round is at step 6"),
        ({}, lambda w: w["statistics"].pop("fields"), "corrupted or hand-edited"),
        ({}, lambda w: w.pop("batches"), "it cannot be read \\(KeyError"),
    ],
)
def test_a_window_the_run_cannot_continue_is_dropped_with_the_reason(step4, tmp_path, changes, edit, dropped):
    path = step4 if edit is None else _edited(step4, tmp_path, edit)
    _, pruner = _run(tmp_path, "obd_fisher", 1, ckpt_path=path, dropped=dropped, **changes)
    assert [r["global_step"] for r in pruner.history] == ROUNDS
    assert len(pruner.seen[0][0]) == 2  # the batches trained after the resume


Pair = namedtuple("Pair", "x y")


class PairNet(Net):
    """Batches as named tuples, which torch.load(weights_only=True) does not load."""

    def train_dataloader(self):
        return ResumableLoader([Pair(*b) for b in training_batches(self.n_samples)])


def test_kept_batches_weights_only_loading_refuses_are_named_when_saved(tmp_path):
    def run(path, ckpt_path=None, weights_only=None):
        pruner = OBDPruning(0.6, fisher_type="exact", start_step=6, every_n_steps=6, end_step=12, verbose=0)
        kw = dict(max_steps=13, max_epochs=-1)
        return _fit(path, pruner, ckpt_path, net=PairNet, weights_only=weights_only, **kw)

    ref = run(tmp_path / "ref")
    said = r"kept batches, which hold a test_resume_window.Pair: .*trainer.fit\(..., weights_only=False\)"
    assert len([m for m in ref[1].warned if re.search(said, m)]) == 1  # once, not at every checkpoint
    with pytest.raises(Exception, match="Weights only load failed"):
        run(tmp_path / "default", tmp_path / "ref" / "step=4.ckpt")
    _same(ref, run(tmp_path / "trusted", tmp_path / "ref" / "step=4.ckpt", weights_only=False), "global_step", ROUNDS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_inside_a_window_on_gpu(tmp_path):
    """Statistics and kept batches travel to the CPU in the checkpoint and back to the GPU on resume."""
    ref = _run(tmp_path / "ref", "obs_layerwise", 1, accelerator="gpu")
    for step in _inside_first_window(1):
        got = _run(tmp_path / f"r{step}", "obs_layerwise", 1, tmp_path / "ref" / f"step={step}.ckpt", accelerator="gpu")
        assert all(b.device.type == "cuda" for b in got[1].seen[0][0])
        _same(ref, got, "global_step", ROUNDS)


def _run_epochs(tmp_path, ckpt_path=None):
    pruner = OBDPruning(0.6, fisher_type="empirical", start_epoch=0, end_epoch=1, num_batches=WINDOW, verbose=0)
    return _fit(tmp_path, pruner, ckpt_path, max_epochs=2)


def test_every_resume_point_inside_an_epoch_window_gives_the_uninterrupted_round(tmp_path):
    """The epoch round's window is the epoch's last 4 batches (steps 13 to 16). Lightning resumes the
    checkpoint taken after the last one at the next epoch, skipping the epoch's end: the round runs at
    train start, with that window."""
    ref_dir = tmp_path / "ref"
    ref = _run_epochs(ref_dir)
    for step in (13, 14, 15, 16):
        state = torch.load(ref_dir / f"step={step}.ckpt", weights_only=False)["callbacks"]["OBDPruning"]
        assert state["window"]["point"] == 0 and len(state["window"]["batches"][0]) == step - 12
        got = _run_epochs(tmp_path / f"resumed{step}", ckpt_path=ref_dir / f"step={step}.ckpt")
        _same(ref, got, "epoch", [0, 1])


# ---------------------------------------------------------------- estimators: state_dict / load_state_dict
ESTIMATORS = {
    "inputs": lambda t, c: InputCovariance(t, c),
    "inputs_diagonal": lambda t, c: InputCovariance(t, c, diagonal_only=True),
    "cross": lambda t, c: CrossCovariance(t, c),
    "fisher": lambda t, c: DiagFisher(t, c),
    "kfac": lambda t, c: KFAC(t, comm=c),
    "kfac_diagonal": lambda t, c: KFAC(t, diagonal_only=True, comm=c),
    "ekfac": lambda t, c: EKFAC(t, 4, c),  # phase one: batches 0-1, phase two: 2-3
    "block_fisher": lambda t, c: BlockFisher(t, 8, c),
    "composite": lambda t, c: Composite({"kfac": KFAC(t, comm=c), "fisher": DiagFisher(t, c)}),
}
BATCHES = 4


def _targets(width: int = 5):
    torch.manual_seed(0)
    return resolve_targets(nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3)))


def _stream(targets, rank: int = 0):
    """Per batch and layer: rows ``x (N, T, d_in)`` and gradients ``g (N, T, d_out)`` (a rank's own data).

    Each feature has its own scale, so the second moments have well separated eigenvalues: EKFAC's
    eigenbases are then determined by them, not by the order of float32 additions."""
    g = torch.Generator().manual_seed(100 + rank)

    def rows(d: int) -> torch.Tensor:
        return torch.randn(5, 2, d, generator=g) * 2.0 ** torch.arange(d)

    return [{t.name: (rows(t.shape2d[1]), rows(t.shape2d[0])) for t in targets} for _ in range(BATCHES)]


def _feed(est, batches) -> None:
    for batch in batches:
        for name, (x, g) in batch.items():
            if isinstance(est, CrossCovariance):
                est.update_pair(name, g[..., :1].expand_as(x) + x, x)  # any reference inputs of the same shape
            else:
                est.update(name, x, g)
        est.end_batch()


def _saved(state):
    """Through torch.save and torch.load(weights_only=True), as Lightning loads a checkpoint by default."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _flat(est) -> dict:
    """Every statistic of an estimator, by path."""
    out = {"batches": est.batches, "skipped": est.skipped}
    for key, value in est._statistics().items():
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, dict) and value and all(hasattr(v, "_statistics") for v in value.values()):
            out.update({f"{key}.{k}.{p}": v for k, part in value.items() for p, v in _flat(part).items()})
        else:
            out.update({f"{key}[{n}]": v for n, v in value.items()})
    return out


def _equal(a, b) -> bool:
    fa, fb = _flat(a), _flat(b)
    return fa.keys() == fb.keys() and all(
        torch.equal(x, fb[k]) if isinstance(x, torch.Tensor) else x == fb[k] for k, x in fa.items()
    )


@pytest.mark.parametrize("kind", list(ESTIMATORS))
@pytest.mark.parametrize("stop", range(1, BATCHES))
def test_an_estimator_resumed_from_its_state_equals_the_uninterrupted_one(kind, stop):
    targets = _targets()
    batches = _stream(targets)
    uninterrupted = ESTIMATORS[kind](targets, LOCAL)
    _feed(uninterrupted, batches)
    first = ESTIMATORS[kind](targets, LOCAL)
    _feed(first, batches[:stop])
    first.skipped = 2
    state = _saved(first.state_dict())
    resumed = ESTIMATORS[kind](targets, LOCAL)
    resumed.load_state_dict(state)
    assert _equal(resumed, first)  # bit for bit, including EKFAC's eigenbases after the switch (stop >= 2)
    _feed(resumed, batches[stop:])
    resumed.skipped = 0
    assert _equal(resumed, uninterrupted)


def test_hutchinson_sums_round_trip():
    targets = _targets()
    est = Hutchinson(targets)
    for s in est.sum.values():
        s.normal_()
    est.count += 3
    other = Hutchinson(targets)
    other.load_state_dict(_saved(est.state_dict()))
    assert _equal(other, est)


@pytest.mark.parametrize(
    "make_other,match",
    [
        (lambda t: KFAC(t), "they are 'fisher' statistics"),  # another estimator
        (
            lambda t: DiagFisher(_targets(width=7)),
            r"sq\['0.weight'\] is torch.float32 \(5, 6\), this estimator has torch.float32 \(7, 6\)",
        ),
        (lambda t: DiagFisher(resolve_targets(nn.Sequential(nn.Linear(6, 5)))), r"holds layers \[.2.weight.\]"),
    ],
)
def test_a_state_of_another_layout_is_refused_before_anything_changes(make_other, match):
    targets = _targets()
    est = DiagFisher(targets)
    _feed(est, _stream(targets)[:2])
    other = make_other(targets)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in _flat(other).items()}
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(est.state_dict())
    after = _flat(other)
    assert all(torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k] for k, v in before.items())


def test_estimator_settings_and_corruption_are_refused():
    targets = _targets()
    state = KFAC(targets, diagonal_only=True).state_dict()
    with pytest.raises(ValueError, match="settings .*'diagonal_only': True"):
        KFAC(targets).load_state_dict(state)
    with pytest.raises(ValueError, match="corrupted or hand-edited"):
        KFAC(targets, diagonal_only=True).load_state_dict({k: v for k, v in state.items() if k != "fields"})


class ThreadRanks:
    """``world`` ranks as threads of one process, with a real (barrier-synchronised) all-reduce."""

    def __init__(self, world: int) -> None:
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def run(self, fn):
        results, errors = [None] * self.world, []

        def main(rank):
            try:
                results[rank] = fn(rank, ThreadComm(self, rank))
            except BaseException as err:  # re-raised in the test's thread
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=main, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class ThreadComm(Collectives):
    def __init__(self, ranks: ThreadRanks, rank: int) -> None:
        self.ranks, self._rank = ranks, rank

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self.ranks.world

    def all_reduce_sum_(self, tensors) -> None:
        tensors = list(tensors)
        self.ranks.slots[self._rank] = [t.clone() for t in tensors]
        self.ranks.barrier.wait()
        totals = [sum(slot[i] for slot in self.ranks.slots) for i in range(len(tensors))]
        self.ranks.barrier.wait()
        for t, total in zip(tensors, totals):
            t.copy_(total)


@pytest.mark.parametrize("kind", ["fisher", "composite", "ekfac", "block_fisher"])
@pytest.mark.parametrize("stop", range(1, BATCHES))
def test_two_ranks_resume_to_the_totals_of_the_uninterrupted_window(kind, stop):
    """Rank 0's checkpoint carries both ranks' partial sums; rank 0 restores them, rank 1 starts from zero
    (EKFAC: phase one's factors, or phase two's sums after the switch's all-reduce), and the round's
    all-reduce gives the uninterrupted totals."""
    targets = _targets()
    ranks = ThreadRanks(2)

    def uninterrupted(rank, comm):
        est = ESTIMATORS[kind](targets, comm)
        _feed(est, _stream(targets, rank))
        est.reduce_()
        return est

    def checkpointed(rank, comm):
        est = ESTIMATORS[kind](targets, comm)
        _feed(est, _stream(targets, rank)[:stop])
        est.skipped = rank + 1
        return est.state_dict(summed=True)  # a collective, on every rank; Lightning saves rank 0's

    state = _saved(ranks.run(checkpointed)[0])
    assert state["skipped"] == 3

    def resumed(rank, comm):
        est = ESTIMATORS[kind](targets, comm)
        est.load_state_dict(state, sums=rank == 0)
        assert est.skipped == (3 if rank == 0 else 0)
        _feed(est, _stream(targets, rank)[stop:])
        est.reduce_()
        return est

    expected, got = ranks.run(uninterrupted), ranks.run(resumed)
    for rank in range(2):  # the same totals on both ranks, up to the order of float32 additions
        a, b = _flat(got[rank]), _flat(expected[rank])
        assert a.keys() == b.keys() and a["batches"] == b["batches"] == BATCHES
        for key, value in b.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(a[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["obs_layerwise", "obd_exact"])
def test_a_round_stopped_by_sigterm_resumes_exactly_from_the_checkpoint_saved_on_the_exception(tmp_path, name):
    """SIGTERM arrives inside the round at step 6: the round stops with every weight restored, Lightning's
    on-exception checkpoint carries the round's window, and the resumed run runs that round first, with
    the same batches and statistics, ending where the uninterrupted run ends."""
    import os
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    ref = _run(tmp_path / "ref", name, 1)
    kw = dict(start_step=ROUNDS[0], every_n_steps=ROUNDS[1] - ROUNDS[0], end_step=ROUNDS[1])
    pruner = PRUNERS[name]({**kw, "num_batches": WINDOW, "verbose": 0})
    # layer-wise OBS: the signal arrives as the solves start; the exact Fisher: as its pass over the batches starts
    where = "prune" if name == "obs_layerwise" else "collect"
    inner = getattr(pruner.criterion, where)

    def interrupted(*args, **kwargs):
        if not pruner.history:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler sets trainer.received_sigterm
        return inner(*args, **kwargs)

    setattr(pruner.criterion, where, interrupted)
    pl.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "stop", filename="stopped", save_on_exception=True, save_top_k=0)
    trainer = make_trainer(
        tmp_path / "stop", callbacks=[pruner, ckpt], enable_checkpointing=True, max_steps=ROUNDS[1] + 1, max_epochs=-1
    )
    with pytest.raises(SIGTERMException):
        trainer.fit(Net(optimizer="adam", lr=0.02))
    assert not pruner.history
    (saved,) = list((tmp_path / "stop").glob("*.ckpt"))
    state = torch.load(saved, weights_only=False)["callbacks"][type(pruner).__name__]
    assert state["window"]["point"] == ROUNDS[0] and len(state["window"]["batches"][0]) == WINDOW
    got = _run(tmp_path / "resumed", name, 1, ckpt_path=saved)
    _same(ref, got, "global_step", ROUNDS)
