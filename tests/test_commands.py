"""Every ``lightning-prune`` command in the README and in ``cli.py``'s docstring, as a new user types it.

Each one composes (with every combination of a sweep) and builds its objects; then each one runs,
exactly as written except for a lower ``trainer.max_epochs`` and the output folder, and its output
is checked. Placeholders: ``CKPT`` is the checkpoint the documented dense run saves,
``multirun/<date>/<time>`` the documented sweep's folder, ``model.path=DIR`` the tiny saved LLaMA of
``tests/lm_fixtures.py`` and ``docs/*.txt`` its small corpus. Commands for GPUs, or for Fashion-MNIST
when it is not installed, are composed but not run.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import wandb_log
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate

from lightning_prune.app import cli, cli_run

ROOT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()


def documented() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    lines = [
        line for block in re.findall(r"```bash\n(.+?)\n```", readme, flags=re.S)[2:] for line in block.splitlines()
    ]
    lines += (cli.__doc__ or "").splitlines()
    out = [re.split(r"\s{2,}#", line)[0].strip() for line in lines]
    commands = [c for c in out if c == "lightning-prune" or c.startswith("lightning-prune")]
    # one of each: the README quotes ckpt_path (Lightning's file names contain '='), the docstring does not
    return list({re.sub(r"[\"']", "", c): c for c in reversed(commands)}.values())[::-1]


COMMANDS = documented()
APP = [c for c in COMMANDS if c.split()[0] == "lightning-prune"]


def overrides(command: str) -> list[str]:
    return [a for a in shlex.split(command)[1:] if a != "-m"]


def placeholders(arg: str, ckpt: str, hf_checkpoint: Path, text_corpus: dict) -> str:
    """``CKPT``, ``model.path=DIR`` and ``docs/*.txt`` in a documented argument, replaced by what they stand for."""
    corpus = text_corpus["txt"][0].parent
    arg = arg.replace("CKPT", ckpt).replace("docs/*.txt", f"{corpus}/*.txt")
    return f"model.path={hf_checkpoint}" if arg == "model.path=DIR" else arg


@pytest.mark.parametrize("command", APP)
def test_documented_command_composes_and_builds(command, hf_checkpoint, text_corpus):
    """Composition errors ("Could not override", unknown groups) and shape errors, without training."""
    args = [placeholders(a, "/tmp/checkpoint.ckpt", hf_checkpoint, text_corpus) for a in overrides(command)]
    parsed = OverridesParser.create().parse_overrides(args)
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
        for o in parsed
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(cli.config_dir()), version_base="1.3"):
        for combo in itertools.product(*choices):
            cfg = compose("config", overrides=list(combo))
            if "fashion" in cfg.data._target_.lower() and not FASHION:
                continue
            cli_run._model(cfg, instantiate(cfg.data))
            if cfg.pruner.get("_target_"):
                instantiate(cfg.pruner)


def test_there_is_a_documented_command_for_each_mode():
    assert any("mode=oneshot" in c for c in APP) and any("mode=eval" in c for c in APP)
    assert any(c.startswith("lightning-prune-report") for c in COMMANDS) and "lightning-prune" in APP


def offline_env(home: Path) -> dict[str, str]:
    """A new user's environment: no W&B key or settings, no warning filters."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "PYTHONWARNINGS"}
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home))
    return env


def launch(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc


def needs_gpu(command: str) -> bool:
    return bool(re.search(r"trainer=(ddp|gpu)(\s|$)", command)) and not torch.cuda.is_available()


LM_QUICK = [
    "data.max_files=40",
    "data.vocab_size=512",
    "data.seq_len=32",
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_heads=2",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=4",
]
LM_STEPS = ["trainer.max_steps=24", "pruner.start_step=8", "pruner.end_step=20", "pruner.every_n_steps=4"]
HF_QUICK = ["data.seq_len=32", "data.batch_size=4", "data.calibration_windows=16", "trainer.val_check_interval=3",
            "trainer.limit_val_batches=4"]  # fmt: skip
RECIPE_QUICK = {  # the recipes (experiment=...), lowered
    "experiment=oneshot": ["pruner.num_batches=4"],
    "experiment=shrink_distill": ["shrink.num_batches=4", "shrink.candidates=2", "trainer.max_steps=4"],
    "experiment=prune_while_distilling": ["pruner.num_batches=4", "trainer.max_steps=8"],
}


@pytest.mark.slow
def test_documented_commands_run_as_written(tmp_path, hf_checkpoint, text_corpus):
    env = offline_env(tmp_path / "home")
    env["OMP_NUM_THREADS"] = "1"  # two commands at a time on two cores (threads change no result checked here)
    commands = [c for c in COMMANDS if not (needs_gpu(c) or ("fmnist" in c and not FASHION))]
    outs = {c: tmp_path / f"run{i}" for i, c in enumerate(commands)}
    # the dense run first (it provides CKPT), the report after the sweep it reads, the rest two at a time
    dense = "lightning-prune pruner=none"
    fixtures = (hf_checkpoint, text_corpus)
    ckpt = run_documented(dense, outs[dense], env, None, *fixtures)
    reports = [c for c in commands if c.startswith("lightning-prune-report")]
    rest = [c for c in commands if c != dense and c not in reports]
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda c: run_documented(c, outs[c], env, ckpt, *fixtures), rest))
    (sweep,) = [outs[c] for c in rest if "-m" in shlex.split(c)]
    assert len(reports) == 1, reports
    if reports:
        proc = launch(["lightning_prune.app.report", str(sweep)], env)
        assert "| obs[layerwise] |" in proc.stdout and "WARNING" not in proc.stdout
        assert (sweep / "report.png").stat().st_size > 1000 and "| method | 80% | 90% |" in proc.stdout
        (sweep / "3" / "results.json").unlink()  # a job that crashed
        shutil.rmtree(sweep / "5")  # a job that never ran
        proc = launch(["lightning_prune.app.report", str(sweep)], env)
        assert "WARNING: failed: 3 (pruner=obd pruner.target=0.9 trainer.max_epochs=2)" in proc.stdout
        assert "WARNING: never ran: 1 of the sweep's 6 jobs" in proc.stdout
    assert len(commands) >= len(COMMANDS) - 3, commands  # only GPU / Fashion-MNIST commands may be skipped


def run_documented(
    command: str, out: Path, env: dict[str, str], ckpt: str | None, hf_checkpoint: Path, text_corpus: dict
) -> str | None:
    """Run one documented command (not the report) as written, lowered, and check its output; the dense
    run returns its checkpoint (CKPT)."""
    if command.startswith("lightning-prune-cli"):  # LightningCLI: lower max_epochs, keep logs out of the repo
        args = [re.sub(r"^--trainer.max_epochs=\d+$", "--trainer.max_epochs=2", a) for a in shlex.split(command)[1:]]
        proc = launch(["lightning_prune.app.lightning_cli", *args, f"--trainer.default_root_dir={out}"], env)
        assert "all pruned weights" in proc.stdout and "80.00%" in proc.stdout
        return None
    args = [placeholders(a, str(ckpt), hf_checkpoint, text_corpus) for a in shlex.split(command)[1:]]
    args = [f"save_hf={out / a[len('save_hf=') :]}" if a.startswith("save_hf=") else a for a in args]  # not in ROOT
    if "mode=" not in command and "ckpt_path" in command:  # resume the dense run (2 epochs) for one more
        args = [a for a in args if not a.startswith("trainer.max_epochs")] + ["trainer.max_epochs=3"]
    if "model.path=" in command:  # the tiny saved LLaMA: short windows, a few steps and calibration batches
        args += HF_QUICK + RECIPE_QUICK.get(next((a for a in args if a.startswith("experiment=")), ""), LM_STEPS)
    elif "llama" in command:  # a language model: fewer files, a smaller model, fewer steps
        args += [*LM_QUICK, "trainer.max_steps=24"] if "pruner=" in command else [*LM_QUICK, *LM_STEPS]
    elif not any(a.startswith(("trainer.max_epochs", "trainer.max_steps")) for a in args):
        args.append(f"trainer.max_epochs={3 if command == 'lightning-prune' else 2}")
    args.append(f"hydra.sweep.dir={out}" if "-m" in args else f"hydra.run.dir={out}")
    proc = launch(["lightning_prune", *args], env)
    text = proc.stdout + proc.stderr
    results = [json.loads(p.read_text()) for p in sorted(out.rglob("results.json"))]
    assert results, command
    check(command, proc, text, results, out)
    if command != "lightning-prune pruner=none":
        return None
    ckpt = results[0]["checkpoint"]
    assert ckpt and Path(ckpt).is_file() and "=" not in Path(ckpt).name  # pastes into ckpt_path=...
    return ckpt


def check(command: str, proc, text: str, results: list[dict], out: Path) -> None:
    r = results[0]
    # what we own does not clutter the output, and the summary is the last thing on screen
    for noise in ("anonymous setting", "window of", "not writable", "Traceback"):
        assert noise not in text, (command, noise)
    if command == "lightning-prune":  # the main job, with the default progress bar
        assert "dense val accuracy" in proc.stdout
        assert "round 1 (epoch 1): sparsity" in proc.stdout and "% right after pruning" in proc.stdout
        assert "kept / total" in proc.stdout and "net.3.weight" in proc.stdout  # the end-of-fit table
        assert "CSVLogger:" in proc.stdout and "WandbLogger:" in proc.stdout and "offline" in proc.stdout
        assert proc.stdout.rstrip().endswith("=" * 72)
        assert r["method"] == "obs[layerwise]" and r["sparsity"] == pytest.approx(0.8, abs=1e-3)
        assert len(r["rounds"]) == 2 and 0.0 < r["test_acc"] <= 1.0
    elif "experiment=" in command and "model.path=" in command:  # a recipe: its folder and model card
        folder = Path(r["hf_checkpoint"])
        assert (folder / "README.md").is_file() and (folder / "config.json").is_file() and r["card"]["perplexity"]
    elif "save_hf=" in command:  # prune, shrink, save, load: a smaller Hugging Face checkpoint with its tokenizer
        from transformers import AutoModelForCausalLM, AutoTokenizer

        (directory,) = [a.split("=", 1)[1] for a in shlex.split(command) if a.startswith("save_hf=")]
        loaded = AutoModelForCausalLM.from_pretrained(out / directory)
        config = loaded.config
        target = float(r["config"]["pruner"]["target"])
        assert config.intermediate_size == round(r["config"]["model"]["intermediate_size"] * (1 - target))
        assert config.num_attention_heads == round(r["config"]["model"]["num_heads"] * (1 - target))
        assert r["hf_checkpoint"] == str(out / directory) and "Hugging Face checkpoint:" in proc.stdout
        ids = AutoTokenizer.from_pretrained(out / directory)("def main():\n    return 0")["input_ids"]
        assert len(ids) > 0 and max(ids) < config.vocab_size
    elif "llama" in command:  # perplexity, not accuracy, all the way to the summary
        assert "right after pruning" in proc.stdout and "val perplexity" in proc.stdout and "test perplexity" in text
        assert r["test_ppl"] > 1 and r["dense_val_ppl"] > 1 and len(r["rounds"]) >= 3
        assert r["sparsity"] == pytest.approx(float(r["config"]["pruner"]["target"]), abs=1e-3)
    elif "logger=wandb" in command:  # the W&B offline run holds the pruning scalars and tables
        (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
        rows = wandb_log.history(log)
        rounds = [row for row in rows if "prune/sparsity" in row]
        assert rounds and rounds[-1]["prune/sparsity"] == pytest.approx(r["sparsity"], abs=1e-3)
        assert all("prune/actual_loss_increase" in row for row in rounds)
        assert any("prune/layer_table/path" in row for row in rows)
    elif "-m" in command.split():
        assert len(results) == 6 and {x["method"] for x in results} == {"magnitude", "obd[fisher]", "obs[layerwise]"}
    elif "every_n_steps" in command:
        # dense for 200 // 5 steps, end 40 + (200 - 40) // 2
        assert [h["global_step"] for h in r["history"]] == [40, 60, 80, 100, 120]
        assert [x["when"] for x in r["rounds"]][:2] == ["step 40", "step 60"]
    elif "mode=oneshot" in command:
        assert r["mode"] == "oneshot" and r["sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert r["before"]["val_acc"] > 0.5 and "pruned checkpoint:" in proc.stdout
        pruned = torch.load(out / "pruned.ckpt", weights_only=True)
        assert pruned["callbacks"]["OBSPruning"]["masks"] is not None
    elif "mode=eval" in command:
        assert r["mode"] == "eval" and r["sparsity"] == 0.0 and r["val_acc"] > 0.5  # CKPT: the dense run
    elif "experiment=fmnist_mlp" in command:  # rounds to epoch 9, in a run lowered to 2 epochs: it says so
        assert "will not reach target=0.95" in text and "short of target=0.95" in text
        assert [h["epoch"] for h in r["history"]] == [0, 1] and r["sparsity"] < 0.95
    elif "pruner=none" in command and "ckpt_path" in command:  # resumed at epoch 2 of the dense run
        assert "Restored all states from the checkpoint" in text and r["method"] == "dense"
        assert Path(r["checkpoint"]).name == "last.ckpt"
        assert torch.load(r["checkpoint"], weights_only=True)["epoch"] == 2
    elif "pruner=none" in command:
        assert r["method"] == "dense" and "prune it post-training: lightning-prune mode=oneshot" in proc.stdout
    else:
        assert r["sparsity"] == pytest.approx(float(r["target"]), abs=1e-3), command
