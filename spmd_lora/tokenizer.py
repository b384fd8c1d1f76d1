"""The tokenizer of a HF model directory, with a clear error when it is missing or broken."""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError


def load_tokenizer(model_dir):
    """``transformers.AutoTokenizer`` from the model directory (no downloads)."""
    from transformers import AutoTokenizer
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"model directory not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: could not load a tokenizer ({str(e).splitlines()[0]}); the "
                          f"model directory needs tokenizer files (tokenizer.json or "
                          f"tokenizer.model + tokenizer_config.json)") from None
    if not tok("a b c")["input_ids"]:
        raise ConfigError(f"{path}: the tokenizer returns no ids (is the 'protobuf' package "
                          f"installed for sentencepiece conversion?)")
    return tok
