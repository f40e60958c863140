"""lm-evaluation-harness on a pruned or shrunk Hugging Face causal LM, from local task files only.

The app's optional last step (``harness=local``): :func:`evaluate_harness` wraps lm-eval's ``HFLM`` around a
model already in memory (or a saved folder) and runs ``lm_eval.simple_evaluate`` on tasks that lm-eval's
``TaskManager`` finds under ``include_path`` (YAML files whose ``dataset_path: json`` points at local files).
Nothing is downloaded: unknown task names fail before any work, and the Hub is switched off for the call.
lm-eval (the ``eval`` extra) is imported only here and only when asked for; the library never imports it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

EVAL_EXTRA = "pip install 'lightning-prune[eval]'"
# the keys of a `harness` config group (conf/harness/*.yaml): evaluate_harness's arguments
CONFIG_KEYS = ("tasks", "include_path", "include_defaults", "limit", "batch_size", "num_fewshot", "device")


def _require_lm_eval() -> None:
    missing = [m for m in ("lm_eval", "datasets", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"the lm-evaluation-harness step needs {', '.join(missing)} (the `eval` extra): {EVAL_EXTRA}"
        )


@contextlib.contextmanager
def _offline_and_quiet() -> Iterator[None]:
    """Switch the Hub off, quieten lm-eval's and datasets' logs, and keep the caller's random streams.

    The environment variables alone do not do it: ``huggingface_hub`` and ``datasets`` read them once, on
    import, so their module constants are set too. ``simple_evaluate`` seeds ``random``, numpy and torch;
    their states are restored afterwards, as are the constants, the variables and the log levels."""
    import datasets
    import huggingface_hub.constants as hub
    from datasets import config as ds_config

    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    constants = [(hub, "HF_HUB_OFFLINE"), (ds_config, "HF_HUB_OFFLINE"), (ds_config, "HF_DATASETS_OFFLINE")]
    saved = [getattr(module, name) for module, name in constants]
    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets", "transformers", "httpx")]
    levels = [lg.level for lg in loggers]
    bars_were_off = datasets.are_progress_bars_disabled()
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        os.environ.update(dict.fromkeys(env, "1"))
        for module, name in constants:
            setattr(module, name, True)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        datasets.disable_progress_bars()
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for (module, name), value in zip(constants, saved, strict=True):
            setattr(module, name, value)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if not bars_were_off:
            datasets.enable_progress_bars()
        random.setstate(py_state)
        np.random.set_state(np_state)


def task_manager(include_path: str | Path | Sequence[str | Path] | None = None, include_defaults: bool = False) -> Any:
    """lm-eval's ``TaskManager`` over ``include_path`` (a folder or YAML file, or a list of them).

    lm-eval's own tasks are left out unless ``include_defaults``: indexing them takes ~20 s and their
    data sets come from the Hub, which this step never reaches (they run only from the local cache)."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) else include_path
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"include_path: {str(p)!r} does not exist (a folder of lm-eval task YAML files)")
    return TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=include_defaults)


def check_tasks(tasks: Sequence[str], manager: Any) -> list[str]:
    """The task names as a list, after checking that every one is a task, group or tag ``manager`` knows."""
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"tasks: expected a non-empty list of task names, got {tasks!r}")
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = manager.include_path or "(no include_path)"
        shown = ", ".join(sorted(known)[:20]) + (" ..." if len(known) > 20 else "") if known else "none"
        raise ValueError(
            f"tasks: unknown lm-eval task(s) {unknown}; tasks are looked up in include_path={where!r} "
            f"(folders of task YAML files; lm-eval's own tasks only with include_defaults=True). Known: {shown}"
        )
    return list(tasks)


def _load(model: Any, tokenizer: Any, device: str | None) -> tuple[torch.nn.Module, Any]:
    """The model and a private copy of the tokenizer (lm-eval may give it a pad token), from memory or a folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

    if isinstance(model, (str, Path)):
        folder = Path(model).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model: {str(model)!r} is not a saved Hugging Face model folder (no config.json)")
        tokenizer = folder if tokenizer is None else tokenizer
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        if device is not None:
            model = model.to(device)
    elif not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model: expected a Hugging Face causal LM or a folder, got {type(model).__name__}")
    elif device is not None and not _same_device(torch.device(device), model.device):
        raise ValueError(f"device: {device!r} but the model is on {model.device}; move it there first or pass None")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    elif type(tokenizer).__module__.startswith("tokenizers"):  # a bare `tokenizers.Tokenizer` (the app's text data)
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer: expected a Hugging Face tokenizer or a folder, got {type(tokenizer).__name__}")
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.eos_token is None:
        from lightning_prune.app.data import EOS

        # the app's tokenizers (data=text) end documents with EOS but are saved without naming it
        if tokenizer.convert_tokens_to_ids(EOS) not in (None, tokenizer.unk_token_id):
            tokenizer.eos_token = EOS
    return model, tokenizer


def _same_device(want: torch.device, have: torch.device) -> bool:
    return want.type == have.type and want.index in (None, have.index)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compact(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from ``simple_evaluate``'s results: no aliases and no stderr but the main metric's.

    lm-eval names a value ``"metric,filter"``; the usual filter ``none`` is dropped from the name. The main
    metric is the first the task reports; its stderr stays (as ``metric_stderr``) when lm-eval computed one."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        raw = {k: v for k, v in values.items() if "," in k}  # the rest is "alias" and the like
        row = {k.removesuffix(",none"): float(v) for k, v in raw.items() if "_stderr," not in k and _number(v)}
        main = next((k for k in raw if "_stderr," not in k), None)
        if main is not None:
            metric, kept = main.split(",", 1)
            stderr = f"{metric}_stderr,{kept}"
            if _number(raw.get(stderr)):
                row[stderr.removesuffix(",none")] = float(raw[stderr])
        out[task] = row
    return out


def evaluate_harness(
    model: torch.nn.Module | str | Path,
    tokenizer: Any = None,
    tasks: Sequence[str] = (),
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = False,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    num_fewshot: int | None = None,
    device: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness ``tasks`` on a causal LM and return ``{task: {metric: value}}``.

    ``model`` is a loaded Hugging Face causal LM (evaluated where it is; ``device`` must then be None or its
    device) or a saved folder (loaded with ``AutoModelForCausalLM`` onto ``device``, its tokenizer from the same
    folder unless ``tokenizer`` is given). ``tokenizer``: a Hugging Face tokenizer, a folder, or a bare
    ``tokenizers.Tokenizer``. ``limit`` caps the documents per task (a fraction if below 1); ``num_fewshot``
    overrides the tasks' own. The model is left in eval mode; the caller's tokenizer and random streams are
    left as they were."""
    _require_lm_eval()
    manager = task_manager(include_path, include_defaults)
    names = check_tasks(tasks, manager)
    if limit is not None and (not _number(limit) or limit <= 0):
        raise ValueError(f"limit: expected a positive count or fraction, got {limit!r}")
    model, tokenizer = _load(model, tokenizer, device)
    with _offline_and_quiet():
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False
        )
    return compact(results)


def run_from_config(cfg_harness: Mapping[str, Any] | None, hf_model: Any, tokenizer: Any) -> dict | None:
    """The CLI's step: :func:`evaluate_harness` with the ``harness`` config group's keys, or None without tasks."""
    if cfg_harness is None:
        return None
    from omegaconf import DictConfig, OmegaConf

    cfg = OmegaConf.to_container(cfg_harness, resolve=True) if isinstance(cfg_harness, DictConfig) else cfg_harness
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"harness: unknown key(s) {unknown}; the keys are {list(CONFIG_KEYS)}")
    if not cfg.get("tasks"):
        return None
    kwargs = {k: cfg[k] for k in CONFIG_KEYS[1:] if cfg.get(k) is not None}
    return evaluate_harness(hf_model, tokenizer, list(cfg["tasks"]), **kwargs)
