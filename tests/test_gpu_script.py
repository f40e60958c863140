"""benchmarks/gpu.py, the one-command GPU run, checked through its CPU dry run (same code, tiny shapes).

The dry run is what can be checked without a GPU: every measurement writes one JSON line with the fields every
line has, the figures that have a closed form hold (SparseGPT at 0.5 per layer prunes exactly half; the shrunk
model keeps half the heads and neurons), and what cannot run says why instead of stopping the run. The
process isolation the GPU run uses (a hard time limit per measurement) is checked on stand-in commands.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_script", ROOT / "benchmarks" / "gpu.py")
gpu = importlib.util.module_from_spec(_spec)
sys.modules["gpu_script"] = gpu  # dataclasses look their module up while the file runs
_path = list(sys.path)
_spec.loader.exec_module(gpu)
sys.path[:] = _path  # the script puts benchmarks/ first, whose module names would shadow others in later tests

COMMON = {"measurement", "device", "torch", "commit", "source", "dry_run", "seconds"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    return gpu.main(["--dry-run", "--out", str(out)]), out


def test_the_dry_run_writes_one_line_per_measurement_with_the_common_fields(dry_run):
    lines, out = dry_run
    assert [line["measurement"] for line in lines] == [m.name for m in gpu.MEASUREMENTS]
    written = [json.loads(text) for text in (out / "gpu.jsonl").read_text().splitlines()]
    assert written == lines
    for line in lines:
        assert set(line) >= COMMON, line
        assert line["dry_run"] is True and line["device"].startswith("cpu")
        assert not str(line.get("skipped", "")).startswith("failed"), line  # a skip says why, a failure is a bug


def test_the_dry_run_measures_what_it_can_on_the_cpu(dry_run):
    lines = {line["measurement"]: line for line in dry_run[0]}
    big = lines["sparsegpt_7b"]
    assert big["sparsity"] == pytest.approx(0.5) and big["peak_gpu_mib"] is None and big["prune_seconds"] > 0
    assert big["peak_cpu_above_model_mib"] >= 0  # VmHWM (reset, or the lifetime peak where refused) >= VmRSS before
    defaults = lines["defaults_1b"]
    for name in ("sparsegpt", "defaults"):
        assert defaults[name]["sparsity"] == pytest.approx(0.5)
    assert "block by block" in defaults["defaults"]["plan"]  # prune() planned the defaults on a decoder
    speed = lines["prefill_decode_1b"]
    sizes = gpu.DRY_SETUP["small"]
    assert speed["shrunk"] == {"heads": sizes.heads // 2, "mlp": sizes.mlp // 2, "hidden": sizes.hidden}
    assert speed["params"]["shrunk"] < speed["params"]["dense"]
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        assert set(speed[key]) == {"dense", "shrunk"} and min(speed[key].values()) > 0
    export = lines["export_semi_structured"]
    assert export["two_four"] is True  # pruned 2:4 before the export, which refuses the CPU
    assert "CUDA" in export["skipped"] and "Nothing was converted" in export["skipped"]
    if importlib.util.find_spec("llmcompressor") is None:
        assert "llmcompressor" in lines["llmcompressor_7b"]["skipped"]


def test_the_same_seed_builds_the_same_model_for_both_pruners():
    """llm-compressor's side rebuilds the 7B-shaped model in its own process: the seed must give the same weights."""
    setup = gpu.make_setup(gpu.parse(["--dry-run", "--out", "unused"]), time.time() + 60)
    a, b = (gpu.build_llama(setup.big, setup, "cpu") for _ in range(2))
    assert gpu.checksum(a) == gpu.checksum(b)
    assert all(x.equal(y) for x, y in zip(a.parameters(), b.parameters()))


def test_a_budget_too_short_skips_every_measurement_and_says_why(tmp_path):
    lines = gpu.main(["--dry-run", "--budget", "0.001", "--out", str(tmp_path)])
    assert len(lines) == len(gpu.MEASUREMENTS)
    for line in lines:
        assert set(line) >= COMMON
        assert "time budget" in line["skipped"] or "not importable" in line["skipped"], line


def test_a_child_prints_its_line_after_the_mark(tmp_path, capsys):
    """``--child NAME`` (what the parent runs in a process of its own) prints one line the parent can find."""
    gpu.main(["--dry-run", "--child", "export_semi_structured", "--out", str(tmp_path)])
    marked = [line for line in capsys.readouterr().out.splitlines() if line.startswith(gpu.MARK)]
    assert len(marked) == 1
    line = json.loads(marked[0][len(gpu.MARK) :])
    assert line["two_four"] is True and "seconds" in line


def test_a_process_past_its_limit_is_killed_with_its_children(tmp_path):
    """The hard time limit: the command and what it started (the peer's own subprocess) are killed together."""
    marker = tmp_path / "grandchild-alive"
    grandchild = f"import time; time.sleep(3); open({str(marker)!r}, 'w').write('x')"
    script = "; ".join(
        [
            "import subprocess, sys, time",
            f"subprocess.Popen([sys.executable, '-c', {grandchild!r}])",
            "print('started', flush=True)",
            "time.sleep(30)",
        ]
    )
    start = time.perf_counter()
    rc, tail = gpu.run_logged([sys.executable, "-c", script], tmp_path / "log", 1.5)
    assert rc is None and time.perf_counter() - start < 10
    assert "started" in tail
    time.sleep(3)
    assert not marker.exists()  # the grandchild died with its group


def test_the_parent_reads_a_childs_line_or_says_why_there_is_none(tmp_path, monkeypatch):
    args = gpu.parse(["--dry-run", "--out", str(tmp_path)])
    m = gpu.BY_NAME["export_semi_structured"]
    log = tmp_path / "logs" / f"{m.name}.log"

    def finished(cmd, path, limit):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("noise\n" + gpu.MARK + json.dumps({"seconds": 1.0, "x": 2}) + "\n")
        return 0, "noise"

    monkeypatch.setattr(gpu, "run_logged", finished)
    assert gpu.in_child(m, args, 5)["x"] == 2

    def killed(cmd, path, limit):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("block 3/32\n")
        return None, "block 3/32"

    monkeypatch.setattr(gpu, "run_logged", killed)
    line = gpu.in_child(m, args, 5)
    assert "stopped at its time limit of 5 s" in line["skipped"] and "block 3/32" in line["skipped"]
    assert log.exists()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--calib", "32"], "--calib must be ROWSxTOKENS"),
        (["--calib", "0x512"], "--calib must be ROWSxTOKENS"),
        (["--budget", "0"], "--budget must be a positive"),
        (["--only", "sparsegpt_7b,nope"], r"--only names unknown measurements \['nope'\]"),
    ],
)
def test_bad_arguments_are_refused_naming_them(argv, match, capsys):
    with pytest.raises(SystemExit):
        gpu.parse(["--dry-run", *argv])
    assert pytest.importorskip("re").search(match, capsys.readouterr().err)


def test_without_cuda_a_gpu_run_says_so_in_every_line(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "cuda_available", lambda: False)
    lines = gpu.main(["--only", "sparsegpt_7b,export_semi_structured", "--out", str(tmp_path)])
    assert [line["measurement"] for line in lines] == ["sparsegpt_7b", "export_semi_structured"]
    assert all("no CUDA device" in line["skipped"] or "not importable" in line["skipped"] for line in lines)


STAND_IN_PEER = """
import argparse, json, pathlib, sys
p = argparse.ArgumentParser()
for name in ("--model", "--calib", "--eval", "--method", "--sparsity", "--dtype", "--out"):
    p.add_argument(name)
a = p.parse_args()
assert (pathlib.Path(a.model) / "config.json").exists() and pathlib.Path(a.calib).exists(), a
print("stand-in for llm-compressor", a.method, a.sparsity, a.dtype, flush=True)
pathlib.Path(a.out).write_text(json.dumps({
    "calib_rows": 4, "seq_len": 16, "seconds_oneshot": 1.5, "peak_gpu_mib": None, "peak_rss_oneshot_mib": 300.0,
    "rss_before_mib": 200.0, "achieved_sparsity": 0.5, "cholesky_failures": 0, "llmcompressor_version": "stand-in",
    "pipeline": "sequential",
}))
"""


def test_the_peer_gets_the_saved_model_and_tokens_and_its_figures_are_read(tmp_path, monkeypatch):
    """llm-compressor's side, with a stand-in for lm_peer.py: the model folder and calibration it is given, the
    arguments, and the figures read back (peak CPU above the model: the peak during oneshot less RSS before)."""
    stand_in = tmp_path / "peer.py"
    stand_in.write_text(STAND_IN_PEER)
    monkeypatch.setattr(gpu, "PEER", stand_in)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(gpu.tempfile, "tempdir", str(scratch))
    setup = gpu.make_setup(gpu.parse(["--dry-run", "--out", str(tmp_path)]), time.time() + 60)
    figures = gpu.peer_big(setup)
    assert figures["prune_seconds"] == 1.5 and figures["peak_cpu_above_model_mib"] == 100.0
    assert figures["sparsity"] == 0.5 and figures["calibration"].startswith("4 x 16")
    reference = gpu.build_llama(setup.big, setup, "cpu")
    assert figures["weights_checksum"] == gpu.checksum(reference)
    log = (tmp_path / "logs" / "llmcompressor_7b.peer.log").read_text()
    assert "stand-in for llm-compressor sparsegpt 0.5 bfloat16" in log
    assert not list(scratch.iterdir())  # the model folder (13.5 GB for the 7B) is removed
