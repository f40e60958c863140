"""The Hydra CLI, W&B offline runs, the sweep report, the examples, and packaging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import wandb_log

ROOT = Path(__file__).resolve().parent.parent
FAST = ["trainer.max_epochs=3", "pruner.start_epoch=0", "trainer.enable_progress_bar=false"]


def run(args, cwd=ROOT, env=None, check=True, timeout=300):
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}")
    return proc


def offline_env(tmp_path):
    """No API key anywhere: HOME without a netrc, no WANDB_* set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_SILENT="true", PYTHONWARNINGS="ignore")
    (tmp_path / "home").mkdir(exist_ok=True)
    return env


def test_main_job_prints_rounds_table_and_where_logs_went(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_prune", *FAST, f"hydra.run.dir={out}"],
        cwd=ROOT,
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "dense validation accuracy (before the first round)" in text
    assert "round 1 (epoch 1): sparsity" in text and "val accuracy right after pruning" in text
    assert "kept / total" in text and "net.3.weight" in text
    assert "CSVLogger:" in text and "WandbLogger:" in text and "offline" in text
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "obs[layerwise]" and results["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert len(results["rounds"]) == 2 and 0.0 < results["test_acc"] <= 1.0


def test_oneshot_mode_prunes_a_trained_checkpoint(tmp_path):
    import torch

    from lightning_prune.models import MLPClassifier

    dense = tmp_path / "dense"
    proc = run(
        ["-m", "lightning_prune", "pruner=none", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
         "logger=csv", f"hydra.run.dir={dense}"],
        env=offline_env(tmp_path),
    )  # fmt: skip
    ckpt = json.loads((dense / "results.json").read_text())["checkpoint"]
    assert ckpt and Path(ckpt).is_file() and f"mode=oneshot \"ckpt_path='{ckpt}'\"" in proc.stdout
    out = tmp_path / "oneshot"
    proc = run(
        ["-m", "lightning_prune", "mode=oneshot", f"ckpt_path='{ckpt}'", "pruner=obs", "pruner.target=0.5",
         "logger=none", "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"],
        env=offline_env(tmp_path),
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "oneshot" and results["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert 0.5 < results["before"]["val_acc"] <= 1 and 0.3 < results["after"]["val_acc"] <= 1
    assert results["history"][0]["trigger"] == "prune" and results["source_checkpoint"] == ckpt
    assert (
        "before: val accuracy" in proc.stdout and "pruned checkpoint:" in proc.stdout and "kept / total" in proc.stdout
    )
    pruned = torch.load(out / "pruned.ckpt", weights_only=True)
    model = MLPClassifier((1, 8, 8), 10, hidden=(300, 100))
    model.load_state_dict(pruned["state_dict"], strict=True)  # plain keys
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=1e-3)
    assert pruned["callbacks"]["OBSPruning"]["masks"] is not None  # the masks, for frozen fine-tuning
    failed = run(
        ["-m", "lightning_prune", "mode=oneshot", "pruner=obs", f"hydra.run.dir={tmp_path / 'x'}"], check=False
    )
    assert failed.returncode != 0 and "mode=oneshot needs ckpt_path=" in failed.stderr


def test_step_rounds_and_short_runs_from_the_cli(tmp_path):
    out = tmp_path / "steps"
    run(
        ["-m", "lightning_prune", "trainer.max_epochs=-1", "trainer.max_steps=40", "pruner.every_n_steps=10",
         "trainer.enable_progress_bar=false", "logger=none", "test=false", f"hydra.run.dir={out}"],
        env=offline_env(tmp_path),
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert [r["global_step"] for r in results["history"]] == [10, 20]  # end 10 + (40 - 10) // 2 = 25
    assert [r["when"] for r in results["rounds"]] == ["step 10", "step 20"]
    assert results["sparsity"] == pytest.approx(0.8, abs=1e-3)
    short = tmp_path / "short"  # the derived dense warm-up fits a 3-epoch run
    run(
        ["-m", "lightning_prune", "trainer.max_epochs=3", "trainer.enable_progress_bar=false", "logger=none",
         "test=false", f"hydra.run.dir={short}"],
        env=offline_env(tmp_path),
    )  # fmt: skip
    assert [r["epoch"] for r in json.loads((short / "results.json").read_text())["history"]] == [0, 1]


def test_wandb_offline_run_contains_pruning_metrics(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_prune", *FAST, "logger=wandb", "pruner.target=0.6", f"hydra.run.dir={out}"],
        cwd=ROOT,
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    (log,) = runs[0].glob("run-*.wandb")
    rows = wandb_log.history(log)
    rounds = [r for r in rows if "prune/sparsity" in r]
    assert [r["prune/round"] for r in rounds] == [0, 1]
    assert rounds[-1]["prune/sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert all("prune/layer/net.1.weight" in r and "prune/actual_loss_increase" in r for r in rounds)
    tables = [r for r in rows if "prune/layer_table/path" in r]
    assert len(tables) == 2
    table = json.loads((runs[0] / "files" / tables[-1]["prune/layer_table/path"]).read_text())
    assert table["columns"] == ["layer", "sparsity"]
    assert [row[0] for row in table["data"]] == ["net.1.weight", "net.3.weight", "net.5.weight"]
    assert sum(row[1] * n for row, n in zip(table["data"], (19200, 30000, 1000))) == pytest.approx(0.6 * 50200, abs=1)
    assert any(k.startswith("prune/pruning_curve_table") for r in rows for k in r)
    assert any(k.startswith("prune/layer_sparsity_table") for r in rows for k in r)  # the bar chart
    assert any("prune/val_acc_after_round" in r for r in rows)
    cfg = wandb_log.config(log)
    assert cfg["pruner"]["_target_"] == "lightning_prune.OBSPruning"  # the resolved Hydra config
    assert cfg["pruner"]["target"] == 0.6


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    from lightning_prune.loggers import resolve_wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("online") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "sideways")
    with pytest.raises(ValueError, match="W&B `mode`.*'sideways'"):
        resolve_wandb_mode()


def test_sweep_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    run(
        [
            "-m",
            "lightning_prune",
            "-m",
            "pruner=magnitude,obd",
            "pruner.target=0.5,0.7",
            *FAST,
            "logger=csv",
            "pruner.verbose=0",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    results = sorted(sweep.rglob("results.json"))
    assert len(results) == 4
    proc = run(["-m", "lightning_prune.report", str(sweep)])
    assert "| magnitude |" in proc.stdout and "| obd[fisher] |" in proc.stdout and "50%" in proc.stdout
    assert (sweep / "report.png").stat().st_size > 1000
    assert "| method | 50% | 70% |" in (sweep / "report.md").read_text()


def test_bad_overrides_name_the_key(tmp_path):
    proc = run(["-m", "lightning_prune", "pruner.targett=0.5", f"hydra.run.dir={tmp_path}"], check=False)
    assert proc.returncode != 0 and "pruner.targett" in proc.stderr
    proc = run(["-m", "lightning_prune", "pruner.target=1.5", "logger=none", f"hydra.run.dir={tmp_path}"], check=False)
    assert proc.returncode != 0 and "`target` must be a number in [0, 1), got 1.5" in proc.stderr
    proc = run(["-m", "lightning_prune", "pruner=lottery", f"hydra.run.dir={tmp_path}"], check=False)
    assert proc.returncode != 0 and "lottery" in proc.stderr


def test_every_constructor_argument_is_in_the_pruner_configs():
    import inspect

    from omegaconf import OmegaConf

    from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning

    skip = {"self", "parameters", "loss_fn"}  # Python objects, not CLI values
    for name, cls in (("magnitude", MagnitudePruning), ("obd", OBDPruning), ("obs", OBSPruning)):
        cfg = OmegaConf.load(ROOT / "conf" / "pruner" / f"{name}.yaml")
        expected = set(inspect.signature(cls.__init__).parameters) - skip
        assert expected == set(cfg) - {"_target_"}, name


def test_examples_run(tmp_path):
    proc = run(["examples/plain_python.py", "--epochs", "3", "--target", "0.7"])
    assert "sparsity 70.00%" in proc.stdout
    proc = run(
        [
            "examples/lightning_cli.py",
            "fit",
            "--trainer.max_epochs=3",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=lightning_prune.OBSPruning",
            "--trainer.callbacks.target=0.8",
            "--trainer.callbacks.hessian=kfac",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert "all pruned weights" in proc.stdout and "80.00%" in proc.stdout
    env = {
        "EPOCHS": "2",
        "START_EPOCH": "0",
        "SWEEP_DIR": str(tmp_path / "sweep"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    proc = subprocess.run(
        ["bash", "examples/hydra_sweep.sh"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| obs[layerwise] |" in proc.stdout and len(list((tmp_path / "sweep").rglob("results.json"))) == 6


@pytest.mark.slow
def test_non_editable_install_ships_the_configs(tmp_path):
    """Build the wheel, unpack it somewhere else, and run the CLI from there (no repo on the path)."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("lightning_prune-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "site")
    assert "lightning_prune/conf/config.yaml" in names and "lightning_prune/conf/pruner/obs.yaml" in names
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_prune", "--cfg", "job", "pruner=obd"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "lightning_prune.OBDPruning" in proc.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import lightning_prune.cli as c; print(c.config_dir())"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert str(tmp_path / "site") in probe.stdout
