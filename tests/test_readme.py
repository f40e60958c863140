"""Every Python snippet of the README that can run on a CPU runs as printed.

Each ```python block is executed in a namespace that defines the names the README leaves to the
reader (``model``, ``datamodule``, ``hf_model``, ``lit``, ``calibration_batches``, ...). Blocks that
name ``hf_model`` run for a LLaMA and a GPT-2 (``Conv1D``) model. ``Trainer`` budgets are capped (as
``test_commands.py`` lowers ``max_epochs``) so the suite stays fast; nothing else is changed.
Later blocks use what earlier ones imported (the package's public names). Blocks for GPUs
(``.cuda()``, ``accelerator="gpu"``) are skipped. After a block runs, every pruner it made that
pruned something still holds exact zeros under its masks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, make_data
from torch.utils.data import DataLoader

import lightning_prune
from lightning_prune import Pruner
from lightning_prune.callbacks import PruningCallback

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
GPU = (".cuda()", 'accelerator="gpu"')


def snippets() -> list[str]:
    return re.findall(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def cases() -> list[Any]:
    out = []
    for i, code in enumerate(snippets()):
        marks = [pytest.mark.skip(reason="needs GPUs")] if any(g in code for g in GPU) else []
        archs = ("llama", "gpt2") if "hf_model" in code else ("mixtral",) if "moe_model" in code else (None,)
        for arch in archs:
            out.append(pytest.param(code, arch, id=f"block{i}-{arch or 'plain'}", marks=marks))
    return out


class CappedTrainer(pl.Trainer):
    """The README's Trainer with its budget capped to a few steps, on one CPU, quiet."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("max_epochs") not in (None, -1):
            kwargs["max_epochs"] = min(kwargs["max_epochs"], 2)
        if kwargs.get("max_steps") not in (None, -1):
            kwargs["max_steps"] = min(kwargs["max_steps"], 4)
        kwargs.update(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        super().__init__(*args, **kwargs)


def hf(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "mixtral":  # 8 experts, top-2
        config = transformers.MixtralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, num_local_experts=8,
        )  # fmt: skip
        return transformers.MixtralForCausalLM(config)
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


class Lit(pl.LightningModule):
    """What a user writes around a Hugging Face model."""

    def __init__(self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.model, self.batches = model, batches

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)


class DigitsLike(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(128), batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_data(32, seed=1), batch_size=16)


def namespace(arch: str | None) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    # what the README imported in earlier blocks
    ns: dict[str, Any] = {
        "torch": torch,
        "F": F,
        "L": L,
        **{n: getattr(lightning_prune, n) for n in lightning_prune.__all__},
    }
    ns["model"], ns["datamodule"] = TinyNet(), DigitsLike()
    ns["calibration_loader"] = DataLoader(make_data(128), batch_size=16)
    if arch is not None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 64, (4, 16), generator=g)
        batches = [{"input_ids": ids.roll(i, 1), "labels": ids.roll(i, 1)} for i in range(4)]
        ns["moe_model" if arch == "mixtral" else "hf_model"] = model = hf(arch)
        ns["ids"], ns["calibration_batches"] = ids, batches
        ns["lit"] = Lit(model, batches)
        ns["build_fresh_model"] = lambda: hf(arch, seed=1)
    return ns


@pytest.mark.parametrize(("code", "arch"), cases())
def test_readme_snippet_runs_as_printed(code, arch, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # what a snippet saves (a shrunk model's checkpoint) stays out of the repository
    monkeypatch.setattr(L, "Trainer", CappedTrainer)
    monkeypatch.setattr(pl, "Trainer", CappedTrainer)
    ns = namespace(arch)
    exec(compile(code, "README.md", "exec"), ns)
    for name, value in ns.items():
        if isinstance(value, (Pruner, PruningCallback)) and value.history:
            params = {t.name: t.param for t in value.targets}
            for n, mask in value.masks.items():
                assert torch.all(params[n].detach()[~mask.to(params[n].device)] == 0), (name, n)


@pytest.mark.parametrize(("arch", "attention", "mlp"), [("llama", 4, 3), ("gpt2", 2, 2)])
def test_the_several_pruners_example_selects_attention_and_mlp_of_the_models_it_names(arch, attention, mlp):
    """The README's several-pruners snippet selects by glob: on GPT-2 (``attn``) and LLaMA (``self_attn``) its first
    pruner takes every attention projection of every block and its second every MLP projection, nothing twice
    (``*.attn.*`` matched GPT-2 only: on LLaMA the first pruner found no weight). The checkpoint key the README
    quotes is the pruner's."""
    (code,) = [c for c in snippets() if "MagnitudePruning(0.8, include=" in c]
    ns = namespace(None)
    exec(compile(code, "README.md", "exec"), ns)
    first, second = ns["callbacks"]
    model = hf(arch)
    first.pruner.bind(model)
    second.pruner.bind(model)
    blocks = model.config.num_hidden_layers
    attn, ffn = [t.name for t in first.targets], [t.name for t in second.targets]
    assert len(attn) == attention * blocks and all("attn." in n for n in attn), attn
    assert len(ffn) == mlp * blocks and all(".mlp." in n for n in ffn), ffn
    assert f"`{first.state_key}`" in (ROOT / "README.md").read_text()
