"""The README's two commands stay true: CI runs exactly the README's test command."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)[:2]


def test_readme_opens_with_main_job_and_test_commands():
    main_job, tests = _commands()
    assert main_job.startswith("python3 -m venv .venv") and main_job.endswith("lightning-prune")
    assert "pip install torch==2.13.0" in main_job and "pip install torch==2.13.0" in tests
    assert tests.endswith("pytest -q -n 2 --dist loadfile")  # two workers, a test file each


def test_ci_runs_the_readme_test_command():
    _, tests = _commands()
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run adds -q to pip for quieter logs; otherwise the command is the README's
    assert tests.replace("pip install ", "pip install -q ") in ci


def test_the_main_job_installs_the_cli_extra_and_the_library_does_not_need_it():
    """`lightning-prune` needs the `cli` extra (the README's main job installs it, the test command through
    `dev`); the library's own requirements hold none of the app's packages, and the app's import check
    names exactly the extra's packages."""
    tomllib = pytest.importorskip("tomllib")
    from lightning_prune.app import CLI_EXTRA

    main_job, _ = _commands()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert 'pip install -e ".[cli]"' in main_job
    assert "lightning-prune[cli]" in extras["dev"]
    assert project["scripts"]["lightning-prune"] == "lightning_prune.app.cli:main"

    def name(requirement: str) -> str:
        return re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0]

    required = {name(r) for r in project["dependencies"]}
    assert required == {"torch", "numpy", "lightning", "torchmetrics"}
    assert set(CLI_EXTRA.values()) <= {name(r) for r in extras["cli"]}
    assert not required & {name(r) for r in extras["cli"]}


def test_the_timings_say_they_hold_on_an_idle_machine_and_the_thread_advice_comes_first():
    """A busy machine (other processes on the cores) makes torch's default threads wait for each other: the shrink
    example took 2 s with one thread and 17-382 s with the default on a busy 2-core machine. The first timings are
    followed by the advice (OMP_NUM_THREADS=1), before the first section, not only in the language-model section;
    the shrink example's "seconds" says idle, and so does the example's own docstring."""
    text = (ROOT / "README.md").read_text()
    opening = text[: text.index("\n## ")]
    assert "OMP_NUM_THREADS=1" in opening and "busy" in opening and "idle" in opening
    shrink = next(p for p in text.split("\n\n") if "examples/shrink_to_hf.py" in p and "end to end" in p)
    assert "idle" in shrink and "OMP_NUM_THREADS=1" in shrink
    example = (ROOT / "examples" / "shrink_to_hf.py").read_text()
    assert "OMP_NUM_THREADS=1" in example.split('"""')[1]
