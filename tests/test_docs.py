"""The README's two commands stay true: CI runs exactly the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)[:2]


def test_readme_opens_with_main_job_and_test_commands():
    main_job, tests = _commands()
    assert main_job.startswith("python3 -m venv .venv") and main_job.endswith("lightning-prune")
    assert "pip install torch==2.13.0" in main_job and "pip install torch==2.13.0" in tests
    assert tests.endswith("pytest -q")


def test_ci_runs_the_readme_test_command():
    _, tests = _commands()
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run adds -q to pip for quieter logs; otherwise the command is the README's
    assert tests.replace("pip install ", "pip install -q ") in ci
