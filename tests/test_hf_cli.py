"""model=hf, data=text_files and data=hf_dataset: any local Hugging Face causal LM on any text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightning_prune.app.hf import HFCausalLM  # noqa: E402
from lightning_prune.app.text_data import HFDatasetDataModule, TextFilesDataModule  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEQ = 32


def brute_force_windows(tokenizer_dir, documents: list[str], seq_len: int = SEQ) -> torch.Tensor:
    """Every document tokenised alone, eos after each, concatenated and cut into windows."""
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    stream: list[int] = []
    for doc in documents:
        stream += [*tok.encode(doc, add_special_tokens=False), tok.eos_token_id]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def all_windows(dm) -> torch.Tensor:
    return torch.cat([dm.split(s) for s in ("train", "val", "test")])


def corpus_docs(text_corpus) -> tuple[list[str], list[str]]:
    txt = [p.read_text(encoding="utf-8") for p in text_corpus["txt"]]
    lines = text_corpus["jsonl"][0].read_text(encoding="utf-8").splitlines()
    return txt, [json.loads(line)["text"] for line in lines]


def test_the_fixture_checkpoint_is_a_tokenizer_and_a_llama(hf_checkpoint):
    tok = transformers.AutoTokenizer.from_pretrained(hf_checkpoint)
    config = transformers.AutoConfig.from_pretrained(hf_checkpoint)
    assert config.model_type == "llama" and config.vocab_size == len(tok) and tok.eos_token == "<|endoftext|>"
    assert 300 <= len(tok) <= 512 and config.num_key_value_heads == 2 and config.num_hidden_layers == 2


def test_model_hf_computes_what_from_pretrained_computes(hf_checkpoint):
    lit = HFCausalLM(str(hf_checkpoint))
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_checkpoint).eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lit.eval()(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert isinstance(lit.model, transformers.LlamaForCausalLM) and len(lit.model.model.layers) == 2
    assert lit.hparams.path == str(hf_checkpoint) and lit.lr == 5e-5
    half = HFCausalLM(str(hf_checkpoint), dtype="bfloat16", attn_implementation="eager")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.model.config._attn_implementation == "eager"


def test_model_hf_errors_name_the_argument(hf_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.path='/no/such/dir' does not exist"):
        HFCausalLM("/no/such/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"model.path=.*empty.*not a Hugging Face checkpoint.*config.json"):
        HFCausalLM(str(tmp_path / "empty"))
    transformers.ResNetConfig().save_pretrained(tmp_path / "resnet")
    with pytest.raises(ValueError, match=r"model.path=.*resnet.*'resnet' model, which is not a causal language model"):
        HFCausalLM(str(tmp_path / "resnet"))
    with pytest.raises(ValueError, match=r"model.dtype must be one of .*got 'float64'"):
        HFCausalLM(str(hf_checkpoint), dtype="float64")
    with pytest.raises(ValueError, match=r"model.attn_implementation must be one of .*got 'fast'"):
        HFCausalLM(str(hf_checkpoint), attn_implementation="fast")
    with pytest.raises(ValueError, match=r"model=hf brings its own tokenizer .* vocab_size=4096 .*data=text_files"):
        HFCausalLM(str(hf_checkpoint), vocab_size=4096)  # what data=text passes


def test_text_files_windows_are_the_brute_force_tokenisation(hf_checkpoint, text_corpus):
    txt, jsonl = corpus_docs(text_corpus)
    files = [str(p) for p in text_corpus["txt"]] + [str(text_corpus["jsonl"][0])]
    dm = TextFilesDataModule(files, tokenizer=str(hf_checkpoint), seq_len=SEQ, val_size=0.1, test_size=5)
    want = brute_force_windows(hf_checkpoint, txt + jsonl)
    assert torch.equal(all_windows(dm), want) and len(want) >= 300
    n_val = round(0.1 * len(want))
    assert torch.equal(dm.split("val"), want[-5 - n_val : -5]) and torch.equal(dm.split("test"), want[-5:])
    # a glob, sorted, and the jsonl file read as JSON lines, alone
    glob_dm = TextFilesDataModule(
        str(text_corpus["txt"][0].parent / "doc*.txt"), tokenizer=str(hf_checkpoint), seq_len=SEQ
    )
    assert torch.equal(all_windows(glob_dm), brute_force_windows(hf_checkpoint, txt))
    jsonl_dm = TextFilesDataModule(files[-1:], tokenizer=str(hf_checkpoint), seq_len=SEQ)
    assert torch.equal(all_windows(jsonl_dm), brute_force_windows(hf_checkpoint, jsonl))
    # batches as TextDataModule gives them; calibration: the first training windows in order
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "labels"} and torch.equal(batch["input_ids"], want[len(want) - 5 - n_val :][:8])
    dm.calibration_windows = 20
    calib = torch.cat([b["input_ids"] for b in dm.calibration_dataloader()])
    assert torch.equal(calib, want[:20]) and dm.model_args == {}


def test_hf_dataset_from_json_files_and_from_disk(hf_checkpoint, text_corpus, tmp_path):
    datasets = pytest.importorskip("datasets")
    _, jsonl = corpus_docs(text_corpus)
    want = brute_force_windows(hf_checkpoint, jsonl)
    common = dict(tokenizer=str(hf_checkpoint), seq_len=SEQ)
    from_json = HFDatasetDataModule(
        "json", data_files=[str(text_corpus["jsonl"][0])], cache_dir=str(tmp_path / "cache"), **common
    )
    assert torch.equal(all_windows(from_json), want)
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": jsonl, "n": list(range(len(jsonl)))})}
    ).save_to_disk(tmp_path / "saved")
    from_disk = HFDatasetDataModule(str(tmp_path / "saved"), **common)
    assert from_disk.from_disk and torch.equal(all_windows(from_disk), want)
    with pytest.raises(ValueError, match=r"data.field='body' is not a column .*\['text', 'n'\]"):
        HFDatasetDataModule(str(tmp_path / "saved"), field="body", **common).setup()
    with pytest.raises(ValueError, match=r"data.split='validation' is not in"):
        HFDatasetDataModule(str(tmp_path / "saved"), split="validation", **common).setup()
    with pytest.raises(FileNotFoundError, match=r"data.data_files: '.*nothing\*.jsonl' matches no file"):
        HFDatasetDataModule("json", data_files=str(tmp_path / "nothing*.jsonl"), **common)


def test_the_configs_build_the_modules_with_the_checkpoints_tokenizer(hf_checkpoint, text_corpus, tmp_path):
    """conf/model/hf.yaml, conf/data/text_files.yaml and hf_dataset.yaml as composed: data.tokenizer is model.path."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lightning_prune.app.cli import config_dir

    jsonl = str(text_corpus["jsonl"][0])
    model = [f"model.path={hf_checkpoint}", "model=hf", "data.seq_len=32"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        files = compose("config", overrides=[*model, "data=text_files", f"data.files=[{jsonl}]"])
        saved = compose(
            "config",
            overrides=[
                *model,
                "data=hf_dataset",
                "data.path=json",
                f"data.data_files=[{jsonl}]",
                f"data.cache_dir={tmp_path}",
            ],
        )
    for cfg in (files, saved):
        dm = instantiate(cfg.data)
        assert dm.tokenizer_name == str(hf_checkpoint) and dm.calibration_windows == 128
        assert torch.equal(all_windows(dm), brute_force_windows(hf_checkpoint, corpus_docs(text_corpus)[1]))
    assert (
        cfg.model.dtype == "float32" and cfg.model.trust_remote_code is False and cfg.model.attn_implementation is None
    )


def test_text_data_errors_name_the_argument(hf_checkpoint, text_corpus, tmp_path):
    common = dict(tokenizer=str(hf_checkpoint), seq_len=SEQ)
    with pytest.raises(FileNotFoundError, match=r"data.files: '.*missing/\*.txt' matches no file"):
        TextFilesDataModule([str(text_corpus["txt"][0]), str(tmp_path / "missing/*.txt")], **common)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n\n{"body": "b"}\n')
    with pytest.raises(
        ValueError, match=r"bad.jsonl:3: no 'text' field \(data.field='text'; the line has \['body'\]\)"
    ):
        TextFilesDataModule(str(bad), **common).setup()
    small = tmp_path / "small.txt"
    small.write_text("def f(x):\n    return x\n" * 3)
    with pytest.raises(ValueError, match=r"the documents give \d+ tokens \(\d windows of data.seq_len=32\).*96 needed"):
        TextFilesDataModule(str(small), **common).setup()
    with pytest.raises(ValueError, match=r"data.format must be one of .*got 'csv'"):
        TextFilesDataModule(str(small), format="csv", **common)
    dm = TextFilesDataModule(str(small), **common)
    tiny = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=256, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)
    )  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"data.tokenizer=.* has 384 tokens, more than the model's vocabulary \(config.vocab_size=256\)",
    ):
        dm.check_model(tiny)
    dm.check_model(transformers.AutoModelForCausalLM.from_pretrained(hf_checkpoint))  # its own model fits


def test_cli_fine_tunes_and_prunes_a_local_checkpoint_on_local_files(hf_checkpoint, text_corpus, tmp_path):
    files = ",".join(str(p) for p in [*text_corpus["txt"], *text_corpus["jsonl"]])
    args = [
        "model=hf",
        f"model.path={hf_checkpoint}",
        "data=text_files",
        f"data.files=[{files}]",
        f"data.seq_len={SEQ}",
        "data.val_size=8",
        "data.test_size=8",
        "trainer=steps",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "pruner=magnitude",
        "pruner.target=0.5",
        "logger=none",
        "callbacks=none",
        f"save_hf={tmp_path / 'pruned'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_prune", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"] == "HFCausalLM" and results["data"] == "TextFilesDataModule"
    assert results["sparsity"] == pytest.approx(0.5, abs=0.01) and results["test_ppl"] > 1
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert len(transformers.AutoTokenizer.from_pretrained(tmp_path / "pruned")) == loaded.config.vocab_size
