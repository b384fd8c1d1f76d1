"""KV-cache generation: greedy equals transformers token for token; sampling is exact and seeded."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

import spmd_lora
from spmd_lora.engine import generate as gen
from spmd_lora.config.model_config import ModelConfig
from spmd_lora.errors import ConfigError, DataError
from spmd_lora.engine.generate import generate, generate_text
from spmd_lora.config.projections import TARGETS
from spmd_lora.config.lora_config import LoraConfig
from spmd_lora.weights.lora import init_lora
from spmd_lora.parallel.mesh import TP, make_mesh
from spmd_lora.model import ForwardOptions

NEW = 12
EOS = 2            # LlamaConfig's default eos_token_id, which HF generate stops at


def prompts_for(vocab, lengths=(5, 11, 3), seed=0):
    rng = np.random.RandomState(seed)
    return [[int(t) for t in rng.randint(3, vocab, n)] for n in lengths]


def hf_generate(hf, prompts, max_new_tokens=NEW, eos_token_id=EOS, pad=0):
    """HF greedy with LEFT padding + attention mask; new tokens cut at EOS (included)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=pad, eos_token_id=eos_token_id)
    res = []
    for row in out[:, width:].tolist():
        if eos_token_id in row:
            row = row[:row.index(eos_token_id) + 1]
        res.append(row)
    return res


class StubTokenizer:
    bos_token_id, eos_token_id = 1, EOS

    def __call__(self, text, add_special_tokens=True, verbose=False):
        if isinstance(text, list):
            return {"input_ids": [self(t, add_special_tokens)["input_ids"] for t in text]}
        return {"input_ids": [1] * add_special_tokens + [3 + (ord(c) % 90) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_equals_transformers(hf_models, tp):
    path, hf = hf_models("gqa4")
    prompts = prompts_for(96)
    ref = hf_generate(hf, prompts)
    model = spmd_lora.load_model(path, tp=tp)
    assert generate(model, prompts, NEW, eos_token_id=EOS) == ref
    # EOS: stop a row at a token it emits mid-way (HF stops that row there too)
    eos = ref[0][4]
    ref_eos = hf_generate(hf, prompts, eos_token_id=eos)
    got = generate(model, prompts, NEW, eos_token_id=eos)
    assert got == ref_eos and got[0][-1] == eos and len(got[0]) <= 5
    # generate_text: tokenize, generate, decode (same padded shapes: no recompilation)
    tok = StubTokenizer()
    texts = ["hi", "hello there", "a longer prompt"]
    out = generate_text(model, tok, texts, max_new_tokens=NEW)
    assert out == [" ".join(map(str, r)) for r in hf_generate(hf, [tok(t)["input_ids"] for t in texts])]


def test_generate_text_templates_and_errors(hf_models, monkeypatch):
    from spmd_lora.data import encode_prompt
    path, _ = hf_models("gqa4")
    model = spmd_lora.load_model(path, tp=2)
    seen = []
    monkeypatch.setattr(gen, "generate", lambda m, ids, n, **kw: seen.append((ids, kw)) or [[5]] * len(ids))
    tok = StubTokenizer()
    rag = {"question": "why?", "contexts": ["because", {"title": "t", "text": "so"}]}
    assert generate_text(model, tok, ["say hi", rag], template="auto", max_new_tokens=3) == ["5", "5"]
    ids, kw = seen[-1]
    assert ids == [encode_prompt({"text": "say hi"}, tok, "auto"), encode_prompt(rag, tok, "rag")]
    assert kw == {"eos_token_id": EOS}
    generate_text(model, tok, ["do it"], template="alpaca")
    assert seen[-1][0] == [encode_prompt({"instruction": "do it"}, tok, "alpaca")]
    assert len(seen[-1][0][0]) > 5                          # the Alpaca preamble is there
    monkeypatch.undo()
    with pytest.raises(DataError, match="empty"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(DataError, match="outside"):
        generate(model, [[1, 200]], 4)
    with pytest.raises(ConfigError, match=r"^top_p \(--top-p\) must be in \(0, 1\], got 0.0$"):
        generate(model, [[1, 2]], 4, temperature=1.0, top_p=0.0)
    with pytest.raises(ConfigError, match=r"^temperature \(--temperature\) must be >= 0 .*, got "
                                          r"-1; max_new_tokens \(--max-new-tokens\) must be >= 0"):
        generate(model, [[1, 2]], -1, temperature=-1)
    assert generate(model, [[1, 2]], 0) == [[]]


def test_greedy_with_lora_equals_peft(hf_models, tmp_path):
    from peft import PeftModel
    from spmd_lora.weights.peft import save_adapter
    path, hf = hf_models("gqa4")
    model = spmd_lora.load_model(path, tp=2, dp=2)
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    lora = init_lora(model.config, lora_cfg, jax.random.key(0))
    rng = np.random.RandomState(0)
    for p in lora["layers"].values():
        p["b"] = jnp.asarray(0.3 * rng.randn(*p["b"].shape), jnp.float32)
    model.lora, model.lora_config = lora, lora_cfg
    save_adapter(tmp_path / "a", lora, lora_cfg)
    pm = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "a")).eval()
    prompts = prompts_for(96, (7, 2, 4), seed=5)        # 3 rows on dp=2: one dummy row added
    ref = hf_generate(pm, prompts)
    assert ref != hf_generate(hf, prompts)
    assert generate(model, prompts, NEW, eos_token_id=EOS) == ref


def test_sampling_top_k_1_is_greedy_and_seeded_sampling_is_deterministic(hf_models):
    path, hf = hf_models("odd_vocab")                   # vocab 101: padded over tp=2
    prompts = prompts_for(101, (4, 9, 6, 1), seed=1)
    m1 = spmd_lora.load_model(path, tp=1)
    m2 = spmd_lora.load_model(path, tp=2)
    greedy = hf_generate(hf, prompts)
    assert generate(m2, prompts, NEW, temperature=0.7, top_k=1, top_p=0.9, seed=3,
                    eos_token_id=EOS) == greedy
    kw = dict(temperature=1.3, top_k=20, top_p=0.9)
    a = generate(m2, prompts, NEW, seed=7, **kw)
    assert a == generate(m2, prompts, NEW, seed=7, **kw)        # same seed, same tokens
    assert a == generate(m1, prompts, NEW, seed=7, **kw)        # and independent of the mesh
    assert a != generate(m2, prompts, NEW, seed=8, **kw)
    assert a != greedy
    assert all(len(r) == NEW and all(0 <= t < 101 for t in r) for r in a)


def _warp_on_mesh(logits, temperature, top_k, top_p, tp):
    vocab = logits.shape[1]
    cfg = ModelConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=2, num_kv_heads=2, head_dim=4)
    opts = ForwardOptions(cfg=cfg, tp=tp)
    vp = cfg.padded_vocab(tp)
    padded = np.full((logits.shape[0], vp), -1e30, np.float32)
    padded[:, :vocab] = logits
    mesh = make_mesh(1, tp)

    def per_device(x):
        vl = x.shape[-1]
        col = jax.lax.axis_index(TP) * vl + jnp.arange(vl, dtype=jnp.int32)
        return gen._warp(x, *gen._mode(temperature, top_k, top_p), col, opts)

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(None, TP), out_specs=P(None, TP)))
    return np.asarray(f(jnp.asarray(padded)))[:, :vocab]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, 1.0), (1.0, 0, 0.8), (1.5, 10, 0.6),
                                                     (0.5, 0, 0.95), (1.0, 90, 0.97),
                                                     (1.0, 200, 0.3)])
def test_warpers_equal_transformers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    logits = np.random.RandomState(0).randn(16, 101).astype(np.float32) * 3
    procs = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                + ([TopKLogitsWarper(top_k)] if top_k else [])
                                + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    ref = procs(None, torch.tensor(logits)).numpy()
    for tp in (1, 2):
        got = _warp_on_mesh(logits, temperature, top_k, top_p, tp)
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
        np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], rtol=1e-6)


def test_gumbel_sampling_matches_softmax_distribution():
    """Many rows of the same logits: token frequencies follow softmax(logits / T)."""
    vocab, rows, temperature = 10, 20000, 0.8
    logits = np.random.RandomState(0).randn(vocab).astype(np.float32)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=2, num_kv_heads=2, head_dim=4)
    opts = ForwardOptions(cfg=cfg, tp=2)
    mesh = make_mesh(1, 2)
    f = jax.jit(jax.shard_map(
        lambda x: gen._sample(x, *gen._mode(temperature, 0, 1.0), jnp.uint32(5), jnp.int32(0), opts),
        mesh=mesh, in_specs=P(None, TP), out_specs=P(None)))
    tokens = np.asarray(f(jnp.asarray(np.tile(logits, (rows, 1)))))
    freq = np.bincount(tokens, minlength=vocab) / rows
    probs = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    assert np.max(np.abs(freq - probs)) < 4 * np.sqrt(probs.max() / rows)


