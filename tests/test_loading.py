"""HF checkpoint loading, config parsing and their error messages."""
import json
import shutil

import jax
import numpy as np
import pytest

import spmd_lora
from spmd_lora.config.model_config import PRESETS, ModelConfig, resolve_model_config
from spmd_lora.errors import CheckpointError, ConfigError
from conftest import CONFIGS, build_hf_llama


def leaves_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_sharded_checkpoint_equals_single_file(tmp_path):
    build_hf_llama(tmp_path / "whole", **CONFIGS["gqa4"])
    build_hf_llama(tmp_path / "sharded", max_shard_size="20KB", **CONFIGS["gqa4"])
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 3
    for tp in (1, 4):
        whole = spmd_lora.load_model(tmp_path / "whole", tp=tp)
        parts = spmd_lora.load_model(tmp_path / "sharded", tp=tp)
        leaves_equal(whole.params, parts.params)


def test_shards_are_laid_out_by_the_plan(hf_models):
    path, _ = hf_models("mha")
    model = spmd_lora.load_model(path, tp=4)
    q = model.params["layers"]["q_proj"]                      # [L, D, H*hd] columns over tp
    shard_shapes = {s.data.shape for s in q.addressable_shards}
    assert shard_shapes == {(q.shape[0], q.shape[1], q.shape[2] // 4)}
    o = model.params["layers"]["o_proj"]                      # rows over tp
    assert {s.data.shape for s in o.addressable_shards} == {(o.shape[0], o.shape[1] // 4, o.shape[2])}


def test_bfloat16_checkpoint_loads(tmp_path):
    build_hf_llama(tmp_path, dtype="bfloat16", **CONFIGS["mha"])
    model = spmd_lora.load_model(tmp_path, tp=2, dtype="float32")
    assert np.isfinite(np.asarray(model.logits(np.zeros((2, 4), np.int32)))).all()


def test_bad_path(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        spmd_lora.load_model(tmp_path / "nope")


def test_missing_tensor_and_shape_mismatch(tmp_path):
    from safetensors.numpy import load_file, save_file
    build_hf_llama(tmp_path / "m", **CONFIGS["mha"])
    shutil.copytree(tmp_path / "m", tmp_path / "missing")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k},
              tmp_path / "missing" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight.*missing"):
        spmd_lora.load_model(tmp_path / "missing")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gate_proj.weight' has shape \[64, 32\].*\[128, 32\]"):
        spmd_lora.load_model(tmp_path / "m")


def test_pickle_checkpoints_need_explicit_allow(tmp_path):
    torch = pytest.importorskip("torch")
    hf = build_hf_llama(tmp_path / "m", **CONFIGS["mha"])
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        spmd_lora.load_model(tmp_path / "m")
    model = spmd_lora.load_model(tmp_path / "m", allow_pickle=True)
    with torch.no_grad():
        ref = hf(torch.zeros((1, 5), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.logits(np.zeros((1, 5), np.int32))), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("heads,kv,tp,msg", [
    (8, 2, 3, "tp=3 does not divide num_attention_heads=8"),
    (24, 6, 4, "num_key_value_heads=6: one must divide the other"),
    (8, 8, 16, "does not divide num_attention_heads"),
])
def test_tp_not_dividing_heads(heads, kv, tp, msg):
    cfg = ModelConfig(vocab_size=32, hidden_size=8 * heads, intermediate_size=96, num_layers=1,
                      num_heads=heads, num_kv_heads=kv, head_dim=8)
    with pytest.raises(ConfigError, match=msg):
        cfg.check_tp(tp)


def test_tp_not_dividing_heads_at_load(hf_models):
    path, _ = hf_models("gqa4")
    with pytest.raises(ConfigError, match="tp=3 does not divide"):
        spmd_lora.load_model(path, tp=3)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        ModelConfig.from_hf_dict({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                                  "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ConfigError, match="missing field 'num_attention_heads'"):
        ModelConfig.from_hf_dict({"hidden_size": 8})
    with pytest.raises(ConfigError, match="neither a model directory nor a preset"):
        resolve_model_config("llama9-1t")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json: expected a JSON object"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


def test_presets_and_hf_round_trip(tmp_path):
    assert PRESETS["llama2-70b"].num_kv_heads == 8 and PRESETS["llama3-8b"].rope_theta == 500000.0
    for name in PRESETS:
        PRESETS[name].check_tp(8)
    build_hf_llama(tmp_path, **CONFIGS["llama3_rope"])
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.factor == 8.0
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_mesh_too_large():
    with pytest.raises(ConfigError, match="devices requested"):
        spmd_lora.make_mesh(4, 4)
