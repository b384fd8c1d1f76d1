"""GGUF export for llama.cpp / Ollama: the merged model, or the LoRA adapter alone.

:func:`export_gguf` writes base + adapter merged (``W + scaling * B @ A``, see
:func:`spmd_lora.export.merged_weights`) as one GGUF model file with the tokenizer inside;
:func:`export_gguf_lora` writes the adapter alone as a GGUF LoRA for ``llama-cli --lora`` /
``llama_cpp.Llama(lora_path=...)`` on a GGUF of the unmerged base.

Layouts (numpy shapes; GGUF lists dimensions in the reverse order):

* tensor names are the gguf package's (``token_embd``, ``blk.{i}.attn_q``, ..., ``output_norm``,
  ``output``; ``.weight`` suffix); linears keep HF's ``[out, in]``; no ``output`` tensor when the
  embeddings are tied.
* ``attn_q`` / ``attn_k`` rows are reordered per head for llama.cpp's rotary layout: llama.cpp
  rotates adjacent pairs ``(2j, 2j + 1)`` of a head where HF rotates ``(j, j + head_dim / 2)``,
  so GGUF row ``2j + t`` of a head is HF row ``t * head_dim / 2 + j``. LoRA ``lora_b`` rows get
  the same reordering.
* Llama-3 rope scaling is stored as llama.cpp expects it: a ``rope_freqs`` tensor
  ``[head_dim / 2]`` of per-frequency divisors.

Files are written streamed (tensor infos first, then one tensor's data at a time from the
memory-mapped base) into a temporary file next to the output, renamed into place at the end:
on any failure nothing is left.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from .config.model_config import ModelConfig
from .errors import CheckpointError, ConfigError
from .export import _natural_key, merged_weights
from .paths import check_writable_dir
from .weights.hf import hf_layer_key
from .weights.peft import read_adapter

OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# Llama 3's pre-tokenizer split pattern (tokenizer.json); llama.cpp calls this "llama-bpe".
LLAMA3_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                      r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the gguf package: pip install 'spmd_lora[gguf]'") from None
    return gguf


def _check_outtype(outtype: str):
    """(gguf LlamaFileType, GGMLQuantizationType) of an outtype name."""
    g = _gguf()
    types = {"f32": (g.LlamaFileType.ALL_F32, g.GGMLQuantizationType.F32),
             "f16": (g.LlamaFileType.MOSTLY_F16, g.GGMLQuantizationType.F16),
             "bf16": (g.LlamaFileType.MOSTLY_BF16, g.GGMLQuantizationType.BF16),
             "q8_0": (g.LlamaFileType.MOSTLY_Q8_0, g.GGMLQuantizationType.Q8_0)}
    if outtype not in types:
        raise ConfigError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    return types[outtype]


def _tensor_type(qtype, shape):
    """llama.cpp converter's rule: 1-D tensors F32; a 2-D tensor whose rows do not split into
    whole quantisation blocks falls back to F16; everything else ``qtype``."""
    g = _gguf()
    if len(shape) < 2:
        return g.GGMLQuantizationType.F32
    if shape[-1] % g.GGML_QUANT_SIZES[qtype][0]:
        return g.GGMLQuantizationType.F16
    return qtype


def _rotary_rows(w: np.ndarray, head_dim: int) -> np.ndarray:
    """Reorder the output rows of each head of ``w`` [heads * head_dim, ...] from HF's rotary
    layout (pairs ``j, j + head_dim/2``) to llama.cpp's (pairs ``2j, 2j + 1``)."""
    half = head_dim // 2
    j, t = np.divmod(np.arange(head_dim), 2)               # GGUF row 2j + t <- HF row t*half + j
    within = t * half + j
    rows = (np.arange(w.shape[0] // head_dim)[:, None] * head_dim + within).reshape(-1)
    return w[rows]


def _llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """Per-frequency divisors of Llama-3 rope scaling, [head_dim / 2] float32 (``rope_freqs``)."""
    rs = cfg.rope_scaling
    old_ctx = rs.original_max_position_embeddings
    factors = []
    for i in range(cfg.head_dim // 2):
        wavelen = 2 * math.pi * cfg.rope_theta ** (2 * i / cfg.head_dim)
        if wavelen < old_ctx / rs.high_freq_factor:
            factors.append(1.0)
        elif wavelen > old_ctx / rs.low_freq_factor:
            factors.append(rs.factor)
        else:
            smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
            factors.append(1.0 / ((1 - smooth) / rs.factor + smooth))
    return np.asarray(factors, np.float32)


def _check_output(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise CheckpointError(f"GGUF output {out} is a directory; give a file name (e.g. model.gguf)")
    if out.exists() and not overwrite:
        raise CheckpointError(f"GGUF output {out} exists; choose a new file name or pass "
                              f"overwrite=True (--overwrite)")
    check_writable_dir(out.parent, "export --output's directory")


def _write(out: Path, writer_setup, tensors) -> Path:
    """Write a GGUF atomically. ``writer_setup(writer)`` adds the metadata; ``tensors`` is a list
    of ``(gguf name, numpy shape, GGML type, produce)`` with ``produce()`` returning the float
    data, called once per tensor while writing."""
    g = _gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    os.close(fd)
    tmp = Path(tmp_name)
    writer = g.GGUFWriter(tmp, "llama")
    try:
        writer_setup(writer)
        writer.add_quantization_version(g.GGML_QUANT_VERSION)
        for name, shape, qtype, _ in tensors:
            byte_shape = g.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                   raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, shape, qtype, produce in tensors:
            data = np.ascontiguousarray(produce(), np.float32).reshape(shape)
            writer.write_tensor_data(g.quants.quantize(data, qtype))
        writer.close()
        tmp.chmod(0o644)
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _add_hparams(w, cfg: ModelConfig, file_type) -> None:
    g = _gguf()
    w.add_file_type(file_type)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling.rope_type == "linear":
        w.add_rope_scaling_type(g.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling.factor)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)


# ----------------------------------------------------------------------------- tokenizer

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from None


def _added_tokens(model_dir: Path) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) of the tokenizer's added tokens (tokenizer.json, else
    tokenizer_config.json's added_tokens_decoder)."""
    if (model_dir / "tokenizer.json").is_file():
        return {int(t["id"]): (t["content"], bool(t.get("special")))
                for t in _read_json(model_dir / "tokenizer.json").get("added_tokens", [])}
    if (model_dir / "tokenizer_config.json").is_file():
        decoder = _read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {})
        return {int(i): (t["content"], bool(t.get("special"))) for i, t in decoder.items()}
    return {}


def _sentencepiece_vocab(model_dir: Path, n_vocab: int):
    """(tokens, scores, types) of a sentencepiece tokenizer.model, padded to ``n_vocab``."""
    from google.protobuf.message import DecodeError
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

    g = _gguf()
    path = model_dir / "tokenizer.model"
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise ConfigError(f"{path}: not a sentencepiece model ({e})") from None
    model_type = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
    if model_type != "BPE":
        raise ConfigError(f"{path}: sentencepiece model type {model_type} is not BPE; llama.cpp's "
                          f"'llama' tokenizer runs BPE models only")
    if proto.normalizer_spec.name not in ("identity", ""):
        raise ConfigError(f"{path}: sentencepiece normalizer {proto.normalizer_spec.name!r} is not "
                          f"'identity'; llama.cpp applies no normalization, so tokens would differ")
    sp = SentencePieceProcessor(model_file=str(path))
    if sp.vocab_size() > n_vocab:
        raise ConfigError(f"{path}: {sp.vocab_size()} pieces but config.json vocab_size is "
                          f"{n_vocab}; the model has no embedding for the extra pieces")
    T = g.TokenType
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [T.UNUSED] * n_vocab
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i)
                    else T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else T.NORMAL)
    for i, (text, special) in _added_tokens(model_dir).items():
        if i >= n_vocab:
            raise ConfigError(f"{model_dir}: added token {text!r} has id {i} >= config.json "
                              f"vocab_size {n_vocab}")
        if types[i] in (T.NORMAL, T.UNUSED):               # sentencepiece's own specials stay
            tokens[i], scores[i] = text, -1000.0
            types[i] = T.CONTROL if special else T.USER_DEFINED
    return tokens, scores, types


def _bpe_vocab(model_dir: Path, n_vocab: int):
    """(tokens, types) of a Llama-3 style byte-level BPE tokenizer.json, padded to ``n_vocab``;
    ConfigError when llama.cpp's 'llama-bpe' tokenizer would not reproduce it."""
    g = _gguf()
    path = model_dir / "tokenizer.json"
    tj = _read_json(path)
    model = tj.get("model") or {}
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    llama3_pre = (len(steps) == 2 and steps[0].get("type") == "Split"
                  and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT_REGEX
                  and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
                  and steps[1].get("type") == "ByteLevel" and not steps[1].get("add_prefix_space")
                  and not steps[1].get("use_regex", True))
    checks = [(model.get("type") == "BPE", f"model type {model.get('type')!r} is not BPE"),
              (not tj.get("normalizer"), "it has a normalizer, which llama.cpp does not apply"),
              (not model.get("byte_fallback"), "byte_fallback BPE needs its sentencepiece tokenizer.model"),
              (llama3_pre, "its pre-tokenizer is not Llama 3's (Split on Llama 3's regex, then ByteLevel)"),
              (model.get("ignore_merges"), "ignore_merges is false (Llama 3 and llama.cpp use true)")]
    problem = next((why for ok, why in checks if not ok), None)
    if problem:
        raise ConfigError(f"{path}: llama.cpp cannot reproduce this tokenizer: {problem}")
    T = g.TokenType
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [T.UNUSED] * n_vocab
    added = _added_tokens(model_dir)
    for text, i in list(model.get("vocab", {}).items()) + [(t, i) for i, (t, _) in added.items()]:
        if i >= n_vocab:
            raise ConfigError(f"{path}: token {text!r} has id {i} >= config.json vocab_size {n_vocab}")
        tokens[i] = text
        types[i] = (T.NORMAL if i not in added else T.CONTROL if added[i][1] else T.USER_DEFINED)
    return tokens, types


def _add_tokenizer(w, model_dir: Path, n_vocab: int) -> None:
    """Vocabulary, special ids, add_bos/add_eos and chat template of the HF tokenizer."""
    g = _gguf()
    bpe = not (model_dir / "tokenizer.model").is_file()
    if not bpe:
        tokens, scores, types = _sentencepiece_vocab(model_dir, n_vocab)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores(scores)
    elif (model_dir / "tokenizer.json").is_file():
        tokens, types = _bpe_vocab(model_dir, n_vocab)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
    else:
        raise ConfigError(f"{model_dir}: no tokenizer.model or tokenizer.json; a GGUF model "
                          f"carries its tokenizer, so export needs one next to config.json")
    w.add_token_list(tokens)
    w.add_token_types(types)
    log = logging.getLogger("gguf.vocab")
    log.addFilter(_pair_template_note)
    try:
        special = g.SpecialVocab(model_dir, load_merges=bpe, n_vocab=n_vocab)
    except ValueError as e:                                # e.g. a negative special token id
        raise ConfigError(f"{model_dir}: tokenizer / config.json special tokens: {e}") from None
    finally:
        log.removeFilter(_pair_template_note)
    special.add_to_gguf(w, quiet=True)
    if "eot" not in special.special_token_ids and "<|eot_id|>" in tokens:
        eot = tokens.index("<|eot_id|>")                   # Llama 3 chat's end of turn
        if types[eot] == g.TokenType.CONTROL:
            w.add_eot_token_id(eot)


def _pair_template_note(record: logging.LogRecord) -> bool:
    """Drop gguf's note on the sentence-pair template of tokenizer.json's post-processor (BOS
    as the pair separator): llama.cpp never reads it, and a user could not act on it."""
    return "TemplateProcessing<pair>" not in record.getMessage()


# ----------------------------------------------------------------------------- exports

def export_gguf(model_dir, adapter_dir, out_file, outtype: str = "f16", base_quant: str = "none",
                overwrite: bool = False) -> Path:
    """Merge the PEFT adapter in ``adapter_dir`` into the HF Llama checkpoint in ``model_dir`` and
    write the merged model, with its tokenizer, as one GGUF file ``out_file`` for llama.cpp.
    With ``adapter_dir=None`` the base alone is converted (the model to run a
    :func:`export_gguf_lora` adapter on).

    ``outtype`` f32 | f16 | bf16 | q8_0 sets the type of the 2-D weights (q8_0 via
    ``gguf.quants``; a weight whose row length is not a multiple of 32 is written F16); norms
    and ``rope_freqs`` are always F32. The merge is computed in float32 from the base and
    converted once. With ``base_quant`` int8 | nf4 (an adapter trained on a quantised base) the
    seven decoder linears of the base are quantised and dequantised as training saw them before
    the merge, so the GGUF holds the dequantised base + adapter (not a re-quantised one).

    Metadata: the Llama hyperparameters of config.json; the tokenizer (sentencepiece
    ``tokenizer.model`` -> llama.cpp "llama"; Llama-3 byte-level BPE ``tokenizer.json`` ->
    "gpt2" with pre-tokenizer "llama-bpe"; anything else is a ConfigError), its bos / eos /
    unk / pad ids, add_bos / add_eos, ``<|eot_id|>`` as end of turn when the vocabulary has it,
    and the chat template (tokenizer_config.json or chat_template.jinja). The vocabulary is
    padded with unused ``[PAD{id}]`` tokens up to config.json's vocab_size. llama.cpp tokenizes
    sentencepiece vocabularies as sentencepiece itself does, which puts a space prefix before
    text that follows a special token or already starts with a space; transformers'
    ``tokenizer.json`` (Metaspace, prepend_scheme "first") does neither, so such prompts can
    tokenize differently in llama.cpp than in transformers (ordinary text does not).

    An existing ``out_file`` is an error unless ``overwrite=True``. Returns ``out_file``.
    """
    model_dir, out = Path(model_dir), Path(out_file)
    file_type, qtype = _check_outtype(outtype)
    _check_output(out, overwrite)
    g = _gguf()
    cfg, files, produce = merged_weights(model_dir, adapter_dir, base_quant)
    names = g.get_tensor_name_map(g.MODEL_ARCH.LLAMA, cfg.num_layers)
    qk = {hf_layer_key(i, p) for i in range(cfg.num_layers) for p in ("q_proj", "k_proj")}

    def read(hf_name):
        if hf_name in qk:
            return lambda: _rotary_rows(produce(hf_name, np.float32), cfg.head_dim)
        return lambda: produce(hf_name, np.float32)

    tensors = []
    if cfg.rope_scaling.rope_type == "llama3":
        factors = _llama3_rope_factors(cfg)
        tensors.append((g.TENSOR_NAMES[g.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape,
                        g.GGMLQuantizationType.F32, lambda: factors))
    for hf_name in sorted(files.names(), key=_natural_key):
        if hf_name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings
                                                       and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise CheckpointError(f"{model_dir}: tensor {hf_name!r} has no GGUF name for a Llama "
                                  f"model; is this a LlamaForCausalLM checkpoint?")
        shape = files.shape(hf_name)
        tensors.append((name, shape, _tensor_type(qtype, shape), read(hf_name)))

    def setup(w):
        w.add_type(g.GGUFType.MODEL)
        w.add_name(out.stem)
        _add_hparams(w, cfg, file_type)
        _add_tokenizer(w, model_dir, cfg.vocab_size)

    return _write(out, setup, tensors)


def export_gguf_lora(model_dir, adapter_dir, out_file, outtype: str = "f32",
                     overwrite: bool = False) -> Path:
    """Write the PEFT adapter in ``adapter_dir`` (for the HF Llama in ``model_dir``, of which
    only config.json is read) as a GGUF LoRA adapter ``out_file`` for llama.cpp's ``--lora``.

    For every targeted projection and layer: ``<base tensor>.weight.lora_a`` = PEFT lora_A
    ``[r, in]`` and ``<base tensor>.weight.lora_b`` = PEFT lora_B ``[out, r]`` (rows of
    ``attn_q`` / ``attn_k`` reordered for llama.cpp's rotary layout), in ``outtype``
    (f32 | f16 | bf16 | q8_0; a factor whose row length is not a multiple of 32, such as
    lora_b with r < 32, is written F16 under q8_0). Metadata: general.type adapter,
    adapter.type lora, the base's architecture and ``adapter.lora.alpha = scaling * r``, so
    llama.cpp's scale alpha / r equals ours (alpha / r, or alpha / sqrt(r) with rsLoRA).

    An existing ``out_file`` is an error unless ``overwrite=True``. Returns ``out_file``.
    """
    out = Path(out_file)
    file_type, qtype = _check_outtype(outtype)
    _check_output(out, overwrite)
    g = _gguf()
    cfg = ModelConfig.from_pretrained(model_dir)
    lora, lora_cfg = read_adapter(adapter_dir, cfg)
    if lora_cfg.alpha == 0:
        raise CheckpointError(f"{adapter_dir}: lora_alpha is 0; llama.cpp reads alpha 0 as unset "
                              f"and would apply the adapter at scale 1")
    names = g.get_tensor_name_map(g.MODEL_ARCH.LLAMA, cfg.num_layers)
    tensors = []
    for i in range(cfg.num_layers):
        for proj, ab in lora["layers"].items():
            hf_name = hf_layer_key(i, proj)
            name = names.get_name(hf_name, try_suffixes=(".weight",))
            lora_a = ab["a"][i].T                              # [r, in]
            lora_b = ab["b"][i].T                              # [out, r]
            if proj in ("q_proj", "k_proj"):
                lora_b = _rotary_rows(lora_b, cfg.head_dim)
            for suffix, t in ((".lora_a", lora_a), (".lora_b", lora_b)):
                tensors.append((name + suffix, t.shape, _tensor_type(qtype, t.shape),
                                lambda t=t: t))

    def setup(w):
        w.add_type(g.GGUFType.ADAPTER)
        w.add_name(out.stem)
        w.add_string(g.Keys.Adapter.TYPE, "lora")
        w.add_float32(g.Keys.Adapter.LORA_ALPHA, lora_cfg.scaling * lora_cfg.rank)
        w.add_file_type(file_type)

    return _write(out, setup, tensors)


__all__ = ["export_gguf", "export_gguf_lora", "OUTTYPES"]
