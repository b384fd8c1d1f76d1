"""PEFT adapter round trips: ours -> peft.PeftModel, peft -> ours; refusal of unsupported adapters."""
import copy
import json
import warnings

import jax
import numpy as np
import pytest
import torch

import spmd_lora
from spmd_lora.errors import CheckpointError
from spmd_lora.config.projections import TARGETS
from spmd_lora.config.lora_config import LoraConfig
from spmd_lora.weights.lora import init_lora
from spmd_lora.weights.peft import load_adapter, read_adapter, save_adapter
from conftest import make_peft_adapter

TOL = 1e-4


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def random_lora(config, lora_cfg, seed=0):
    """PEFT-style A, and a NON-ZERO random B (so the adapter changes the logits)."""
    lora = init_lora(config, lora_cfg, jax.random.key(seed))
    rng = np.random.RandomState(seed + 1)
    for p in lora["layers"].values():
        p["b"] = np.asarray(0.2 * rng.randn(*p["b"].shape), np.float32)
    return lora


def tokens_for(vocab, batch=2, seq=16, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (batch, seq))


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def peft_model(hf, adapter_dir):
    from peft import PeftModel
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter_dir))
    peft_warnings = [w for w in caught if "peft" in (w.filename or "")]
    assert not peft_warnings, [str(w.message) for w in peft_warnings]
    return pm.eval()


@pytest.mark.parametrize("name,rslora,targets", [
    ("gqa4", False, TARGETS), ("mha", True, ("q_proj", "v_proj", "down_proj"))])
def test_our_adapter_loads_in_peft_with_equal_logits(hf_models, tmp_path, name, rslora, targets):
    path, hf = hf_models(name)
    model = spmd_lora.load_model(path, tp=2)
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=targets, use_rslora=rslora)
    model.lora, model.lora_config = random_lora(model.config, lora_cfg), lora_cfg
    out = save_adapter(tmp_path / "adapter", model.lora, lora_cfg, base_model_path=path)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no temp left
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["use_rslora"] is rslora and cfg["target_modules"] == list(targets)

    tokens = tokens_for(model.config.vocab_size)
    ref = hf_logits(peft_model(hf, out), tokens)
    base = hf_logits(hf, tokens)
    assert rel_err(ref, base) > 1e-2                       # the adapter really changes the output
    err = rel_err(model.logits(tokens), ref)
    print(f"ours->peft {name} rslora={rslora}: rel err {err:.2e}")
    assert err <= TOL

    lora2, cfg2 = load_adapter(out, model.config)        # and back
    assert cfg2 == lora_cfg
    for proj in targets:
        for f in "ab":
            np.testing.assert_array_equal(np.asarray(lora2["layers"][proj][f]),
                                          np.asarray(model.lora["layers"][proj][f]))


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_ours_with_equal_logits(hf_models, tmp_path, rslora):
    path, hf = hf_models("gqa4")
    pm = make_peft_adapter(hf, tmp_path / "peft", use_rslora=rslora)
    tokens = tokens_for(96, seed=2)
    ref = hf_logits(pm, tokens)
    model = spmd_lora.load_model(path, tp=2, adapter=tmp_path / "peft")
    assert model.lora_config.targets == TARGETS and model.lora_config.use_rslora is rslora
    err = rel_err(model.logits(tokens), ref)
    print(f"peft->ours rslora={rslora}: rel err {err:.2e}")
    assert err <= TOL


def test_peft_adapter_dp_tp_and_default_keys(hf_models, tmp_path):
    """Keys written with the adapter name (``lora_A.default.weight``) load too; dp x tp = 2 x 2."""
    from safetensors.numpy import load_file, save_file
    path, hf = hf_models("gqa4")
    pm = make_peft_adapter(hf, tmp_path / "peft", seed=3, target_modules=["q_proj", "v_proj"])
    st = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(st))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}, str(st))
    tokens = tokens_for(96, batch=4, seed=4)
    model = spmd_lora.load_model(path, tp=2, dp=2, adapter=tmp_path / "peft")
    assert model.lora_config.targets == ("q_proj", "v_proj")
    assert rel_err(model.logits(tokens), hf_logits(pm, tokens)) <= TOL


def _write_adapter(tmp_path, hf_models, mutate_cfg=None, mutate_tensors=None):
    from safetensors.numpy import load_file, save_file
    path, hf = hf_models("mha")
    config = spmd_lora.ModelConfig.from_pretrained(path)
    lora_cfg = LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    d = save_adapter(tmp_path / "a", random_lora(config, lora_cfg), lora_cfg)
    if mutate_cfg:
        cfg = json.loads((d / "adapter_config.json").read_text())
        mutate_cfg(cfg)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    if mutate_tensors:
        t = load_file(str(d / "adapter_model.safetensors"))
        mutate_tensors(t)
        save_file(t, str(d / "adapter_model.safetensors"))
    return d, config


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("case,cfg_fn,tensor_fn,match", [
    ("unknown key", None, lambda t: t.update({"base_model.model.model.layers.0.foo.lora_A.weight":
                                               np.zeros((2, 32), np.float32)}), "foo"),
    ("dora", lambda c: c.update(use_dora=True), None, "DoRA"),
    ("dora tensors", None, lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
            np.ones(32, np.float32)}), "DoRA"),
    ("lm_head target", lambda c: c.update(target_modules=["q_proj", "v_proj", "lm_head"]), None,
     "lm_head"),
    ("lm_head tensors", None, lambda t: t.update({"base_model.model.lm_head.lora_A.weight":
                                                   np.zeros((2, 32), np.float32)}), "lm_head"),
    ("embed target", lambda c: c.update(target_modules=["embed_tokens", "q_proj"]), None,
     "embed_tokens"),
    ("modules_to_save", lambda c: c.update(modules_to_save=["lm_head"]), None, "modules_to_save"),
    ("bias", lambda c: c.update(bias="all"), None, "bias"),
    ("rank pattern", lambda c: c.update(rank_pattern={"q_proj": 4}), None, "rank_pattern"),
    ("alpha pattern", lambda c: c.update(alpha_pattern={"q_proj": 4}), None, "alpha_pattern"),
    ("not lora", lambda c: c.update(peft_type="IA3"), None, "IA3"),
    ("shape", None, lambda t: t.update({KEY: np.zeros((2, 31), np.float32)}), "q_proj.lora_A"),
    ("rank", lambda c: c.update(r=3), None, "r=3"),
    ("missing layer", None, lambda t: t.pop(KEY), "q_proj.lora_A"),
    ("layer out of range", None, lambda t: t.update({
        KEY.replace("layers.0", "layers.7"): np.zeros((2, 32), np.float32)}), "layer 7"),
])
def test_unsupported_adapters_are_refused(hf_models, tmp_path, case, cfg_fn, tensor_fn, match):
    d, config = _write_adapter(tmp_path, hf_models, cfg_fn, tensor_fn)
    with pytest.raises(CheckpointError, match=match):
        load_adapter(d, config)


def test_missing_dir_and_non_adapter_output(hf_models, tmp_path):
    path, _ = hf_models("mha")
    config = spmd_lora.ModelConfig.from_pretrained(path)
    with pytest.raises(CheckpointError, match="not found"):
        read_adapter(tmp_path / "nope", config)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "metrics.jsonl").write_text("{}")
    lora_cfg = LoraConfig(rank=2, targets=("q_proj",))
    with pytest.raises(CheckpointError, match="non-adapter"):
        save_adapter(tmp_path / "busy", init_lora(config, lora_cfg, jax.random.key(0)), lora_cfg)


def test_save_adapter_replaces_existing_adapter(hf_models, tmp_path):
    path, _ = hf_models("mha")
    config = spmd_lora.ModelConfig.from_pretrained(path)
    cfg1, cfg2 = LoraConfig(rank=2, targets=("q_proj",)), LoraConfig(rank=3, targets=("v_proj",))
    save_adapter(tmp_path / "a", random_lora(config, cfg1), cfg1)
    save_adapter(tmp_path / "a", random_lora(config, cfg2), cfg2)
    _, loaded = read_adapter(tmp_path / "a", config)
    assert loaded == cfg2
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
