"""lm-evaluation-harness on a tiny random LLaMA, with a task defined from local files only.

The accuracy lm-eval reports is checked against the choices' log-likelihoods computed directly with the model
(the sum of the continuation tokens' log-probabilities given the context); the gold labels are chosen from
those so that the right answer is a known fraction (5 of 8), not 0 or 1. A saved folder gives what the model
in memory gives; unknown tasks, a missing include_path and a missing `tasks` list fail with clear errors.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from lightning_prune.app import harness  # noqa: E402

QUESTIONS = [
    ("Is the sky blue?", ["yes", "no", "maybe"]),
    ("What colour is grass?", ["green", "red", "blue"]),
    ("Where did the cat sit?", ["on the mat", "on the log", "in a tree"]),
    ("What comes after two?", ["three", "five", "ten"]),
    ("Which animal sat on the log?", ["the dog", "the cat", "a bird"]),
    ("Is the grass red?", ["no", "yes", "sometimes"]),
    ("What comes before ten?", ["nine", "one", "four"]),
    ("Name a colour.", ["purple", "seven", "mat"]),
]
CORRECT = 5  # the first five documents' gold answer is the model's own first choice, the others' is not


@pytest.fixture(scope="module")
def lm(hf_checkpoint):
    """The shared tiny checkpoint (tests/lm_fixtures.py: a byte-level BPE with an end-of-text token and a random
    two-layer LLaMA), loaded: the model in memory and its tokenizer."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_checkpoint).eval()
    return model, transformers.AutoTokenizer.from_pretrained(hf_checkpoint)


def compose(overrides: list[str]):
    """The app's config (conf/config.yaml) with ``overrides``, as ``lightning-prune`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lightning_prune.app import cli

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(cli.config_dir()), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation token | everything before it), the continuation tokenised on its own."""
    ctx, cont = tokenizer(context).input_ids, tokenizer(continuation).input_ids
    assert tokenizer(context + continuation).input_ids == ctx + cont  # the split lm-eval makes is the same
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


@pytest.fixture(scope="module")
def task(lm, tmp_path_factory):
    """A multiple-choice task from a local jsonl, its gold labels set from the brute-force likelihoods."""
    model, tokenizer = lm
    folder = tmp_path_factory.mktemp("tasks")
    docs, expect_acc, expect_norm = [], 0, 0
    for i, (question, choices) in enumerate(QUESTIONS):
        lls = [loglikelihood(model, tokenizer, f"Question: {question} Answer:", " " + c) for c in choices]
        best = max(range(len(choices)), key=lls.__getitem__)
        label = best if i < CORRECT else (best + 1) % len(choices)
        norm = max(range(len(choices)), key=lambda j: lls[j] / len(choices[j]))
        expect_acc, expect_norm = expect_acc + (best == label), expect_norm + (norm == label)
        docs.append({"question": question, "choices": choices, "label": label})
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "tiny_mc.yaml").write_text(
        f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}} Answer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    )
    assert expect_acc == CORRECT
    return folder, expect_acc / len(docs), expect_norm / len(docs)


@pytest.fixture(scope="module")
def in_memory(lm, task):
    model, tokenizer = lm
    return harness.evaluate_harness(model, tokenizer, ["tiny_mc"], include_path=task[0], batch_size=4)


def test_accuracy_equals_the_brute_force_choice_likelihoods(in_memory, task):
    _, acc, acc_norm = task
    row = in_memory["tiny_mc"]
    assert set(row) == {"acc", "acc_norm", "acc_stderr"}  # no aliases, only the main metric's stderr
    assert row["acc"] == acc == CORRECT / len(QUESTIONS)
    assert row["acc_norm"] == acc_norm
    # lm-eval's stderr of a mean: the sample standard deviation over sqrt(n)
    n = len(QUESTIONS)
    assert row["acc_stderr"] == pytest.approx((acc * (1 - acc) * n / (n - 1) / n) ** 0.5)


def test_a_saved_folder_gives_what_the_model_in_memory_gives(hf_checkpoint, task, in_memory):
    assert harness.evaluate_harness(hf_checkpoint, None, ["tiny_mc"], include_path=task[0], batch_size=4) == in_memory


def test_the_config_step_takes_a_bare_tokenizer_runs_offline_and_leaves_the_caller_as_it_was(
    lm, task, in_memory, monkeypatch
):
    """run_from_config with the text data's kind of tokenizer (a bare `tokenizers.Tokenizer`, its end-of-text
    token found by name) gives the same numbers; the Hub is off while lm-eval asks it about the model (it does,
    for its report), and the environment, the offline switch, the caller's tokenizer and random streams are as
    before afterwards."""
    import datasets
    import huggingface_hub
    import huggingface_hub.constants as hub

    asked = []

    def model_info(self, *args, **kwargs):
        asked.append((hub.is_offline_mode(), datasets.config.HF_HUB_OFFLINE))
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)

    model, tokenizer = lm
    before_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    was_offline, pad = hub.HF_HUB_OFFLINE, tokenizer.pad_token
    torch.manual_seed(123)
    random.seed(123)
    want = (torch.rand(3).tolist(), random.random())
    torch.manual_seed(123)
    random.seed(123)
    cfg = compose(["harness=local", "harness.tasks=[tiny_mc]", f"harness.include_path={task[0]}"])
    assert set(cfg.harness) == set(harness.CONFIG_KEYS)  # conf/harness/local.yaml shows every key
    assert harness.run_from_config(cfg.harness, model, tokenizer.backend_tokenizer) == in_memory
    assert asked == [(True, True)]
    assert (torch.rand(3).tolist(), random.random()) == want
    assert {k: os.environ.get(k) for k in before_env} == before_env and was_offline == hub.HF_HUB_OFFLINE
    assert tokenizer.pad_token == pad is None  # lm-eval set a pad token on its own copy only
    # the bare tokenizer's end-of-text token is named again (lm-eval pads and prefixes with it)
    assert harness._load(model, tokenizer.backend_tokenizer, None)[1].eos_token == "<|endoftext|>"


def test_no_tasks_configured_runs_nothing(lm):
    """The default group (harness=none), no tasks, and an empty list; a misspelt key is an error."""
    model, tokenizer = lm
    assert harness.run_from_config(compose([]).harness, model, tokenizer) is None
    assert harness.run_from_config(None, model, tokenizer) is None
    assert harness.run_from_config({}, model, tokenizer) is None
    assert harness.run_from_config({"tasks": [], "include_path": None}, model, tokenizer) is None
    with pytest.raises(ValueError, match=r"harness: unknown key\(s\) \['task'\]"):
        harness.run_from_config({"task": ["tiny_mc"]}, model, tokenizer)


def test_bad_tasks_fail_before_any_work_naming_the_task_and_the_include_path(lm, task):
    model, tokenizer = lm
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['hellaswag'\].*include_path=.*tiny_mc"):
        harness.evaluate_harness(model, tokenizer, ["tiny_mc", "hellaswag"], include_path=task[0])
    with pytest.raises(FileNotFoundError, match="include_path: '/no/such/folder' does not exist"):
        harness.evaluate_harness(model, tokenizer, ["tiny_mc"], include_path="/no/such/folder")
    with pytest.raises(ValueError, match="tasks: expected a non-empty list"):
        harness.evaluate_harness(model, tokenizer, "tiny_mc", include_path=task[0])
    with pytest.raises(ValueError, match="limit: expected a positive count or fraction, got 0"):
        harness.evaluate_harness(model, tokenizer, ["tiny_mc"], include_path=task[0], limit=0)
    with pytest.raises(FileNotFoundError, match="not a saved Hugging Face model folder"):
        harness.evaluate_harness("/no/such/model", None, ["tiny_mc"], include_path=task[0])
    with pytest.raises(TypeError, match="tokenizer: expected a Hugging Face tokenizer or a folder, got NoneType"):
        harness.evaluate_harness(model, None, ["tiny_mc"], include_path=task[0])
    with pytest.raises(ValueError, match="device: 'meta' but the model is on cpu"):
        harness.evaluate_harness(model, tokenizer, ["tiny_mc"], include_path=task[0], device="meta")


def test_without_lm_eval_the_error_names_the_extra(monkeypatch):
    real = harness.importlib.util.find_spec
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda m: None if m == "lm_eval" else real(m))
    with pytest.raises(ModuleNotFoundError, match=r"lm_eval .*pip install 'lightning-prune\[eval\]'"):
        harness.evaluate_harness(torch.nn.Linear(1, 1), None, ["x"])
