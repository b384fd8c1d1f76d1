"""GGUF export for llama.cpp / Ollama (spmd_lora/gguf_export.py).

Fast tests read the files back with gguf.GGUFReader and check every tensor and metadata value
against references built here from the safetensors / PEFT files themselves, RoPE written out
from its definition (for llama.cpp's q/k row order) and transformers' Llama-3 rope frequencies.
Slow tests load the files in llama.cpp itself (llama-cpp-python) and compare logits, greedy
generation, tokenization, end-of-turn stopping and base + LoRA with transformers / PEFT.
"""
import contextlib
import json
import math
import re
import shutil
import time

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from spmd_lora.errors import CheckpointError, ConfigError  # noqa: E402
from spmd_lora.gguf_export import export_gguf, export_gguf_lora  # noqa: E402
from spmd_lora.tiny import asset_text, build_tiny_llama, build_tokenizer  # noqa: E402

PROJ_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
F32, F16, BF16, Q8_0 = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                        gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.Q8_0)
SPM_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
                "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}"
                "{% endfor %}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                   "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
                   "\n\n{% endif %}")


# ----------------------------------------------------------------------------- builders

def build_llama3_tokenizer(out_dir, vocab_size=400, gpt2_pre=False):
    """A Llama-3 style byte-level BPE tokenizer (Llama 3's split regex, ignore_merges, the
    chat special tokens after the trained vocabulary, BOS added, llama3 chat template) trained
    on the bundled corpus; ``gpt2_pre`` gives it GPT-2's pre-tokenizer instead."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=True))
    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if gpt2_pre else
                         pre_tokenizers.Sequence([
                             pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(asset_text("corpus.txt").splitlines(), trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_special_tokens(LLAMA3_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>")
    fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return out_dir


def with_tokenizer(model_dir, tokenizer_dir):
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, model_dir / f.name)
    return model_dir


def proj_dims(cfg: dict, proj: str) -> tuple[int, int]:
    """(in, out) features of a projection, from config.json."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}[proj]


def write_peft_adapter(out_dir, model_dir, rank=4, alpha=8.0, rslora=False, seed=0,
                       targets=tuple(PROJ_MODULES)):
    """A PEFT LoRA adapter directory with random lora_A [r, in] / lora_B [out, r]."""
    from safetensors.numpy import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for proj in targets:
            fan_in, fan_out = proj_dims(cfg, proj)
            key = f"base_model.model.model.layers.{i}.{PROJ_MODULES[proj]}.{proj}"
            tensors[key + ".lora_A.weight"] = 0.2 * rng.standard_normal((rank, fan_in), np.float32)
            tensors[key + ".lora_B.weight"] = 0.2 * rng.standard_normal((fan_out, rank), np.float32)
    out_dir.mkdir(parents=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
         "target_modules": list(targets), "lora_dropout": 0.0}))
    return out_dir


def reference_weights(model_dir, adapter_dir=None) -> dict[str, np.ndarray]:
    """HF name -> float64 weight, W + scaling * B @ A for adapted ones, from the files."""
    from safetensors.numpy import load_file

    w = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        w.update({k: v.astype(np.float64) for k, v in load_file(str(f)).items()})
    if adapter_dir is not None:
        acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        scaling = acfg["lora_alpha"] / (math.sqrt(acfg["r"]) if acfg["use_rslora"] else acfg["r"])
        ad = load_file(str(adapter_dir / "adapter_model.safetensors"))
        for key, a in ad.items():
            if key.endswith(".lora_A.weight"):
                b = ad[key.replace("lora_A", "lora_B")]
                name = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
                w[name] = w[name] + scaling * (b.astype(np.float64) @ a.astype(np.float64))
    return w


def gguf_name(hf_name: str) -> str:
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    if m:
        return f"blk.{m[1]}.{GGUF_LAYER[m[2]]}.weight"
    return GGUF_TOP[hf_name.removesuffix(".weight")] + ".weight"


def read_gguf(path):
    """(metadata dict, {name: (GGML type, float64 array in numpy layout)}), decoding BF16 and
    Q8_0 blocks here (not with the gguf package)."""
    r = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items()}
    tensors = {}
    for t in r.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        if t.tensor_type in (F32, F16):
            x = np.asarray(t.data, np.float64)
        elif t.tensor_type == BF16:
            x = (np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif t.tensor_type == Q8_0:
            blocks = np.asarray(t.data).reshape(-1, 34)         # f16 scale + 32 int8
            x = blocks[:, :2].copy().view(np.float16).astype(np.float64) * blocks[:, 2:].view(np.int8)
        else:
            raise AssertionError(f"unexpected type {t.tensor_type!r}")
        tensors[t.name] = (t.tensor_type, np.asarray(x, np.float64).reshape(shape))
    return meta, tensors


def rope_scores(wq, wk, cfg: dict, layout: str) -> np.ndarray:
    """Attention logits [heads, kv heads] of q(x at position 3) and k(y at position 11) with
    RoPE as HF applies it (rotate_half: pairs j, j + d/2) or as llama.cpp does (adjacent
    pairs 2j, 2j + 1), both written from their definitions."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    freqs = theta ** (-np.arange(0, hd, 2) / hd)
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal(wq.shape[1]), rng.standard_normal(wk.shape[1])

    def rope(v, pos):
        c, s = np.cos(pos * freqs), np.sin(pos * freqs)
        out = np.empty_like(v)
        if layout == "hf":
            a, b = v[:, :hd // 2], v[:, hd // 2:]
            out[:, :hd // 2], out[:, hd // 2:] = a * c - b * s, b * c + a * s
        else:
            a, b = v[:, 0::2], v[:, 1::2]
            out[:, 0::2], out[:, 1::2] = a * c - b * s, b * c + a * s
        return out

    q = rope((wq @ x).reshape(-1, hd), 3)
    k = rope((wk @ y).reshape(-1, hd), 11)
    return q @ k.T


def check_tensors(got: dict, ref: dict, cfg: dict, rtol: float) -> None:
    """Every reference tensor is in the GGUF (q / k checked through RoPE attention logits)."""
    for name, want in ref.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        x = got[gguf_name(name)][1]
        assert x.shape == want.shape, name
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            assert np.allclose(np.sort(x, axis=None), np.sort(want, axis=None),
                               rtol=rtol, atol=rtol * np.abs(want).max()), name
            continue
        assert np.allclose(x, want, rtol=rtol, atol=rtol * np.abs(want).max()), name
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        want = rope_scores(ref[p + "q_proj.weight"], ref[p + "k_proj.weight"], cfg, "hf")
        score = rope_scores(got[f"blk.{i}.attn_q.weight"][1], got[f"blk.{i}.attn_k.weight"][1],
                            cfg, "llama.cpp")
        assert np.abs(score - want).max() <= 4 * rtol * np.abs(want).max(), f"layer {i} q/k"


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    out = build_tokenizer(tmp_path_factory.mktemp("spm_tok"), vocab_size=384)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = SPM_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    return build_llama3_tokenizer(tmp_path_factory.mktemp("bpe_tok"))


@pytest.fixture(scope="module")
def gqa(tmp_path_factory, spm_tokenizer):
    """(model dir, adapter dir): the default tiny Llama (GQA 4/2, vocab 512 > 384 pieces)."""
    root = tmp_path_factory.mktemp("gqa")
    model = with_tokenizer(build_tiny_llama(root / "model", with_tokenizer=False), spm_tokenizer)
    return model, write_peft_adapter(root / "adapter", model)


# ----------------------------------------------------------------------------- fast tests

@pytest.mark.parametrize("outtype,want_type,rtol", [("f32", F32, 1e-6), ("f16", F16, 1e-3),
                                                    ("bf16", BF16, 8e-3)], ids=["f32", "f16", "bf16"])
def test_merged_gguf_tensors_and_metadata(gqa, spm_tokenizer, tmp_path, outtype, want_type, rtol):
    from sentencepiece import SentencePieceProcessor

    model, adapter = gqa
    t0 = time.perf_counter()
    out = export_gguf(model, adapter, tmp_path / "m.gguf", outtype=outtype)
    print(f"export_gguf {outtype}: {time.perf_counter() - t0:.2f}s")
    meta, got = read_gguf(out)
    cfg = json.loads((model / "config.json").read_text())
    ref = reference_weights(model, adapter)
    assert set(got) == {gguf_name(n) for n in ref}
    for name, (typ, x) in got.items():
        assert typ == (F32 if x.ndim == 1 else want_type), name
    check_tensors(got, ref, cfg, rtol)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]

    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    assert meta["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32}[outtype]
    expect = {"context_length": cfg["max_position_embeddings"],
              "embedding_length": cfg["hidden_size"], "block_count": cfg["num_hidden_layers"],
              "feed_forward_length": cfg["intermediate_size"],
              "attention.head_count": cfg["num_attention_heads"],
              "attention.head_count_kv": cfg["num_key_value_heads"],
              "attention.key_length": hd, "attention.value_length": hd,
              "rope.dimension_count": hd, "vocab_size": cfg["vocab_size"]}
    assert {k: meta["llama." + k] for k in expect} == expect
    assert meta["llama.rope.freq_base"] == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert "llama.rope.scaling.type" not in meta and "rope_freqs.weight" not in got

    sp = SentencePieceProcessor(model_file=str(spm_tokenizer / "tokenizer.model"))
    n = sp.vocab_size()
    assert meta["tokenizer.ggml.model"] == "llama"
    tokens, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert len(tokens) == len(scores) == len(types) == cfg["vocab_size"]
    assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
    assert np.allclose(scores[:n], [sp.get_score(i) for i in range(n)])
    byte = [i for i in range(n) if re.fullmatch(r"<0x[0-9A-F]{2}>", sp.id_to_piece(i))]
    assert len(byte) == 256 and all(types[i] == 6 for i in byte)        # BYTE
    assert types[0] == 2 and types[1] == types[2] == 3                   # UNKNOWN, CONTROL
    assert set(types[i] for i in range(n) if i > 2 and i not in byte) == {1}   # NORMAL
    assert set(types[n:]) == {5} and tokens[n] == f"[PAD{n}]"            # UNUSED padding
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.chat_template"] == SPM_TEMPLATE
    assert "tokenizer.ggml.eot_token_id" not in meta


def test_llama3_bpe_tokenizer_metadata(bpe_tokenizer, tmp_path):
    tj = json.loads((bpe_tokenizer / "tokenizer.json").read_text())
    n_tok = len(tj["model"]["vocab"]) + len(LLAMA3_SPECIALS)
    model = with_tokenizer(build_tiny_llama(tmp_path / "m", vocab_size=n_tok + 3, seed=1,
                                            with_tokenizer=False), bpe_tokenizer)
    meta, _ = read_gguf(export_gguf(model, None, tmp_path / "m.gguf", outtype="f32"))
    ids = {t["content"]: t["id"] for t in tj["added_tokens"]}
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "llama-bpe")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == n_tok + 3
    assert all(tokens[i] == t for t, i in tj["model"]["vocab"].items())
    assert all(tokens[ids[t]] == t and types[ids[t]] == 3 for t in LLAMA3_SPECIALS)   # CONTROL
    assert set(types[:len(tj["model"]["vocab"])]) == {1} and set(types[n_tok:]) == {5}
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m
                                             for m in tj["model"]["merges"]]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.eot_token_id"]) == (ids["<|begin_of_text|>"],
                                                     ids["<|end_of_text|>"], ids["<|eot_id|>"])
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.chat_template"] == LLAMA3_TEMPLATE


def test_llama3_rope_freqs_and_tied_embeddings(spm_tokenizer, tmp_path):
    pytest.importorskip("torch")                           # transformers' rope helpers
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    model = with_tokenizer(build_tiny_llama(tmp_path / "m", rope_scaling=rope, rope_theta=500000.0,
                                            tie_word_embeddings=True, with_tokenizer=False),
                           spm_tokenizer)
    adapter = write_peft_adapter(tmp_path / "a", model, targets=("q_proj", "v_proj"))
    meta, got = read_gguf(export_gguf(model, adapter, tmp_path / "m.gguf", outtype="f16"))
    cfg = json.loads((model / "config.json").read_text())
    assert "output.weight" not in got and "token_embd.weight" in got
    check_tensors(got, reference_weights(model, adapter), cfg, 1e-3)

    hf_cfg = LlamaConfig.from_pretrained(str(model))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    plain = 500000.0 ** (-np.arange(0, hd, 2) / hd)
    typ, factors = got["rope_freqs.weight"]
    assert typ == F32 and factors.shape == (hd // 2,)
    assert np.allclose(factors, plain / scaled.double().numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0      # both ends of the band are used
    assert meta["llama.rope.freq_base"] == 500000.0


def test_q8_0_within_quantisation_error_and_f16_fallback(spm_tokenizer, tmp_path):
    # hidden 48: rows of 48 do not split into 32-blocks (F16, as llama.cpp's converter);
    # down_proj rows (intermediate 64) do (Q8_0)
    model = with_tokenizer(build_tiny_llama(tmp_path / "m", hidden_size=48, intermediate_size=64,
                                            num_attention_heads=4, num_key_value_heads=4,
                                            with_tokenizer=False), spm_tokenizer)
    adapter = write_peft_adapter(tmp_path / "a", model)
    meta, got = read_gguf(export_gguf(model, adapter, tmp_path / "q.gguf", outtype="q8_0"))
    _, exact = read_gguf(export_gguf(model, adapter, tmp_path / "f.gguf", outtype="f32"))
    assert meta["general.file_type"] == 7
    worst = 0.0
    for name, (typ, x) in got.items():
        want = exact[name][1]
        if x.ndim == 1:
            assert typ == F32 and np.array_equal(x, want), name
        elif x.shape[1] % 32:
            assert typ == F16 and np.allclose(x, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
        else:
            assert typ == Q8_0, name
            blocks = want.reshape(-1, 32)
            err = np.abs(x.reshape(-1, 32) - blocks)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert (err <= 0.57 * step + 1e-7).all(), name     # half a step + f16 scale rounding
            worst = max(worst, float(err.max() / np.abs(want).max()))
    assert {t for t, _ in got.values()} == {F32, F16, Q8_0}
    print(f"q8_0 max error / max |w|: {worst:.2e}")


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_gguf_matches_peft_adapter(gqa, tmp_path, rslora):
    model, _ = gqa
    adapter = write_peft_adapter(tmp_path / "a", model, rank=8, alpha=4.0, rslora=rslora, seed=3)
    meta, got = read_gguf(export_gguf_lora(model, adapter, tmp_path / "lora.gguf"))
    assert (meta["general.architecture"], meta["general.type"], meta["adapter.type"]) == \
        ("llama", "adapter", "lora")
    scaling = 4.0 / (math.sqrt(8) if rslora else 8)
    assert meta["adapter.lora.alpha"] / 8 == pytest.approx(scaling)   # llama.cpp: alpha / rank

    from safetensors.numpy import load_file
    peft = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(got) == len(peft)
    for key, t in peft.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        name = gguf_name(m[1] + ".weight") + (".lora_a" if m[2] == "A" else ".lora_b")
        typ, x = got[name]
        assert typ == F32 and x.shape == t.shape
        if m[2] == "A" or not name.startswith(("blk.0.attn_q", "blk.0.attn_k", "blk.1.attn_q",
                                               "blk.1.attn_k")):
            assert np.array_equal(x, t), name
    # q / k: base GGUF + scale * B @ A from the LoRA GGUF == the merged GGUF
    _, base = read_gguf(export_gguf(model, None, tmp_path / "base.gguf", outtype="f32"))
    _, merged = read_gguf(export_gguf(model, adapter, tmp_path / "merged.gguf", outtype="f32"))
    for name in merged:
        if name + ".lora_a" in got:
            delta = got[name + ".lora_b"][1] @ got[name + ".lora_a"][1]
            assert np.allclose(base[name][1] + meta["adapter.lora.alpha"] / 8 * delta,
                               merged[name][1], atol=1e-5), name
        else:
            assert np.array_equal(base[name][1], merged[name][1]), name


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_base_quant_merges_into_dequantised_base(spm_tokenizer, tmp_path, kind):
    from spmd_lora.config.model_config import ModelConfig
    from spmd_lora.export import _quant_roundtrip

    model = with_tokenizer(build_tiny_llama(tmp_path / "m", with_tokenizer=False), spm_tokenizer)
    config = ModelConfig.from_pretrained(model)
    adapter = write_peft_adapter(tmp_path / "a", model)
    _, got = read_gguf(export_gguf(model, adapter, tmp_path / "m.gguf", outtype="f32",
                                   base_quant=kind))
    base = reference_weights(model)
    merged = reference_weights(model, adapter)
    ref = {}
    for name, w in base.items():
        proj = name.split(".")[-2]
        if proj in PROJ_MODULES:        # dequantised as training saw it, plus the LoRA delta
            deq = _quant_roundtrip(kind, proj, w.astype(np.float32), config).astype(np.float64)
            assert not np.allclose(deq, w)
            ref[name] = deq + (merged[name] - w)
        else:
            ref[name] = w
    check_tensors(got, ref, json.loads((model / "config.json").read_text()), 1e-5)


def test_bad_input_is_a_one_line_error(gqa, bpe_tokenizer, tmp_path):
    model, adapter = gqa
    for export in (export_gguf, export_gguf_lora):
        with pytest.raises(ConfigError) as e:
            export(model, adapter, tmp_path / "x.gguf", outtype="q4_k")
        assert "unknown GGUF outtype 'q4_k'; choose one of f32, f16, bf16, q8_0" in one_line(e)

    other = build_tiny_llama(tmp_path / "other", hidden_size=32, with_tokenizer=False)
    wrong = write_peft_adapter(tmp_path / "wrong", other)
    for export in (export_gguf, export_gguf_lora):
        with pytest.raises(CheckpointError) as e:
            export(model, wrong, tmp_path / "x.gguf")
        assert "does not match this base model" in one_line(e)

    (tmp_path / "old.gguf").write_bytes(b"keep")
    for export in (export_gguf, export_gguf_lora):
        with pytest.raises(CheckpointError) as e:
            export(model, adapter, tmp_path / "old.gguf")
        assert "exists; choose a new file name or pass overwrite=True" in one_line(e)
        with pytest.raises(CheckpointError, match="is a directory"):
            export(model, adapter, tmp_path)
    assert (tmp_path / "old.gguf").read_bytes() == b"keep"

    gpt2 = build_llama3_tokenizer(tmp_path / "gpt2_tok", gpt2_pre=True)
    bare = build_tiny_llama(tmp_path / "bare", with_tokenizer=False)
    with pytest.raises(ConfigError) as e:
        export_gguf(bare, adapter, tmp_path / "x.gguf")
    assert "no tokenizer.model or tokenizer.json" in one_line(e)
    with_tokenizer(bare, gpt2)
    with pytest.raises(ConfigError) as e:
        export_gguf(bare, adapter, tmp_path / "x.gguf")
    assert re.search(r"bare/tokenizer.json: llama.cpp cannot reproduce this tokenizer: its "
                     r"pre-tokenizer is not Llama 3's", one_line(e))

    zero = write_peft_adapter(tmp_path / "zero", model, alpha=0.0)
    with pytest.raises(CheckpointError) as e:
        export_gguf_lora(model, zero, tmp_path / "x.gguf")
    assert "lora_alpha is 0" in one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf") == ["old.gguf"]


def test_cli_formats_and_their_errors(gqa, tmp_path, capsys):
    """``spmd-lora export --format gguf | gguf-lora`` as a user types it: the files equal the
    library's; wrong combinations are one error line with exit 2 and write nothing."""
    from spmd_lora import cli

    model, adapter = gqa
    base = ["export", "--model", str(model)]
    assert cli.main([*base, "--adapter", str(adapter), "--format", "gguf", "--outtype", "f32",
                     "--output", str(tmp_path / "m.gguf")]) == 0
    assert "GGUF of the merged model written to" in capsys.readouterr().out
    assert cli.main([*base, "--format", "gguf", "--output", str(tmp_path / "base.gguf")]) == 0
    assert cli.main([*base, "--adapter", str(adapter), "--format", "gguf-lora",
                     "--output", str(tmp_path / "a.gguf")]) == 0
    out = capsys.readouterr().out
    assert "GGUF of the base model written to" in out and "(f16)" in out
    assert "GGUF LoRA adapter written to" in out and "(f32)" in out
    export_gguf(model, adapter, tmp_path / "lib.gguf", outtype="f32")
    cli_t, lib_t = read_gguf(tmp_path / "m.gguf")[1], read_gguf(tmp_path / "lib.gguf")[1]
    assert cli_t.keys() == lib_t.keys()
    assert all(cli_t[k][0] == lib_t[k][0] and np.array_equal(cli_t[k][1], lib_t[k][1]) for k in lib_t)
    assert read_gguf(tmp_path / "base.gguf")[0]["general.file_type"] == 1          # MOSTLY_F16

    def error(*argv):
        with pytest.raises(SystemExit) if "--outtype" in argv and "q4_k" in argv else \
                contextlib.nullcontext():
            rc = cli.main([*base, *argv])
            assert rc == 2
        return [x for x in capsys.readouterr().err.splitlines() if x.strip()]

    lines = error("--adapter", str(adapter), "--format", "gguf", "--outtype", "q4_k",
                  "--output", str(tmp_path / "x.gguf"))
    assert "--outtype: invalid choice: 'q4_k'" in lines[-1]
    for argv, says in [
            (["--adapter", str(adapter), "--outtype", "f16", "--output", str(tmp_path / "x")],
             "error: --outtype applies to --format gguf and gguf-lora"),
            (["--format", "gguf-lora", "--output", str(tmp_path / "x.gguf")],
             "error: --adapter is required for --format gguf-lora"),
            (["--format", "gguf", "--output", str(tmp_path / "m.gguf")], "exists; choose a new"),
            (["--format", "gguf", "--output", "/proc/x.gguf"], "/proc")]:
        lines = error(*argv)
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.gguf", "base.gguf", "lib.gguf", "m.gguf"]


def test_failed_write_leaves_nothing(gqa, tmp_path, monkeypatch):
    model, adapter = gqa
    real = gguf.GGUFWriter.write_tensor_data
    calls = []

    def failing(self, tensor, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(self, tensor, *args, **kw)

    (tmp_path / "old.gguf").write_bytes(b"keep")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    for export, out, overwrite in ((export_gguf, "new.gguf", False),
                                   (export_gguf_lora, "new.gguf", False),
                                   (export_gguf, "old.gguf", True)):
        calls.clear()
        with pytest.raises(OSError, match="disk full"):
            export(model, adapter, tmp_path / out, overwrite=overwrite)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["old.gguf"]   # no temp file
    assert (tmp_path / "old.gguf").read_bytes() == b"keep"
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", real)
    export_gguf(model, adapter, tmp_path / "old.gguf", overwrite=True)
    assert read_gguf(tmp_path / "old.gguf")[0]["general.architecture"] == "llama"


# ----------------------------------------------------------------------------- llama.cpp itself

SLOW_CASES = {
    "mha-spm": dict(tokenizer="spm", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4),
    "gqa-spm": dict(tokenizer="spm", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2),
    "llama3-bpe": dict(tokenizer="bpe", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 16},
                       tie_word_embeddings=True),
}
PROMPT = "Below is an instruction. Describe how 42 people live in Corholt, and why."


@pytest.fixture(scope="module")
def llama_cpp():
    """The llama-cpp-python module (first in the slow tests' arguments, so they skip before
    anything is built)."""
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; "
                                                   "pip install llama-cpp-python")


def hf_case(name, root, spm_tokenizer, bpe_tokenizer, rslora=False):
    """(model dir, adapter dir, HF tokenizer, PEFT model over the HF base) for a SLOW_CASES entry."""
    from transformers import AutoTokenizer

    from conftest import build_hf_llama, make_peft_adapter

    kw = dict(SLOW_CASES[name])
    tok_dir = spm_tokenizer if kw.pop("tokenizer") == "spm" else bpe_tokenizer
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab = len(tok) + (3 if tok_dir == bpe_tokenizer else 0)     # BPE: padded vocabulary
    hf = build_hf_llama(root / "model", vocab_size=vocab, **kw)
    with_tokenizer(root / "model", tok_dir)
    pm = make_peft_adapter(hf, root / "adapter", use_rslora=rslora)
    return root / "model", root / "adapter", tok, pm


def prompt_ids(tok, bpe: bool) -> tuple[list[int], str, bool]:
    """(HF token ids, text, add_bos) of the test prompt."""
    if bpe:       # the chat template, special tokens inside
        text = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                       add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False).input_ids, text, False
    text = PROMPT + "</s>"
    return tok(text).input_ids, text, True


def llama_logits(llama_cpp, path, ids, kv_f32=True, **kw) -> np.ndarray:
    """llama.cpp's logits [tokens, vocab] of ``ids``; the KV cache in float32 unless
    ``kv_f32=False`` (llama.cpp's default f16 cache)."""
    if kv_f32:
        kw.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True,
                          verbose=False, n_threads=2, **kw)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], np.float64)


def llama_logits_in_child(path, ids) -> np.ndarray | int:
    """:func:`llama_logits` of ``path`` computed in a child process; the child's (negative)
    return code when it dies by a signal."""
    import subprocess
    import sys

    out = path.with_suffix(".logits.npy")
    code = ("import sys, json, numpy as np, llama_cpp\n"
            "llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=128, n_batch=128, logits_all=True,"
            " verbose=False, n_threads=2, type_k=llama_cpp.GGML_TYPE_F32,"
            " type_v=llama_cpp.GGML_TYPE_F32)\n"
            "ids = json.loads(sys.argv[2]); llm.eval(ids)\n"
            "np.save(sys.argv[3], np.array(llm.scores[:len(ids)], np.float64))\n")
    r = subprocess.run([sys.executable, "-c", code, str(path), json.dumps(ids), str(out)],
                       capture_output=True, text=True, timeout=300)
    if r.returncode < 0:
        return r.returncode
    assert r.returncode == 0 and out.is_file(), r.stderr[-2000:]
    return np.load(out)


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_llama_cpp_runs_the_export_like_hf(llama_cpp, name, spm_tokenizer, bpe_tokenizer, tmp_path):
    import itertools

    import torch

    t0 = time.perf_counter()
    bpe = SLOW_CASES[name]["tokenizer"] == "bpe"
    model, adapter, tok, pm = hf_case(name, tmp_path, spm_tokenizer, bpe_tokenizer, rslora=bpe)
    ids, text, add_bos = prompt_ids(tok, bpe)
    with torch.no_grad():
        want = pm(torch.tensor([ids])).logits[0].double().numpy()
        hf_new = pm.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                             do_sample=False, max_new_tokens=32)[0, len(ids):].tolist()

    errs = {}
    for outtype in ("f32", "f16"):
        path = export_gguf(model, adapter, tmp_path / f"merged-{outtype}.gguf", outtype=outtype)
        errs[outtype] = rel(llama_logits(llama_cpp, path, ids), want)
    # q8_0: the same bytes as llama.cpp's own quantiser makes from our f32 file; its logits
    # come from a child process (llama.cpp's q8_0 CPU kernels crash on some CPUs, on its own
    # q8_0 files too), and must then behave as llama.cpp's own file does
    ours_q8 = export_gguf(model, adapter, tmp_path / "merged-q8_0.gguf", outtype="q8_0")
    cpp_q8 = tmp_path / "llama-cpp-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(tmp_path / "merged-f32.gguf").encode(),
                                          str(cpp_q8).encode(), params) == 0
    ours_t = {t.name: t for t in gguf.GGUFReader(str(ours_q8)).tensors}
    cpp_t = {t.name: t for t in gguf.GGUFReader(str(cpp_q8)).tensors}
    assert ours_t.keys() == cpp_t.keys()
    for k, t in ours_t.items():
        assert t.tensor_type == cpp_t[k].tensor_type and np.array_equal(
            np.asarray(t.data), np.asarray(cpp_t[k].data)), k
    q8 = {path.name: llama_logits_in_child(path, ids) for path in (ours_q8, cpp_q8)}
    assert isinstance(q8[ours_q8.name], int) == isinstance(q8[cpp_q8.name], int), q8
    if isinstance(q8[ours_q8.name], int):
        print(f"note: llama.cpp crashed (signal {-q8[ours_q8.name]}) on q8_0 here, on its own "
              f"q8_0 file as well")
    else:
        errs["q8_0"] = rel(q8[ours_q8.name], want)
    errs["f32 (f16 KV cache)"] = rel(llama_logits(llama_cpp, tmp_path / "merged-f32.gguf", ids,
                                                  kv_f32=False), want)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "merged-f32.gguf"), n_ctx=128,
                          verbose=False, n_threads=2)
    assert llm.tokenize(text.encode(), add_bos=add_bos, special=True) == ids
    cpp_new = list(itertools.islice(llm.generate(ids, temp=0.0), 32))
    # HF stops early only at its eos; llama.cpp then produced the same eos
    assert cpp_new[:len(hf_new)] == hf_new and (len(hf_new) == 32 or hf_new[-1] == tok.eos_token_id)

    base = export_gguf(model, None, tmp_path / "base-f32.gguf", outtype="f32")
    lora = export_gguf_lora(model, adapter, tmp_path / "lora-f32.gguf")
    with_lora = llama_logits(llama_cpp, base, ids, lora_path=str(lora))
    errs["base+lora"] = rel(with_lora, want)
    print(f"llama.cpp vs PEFT {name} ({len(ids)} prompt tokens, {len(hf_new)} greedy tokens equal): "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
          + f"; {time.perf_counter() - t0:.1f}s")
    assert errs["f32"] <= 1e-4 and errs["base+lora"] <= 1e-4
    assert errs["f16"] <= 1e-2 and errs["f32 (f16 KV cache)"] <= 1e-2
    # q8_0: llama.cpp also rounds the activations to 8 bits in its q8_0 matmuls; the weights
    # themselves are checked within their quantisation error by the fast test
    assert errs.get("q8_0", 0.0) <= 0.25


@pytest.mark.slow
def test_llama_cpp_stops_at_the_llama3_end_of_turn(llama_cpp, bpe_tokenizer, tmp_path):
    """A model built to answer <|eot_id|> at once: llama.cpp's chat completion (the GGUF's chat
    template) ends there with finish_reason 'stop' although eos is <|end_of_text|>."""
    import torch
    from transformers import AutoTokenizer

    from conftest import build_hf_llama

    tok = AutoTokenizer.from_pretrained(str(bpe_tokenizer))
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot != tok.eos_token_id
    kw = {k: v for k, v in SLOW_CASES["llama3-bpe"].items() if k != "tokenizer"}
    kw["tie_word_embeddings"] = False
    hf = build_hf_llama(tmp_path / "model", vocab_size=len(tok), **kw)
    # hidden unit 0 carries a constant 10 through the residual stream; only eot reads it
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd["model.embed_tokens.weight"][:, 0] = 10.0
    for k in sd:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            sd[k][0] = 0.0
    sd["lm_head.weight"][:, 0] = 0.0
    sd["lm_head.weight"][eot, 0] = 10.0
    hf.load_state_dict(sd)
    hf.save_pretrained(str(tmp_path / "model"))
    with_tokenizer(tmp_path / "model", bpe_tokenizer)
    ids, _, _ = prompt_ids(tok, bpe=True)
    with torch.no_grad():
        assert hf(torch.tensor([ids])).logits[0, -1].argmax().item() == eot

    path = export_gguf(tmp_path / "model", None, tmp_path / "m.gguf", outtype="f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False, n_threads=2)
    assert llm._model.token_eot() == eot
    assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, eot)
    out = llm.create_chat_completion([{"role": "user", "content": PROMPT}], max_tokens=8,
                                     temperature=0.0)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["message"]["content"] == ""
    assert out["usage"]["prompt_tokens"] == len(ids)         # the template rendered as HF does


@pytest.mark.slow
def test_demo_model_in_llama_cpp_generates_like_spmd_lora_generate(llama_cpp, tmp_path, capsys):
    """Issue 27's end to end: ``spmd-lora demo`` trains a tiny model, ``spmd-lora export
    --format gguf`` writes it, and llama.cpp's greedy tokens from the alpaca prompt equal
    ``spmd-lora generate``'s (the CLI's text, and the token ids behind it)."""
    import itertools
    import json as json_

    import spmd_lora
    from spmd_lora import cli
    from spmd_lora.data import encode_prompt
    from spmd_lora.engine.generate import generate
    from spmd_lora.tokenizer import decode_whole_characters, load_tokenizer

    assert cli.main(["demo", "--output", str(tmp_path / "demo"), "--max-steps", "20"]) == 0
    model, adapter = tmp_path / "demo" / "tiny_llama", tmp_path / "demo" / "run" / "adapter"
    instruction = "Give three tips for staying healthy."
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(model), "--adapter", str(adapter), "--tp", "2",
                     "--template", "alpaca", "--prompt", instruction,
                     "--max-new-tokens", "32"]) == 0
    cli_text = json_.loads(capsys.readouterr().out.strip().splitlines()[-1])["completion"]

    tok = load_tokenizer(model)
    ids = [int(i) for i in encode_prompt({"instruction": instruction}, tok, "alpaca")]
    tuned = spmd_lora.load_model(model, tp=2, adapter=adapter)
    ours = generate(tuned, [ids], 32, eos_token_id=tok.eos_token_id)[0]
    assert decode_whole_characters(tok, ours, skip_special_tokens=True) == cli_text
    # past the end of text too (eos ignored on both sides): 32 tokens
    ours_32 = generate(tuned, [ids], 32, eos_token_id=None)[0]
    assert ours_32[:len(ours)] == ours and len(ours_32) == 32

    for fmt, name in [("gguf", "model-f32.gguf"), ("gguf-lora", "adapter.gguf")]:
        assert cli.main(["export", "--format", fmt, "--model", str(model), "--adapter",
                         str(adapter), "--outtype", "f32", "--output", str(tmp_path / name)]) == 0
    assert cli.main(["export", "--format", "gguf", "--model", str(model), "--outtype", "f32",
                     "--output", str(tmp_path / "base-f32.gguf")]) == 0
    kv = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    for path, extra in [("model-f32.gguf", {}),
                        ("base-f32.gguf", {"lora_path": str(tmp_path / "adapter.gguf")})]:
        llm = llama_cpp.Llama(model_path=str(tmp_path / path), n_ctx=256, verbose=False,
                              n_threads=2, **kv, **extra)
        theirs = [int(t) for t in itertools.islice(llm.generate(ids, temp=0.0), 32)]
        print(f"demo model, {path}{' + adapter.gguf' if extra else ''}: llama.cpp's 32 greedy "
              f"tokens equal ours: {theirs == list(ours_32)} (spmd-lora generate stops at eos "
              f"after {len(ours)}: {cli_text!r})")
        assert theirs == list(ours_32), (path, theirs, ours_32)
