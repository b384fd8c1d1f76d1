"""The tokenizer of a HF model directory, with a clear error when it is missing or broken, and
decoding that ends on a whole character."""
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


#: the most tokens one character can span: a UTF-8 character is at most 4 bytes, and a
#: byte-fallback (sentencepiece) or byte-level (BPE) token carries at least one of them
_MAX_TOKENS_PER_CHARACTER = 4


def decode_whole_characters(tokenizer, ids, **kw) -> str:
    """``tokenizer.decode(ids, **kw)`` without a character cut at the end: a generation that
    stops (at ``max_new_tokens``) inside a multi-byte character decodes its last bytes to
    U+FFFD (byte-fallback decoders even turn the whole byte run into U+FFFDs). Drop up to 3
    trailing tokens until the text no longer ends in U+FFFD (a trailing U+FFFD carries no
    text either way); when no such cut exists the full text is returned. U+FFFDs inside the
    text (invalid bytes the model generated) are left as they are."""
    ids = list(ids)
    full = tokenizer.decode(ids, **kw)
    if not full.endswith("\ufffd"):
        return full
    for cut in range(1, min(_MAX_TOKENS_PER_CHARACTER, len(ids) + 1)):
        text = tokenizer.decode(ids[:-cut], **kw)
        if not text.endswith("\ufffd"):
            return text
    return full
