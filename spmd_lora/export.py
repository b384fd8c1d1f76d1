"""Merged export: base HF checkpoint + PEFT LoRA adapter -> a plain HF checkpoint.

Every targeted projection becomes ``W + scaling * B @ A`` in PEFT's ``[out, in]`` convention
(``scaling = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA), computed in float32 and cast back
to the base tensor's dtype; every other tensor is copied byte for byte. Output is sharded
safetensors (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, or a single
``model.safetensors``) written tensor by tensor from the memory-mapped input, so at most one
tensor is in memory at a time. config.json, generation_config.json and tokenizer files are copied.
With ``base_quant`` int8 | nf4 (an adapter trained on a quantised base), the merge goes into the
DEQUANTISED base: each of the seven decoder linears is quantised and dequantised exactly as
training saw it (quant.py; the result does not depend on tp), then merged, and written in the
base tensor's dtype (bf16/fp16 for usual checkpoints).
The whole directory appears atomically (written in a temporary directory next to it, renamed);
an output that cannot be created or written is refused before anything is read.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .weights.safetensors import WeightFiles, write_safetensors_checkpoint
from .config.model_config import ModelConfig
from .config.projections import PROJECTIONS
from .errors import CheckpointError
from .paths import check_writable_dir
from .weights.hf import hf_layer_key
from .weights.peft import _replace_dir, read_adapter
from .weights.quant import QUANTISED_LINEARS, check_base_quant, nf4_unit_rows, quantize_host

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
                "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _quant_roundtrip(kind: str, proj: str, w, config: ModelConfig) -> np.ndarray:
    """HF weight [out, in] -> the dequantised weight training used, same dtype."""
    c = np.asarray(w, np.float32)
    row = not PROJECTIONS[proj].column
    c = c.T if row else c                                   # canonical [N, D] (quant.py)
    deq = np.asarray(quantize_host(kind, c, nf4_unit_rows(config, proj)).dequantize())
    return (deq.T if row else deq).astype(w.dtype)


def merged_weights(model_dir, adapter_dir, base_quant: str = "none", allow_pickle: bool = False):
    """Open the base checkpoint in ``model_dir`` and the PEFT adapter in ``adapter_dir`` for a
    merge, checking that the adapter fits the base (CheckpointError otherwise); with
    ``adapter_dir=None`` nothing is merged (the base alone, e.g. to convert it).

    Returns ``(config, files, produce)``: the base's ModelConfig, its memory-mapped WeightFiles
    (``files.names()``, ``files.shape(name)``) and ``produce(name, dtype=None)``, which reads the
    HF tensor ``name`` and returns it merged as a numpy array in HF layout: ``W + scaling * B @ A``
    (computed in float32, after the int8 / nf4 round trip of ``base_quant``) for the targeted
    projections, the base tensor unchanged otherwise; cast to ``dtype`` (default: the base
    tensor's dtype). Each call reads and returns one tensor, so callers stream.
    """
    check_base_quant(base_quant)
    config = ModelConfig.from_pretrained(model_dir)
    lora, scaling = {"layers": {}}, None
    if adapter_dir is not None:
        lora, lora_cfg = read_adapter(adapter_dir, config)
        scaling = np.float32(lora_cfg.scaling)
    files = WeightFiles(model_dir, allow_pickle=allow_pickle)

    merged = {}                                            # HF name -> (proj, layer)
    for proj in lora["layers"]:
        for i in range(config.num_layers):
            name = hf_layer_key(i, proj)
            if name not in files:
                raise CheckpointError(f"{model_dir}: tensor {name!r} (targeted by the adapter) missing")
            in_f, out_f = lora["layers"][proj]["a"].shape[1], lora["layers"][proj]["b"].shape[2]
            if files.shape(name) != (out_f, in_f):
                raise CheckpointError(
                    f"{model_dir}: tensor {name!r} has shape {list(files.shape(name))}, the adapter "
                    f"expects {[out_f, in_f]}")
            merged[name] = (proj, i)

    quantised = {hf_layer_key(i, proj): proj for proj in QUANTISED_LINEARS
                 for i in range(config.num_layers)} if base_quant != "none" else {}
    def produce(n, dtype=None):
        w = files.get(n)
        if n in quantised:
            w = _quant_roundtrip(base_quant, quantised[n], w, config)
        dtype = w.dtype if dtype is None else dtype
        if n not in merged:
            return np.asarray(w, dtype)
        proj, i = merged[n]
        a = lora["layers"][proj]["a"][i]                   # [in, r]
        b = lora["layers"][proj]["b"][i]                   # [r, out]
        delta = (b.T @ a.T) * scaling                      # [out, in] = B_peft @ A_peft * scaling
        return (np.asarray(w, np.float32) + delta).astype(dtype)

    return config, files, produce


def export_merged(model_dir, adapter_dir, out_dir, max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE,
                  overwrite: bool = False, allow_pickle: bool = False, base_quant: str = "none") -> Path:
    """Merge the PEFT adapter in ``adapter_dir`` into the HF Llama checkpoint in ``model_dir`` and
    write a standalone HF checkpoint to ``out_dir`` (same dtype as the base weights).

    An existing non-empty ``out_dir`` is an error unless ``overwrite=True``, and so is one that
    cannot be created or written (checked first). On any failure nothing is left at ``out_dir``
    (nor any temporary directory). Returns ``out_dir``.
    """
    model_dir, out = Path(model_dir), Path(out_dir)
    if max_shard_size_bytes <= 0:
        raise CheckpointError(f"max_shard_size_bytes must be positive, got {max_shard_size_bytes}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"export output {out} exists and is not empty; choose a new "
                              f"directory or pass overwrite=True (--overwrite)")
    if out.resolve() in (model_dir.resolve(), Path(adapter_dir).resolve()):
        raise CheckpointError(f"export output {out} must differ from the model and adapter directories")
    check_writable_dir(out, "export --output")
    _, files, produce = merged_weights(model_dir, adapter_dir, base_quant, allow_pickle)
    names = sorted(files.names(), key=_natural_key)
    shapes = {n: files.shape(n) for n in names}
    dtypes = {n: np.dtype(files.get(n).dtype) for n in names}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        write_safetensors_checkpoint(tmp, names, shapes, dtypes, produce, max_shard_size_bytes)
        for fname in COPIED_FILES:
            if (model_dir / fname).is_file():
                shutil.copy2(model_dir / fname, tmp / fname)
        tmp.chmod(0o755)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
