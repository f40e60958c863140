"""The three recipes (``experiment=oneshot``, ``shrink_distill``, ``prune_while_distilling``) end to end on the
tiny saved LLaMA of ``tests/lm_fixtures.py``: each model card parsed and compared with ``results.json``, its
numbers measured again on the folder it describes, and the card's pieces against closed forms."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
yaml = pytest.importorskip("yaml")

from lightning_prune.app import card  # noqa: E402
from lightning_prune.app.text_data import TextFilesDataModule  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEQ, BATCH, CALIBRATION = 32, 4, 16
QUICK = [
    f"data.seq_len={SEQ}",
    f"data.batch_size={BATCH}",
    f"data.calibration_windows={CALIBRATION}",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=4",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "print_config=false",
]
RECIPES = {
    "oneshot": ["experiment=oneshot", "pruner.num_batches=4"],
    "shrink": ["experiment=shrink_distill", "shrink.num_batches=4", "shrink.candidates=3", "trainer.max_steps=6"],
    "pwd": ["experiment=prune_while_distilling", "pruner.num_batches=4", "trainer.max_steps=12"],
}


def lightning_prune(args: list[str], out: Path, command: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    proc = subprocess.run(
        [*(command or [sys.executable, "-m", "lightning_prune"]), *args, f"hydra.run.dir={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"{args}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc


def data_args(hf_checkpoint: Path, text_corpus: dict) -> list[str]:
    files = ",".join(str(p) for p in [*text_corpus["txt"], *text_corpus["jsonl"]])
    return [f"model.path={hf_checkpoint}", f"data.files=[{files}]", *QUICK]


@pytest.fixture(scope="module")
def runs(hf_checkpoint, text_corpus, tmp_path_factory) -> dict[str, Path]:
    """The three recipes, two at a time (each is mostly one process's imports): name -> the run's folder."""
    base = tmp_path_factory.mktemp("recipes")
    common = data_args(hf_checkpoint, text_corpus)
    extra = {"oneshot": ["harness=local", "harness.tasks=[tiny_mc]", f"harness.include_path={harness_task(base)}"]}
    # shrink_distill through the README's example (examples/smaller_llm.sh: the recipe, then the card printed)
    files = ",".join(str(p) for p in [*text_corpus["txt"], *text_corpus["jsonl"]])
    example = ["bash", "examples/smaller_llm.sh", str(hf_checkpoint), files, str(base / "shrink" / "model")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {
            name: pool.submit(
                lightning_prune,
                [*args[1:], *QUICK] if name == "shrink" else [*args, *common, *extra.get(name, [])],
                base / name,
                example if name == "shrink" else None,
            )
            for name, args in RECIPES.items()
        }
        printed = jobs["shrink"].result().stdout
        for job in jobs.values():
            job.result()
    card_text = (base / "shrink" / "model" / "README.md").read_text()
    assert printed.rstrip().endswith(card_text.rstrip())  # the example prints the card it wrote
    return {name: base / name for name in RECIPES}


def harness_task(base: Path) -> Path:
    """A three-question multiple-choice task of lm-evaluation-harness, from a local file."""
    folder = base / "tasks"
    folder.mkdir()
    docs = [
        ("Is the sky blue?", ["yes", "no"]),
        ("What comes after two?", ["three", "five"]),
        ("A colour?", ["red", "ten"]),
    ]
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": 0}) + "\n" for q, c in docs))
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "Question: {{question}} Answer:"\ndoc_to_target: label\n'
        'doc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc\n'
    )
    return folder


def parse_card(text: str) -> dict:
    """The model card read back: its front matter, and every number it prints, as the card's facts hold them."""
    _, front, body = text.split("---\n", 2)
    rows = {k: (a, b) for k, a, b in re.findall(r"^\| ([^|]+) \| ([\d,-]+) \| ([\d,-]+) \|$", body, flags=re.M)}

    def number(s: str) -> int | None:
        return None if s == "-" else int(s.replace(",", ""))

    sizes = {k: [number(a), number(b)] for k, (a, b) in rows.items() if not k.startswith("parameters")}
    labels = {v: k for k, v in card.PARAMS.items()}
    params = {
        labels[k[len("parameters (") : -1]]: [number(a), number(b)] for k, (a, b) in rows.items() if k not in sizes
    }
    names = {v: k for k, v in card.PERPLEXITY.items()}
    ppl = {names[k]: float(v) for k, v in re.findall(r"^\| (parent|after \w+) \| ([\d.]+) \|$", body, flags=re.M)}
    measured = re.search(r"Measured on .*: ([\d,]+) windows of (\d+) tokens, ([\d,]+) tokens\.", body)
    recovery = re.search(
        r"Recovery: ([\d,]+) tokens \((\d+) steps x (\d+) sequences x (\d+) tokens x (\d+) devices x (\d+) accum", body
    )
    return {
        "front": yaml.safe_load(front),
        "parent": re.search(r"^Parent: (.+)$", body, flags=re.M).group(1),
        "sizes": sizes,
        "params": params,
        "perplexity": ppl,
        "eval": [
            int(measured.group(1).replace(",", "")),
            int(measured.group(2)),
            int(measured.group(3).replace(",", "")),
        ],
        "recovery": None if recovery is None else [int(g.replace(",", "")) for g in recovery.groups()],
        "command": re.search(r"```bash\n(.+)\n```", body).group(1),
        "harness": json.loads(harness.group(1)) if (harness := re.search(r"```json\n(.+?)\n```", body, re.S)) else None,
    }


def check_card(out: Path, hf_checkpoint: Path, recipe: str) -> tuple[dict, dict]:
    """The card parsed equals results.json's facts, number for number; returns (results, facts)."""
    results = json.loads((out / "results.json").read_text())
    facts, directory = results["card"], Path(results["hf_checkpoint"])
    assert directory == out / "model"  # the experiments' default save_hf
    parsed = parse_card((directory / "README.md").read_text())
    assert parsed["front"] == {
        "library_name": "transformers", "base_model": str(hf_checkpoint), "tags": ["pruned", "lightning-prune"],
    }  # fmt: skip
    assert parsed["parent"] == facts["parent"] == str(hf_checkpoint)
    assert parsed["sizes"] == facts["sizes"] and parsed["params"] == facts["params"]
    assert parsed["perplexity"] == facts["perplexity"]
    ev = facts["eval_data"]
    assert parsed["eval"] == [ev["windows"], ev["seq_len"], ev["tokens"]] and ev["tokens"] == ev["windows"] * SEQ
    assert ev["source"] == "TextFilesDataModule" and ev["settings"]["seq_len"] == SEQ and ev["split"] == "validation"
    r = facts["recovery"]
    if r is None:
        assert parsed["recovery"] is None
    else:
        assert parsed["recovery"] == [r["tokens"], r["steps"], r["batch"], r["seq_len"], r["devices"], r["accumulate"]]
        assert r["tokens"] == r["steps"] * r["batch"] * r["seq_len"] * r["devices"] * r["accumulate"]
    assert parsed["command"] == facts["command"]
    assert (
        parsed["command"].startswith(f"lightning-prune {RECIPES[recipe][0]} ")
        and "hydra.run.dir" not in facts["command"]
    )
    assert parsed["harness"] == facts["harness"]
    return results, facts


def measured_again(directory: Path, hf_checkpoint: Path, text_corpus: dict) -> tuple[float, object]:
    """The held-out perplexity of the saved folder, measured here on the same validation windows, and its model."""
    files = [str(p) for p in [*text_corpus["txt"], *text_corpus["jsonl"]]]
    dm = TextFilesDataModule(files=files, tokenizer=str(hf_checkpoint), seq_len=SEQ, batch_size=BATCH,
                             calibration_windows=CALIBRATION)  # fmt: skip
    dm.setup("fit")
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    return card.held_out(model, dm.val_dataloader())["perplexity"], model


def curves(out: Path) -> list[dict]:
    (path,) = out.glob("csv/version_*/metrics.csv")
    return list(csv.DictReader(path.open()))


def test_oneshot_prunes_a_pretrained_model_without_a_checkpoint_and_its_card_says_so(runs, hf_checkpoint, text_corpus):
    results, facts = check_card(runs["oneshot"], hf_checkpoint, "oneshot")
    assert results["method"] == "sparsegpt" and results["sparsity"] == pytest.approx(0.5, abs=1e-3)
    # harness=local: lm-evaluation-harness on the saved folder, its results on the card and in results.json
    assert facts["harness"]["tiny_mc"]["acc"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert results["source_checkpoint"] == str(hf_checkpoint)
    # unstructured: the same shape, half the weights of the pruned layers zero
    (a, b), (ne_a, ne_b) = facts["params"]["total"], facts["params"]["non_embedding"]
    assert facts["sizes"]["MLP neurons"] == [96, 96] and a == b and ne_a == ne_b
    config = transformers.AutoConfig.from_pretrained(hf_checkpoint)
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * (48 // 4)
    linear = 2 * (h * h + 2 * h * kv + h * h + 3 * h * i)
    assert facts["params"]["non_embedding_nonzero"] == [ne_a, ne_a - linear // 2]
    ppl, _ = measured_again(results["hf_checkpoint"], hf_checkpoint, text_corpus)
    assert ppl == pytest.approx(facts["perplexity"]["pruned"], abs=1e-3)
    parent = transformers.AutoModelForCausalLM.from_pretrained(hf_checkpoint)
    assert facts["perplexity"]["dense"] == pytest.approx(ppl_of(parent, hf_checkpoint, text_corpus), abs=1e-3)


def ppl_of(model, hf_checkpoint: Path, text_corpus: dict) -> float:
    files = [str(p) for p in [*text_corpus["txt"], *text_corpus["jsonl"]]]
    dm = TextFilesDataModule(files=files, tokenizer=str(hf_checkpoint), seq_len=SEQ, batch_size=BATCH)
    dm.setup("fit")
    return card.held_out(model, dm.val_dataloader())["perplexity"]


def test_shrink_distill_picks_a_smaller_shape_distils_it_and_the_card_describes_the_folder(
    runs, hf_checkpoint, text_corpus
):
    out = runs["shrink"]
    results, facts = check_card(out, hf_checkpoint, "shrink")
    ppl, saved = measured_again(results["hf_checkpoint"], hf_checkpoint, text_corpus)
    assert ppl == pytest.approx(facts["perplexity"]["recovered"], abs=1e-3)
    assert results["perplexity"] == facts["perplexity"] and set(facts["perplexity"]) == {"dense", "pruned", "recovered"}
    assert facts["params"]["total"][1] == sum(p.numel() for p in saved.parameters())
    # the budget: at most half the parent's non-embedding parameters, the best of the candidates ranked
    assert facts["params"]["non_embedding"][1] <= facts["params"]["non_embedding"][0] // 2
    rows = results["shrink"]["candidates"]
    best = min(rows, key=lambda r: r["loss"])
    assert len(rows) == 3 and best["params"] == facts["params"]["non_embedding"][1]
    keys = {"hidden size": "hidden_size", "attention heads": "num_attention_heads", "MLP neurons": "intermediate_size",
            "kv heads": "num_key_value_heads", "blocks": "num_hidden_layers"}  # fmt: skip
    assert {k: getattr(saved.config, v) for k, v in keys.items()} == {k: v[1] for k, v in facts["sizes"].items()}
    assert facts["recovery"] == {"steps": 6, "batch": BATCH, "seq_len": SEQ, "devices": 1, "accumulate": 1,
                                 "tokens": 6 * BATCH * SEQ}  # fmt: skip
    rows = curves(out)  # the student's loss, the KD term, the size, perplexity at each validation
    kd = [float(r["distill/kd"]) for r in rows if r.get("distill/kd")]
    density = {float(r["size/density"]) for r in rows if r.get("size/density")}
    (ne_dense, ne_small) = facts["params"]["non_embedding"]
    assert len(kd) == 6 and all(k >= 0 for k in kd) and len(density) == 1
    assert density.pop() == pytest.approx(ne_small / ne_dense)  # of the dense parent, all along
    assert len([r for r in rows if r.get("distill/task")]) == len([r for r in rows if r.get("distill/teacher")]) == 6
    assert len([r for r in rows if r.get("val/ppl")]) == 2


def test_prune_while_distilling_removes_heads_and_neurons_in_three_rounds_and_saves_the_smaller_model(
    runs, hf_checkpoint, text_corpus
):
    out = runs["pwd"]
    results, facts = check_card(out, hf_checkpoint, "pwd")
    assert [h["global_step"] for h in results["history"]] == [1, 4, 7]  # quarters of 12 steps, from step 1
    assert facts["harness"] is None  # harness=none
    assert results["distill"] == "kd" and results["sparsity"] == pytest.approx(0.5, abs=1e-3)
    sizes = facts["sizes"]
    assert sizes["attention heads"] == [4, 2] and sizes["kv heads"] == [2, 1] and sizes["MLP neurons"] == [96, 48]
    assert sizes["hidden size"] == [48, 48] and sizes["blocks"] == [2, 2]
    ppl, saved = measured_again(results["hf_checkpoint"], hf_checkpoint, text_corpus)
    assert ppl == pytest.approx(facts["perplexity"]["recovered"], abs=1e-3) and set(facts["perplexity"]) == {
        "dense", "recovered"
    }  # fmt: skip
    ne = facts["params"]["non_embedding"][1]
    assert ne == card.count_params(saved)["non_embedding"] and facts["params"]["non_embedding_nonzero"][1] == ne
    rows = curves(out)
    size = {int(r["step"]): float(r["size/params_non_embedding"]) for r in rows if r.get("size/params_non_embedding")}
    # the size curve counts the masked heads and neurons as removed: at the end, the saved model's size
    assert size[max(size)] == ne and size[0] < facts["params"]["non_embedding"][0]
    assert [size[s] for s in sorted(size)] == sorted(size.values(), reverse=True)  # only ever smaller
    assert len(set(size.values())) == 3  # one size per round
    assert any(r.get("distill/kd") for r in rows) and any(r.get("val/ppl") for r in rows)


@pytest.mark.slow
def test_shrink_distill_on_two_processes(hf_checkpoint, text_corpus, tmp_path):
    """trainer=ddp_cpu: the search once on rank 0, the shrunk model handed to rank 1 through the run's folder, the
    dense teacher on each rank; the card counts both devices' tokens."""
    out = tmp_path / "ddp"
    args = [
        *RECIPES["shrink"],
        *data_args(hf_checkpoint, text_corpus),
        "trainer=ddp_cpu",
        "+trainer.limit_val_batches=4",
    ]
    proc = lightning_prune([a for a in args if not a.startswith(("trainer.val_check", "trainer.limit_val"))], out)
    results, facts = check_card(out, hf_checkpoint, "shrink")
    assert facts["recovery"]["devices"] == 2 and facts["recovery"]["tokens"] == 6 * BATCH * SEQ * 2
    assert (out / "shrunk" / "config.json").is_file() and proc.stdout.count("shrink_to: ") == 3  # rank 0 only
    ppl, _ = measured_again(results["hf_checkpoint"], hf_checkpoint, text_corpus)
    assert ppl == pytest.approx(facts["perplexity"]["recovered"], abs=1e-3)


def test_parameter_counts_are_the_llama_closed_form():
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    h, i, hd = 16, 24, 4
    block = h * 4 * hd + 2 * h * 2 * hd + 4 * hd * h + 3 * h * i + 2 * h
    assert card.count_params(model) == {"total": 3 * block + h + 2 * 50 * h, "non_embedding": 3 * block + h}
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :5] = 0  # 5 neurons' columns masked
    assert card.count_params(model, nonzero=True)["non_embedding"] == 3 * block + h - 5 * h
    assert card.sizes(model) == {"hidden size": 16, "attention heads": 4, "kv heads": 2, "MLP neurons": 24, "blocks": 3}


def test_held_out_perplexity_is_exp_of_the_mean_loss_over_every_predicted_token():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=30, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2))  # fmt: skip
    batches = [{"input_ids": torch.randint(0, 30, (b, 7))} for b in (3, 1)]
    with torch.no_grad():
        logits = torch.cat([model(input_ids=x["input_ids"]).logits for x in batches])
        ids = torch.cat([x["input_ids"] for x in batches])
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 30), ids[:, 1:].reshape(-1))
    got = card.held_out(model, batches)
    assert got == {"perplexity": round(math.exp(float(nll)), 4), "windows": 4, "seq_len": 7, "tokens": 28}


def test_the_command_is_quoted_for_a_shell_and_the_round_steps_are_quarters():
    from lightning_prune.app.cli import steps_at

    assert card.command(["experiment=oneshot", "data.files=[a b.txt]"]) == (
        "lightning-prune experiment=oneshot 'data.files=[a b.txt]'"
    )
    assert [steps_at(300, 0.25), steps_at(300, 0.5, 1), steps_at(2, 0.25)] == [75, 151, 1]
    with pytest.raises(ValueError, match=r"`trainer.max_steps` must be >= 1, got -1"):
        steps_at(-1, 0.25)


def test_shrink_without_distillation_is_refused_naming_the_key():
    from omegaconf import OmegaConf

    from lightning_prune.app.recipes import run_shrink

    with pytest.raises(ValueError, match="mode=shrink distils the shrunk model from the dense one: add distill=kd"):
        run_shrink(OmegaConf.create({"mode": "shrink", "distill": {}}))
