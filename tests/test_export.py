"""Merged export: base + adapter -> a standalone sharded HF checkpoint."""
import json
import shutil

import numpy as np
import pytest
import torch

from spmd_lora.weights import safetensors as checkpoint_io
from spmd_lora.errors import CheckpointError
from spmd_lora.export import export_merged
from conftest import make_peft_adapter

TOL = 1e-4


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("name,rslora", [("gqa4", False), ("tied", True)])
def test_merged_export_equals_base_plus_adapter(hf_models, tmp_path, name, rslora):
    from transformers import LlamaForCausalLM
    src, hf = hf_models(name)
    path = shutil.copytree(src, tmp_path / "base")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    pm = make_peft_adapter(hf, tmp_path / "adapter", use_rslora=rslora)
    out = export_merged(path, tmp_path / "adapter", tmp_path / "merged", max_shard_size_bytes=30_000)

    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) >= 3 and all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    assert {"model.safetensors.index.json", "config.json", "tokenizer_config.json"} <= set(files)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    merged = LlamaForCausalLM.from_pretrained(str(out)).eval()
    tokens = torch.tensor(np.random.RandomState(0).randint(0, 96, (2, 16)))
    with torch.no_grad():
        ref, got, base = pm(tokens).logits, merged(tokens).logits, hf(tokens).logits
    assert rel_err(ref, base) > 1e-2
    err = rel_err(got, ref)
    print(f"merged export {name} rslora={rslora}: rel err {err:.2e}")
    assert err <= TOL


def test_export_bf16_keeps_dtype_single_file(tmp_path):
    from conftest import CONFIGS, build_hf_llama
    from safetensors import safe_open
    build_hf_llama(tmp_path / "base", dtype="bfloat16", **CONFIGS["mha"])
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    make_peft_adapter(hf, tmp_path / "adapter", target_modules=["q_proj"])
    out = export_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())


def test_export_is_atomic_and_refuses_non_empty_output(hf_models, tmp_path, monkeypatch):
    path, hf = hf_models("mha")
    make_peft_adapter(hf, tmp_path / "adapter", target_modules=["q_proj", "down_proj"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        export_merged(path, tmp_path / "adapter", tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep me"

    real = checkpoint_io._write_shard
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kw)

    monkeypatch.setattr(checkpoint_io, "_write_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        export_merged(path, tmp_path / "adapter", tmp_path / "out", max_shard_size_bytes=20_000)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "busy"]   # no temp dir left
    monkeypatch.setattr(checkpoint_io, "_write_shard", real)

    out = export_merged(path, tmp_path / "adapter", tmp_path / "busy", overwrite=True)
    assert not (out / "x").exists() and (out / "config.json").is_file()
