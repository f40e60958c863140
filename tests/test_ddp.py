"""Real multi-process DDP on CPU (gloo, 2 processes): sync, equivalence, resume, rank-0 output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

from lightning_prune.callbacks.parallel import check_strategy

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "tests" / "ddp_job.py"

pytestmark = pytest.mark.slow


def job(out: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(JOB), "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def load(out: Path, rank: int) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=False)


@pytest.mark.parametrize("method", ["magnitude", "obd", "obs", "obs_kfac"])
def test_masks_and_weights_bitwise_identical_across_ranks(tmp_path, method):
    stdout = job(tmp_path, "--devices", "2", "--method", method, "--chaos")
    r0, r1 = load(tmp_path, 0), load(tmp_path, 1)
    assert r0["world"] == 2
    assert r0["diverged_before_round"] == [True, True]  # the ranks really disagreed before each round
    assert r0["checks"] == r1["checks"] == [True, True]  # all_gather after every round: identical
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name])
        assert torch.equal(r0["weights"][name], r1["weights"][name])
    # only rank 0 prints: one summary line per round
    assert stdout.count("[lightning-prune] round 0 ") == 1 and stdout.count("[lightning-prune] round 1 ") == 1


@pytest.mark.parametrize("method", ["obd", "obd_kfac", "obd_ekfac", "obs"])
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, method):
    """Same samples per step (DistributedSampler interleaves them), lr 0: same statistics and masks."""
    two, one = tmp_path / "two", tmp_path / "one"
    job(two, "--devices", "2", "--batch", "16", "--lr", "0", "--method", method, "--epochs", "2")
    job(one, "--devices", "1", "--batch", "32", "--lr", "0", "--method", method, "--epochs", "2")
    a, b = load(two, 0), load(one, 0)
    for name, diag in b["diagonals"].items():
        torch.testing.assert_close(a["diagonals"][name], diag, rtol=1e-5, atol=1e-10)
    for name in b["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name
        torch.testing.assert_close(a["weights"][name], b["weights"][name], rtol=1e-4, atol=1e-6)


def test_resume_under_ddp(tmp_path):
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    job(ref, "--devices", "2", "--method", "obd", "--epochs", "5")
    job(resumed, "--devices", "2", "--method", "obd", "--epochs", "5", "--resume", str(ref / "ckpt" / "epoch=0.ckpt"))
    a, b = load(ref, 0), load(resumed, 1)
    assert [r["epoch"] for r in a["history"]] == [r["epoch"] for r in b["history"]]
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name


def test_resume_inside_a_capture_window_under_ddp(tmp_path):
    """Checkpoints after 1, 2 and 3 of a window's 4 batches: rank 0's checkpoint carries both ranks' partial
    sums and kept batches, and each resumed run gives every rank the uninterrupted round (one job, 4 fits)."""
    job(tmp_path, "--devices", "2", "--window-resume")
    for rank in (0, 1):
        runs = load(tmp_path, rank)
        ref = runs["ref"]
        assert ref["rank"] == rank and ref["steps"] == [6, 12] and [len(b) for b, _ in ref["seen"]] == [4, 4]
        for step in (3, 4, 5):
            got = runs[step]
            assert got["steps"] == ref["steps"], step
            for (batches, stats), (ref_batches, ref_stats) in zip(got["seen"], ref["seen"], strict=True):
                assert len(batches) == len(ref_batches) and all(map(torch.equal, batches, ref_batches)), (rank, step)
                for a, b in zip(stats, ref_stats, strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
            for name, mask in ref["masks"].items():
                assert torch.equal(got["masks"][name], mask), (rank, step, name)
            for name, w in ref["weights"].items():
                torch.testing.assert_close(got["weights"][name], w, rtol=0, atol=1e-6, msg=name)
    r0, r1 = load(tmp_path, 0)["ref"]["seen"][0][0], load(tmp_path, 1)["ref"]["seen"][0][0]
    assert not torch.equal(r0[0], r1[0])  # the ranks keep different batches: each got its own back


def test_sharding_strategies_are_refused_with_the_supported_list():
    from types import SimpleNamespace

    check_strategy(SimpleNamespace(strategy=SingleDeviceStrategy(device=torch.device("cpu"))))
    check_strategy(SimpleNamespace(strategy=DDPStrategy()))
    with pytest.raises(
        ValueError, match="does not support strategy FSDPStrategy.*Supported strategies: single device, 'ddp'"
    ):
        check_strategy(SimpleNamespace(strategy=FSDPStrategy()))

    class DeepSpeedStrategy(DDPStrategy):  # stands in for Lightning's, which needs deepspeed installed
        pass

    with pytest.raises(ValueError, match="DeepSpeedStrategy"):
        check_strategy(SimpleNamespace(strategy=DeepSpeedStrategy()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDP needs a CUDA device")
def test_fsdp_is_refused_at_setup():
    import lightning.pytorch as pl
    from conftest import TinyNet

    from lightning_prune import OBSPruning

    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        strategy=FSDPStrategy(),
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        callbacks=[OBSPruning(0.5)],
    )
    with pytest.raises(Exception, match="FSDP"):
        trainer.fit(TinyNet())


def test_distillation_under_ddp_equals_one_process_with_twice_the_batch(tmp_path):
    """The teacher is a per-rank replica outside DDP (no gradient sync): two ranks of 16 train, prune and
    distil as one process of 32 (KD and CE are means over samples, DDP averages the ranks' gradients)."""
    two, one = tmp_path / "two", tmp_path / "one"
    args = ["--method", "magnitude", "--distill", "--epochs", "3", "--lr", "0.01"]
    job(two, "--devices", "2", "--batch", "16", *args)
    job(one, "--devices", "1", "--batch", "32", *args)
    r0, r1, single = load(two, 0), load(two, 1), load(one, 0)
    assert r0["checks"] == r1["checks"] and all(r0["checks"])
    assert r0["terms"]["kd"] > 0 and single["terms"]["kd"] > 0  # distilled after the first round
    for name in r0["teacher"]:
        assert torch.equal(r0["teacher"][name], r1["teacher"][name])  # the same replica on both ranks
        torch.testing.assert_close(r0["teacher"][name], single["teacher"][name], rtol=1e-4, atol=1e-6)
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], single["masks"][name])
    for name in r0["all_weights"]:
        torch.testing.assert_close(r0["all_weights"][name], single["all_weights"][name], rtol=1e-4, atol=1e-5)
