"""The language-model pieces: Python's stdlib as a corpus, the LLaMA LightningModule, perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_prune.app.data import TextDataModule, stdlib_sources

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> TextDataModule:
    dm = TextDataModule(
        max_files=40, vocab_size=512, seq_len=32, batch_size=4, cache_dir=str(tmp_path_factory.mktemp("t"))
    )
    dm.setup()
    return dm


def test_corpus_is_the_standard_library_split_by_file(text):
    files = stdlib_sources()
    assert len(files) > 300 and all(p.suffix == ".py" and "test" not in p.parts for p in files)
    shapes = {s: text.split(s).shape for s in ("train", "val", "test")}
    assert all(n > 0 and t == 32 for n, t in shapes.values())
    assert shapes["train"][0] > 5 * (shapes["val"][0] + shapes["test"][0])
    # windows of one file never land in two splits: the splits share no window
    train = {tuple(w.tolist()) for w in text.split("train")}
    assert not any(tuple(w.tolist()) in train for w in text.split("test"))
    assert int(text.split("train").max()) < 512 and text.tokenizer.get_vocab_size() == 512
    batch = next(iter(text.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"} and torch.equal(batch["input_ids"], batch["labels"])
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.long


def test_tokenizer_and_ids_are_cached_and_identical(text):
    again = TextDataModule(max_files=40, vocab_size=512, seq_len=32, cache_dir=str(text.cache_dir))
    again.setup()
    for split in ("train", "val", "test"):
        assert torch.equal(again.split(split), text.split(split))
    assert again.tokenizer.decode(text.split("val")[0].tolist()).strip()  # real text back


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 100}, "`vocab_size` must be an integer >= 260"),
        ({"seq_len": 1}, "`seq_len` must be an integer >= 2"),
        ({"max_files": 2}, "`max_files` must be None or an integer >= 3"),
        ({"root": "/nonexistent"}, "`root` .* is not a folder"),
    ],
)
def test_bad_text_arguments_name_themselves(kwargs, match, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        TextDataModule(cache_dir=str(tmp_path), **kwargs).setup()


def test_causal_lm_perplexity_is_exp_of_the_mean_token_loss(text):
    from lightning_prune.app.models import CausalLM, perplexity

    lit = CausalLM(**text.model_args, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64).eval()
    names = [n for n, _ in lit.named_parameters()]
    assert "model.lm_head.weight" in names and "model.model.layers.1.mlp.down_proj.weight" in names
    loader = text.val_dataloader()
    losses = [float(lit(**b).loss) for b in loader]
    sizes = [b["input_ids"].shape[0] for b in loader]
    expected = math.exp(sum(loss * n for loss, n in zip(losses, sizes)) / sum(sizes))
    assert perplexity(lit.model, loader) == pytest.approx(expected, rel=1e-5)
    assert 100 < expected < 2000  # a random model: about the vocabulary size
    key, value = lit.round_metric(loader)
    assert key == "val_ppl" and value == pytest.approx(expected, rel=1e-5)


def test_llama_example_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "examples/llama_text.py", "--steps", "12", "--files", "40", "--layers", "2"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation perplexity: dense" in proc.stdout and "pruned to 60% and fine-tuned" in proc.stdout


def test_documented_language_model_runs_take_minutes_and_the_long_run_is_one_override():
    """`experiment=llama_text` was 1,500 steps of a 5.1M model on the whole library (over 70 minutes on
    2 cores); the README's LM commands now compose to a bounded budget, the long run to the old one."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from lightning_prune.app import cli
    from lightning_prune.app.cli_run import _model

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    commands = [line.split("  #")[0].strip() for line in readme.splitlines() if line.startswith("lightning-prune ")]
    commands = [c for c in commands if "llama" in c]
    assert "lightning-prune experiment=llama_text" in commands
    assert "lightning-prune model=llama_tiny data=text trainer=steps pruner=magnitude" in commands
    assert "experiment=llama_text_full" in readme
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(cli.config_dir()), version_base="1.3"):
        for command in commands:
            cfg = compose("config", overrides=command.split()[1:])
            model = _model(cfg, instantiate(cfg.data))
            blocks = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
            assert sum(p.numel() for p in model.parameters()) <= 2_000_000 and blocks <= 900_000, command
            assert cfg.trainer.max_epochs == -1 and cfg.trainer.max_steps <= 300, command
            assert cfg.trainer.max_steps * cfg.data.batch_size * cfg.data.seq_len <= 300 * 16 * 128, command  # tokens
            assert cfg.data.max_files is not None and cfg.data.max_files <= 150, command  # tokenised in seconds
            # rounds start after a dense warm-up and leave steps to fine-tune
            start = cfg.pruner.start_step
            end = cfg.pruner.end_step or start + (cfg.trainer.max_steps - start) // 2
            assert 0 < start < end < cfg.trainer.max_steps, command
            assert cfg.trainer.val_check_interval < start, command  # the dense perplexity, before the first round
        full = compose("config", overrides=["experiment=llama_text_full"])
        model = _model(full, instantiate(full.data))
        assert full.model.num_layers == 8 and full.model.hidden_size == 192 and full.data.max_files is None
        assert 5.0e6 < sum(p.numel() for p in model.parameters()) < 5.2e6
        assert full.trainer.max_steps == 1500 and full.pruner.target == 0.6 and full.pruner.blocks == "auto"
    GlobalHydra.instance().clear()
