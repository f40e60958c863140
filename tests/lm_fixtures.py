"""Tiny local language-model material for tests: a text corpus and a saved Hugging Face checkpoint.

Everything is deterministic and offline: the corpus is cut from a few of Python's own standard-library
sources, the tokenizer is a byte-level BPE trained on it, and the model is a seeded random-init LLaMA.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"
# stdlib modules present on every CPython 3.9+; (text documents, jsonl documents)
_TEXT_SOURCES = ("bisect.py", "colorsys.py", "keyword.py")
_JSONL_SOURCES = ("heapq.py", "fnmatch.py", "this.py", "stat.py")


def _stdlib(name: str) -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")


def corpus_documents() -> tuple[list[str], list[str]]:
    """The documents of the corpus: (one per ``.txt`` file, one per ``.jsonl`` line)."""
    text = [_stdlib(n) for n in _TEXT_SOURCES]
    jsonl = [_stdlib(n) for n in _JSONL_SOURCES]
    return text, jsonl


def write_text_corpus(folder: str | Path) -> dict[str, list[Path]]:
    """Write ``doc0.txt``... (one document each) and ``docs.jsonl`` (one ``{"text", "id"}`` per line).

    Returns ``{"txt": [...], "jsonl": [...]}``: about 30k characters, ~9k tokens with the fixture tokenizer.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text, jsonl = corpus_documents()
    txt = []
    for i, doc in enumerate(text):
        path = folder / f"doc{i}.txt"
        path.write_text(doc, encoding="utf-8")
        txt.append(path)
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(jsonl)), encoding="utf-8")
    return {"txt": txt, "jsonl": [path]}


def llama_config(hidden: int, intermediate: int, layers: int, **extra: Any) -> Any:
    """A tiny random-init LLaMA's ``LlamaConfig``: vocabulary 96, 2 heads, 32 positions unless ``extra`` says
    otherwise (the shape most block-by-block tests prune)."""
    from transformers import LlamaConfig

    base = dict(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaConfig(**{**base, **extra})


def write_hf_checkpoint(
    folder: str | Path,
    vocab_size: int = 384,
    hidden_size: int = 48,
    num_layers: int = 2,
    intermediate_size: int = 96,
    seed: int = 0,
) -> Path:
    """Save a ``PreTrainedTokenizerFast`` (BPE trained on the corpus) and a random ``LlamaForCausalLM``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text, jsonl = corpus_documents()
    tok.train_from_iterator(text + jsonl, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    tokenizer.save_pretrained(folder)
    config = llama_config(
        hidden_size,
        intermediate_size,
        num_layers,
        vocab_size=len(tokenizer),
        num_attention_heads=4,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
