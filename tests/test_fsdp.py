"""FSDP2 (ModelParallelStrategy + fully_shard) on 2 CPU processes: the same masks and OBS weights as one
unsharded process, per-rank masks of the local shard, checkpoints that resume, a Distillation teacher
sharded like the student; and what stays refused."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_prune.callbacks.parallel import check_strategy
from lightning_prune.runtime import sharding

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "fsdp_job.py"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def run(*args: str, launcher: tuple[str, ...] = ()) -> str:
    cmd = [sys.executable, *launcher, str(JOB), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def job(out: Path, *args: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    run("--out", str(out), *args)
    files = sorted(out.glob("rank*.pt"))
    return [torch.load(f, weights_only=False) for f in files]


@pytest.mark.slow
def test_sharded_selection_equals_one_process_on_whole_layers(tmp_path):
    """24 cases (global/layer scope, ties, NaN scores, floors, earlier masks, 2:4 both ramps, a layer
    every rank holds whole): rows split between 2 ranks select exactly what one process selects."""
    run("--selection", "--out", str(tmp_path), launcher=("-m", "torch.distributed.run", "--nproc_per_node=2"))
    for rank in (0, 1):
        results = torch.load(tmp_path / f"selection{rank}.pt")
        assert len(results) == 24
        assert [case for case, ok in results if not ok] == []


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "obd_exact", "obs", "obs_layer", "obs_kfac", "obs_nm"])
def test_two_sharded_ranks_equal_one_unsharded_process(tmp_path, method):
    """lr 0 and the same samples per step: whole-layer masks equal, OBS-moved weights within float32
    rounding of the statistics, reduced in another order (relative: the refit of later layers to the
    original outputs, ``W C A^-1``, amplifies it), and each rank stores only its shard's rows (5 output
    rows: 3 + 2)."""
    one = job(tmp_path / "one", "--devices", "1", "--method", method)[0]
    two = job(tmp_path / "two", "--devices", "2", "--method", method)
    assert len(two) == 2 and all(r["world"] == 2 and all(r["sharded"]) for r in two)
    assert not any(one["sharded"])
    assert [two[0]["local_shapes"]["net.4.weight"], two[1]["local_shapes"]["net.4.weight"]] == [(3, 28), (2, 28)]
    assert one["local_shapes"]["net.4.weight"] == (5, 28)
    assert len(one["history"]) >= 2
    for r in two:
        assert [h["sparsity"] for h in r["history"]] == [h["sparsity"] for h in one["history"]]
        for n, m in one["masks"].items():
            assert torch.equal(r["masks"][n], m), n
            torch.testing.assert_close(r["weights"][n], one["weights"][n], atol=1e-6, rtol=1e-3)
            assert torch.all(r["weights"][n][~m] == 0)
        for a, b in zip(r["history"], one["history"]):
            assert a["loss_after"] == pytest.approx(b["loss_after"], abs=1e-5)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_to_the_uninterrupted_run(tmp_path):
    """Training (lr > 0, K-FAC OBS), interrupted after epoch 1 and resumed from the distributed checkpoint
    on the same world size, ends with the uninterrupted run's masks and weights; the checkpoint's
    masks are whole layers, so it also resumes on one rank (world size 1) to the same end."""
    full = job(tmp_path / "full", "--devices", "2", "--method", "obs_kfac", "--lr", "0.01")
    ckpt = tmp_path / "full" / "ckpt" / "epoch=1.ckpt"
    assert ckpt.is_dir()  # a distributed checkpoint: one shard file per rank, masks in the metadata
    meta = torch.load(ckpt / "meta.pt", weights_only=False)
    states = [s for k, s in meta["callbacks"].items() if "OBSPruning" in k]
    assert len(states) == 1 and states[0]["masks"]["net.4.weight"]["shape"] == [5, 28]
    resumed = job(tmp_path / "resumed", "--devices", "2", "--method", "obs_kfac", "--lr", "0.01", "--resume", str(ckpt))
    # another world size: the same checkpoint, one FSDP2 rank (DCP reshards the weights, the masks are cut anew)
    alone = job(
        tmp_path / "alone",
        "--devices",
        "1",
        "--fsdp",
        "1",
        "--method",
        "obs_kfac",
        "--lr",
        "0.01",
        "--resume",
        str(ckpt),
    )
    assert alone[0]["world"] == 1 and alone[0]["local_shapes"]["net.4.weight"] == (5, 28)
    for a, b in [*zip(full, resumed), (full[0], alone[0])]:
        assert len(b["history"]) == len(a["history"]) >= 2
        assert a["moments_at_pruned"] == 0.0 and b["moments_at_pruned"] == 0.0  # Adam moments frozen on the shards
        for n in a["masks"]:
            assert torch.equal(a["masks"][n], b["masks"][n]), n
            assert torch.all(b["weights"][n][~b["masks"][n]] == 0)  # frozen at 0.0 through Adam steps
            torch.testing.assert_close(a["weights"][n], b["weights"][n], atol=1e-6, rtol=0)


def assert_teacher_sharded(ranks: list[dict]) -> None:
    """Each rank holds its rows of every teacher tensor (the 5-row last layer: 3 + 2), frozen and in eval mode."""
    for name, numel in ranks[0]["teacher_numel"].items():
        assert ranks[0]["teacher_local"][name] + ranks[1]["teacher_local"][name] == numel, name
        assert ranks[1]["teacher_local"][name] <= ranks[0]["teacher_local"][name] <= numel // 2 + 28, name
    assert [r["teacher_local"]["4.weight"] for r in ranks] == [3 * 28, 2 * 28]
    assert all(r["teacher_frozen"] for r in ranks)
    for name, t in ranks[0]["teacher"].items():
        assert torch.equal(ranks[1]["teacher"][name], t)  # the shards of one teacher


@pytest.mark.slow
def test_distillation_under_fsdp2_equals_one_process_with_twice_the_batch(tmp_path):
    """The default teacher (the dense student just before the first round) is sharded like the student and
    kept out of the distributed checkpoint; two ranks of 16 train, prune and distil as one unsharded process
    of 32 (KD and CE are means over samples, the ranks' gradients are averaged); the fit-start message gives
    the per-rank shard size."""
    args = ("--method", "magnitude", "--distill", "copy", "--epochs", "3", "--lr", "0.01")
    log = run("--out", str(tmp_path / "two"), "--devices", "2", *args)
    two = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    one = job(tmp_path / "one", "--devices", "1", *args)[0]
    assert_teacher_sharded(two)
    assert one["teacher_local"] == one["teacher_numel"]  # one process: the whole teacher
    local = sum(two[0]["teacher_local"].values()) * 4 / 2**10
    full = sum(two[0]["teacher_numel"].values()) * 4 / 2**10
    said = re.search(r"([\d.]+) KiB of weights on rank 0 \(its FSDP2 shards of ([\d.]+) KiB over 2 rank\(s\)\)", log)
    assert said and [float(said[1]), float(said[2])] == [round(local, 1), round(full, 1)] and local < 0.6 * full
    assert len(one["history"]) >= 2
    for r in two:
        assert [h["sparsity"] for h in r["history"]] == [h["sparsity"] for h in one["history"]]
        for n, t in one["teacher"].items():  # the dense model of the same step, frozen at the same round
            torch.testing.assert_close(r["teacher"][n], t, rtol=1e-4, atol=1e-6)
        for n, m in one["masks"].items():
            assert torch.equal(r["masks"][n], m), n
            torch.testing.assert_close(r["weights"][n], one["weights"][n], rtol=1e-4, atol=1e-5)
    assert two[0]["terms"]["kd"] > 0 and two[1]["terms"]["kd"] > 0  # distilled after the first round
    for term in ("kd", "task"):  # the ranks' means of 16 samples average to the mean of 32
        assert (two[0]["terms"][term] + two[1]["terms"][term]) / 2 == pytest.approx(one["terms"][term], rel=1e-4)
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(tmp_path / "two" / "ckpt" / "epoch=2.ckpt")).read_metadata()
    saved = {k.removeprefix("state_dict.") for k in meta.state_dict_metadata if k.startswith("state_dict.")}
    assert saved == set(two[0]["state_keys"]) == set(one["state_keys"])  # the student's, no teacher


@pytest.mark.slow
@pytest.mark.parametrize("form", ["path"])  # "module" (sharded in place) runs the same path minus the load: 15 s
def test_a_given_teacher_is_sharded_like_the_student(tmp_path, form):
    """A dense teacher passed as a state-dict file (loaded into the student's structure, then sharded; a
    module is sharded in place): each rank holds its rows of exactly the given weights, frozen."""
    two = job(tmp_path, "--devices", "2", "--method", "magnitude", "--distill", form, "--epochs", "2", "--lr", "0.01")
    assert_teacher_sharded(two)
    for n, t in two[0]["dense"].items():
        assert torch.equal(two[0]["teacher"][n], t), n
    assert all(r["terms"]["kd"] > 0 for r in two)


@pytest.mark.slow
def test_the_default_teacher_is_refused_on_a_run_resumed_after_a_round(tmp_path):
    """FSDP2 restores a checkpoint after fit start, so the default teacher's copy would hold the weights from
    before the restore (the untrained model): a run resumed after a round is refused, naming `teacher`."""
    args = ("--devices", "1", "--fsdp", "1", "--method", "magnitude", "--lr", "0.01")
    job(tmp_path / "first", *args, "--epochs", "2")
    ckpt = tmp_path / "first" / "ckpt" / "epoch=1.ckpt"
    cmd = [sys.executable, str(JOB), "--out", str(tmp_path), *args, "--epochs", "3", "--distill", "copy"]
    proc = subprocess.run([*cmd, "--resume", str(ckpt)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "ValueError: Distillation(teacher=None) found the pruners' rounds restored" in proc.stderr
    assert "as `teacher`" in proc.stderr


def test_distillation_on_a_sharded_student_in_one_process(one_rank_group, tmp_path):
    """On a mesh of one rank: the default teacher needs the student's structure from setup (before
    configure_model shards it), and is refused naming `teacher` without it; with it, the teacher is a
    sharded copy in `teacher_dtype`, frozen, outside the student. A checkpoint directory is refused."""
    from conftest import TinyNet
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_prune import Distillation

    trainer = SimpleNamespace(
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), callbacks=[]
    )
    torch.manual_seed(0)
    late, model = TinyNet(), TinyNet()
    _sharded(late.net)
    with pytest.raises(ValueError, match=r"Distillation\(teacher=None\) under FSDP2.*had no parameters then"):
        Distillation().on_fit_start(trainer, late)
    distill = Distillation(teacher_dtype=torch.bfloat16)
    distill.setup(trainer, model, "fit")
    _sharded(model.net)  # what configure_model does
    distill.on_fit_start(trainer, model)
    x = torch.randn(8, 12)
    with torch.no_grad():
        want = model.net(x)
        got = distill.teacher(x.bfloat16())
    assert all(sharding.is_sharded(p) and p.dtype == torch.bfloat16 for p in distill.teacher.parameters())
    assert not any(p.requires_grad for p in distill.teacher.parameters()) and not distill.teacher.training
    assert {id(p) for p in distill.teacher.parameters()}.isdisjoint(id(p) for p in model.parameters())
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    distill.teardown(trainer, model, "fit")
    with pytest.raises(ValueError, match=r"`teacher` is not a file: .* \(a directory: a distributed checkpoint"):
        Distillation(teacher=tmp_path)


def test_model_parallel_strategy_needs_tensor_parallel_size_1():
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    check_strategy(SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)))
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2.*tensor parallelism shards the layer inputs"):
        check_strategy(SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)))
    with pytest.raises(ValueError, match="does not support strategy FSDPStrategy.*ModelParallelStrategy"):
        check_strategy(SimpleNamespace(strategy=FSDPStrategy()))


@pytest.fixture
def one_rank_group():
    """A 1-process gloo group: fully_shard then makes DTensor weights in this process (mesh of 1)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


@pytest.mark.parametrize("kind", ["magnitude", "obd", "obs", "obs_kfac"])
def test_prune_on_dtensor_weights_equals_plain_weights(one_rank_group, kind):
    """prune() through the DTensor paths (gather, local blocks, write back) on a mesh of one rank
    gives the plain model's masks and weights."""
    from conftest import make_data

    from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning, prune
    from lightning_prune.runtime import sharding

    make = {
        "magnitude": lambda: MagnitudePruning(0.7, verbose=0),
        "obd": lambda: OBDPruning(0.7, num_batches=4, verbose=0),
        "obs": lambda: OBSPruning(0.7, num_batches=4, verbose=0),
        "obs_kfac": lambda: OBSPruning(0.7, hessian="kfac", num_batches=4, verbose=0),
    }[kind]
    x, y = make_data(128, 12, 4).tensors
    data = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]

    def loss(model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    plain, sharded = _net(), _sharded(_net())
    p1, p2 = make(), make()
    prune(plain, data, p1, loss_fn=loss)
    prune(sharded, data, p2, loss_fn=loss)
    assert all(t.sharded for t in p2.targets) and not any(t.sharded for t in p1.targets)
    assert p2.sparsity == pytest.approx(p1.sparsity) and p1.history[0]["sparsity"] == p2.history[0]["sparsity"]
    for t1, t2 in zip(p1.targets, p2.targets):
        assert torch.equal(p1.masks[t1.name], p2.masks[t2.name])
        torch.testing.assert_close(sharding.gather(t2.param), t1.param.detach(), atol=1e-6, rtol=0)
    assert p2.state_dict()["masks"].keys() == p1.state_dict()["masks"].keys()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda P: P["mag"](0.5, pattern="channels", scope="layer", verbose=0), "pattern='channels'.*FSDP2"),
        (lambda P: P["obd"](0.5, curvature="hutchinson", verbose=0), "hutchinson.*FSDP2"),
        (lambda P: P["obs"](0.5, blocks="auto", allocation="reconstruction", scope="layer", verbose=0), "blocks"),
    ],
)
def test_what_sharded_models_cannot_do_is_refused_at_bind(one_rank_group, make, match):
    from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning

    pruner = make({"mag": MagnitudePruning, "obd": OBDPruning, "obs": OBSPruning})
    with pytest.raises(ValueError, match=match):
        pruner.bind(_sharded(_net()))


def test_tensor_parallel_placements_are_refused_naming_the_parameter(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_prune.runtime.sharding import check_sharding

    w = distribute_tensor(torch.randn(4, 6), init_device_mesh("cpu", (1,)), [Shard(1)])
    assert check_sharding(["plain"], [torch.randn(4, 6)], 1) is False
    with pytest.raises(ValueError, match=r"'net.0.weight' is a DTensor with placements \(Shard\(dim=1\),\)"):
        check_sharding(["net.0.weight"], [w], 1)
