"""Tiny, download-free Llama checkpoints and tokenizers (for tests and ``spmd-lora demo``).

* :func:`build_tokenizer` trains a small sentencepiece BPE model (Llama conventions: unk=0,
  bos=1, eos=2, no pad, byte fallback, digits split) on the bundled English corpus
  (``spmd_lora/assets/corpus.txt`` plus the bundled sample datasets and prompt templates) and
  saves it as a Hugging Face ``LlamaTokenizer`` directory.
* :func:`build_tiny_llama` saves a randomly initialised ``LlamaForCausalLM`` (sharded
  safetensors) and, by default, that tokenizer next to it.

Both are deterministic for a given seed, write only under ``out_dir`` (no cache, no network)
and take about a second; :func:`build_tiny_llama` makes its directory appear whole or not at
all.
"""
from __future__ import annotations

import importlib.resources
import io
import json
import os
import secrets
import shutil
from pathlib import Path

from .config.projections import PROJECTIONS
from .errors import ConfigError, SpmdLoraError
from .data import PROMPT_TEMPLATES
from .weights.safetensors import write_safetensors_checkpoint

ASSETS = "spmd_lora.assets"
SAMPLES = {"alpaca": "alpaca_sample.jsonl", "rag": "rag_sample.jsonl", "text": "text_sample.jsonl"}


def asset_text(name: str) -> str:
    """Text of a bundled asset file (``corpus.txt``, ``alpaca_sample.jsonl``, ...)."""
    res = importlib.resources.files(ASSETS).joinpath(name)
    if not res.is_file():
        raise SpmdLoraError(f"bundled asset {name!r} is missing from the spmd_lora.assets package; "
                            "reinstall spmd_lora (pip install -e .)")
    return res.read_text(encoding="utf-8")


def asset_path(name: str) -> Path:
    """Filesystem path of a bundled asset (the package is installed as plain files)."""
    res = importlib.resources.files(ASSETS).joinpath(name)
    if not res.is_file():
        raise SpmdLoraError(f"bundled asset {name!r} is missing from the spmd_lora.assets package; "
                            "reinstall spmd_lora (pip install -e .)")
    return Path(str(res))


def sample_data_path(template: str) -> Path:
    """Path of the bundled sample dataset for ``template`` ('alpaca', 'rag' or 'text')."""
    if template not in SAMPLES:
        raise ConfigError(f"no bundled sample for template {template!r}; "
                          f"choose one of {sorted(SAMPLES)}")
    return asset_path(SAMPLES[template])


def _training_lines() -> list[str]:
    """Corpus lines plus every string of the bundled samples and prompt templates."""

    lines = [ln for ln in asset_text("corpus.txt").splitlines() if ln.strip()]

    def strings(obj):
        if isinstance(obj, str):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from strings(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from strings(v)

    for name in SAMPLES.values():
        for row in asset_text(name).splitlines():
            if row.strip():
                lines.extend(s for s in strings(json.loads(row)) if s.strip())
    for s in strings(PROMPT_TEMPLATES):
        lines.extend(part for part in s.split("\n") if part.strip())
    return lines


def build_tokenizer(out_dir, vocab_size: int = 512) -> Path:
    """Train a sentencepiece BPE tokenizer on the bundled corpus and save it to ``out_dir``.

    Writes ``tokenizer.model`` (the sentencepiece model), ``tokenizer.json`` and
    ``tokenizer_config.json``; ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it.
    Ids: unk=0, bos=1 (``<s>``), eos=2 (``</s>``), no pad token (like Llama). ``vocab_size`` must
    be at least 320 (256 byte-fallback pieces + the corpus characters + specials).
    """
    import sentencepiece as spm

    if vocab_size < 320:
        raise ConfigError(f"tokenizer vocab_size={vocab_size} is too small: the byte-fallback "
                          "tokenizer needs at least 320 pieces; use 320 or more")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines()), model_writer=buf,
        model_type="bpe", vocab_size=vocab_size, character_coverage=1.0, byte_fallback=True,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, shuffle_input_sentence=False, max_sentence_length=1 << 16,
        hard_vocab_limit=True, minloglevel=2)
    model_file = out / "tokenizer.model"
    model_file.write_bytes(buf.getvalue())

    from transformers import AutoTokenizer, LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(out), vocab_file=str(model_file), add_bos_token=True,
                                         add_eos_token=False)
    tok.save_pretrained(str(out))
    _check_tokenizer(AutoTokenizer.from_pretrained(str(out)), out)
    return out


def _check_tokenizer(tok, out: Path) -> None:
    probe = "Below is an instruction.\n\n### Response:\nAbout 42 people live in Corholt."
    ids = tok.encode(probe, add_special_tokens=False)
    back = tok.decode(ids, skip_special_tokens=True)
    if not ids or back.strip() != probe.strip() or tok.bos_token_id != 1 or tok.eos_token_id != 2:
        raise SpmdLoraError(
            f"the tokenizer saved in {out} does not work (ids={ids[:8]}, decoded={back[:40]!r}); "
            "this happens when the 'protobuf' package is missing: pip install protobuf")


_DTYPES = ("float32", "bfloat16", "float16")


def _tiny_tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF LlamaForCausalLM tensor names -> shapes ([out, in] for linears), in HF's order."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    features = {"hidden": d, "intermediate": f, "heads": cfg["num_attention_heads"] * hd,
                "kv_heads": cfg["num_key_value_heads"] * hd}
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + f"{proj.hf_module}.weight": (features[proj.out_features],
                                                        features[proj.in_features])
                       for proj in PROJECTIONS.values()})
        shapes.update({p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    shapes["model.norm.weight"] = (d,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def build_tiny_llama(out_dir, *, vocab_size: int = 512, hidden_size: int = 64,
                     intermediate_size: int = 128, num_hidden_layers: int = 2,
                     num_attention_heads: int = 4, num_key_value_heads: int = 2,
                     max_position_embeddings: int = 2048, rope_theta: float = 10000.0,
                     rope_scaling: dict | None = None, tie_word_embeddings: bool = False,
                     seed: int = 0, max_shard_size="200KB", with_tokenizer: bool = True,
                     dtype: str = "float32", init_std: float = 0.1,
                     tokenizer_vocab_size: int | None = None) -> Path:
    """Save a random tiny HF ``LlamaForCausalLM`` checkpoint (config.json + sharded safetensors)
    to ``out_dir``, with numpy only (no torch needed, so the demo runs on a bare install).

    Weights come from ``numpy.random.default_rng(seed)``: every Linear / Embedding
    ``N(0, init_std)`` and every RMSNorm weight ``1 + 0.1 * N(0, 1)``, so logits are far from
    flat and norm weights matter. With ``with_tokenizer`` the tokenizer of
    :func:`build_tokenizer` with
    ``tokenizer_vocab_size`` pieces (default: ``vocab_size``) is saved alongside; the model's
    ``vocab_size`` may be larger than the tokenizer's, never smaller. Returns ``Path(out_dir)``.

    ``out_dir`` must not exist or be an empty directory. The checkpoint is built in a hidden
    temporary sibling directory that is renamed to ``out_dir`` when complete, so a partial
    ``out_dir`` never exists: a failed or interrupted build leaves ``out_dir`` as it was (a
    killed process may leave the hidden ``.NAME.tmp-*`` sibling, never a partial ``NAME``), and
    a present ``out_dir/config.json`` means the whole checkpoint is there.
    """
    import ml_dtypes
    import numpy as np
    from transformers import LlamaConfig


    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; choose one of {_DTYPES}")
    tok_vocab = vocab_size if tokenizer_vocab_size is None else int(tokenizer_vocab_size)
    if with_tokenizer and vocab_size < tok_vocab:
        raise ConfigError(f"vocab_size={vocab_size} is smaller than tokenizer_vocab_size="
                          f"{tok_vocab}; the model needs an embedding row for every token")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty directory; build the tiny model "
                          f"into a new directory")

    kwargs = {}
    if rope_scaling is not None:
        kwargs["rope_scaling"] = dict(rope_scaling)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                      intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
                      num_attention_heads=num_attention_heads,
                      num_key_value_heads=num_key_value_heads,
                      max_position_embeddings=max_position_embeddings, rope_theta=rope_theta,
                      tie_word_embeddings=tie_word_embeddings, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None, **kwargs)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = dtype
    shapes = _tiny_tensor_shapes(cfg.to_dict())
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in shapes.items():                     # drawn in a fixed order: reproducible
        noise = rng.standard_normal(shape, dtype=np.float32)
        tensors[name] = (1.0 + 0.1 * noise if "norm" in name else init_std * noise).astype(np_dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        if with_tokenizer:
            build_tokenizer(tmp, vocab_size=tok_vocab)
        cfg.save_pretrained(str(tmp))
        write_safetensors_checkpoint(tmp, list(shapes), shapes, {n: np_dtype for n in shapes},
                                     tensors.pop, max_shard_size)
        os.replace(tmp, out)                     # onto an empty directory too (POSIX rename)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["build_tokenizer", "build_tiny_llama", "asset_path", "asset_text", "sample_data_path",
           "SAMPLES"]
