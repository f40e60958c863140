"""The Hydra CLI, W&B offline runs, the sweep report, the examples, and packaging."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    from lightning_prune.app.loggers import resolve_wandb_mode

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


def test_bad_overrides_name_the_key(tmp_path):
    cases = [  # (arguments, what stderr must say), run two at a time: each is mostly the CLI's imports
        (["pruner.start_epoch=5", "trainer.max_epochs=3", "logger=none"],
         ["`start_epoch` (5) must be < Trainer(max_epochs=3)",
          "[on the command line: pruner.start_epoch=..., trainer.max_epochs=...]"]),
        (["model=lenet5", "logger=none"], ["does not fit 8x8 images", "model.kernel_size=3"]),
        (["mode=oneshot"], ["mode=oneshot needs ckpt_path="]),
        (["pruner.targett=0.5"], ["pruner.targett"]),
        (["pruner.target=1.5", "logger=none"], ["`target` must be a number in [0, 1), got 1.5"]),
        (["pruner=lottery"], ["lottery"]),
    ]  # fmt: skip

    def attempt(i: int):
        args = ["-m", "lightning_prune", *cases[i][0], f"hydra.run.dir={tmp_path / str(i)}"]
        return run(args, check=False, env={"OMP_NUM_THREADS": "1"})

    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(attempt, range(len(cases))))
    for (args, says), proc in zip(cases, procs):
        assert proc.returncode != 0, args
        for text in says:
            assert text in proc.stderr, (args, text, proc.stderr[-2000:])


def test_help_names_the_app_groups_and_examples():
    proc = run(["-m", "lightning_prune", "--help"])
    assert proc.stdout.startswith("lightning-prune: train and prune")
    assert "powered by Hydra" not in proc.stdout
    for group in ("pruner:", "callbacks:", "debug:", "experiment:", "trainer:"):
        assert group in proc.stdout, group
    assert "lightning-prune mode=oneshot ckpt_path=CKPT" in proc.stdout


def test_help_does_not_import_lightning():
    """`--help` took 10-21 s when the entry point imported Lightning; Hydra answers it before any run."""
    script = (
        "import sys\n"
        "sys.argv = ['lightning-prune', '--help']\n"
        "from lightning_prune.app.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exit:\n"
        "    assert exit.code in (None, 0), exit.code\n"
        "print('IMPORTED:', sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning'}))\n"
    )
    proc = run(["-c", script])
    assert proc.stdout.startswith("lightning-prune: train and prune")  # the help text itself ran
    assert proc.stdout.rstrip().endswith("IMPORTED: []"), proc.stdout[-300:]


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
    """The three examples, two at a time (each is mostly one process's imports and a short fit)."""
    env = {
        "EPOCHS": "2",
        "START_EPOCH": "0",
        "SWEEP_DIR": str(tmp_path / "sweep"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }

    def plain():
        return run(["examples/plain_python.py", "--epochs", "3", "--target", "0.7"], env={"OMP_NUM_THREADS": "1"})

    def cli():
        args = [
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
        return run(args, env={"OMP_NUM_THREADS": "1"})

    def sweep():
        return subprocess.run(
            ["bash", "examples/hydra_sweep.sh"],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=600,
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        sweeping = pool.submit(sweep)
        plain_proc, cli_proc = pool.submit(plain).result(), pool.submit(cli).result()
        proc = sweeping.result()
    assert "sparsity 70.00%" in plain_proc.stdout
    assert "all pruned weights" in cli_proc.stdout and "80.00%" in cli_proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| obs[layerwise] |" in proc.stdout and len(list((tmp_path / "sweep").rglob("results.json"))) == 7
    assert "Dense baseline: dense (pruner=none, 1 run): test accuracy at the end of the same training" in proc.stdout


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
    assert "lightning_prune/app/conf/config.yaml" in names and "lightning_prune/app/conf/pruner/obs.yaml" in names
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
        [sys.executable, "-c", "import lightning_prune.app.cli as c; print(c.config_dir())"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert str(tmp_path / "site") in probe.stdout


def test_save_hf_is_checked_before_the_run_and_names_the_model():
    """save_hf=DIR needs a Hugging Face model in the LightningModule's ``.model``: refused before any
    training, naming the argument and the model (the positive path runs in test_commands.py)."""
    from omegaconf import OmegaConf
    from torch import nn

    from lightning_prune.app import export

    cfg = OmegaConf.create({"save_hf": "small", "model": {"_target_": "lightning_prune.app.models.MLPClassifier"}})
    lit = nn.Module()
    lit.model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"save_hf='small'.*MLPClassifier holds no transformers model"):
        export.hf_model(cfg, lit)
    assert export.hf_model(OmegaConf.create({"save_hf": None}), lit) is None
    transformers = pytest.importorskip("transformers")
    lit.model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)
    )  # fmt: skip
    assert export.hf_model(cfg, lit) is lit.model


def test_the_summary_of_a_language_model_without_validation_prints_no_nan():
    """No validation ran (e.g. val_check_interval past the run): the summary used to say "val accuracy nan%" for
    a language model. What was not measured is said so; the metrics that were are printed as before."""
    from lightning_prune.app import cli_run

    summary = {
        "method": "obs[layerwise]", "model": "CausalLM", "data": "TextDataModule", "sparsity": 0.6,
        **cli_run._quality({}, "val"), **cli_run._quality({"test/ppl": 123.4}, "test"), "dense_val_acc": math.nan,
        "rounds": [{"round": 0, "when": "step 60", "sparsity": 0.3, "val_ppl": math.nan}], "output_dir": "out",
    }  # fmt: skip
    text = cli_run._final_report(summary, None, [])
    assert "nan" not in text.lower() and "accuracy" not in text
    assert "final: sparsity 60.00%, val: not measured, test perplexity 123.40" in text
    assert cli_run._fmt(summary["rounds"][0], "val") == "val: not measured"
    assert cli_run._fmt({"val_ppl": 45.678}, "val") == "val perplexity 45.68"
    assert cli_run._fmt({"val_acc": 0.5, "val_ppl": math.nan}, "val") == "val accuracy 50.00%"
    assert cli_run._fmt({}, "test") == "test: not measured"


def test_a_busy_machine_gets_the_thread_hint_and_the_thread_count_is_left_alone(monkeypatch):
    """Other processes on every core and torch on several threads: the command says OMP_NUM_THREADS=1 may help
    (the README's timings hold on an idle machine); it never sets the thread count itself."""
    import torch

    from lightning_prune.app import cli_run

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (4.5, 3.0, 2.0))
    hint = cli_run.busy_hint()
    assert hint is not None and "load 4.5 on 2 cores" in hint and "OMP_NUM_THREADS=1" in hint
    monkeypatch.setattr(os, "getloadavg", lambda: (0.7, 0.5, 0.5))
    assert cli_run.busy_hint() is None  # a core to spare
    monkeypatch.setattr(os, "getloadavg", lambda: (4.5, 3.0, 2.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cli_run.busy_hint() is None  # the user chose


def test_an_error_naming_a_distillation_argument_gives_its_command_line_key():
    """`distill=kd pruner=none`: Distillation refuses a fit with no pruner and no teacher, naming `teacher`; on the
    command line that is distill.teacher."""
    from omegaconf import OmegaConf

    from lightning_prune.app import cli

    cfg = OmegaConf.create({"pruner": {}, "distill": {"_target_": "lightning_prune.Distillation", "teacher": None}})
    assert cli._with_config_keys("pass the `teacher`", cfg).endswith("[on the command line: distill.teacher=...]")
