"""``model=hf``: any Hugging Face causal LM, from a local checkpoint folder (or a Hub id), fine-tuned and pruned.

The checkpoint is checked before anything is loaded (the folder exists, holds a ``config.json``, and
that config is a causal LM ``AutoModelForCausalLM`` can build), so a wrong ``model.path`` fails in a
second with the argument named, not after minutes of loading.
"""

from __future__ import annotations

import re
from pathlib import Path

from lightning_prune.app.models import CausalLMBase

DTYPES = ("float32", "bfloat16", "float16", "auto")
ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2")
# a Hub id: "name" or "owner/name", nothing that reads as a path on disk
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def check_checkpoint(path: str, trust_remote_code: bool = False):
    """The ``transformers`` config of the causal LM at ``path`` (a folder, or a Hub id where the network allows).

    Raises ``FileNotFoundError``/``ValueError`` naming ``model.path`` when ``path`` is not there, is not a
    Hugging Face checkpoint, or is not a causal LM.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    local = Path(str(path)).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ValueError(
                f"model.path={str(path)!r} is not a Hugging Face checkpoint: the folder has no config.json "
                "(save one with model.save_pretrained(DIR))"
            )
        source = str(local)
    elif _HUB_ID.match(str(path)) and not str(path).startswith("."):
        source = str(path)  # a Hub id: from_pretrained downloads it (or finds it in the cache)
    else:
        raise FileNotFoundError(f"model.path={str(path)!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        where = "" if local.exists() else " is not a local folder, and as a Hub id it"
        raise ValueError(f"model.path={str(path)!r}{where}: no Hugging Face config could be read ({err})") from err
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not (trust_remote_code and remote):
        kind = getattr(config, "model_type", type(config).__name__)
        raise ValueError(
            f"model.path={str(path)!r} holds a {kind!r} model, which is not a causal language model "
            "AutoModelForCausalLM can build" + (" (its code is remote: model.trust_remote_code=true)" if remote else "")
        )
    return config


class HFCausalLM(CausalLMBase):
    """A pretrained Hugging Face causal LM (``AutoModelForCausalLM.from_pretrained(path)``) as a LightningModule.

    ``dtype``: ``float32`` (default; what CPU training and the pruners' statistics want), ``bfloat16``,
    ``float16`` or ``auto`` (the checkpoint's own). ``attn_implementation``: ``None`` (transformers'
    choice), ``eager``, ``sdpa`` or ``flash_attention_2``. ``trust_remote_code`` runs the checkpoint's own
    Python code, so it is off unless asked for. Training, logging and the optimizer (``lr``,
    ``weight_decay``, ``warmup_steps``) are :class:`~lightning_prune.app.models.CausalLMBase`'s.
    ``vocab_size`` is refused: it comes from data modules that train their own tokenizer (``data=text``).
    """

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        vocab_size: int | None = None,
    ) -> None:
        if vocab_size is not None:  # what data=text passes: a vocabulary of a tokenizer it trained itself
            raise ValueError(
                f"model=hf brings its own tokenizer and vocabulary, but the data gives vocab_size={vocab_size} "
                "(a tokenizer of its own): use data=text_files or data=hf_dataset, which tokenise with model.path's"
            )
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError as err:  # transformers is an optional dependency
            raise ImportError("model=hf needs transformers: pip install 'lightning-prune[lm]'") from err
        if dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {dtype!r}")
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"model.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}"
            )
        if not isinstance(trust_remote_code, bool):
            raise ValueError(f"model.trust_remote_code must be true or false, got {trust_remote_code!r}")
        config = check_checkpoint(path, trust_remote_code)
        local = Path(str(path)).expanduser()
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(
            str(local) if local.exists() else str(path),
            config=config,
            dtype="auto" if dtype == "auto" else getattr(torch, dtype),
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
        super().__init__(model, lr, weight_decay, warmup_steps)
        self.save_hyperparameters()
