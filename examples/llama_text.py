"""Train a tiny LLaMA (Hugging Face transformers) from scratch on Python's standard library, and prune
it while it trains: step-based rounds of sequential layer-wise OBS, then fine-tuning.

python examples/llama_text.py                      # 8 blocks, 600 dense + 600 pruning steps, 60%
python examples/llama_text.py --steps 20 --files 60 --layers 2   # a smoke run

No download: the corpus is the running Python's own ``.py`` files, tokenised with a byte-level BPE
trained on them (``tokenizers``); the model is built from a ``LlamaConfig``. Prints the validation
perplexity of the dense model and of the pruned one.
"""

from __future__ import annotations

import argparse

import lightning as L

from lightning_prune import OBSPruning
from lightning_prune.app.data import TextDataModule
from lightning_prune.app.models import CausalLM, perplexity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="dense steps; as many again prune and fine-tune")
    p.add_argument("--target", type=float, default=0.6)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--files", type=int, default=None, help="use every k-th of this many stdlib files")
    a = p.parse_args()
    L.seed_everything(0)
    data = TextDataModule(max_files=a.files)
    model = CausalLM(**data.model_args, num_layers=a.layers, warmup_steps=max(a.steps // 10, 1))
    trainer_args = dict(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False, limit_val_batches=0)

    L.Trainer(max_steps=a.steps, **trainer_args).fit(model, datamodule=data)
    dense = perplexity(model.model.eval(), data.val_dataloader())

    # a second fit (its steps count from 0): a round every tenth of them over the first 60%,
    # SparseGPT's objective, block by block
    every = max(a.steps // 10, 1)
    pruner = OBSPruning(
        target=a.target,
        allocation="reconstruction",
        scope="layer",
        blocks="auto",
        start_step=every,
        end_step=6 * every,
        every_n_steps=every,
        num_batches=16,
    )
    model.warmup_steps = 1
    L.Trainer(max_steps=a.steps, callbacks=[pruner], **trainer_args).fit(model, datamodule=data)
    pruned = perplexity(model.model.eval(), data.val_dataloader())
    print(f"validation perplexity: dense {dense:.2f}, pruned to {pruner.sparsity:.0%} and fine-tuned {pruned:.2f}")


if __name__ == "__main__":
    main()
