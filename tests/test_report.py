"""``lightning-prune-report``: every number says its split and moment, and the dense line is comparable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_prune.app import report

ROOT = Path(__file__).resolve().parent.parent


def write_run(folder: Path, **result) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(result))


def pruned(method: str, target: float, test_acc: float, dense_val_acc: float = 0.5, **extra) -> dict:
    """A train-mode pruning run whose dense model was validated early (epoch 4), far below the end."""
    rounds = [{"round": 1, "when": "epoch 4", "sparsity": target / 2, "val_acc": 0.4}]
    return dict(method=method, target=target, sparsity=target, test_acc=test_acc, val_acc=test_acc,
                dense_val_acc=dense_val_acc, rounds=rounds, **extra)  # fmt: skip


@pytest.fixture
def lines(monkeypatch):
    """The horizontal lines the plot draws: (y, label)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    drawn: list[tuple[float, str]] = []
    original = Axes.axhline

    def record(self, y=0, *args, **kwargs):
        drawn.append((y, kwargs.get("label", "")))
        return original(self, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "axhline", record)
    return drawn


def test_dense_line_is_the_test_accuracy_of_the_dense_runs(tmp_path, lines, capsys):
    write_run(tmp_path / "0", **pruned("obs[layerwise]", 0.8, 0.90))
    write_run(tmp_path / "1", **pruned("magnitude", 0.8, 0.80))
    write_run(tmp_path / "2", method="dense", target=0.0, sparsity=0.0, test_acc=0.96, val_acc=0.97, rounds=[])
    write_run(tmp_path / "3", method="dense", target=0.0, sparsity=0.0, test_acc=0.94, val_acc=0.95, rounds=[])
    report.main([str(tmp_path)])
    assert lines == [
        (pytest.approx(0.95), "dense (pruner=none, 2 runs):\ntest accuracy at the end of the same training")
    ]
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# test accuracy by method and target sparsity")
    assert "Each number: test accuracy at the end of training (after the last round and the fine-tuning" in md
    assert "Dense baseline: dense (pruner=none, 2 runs): test accuracy at the end of the same training: 95.00%." in md
    assert "| dense | 95.00% ± 1.41% | - |" in md and "| obs[layerwise] | - | 90.00% |" in md
    assert "Each number: test accuracy at the end of training" in capsys.readouterr().out


def test_without_dense_runs_nothing_incomparable_is_drawn_and_the_report_says_so(tmp_path, lines):
    """The validation accuracy before the first round (epoch 4 of 20) sat below every pruned model."""
    write_run(tmp_path / "0", **pruned("obs[layerwise]", 0.8, 0.90, dense_val_acc=0.52))
    write_run(tmp_path / "1", **pruned("magnitude", 0.8, 0.80, dense_val_acc=0.48))
    report.main([str(tmp_path)])
    assert lines == []
    md = (tmp_path / "report.md").read_text()
    assert "Dense baseline: none, no `pruner=none` run in this folder" in md
    assert "the dense val accuracy logged before the first round (epoch 4) was 50.00%" in md
    assert "not drawn" in md


def test_one_shot_runs_compare_with_their_checkpoints_before_the_round(tmp_path, lines):
    for i, (method, after) in enumerate((("obs[layerwise]", 0.9), ("magnitude", 0.7))):
        before = {"val_acc": 0.97, "test_acc": 0.96}
        write_run(tmp_path / str(i), mode="oneshot", method=method, target=0.5, sparsity=0.5, test_acc=after,
                  before=before, dense_val_acc=0.97)  # fmt: skip
    report.main([str(tmp_path)])
    assert lines == [(pytest.approx(0.96), "dense:\ntest accuracy of the same checkpoints before the one-shot round")]
    assert "Each number: test accuracy right after the one-shot round (no fine-tuning)" in (
        (tmp_path / "report.md").read_text()
    )


def test_perplexity_is_not_a_percentage_and_eval_runs_are_listed(tmp_path, lines, capsys):
    write_run(tmp_path / "0", method="magnitude", target=0.6, sparsity=0.6, test_ppl=31.5, dense_val_ppl=60.0)
    write_run(tmp_path / "1", method="dense", target=0.0, sparsity=0.0, test_ppl=28.25)
    write_run(tmp_path / "2", mode="eval", checkpoint="x.ckpt", sparsity=0.0, val_acc=0.9)
    report.main([str(tmp_path), "--metric", "test_ppl"])
    out = capsys.readouterr().out
    assert "| magnitude | - | 31.50 |" in out and "| dense | 28.25 | - |" in out
    assert "test perplexity at the end of the same training: 28.25." in out
    assert "WARNING: not a pruning run: 2/results.json (mode=eval)" in out
    assert lines == [
        (pytest.approx(28.25), "dense (pruner=none, 1 run):\ntest perplexity at the end of the same training")
    ]


@pytest.mark.parametrize("case", ["missing", "empty", "crashed"])
def test_a_folder_without_results_gets_one_line_and_a_nonzero_exit(tmp_path, case):
    folder = tmp_path / "sweep"
    if case != "missing":
        folder.mkdir()
    if case == "crashed":  # a sweep job that died before writing results.json
        (folder / "0" / ".hydra").mkdir(parents=True)
        (folder / "0" / ".hydra" / "overrides.yaml").write_text("- pruner=obs\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "lightning_prune.app.report", str(folder)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("lightning-prune-report: ") and str(folder) in proc.stderr
    if case == "missing":
        assert "is not a folder" in proc.stderr
    else:
        assert "no results.json of a pruning run under" in proc.stderr
    if case == "crashed":
        assert "failed: 0 (pruner=obs)" in proc.stderr
