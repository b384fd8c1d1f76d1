"""Tiny download-free Llama checkpoints / tokenizers and the bundled sample data."""
import json

import numpy as np
import pytest

from spmd_lora.errors import ConfigError
from spmd_lora.tiny import asset_text, build_tiny_llama, build_tokenizer, sample_data_path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_tiny_llama_loads_with_transformers(tiny_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaForCausalLM

    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tiny_dir / s).exists() for s in shards)
    model, info = LlamaForCausalLM.from_pretrained(str(tiny_dir), output_loading_info=True)
    assert not any(info.values()), info                 # every tensor found, none left over
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
            cfg.num_attention_heads, cfg.num_key_value_heads) == (512, 64, 128, 2, 4, 2)
    assert not cfg.tie_word_embeddings and cfg.bos_token_id == 1 and cfg.eos_token_id == 2

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert len(tok) == 512 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    text = "The heart pumps blood.\n\n### Response:\nAbout 42 people live there."
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and len(ids) > 5 and max(ids) < cfg.vocab_size
    assert tok.decode(ids, skip_special_tokens=True) == text
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 512) and torch.isfinite(logits).all()
    assert logits.std() > 0.2  # not trivially flat
    import spmd_lora                                    # and our loader reads the same model
    ours = np.asarray(spmd_lora.load_model(tiny_dir, tp=2).logits(np.array([ids])))
    assert np.abs(ours - logits.numpy()).max() <= 1e-4 * np.abs(logits.numpy()).max()


def test_tiny_llama_deterministic_and_options(tmp_path, tiny_dir):
    from safetensors.numpy import load_file

    def weights(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a = build_tiny_llama(tmp_path / "a", with_tokenizer=False)
    wa, w0 = weights(a), weights(tiny_dir)
    assert wa.keys() == w0.keys() and all(np.array_equal(wa[k], w0[k]) for k in wa)
    assert not (a / "tokenizer.json").exists()
    norms = [v for k, v in wa.items() if "norm" in k]
    assert all(abs(v.mean() - 1) < 0.1 and v.std() > 0.03 for v in norms)

    b = build_tiny_llama(tmp_path / "b", seed=1, vocab_size=640, tokenizer_vocab_size=600,
                         tie_word_embeddings=True, rope_theta=500000.0, max_shard_size="10MB",
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    cfg = json.loads((b / "config.json").read_text())
    assert cfg["vocab_size"] == 640 and cfg["tie_word_embeddings"]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    assert rope["rope_type"] == "llama3" and rope.get("rope_theta", cfg.get("rope_theta")) == 5e5
    assert (b / "model.safetensors").exists()
    wb = weights(b)
    assert not np.array_equal(wb["model.embed_tokens.weight"][:512],
                              w0["model.embed_tokens.weight"])
    from transformers import AutoTokenizer
    assert len(AutoTokenizer.from_pretrained(str(b))) == 600
    with pytest.raises(ConfigError, match="vocab_size"):
        build_tiny_llama(tmp_path / "c", vocab_size=500, tokenizer_vocab_size=512)


def test_tokenizer_deterministic(tmp_path, tiny_dir):
    d = build_tokenizer(tmp_path / "t")
    for name in ("tokenizer.model", "tokenizer.json"):
        assert (d / name).read_bytes() == (tiny_dir / name).read_bytes()
    with pytest.raises(ConfigError):
        build_tokenizer(tmp_path / "small", vocab_size=100)


def test_bundled_samples():
    from spmd_lora.data import load_records

    alpaca = load_records(sample_data_path("alpaca"))
    assert len(alpaca) == 64
    with_input = sum(bool(r.get("input")) for r in alpaca)
    assert 16 < with_input < 48
    rag = load_records(sample_data_path("rag"))
    assert len(rag) == 32
    kinds = {type(c) for r in rag for c in r["contexts"]}
    assert kinds == {str, dict}
    for r in rag:  # every answer is supported by a passage
        texts = [c if isinstance(c, str) else c["text"] for c in r["contexts"]]
        key = r["answer"].rstrip(".").removeprefix("The ").removeprefix("About ")
        key = key.removeprefix("Its ").removesuffix(" festival")
        assert any(key.lower() in t.lower() for t in texts), r
    assert len(load_records(sample_data_path("text"))) == 32
    corpus = asset_text("corpus.txt")
    assert 50_000 < len(corpus.encode()) < 400_000
    with pytest.raises(ConfigError):
        sample_data_path("chat")
