"""Logits / loss / gradient parity of the shard_mapped model with transformers (float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import spmd_lora
from spmd_lora.engine import sharded
from spmd_lora.model import ForwardOptions

MESHES = [(1, 1), (1, 2), (1, 4), (2, 2)]   # (dp, tp)
TOL = 1e-4


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def tokens_for(name, batch=4, seq=24, seed=0):
    from conftest import CONFIGS
    return np.random.RandomState(seed).randint(0, CONFIGS[name]["vocab_size"], (batch, seq))


@pytest.mark.parametrize("name", ["mha", "gqa4", "llama3_rope", "tied", "odd_vocab"])
@pytest.mark.parametrize("dp,tp", MESHES)
def test_logits_and_loss_match_transformers(hf_models, name, dp, tp):
    path, hf = hf_models(name)
    tokens = tokens_for(name)
    mask = np.random.RandomState(1).rand(*tokens.shape) > 0.3
    labels = np.where(mask, tokens, -100)
    with torch.no_grad():
        ref_logits = hf(torch.tensor(tokens)).logits.numpy()
        ref_loss = hf(torch.tensor(tokens), labels=torch.tensor(labels)).loss.item()
    model = spmd_lora.load_model(path, tp=tp, dp=dp)
    logits = model.logits(tokens)
    assert logits.shape == ref_logits.shape
    assert rel_err(logits, ref_logits) <= TOL
    assert abs(float(model.loss(tokens, mask.astype(np.int32))) - ref_loss) / ref_loss <= TOL


def test_positions_and_segments_match_separate_runs(hf_models):
    """Two packed examples (segment ids, restarted positions) equal each run alone."""
    path, hf = hf_models("gqa4")
    a, b = tokens_for("gqa4", 1, 10, 3)[0], tokens_for("gqa4", 1, 14, 4)[0]
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 10 + [2] * 14])
    pos = np.array([list(range(10)) + list(range(14))])
    model = spmd_lora.load_model(path, tp=2)
    out = np.asarray(model.logits(packed, positions=pos, segment_ids=seg))[0]
    with torch.no_grad():
        ra = hf(torch.tensor(a[None])).logits.numpy()[0]
        rb = hf(torch.tensor(b[None])).logits.numpy()[0]
    assert rel_err(out[:10], ra) <= TOL and rel_err(out[10:], rb) <= TOL


@pytest.mark.parametrize("name,dp,tp,ce_chunk", [("gqa4", 1, 4, 4096), ("tied", 2, 2, 20),
                                                 ("odd_vocab", 1, 2, 32)])
def test_param_gradients_match_torch_autograd(hf_models, name, dp, tp, ce_chunk):
    """d loss / d (final norm, q_proj [column-parallel], down_proj [row-parallel], embed), with
    the cross-entropy whole or in chunks (20 and 32 rows: uneven, padded last chunk)."""
    path, hf = hf_models(name)
    tokens = tokens_for(name)
    hf.zero_grad()
    hf(torch.tensor(tokens), labels=torch.tensor(tokens)).loss.backward()
    model = spmd_lora.load_model(path, tp=tp, dp=dp)
    loss_sum = sharded.loss_sum_fn(ForwardOptions(model.config, tp, ce_chunk_tokens=ce_chunk),
                                  model.mesh)
    batch = model.put_batch({"tokens": tokens, "loss_mask": np.ones_like(tokens)})

    def mean_loss(params):
        total, count = loss_sum(params, {}, batch, None)
        return total / count

    grads = jax.jit(jax.grad(mean_loss))(model.params)
    v = model.config.vocab_size
    checks = {
        "final_norm": (grads["final_norm"], hf.model.norm.weight.grad),
        "q_proj": (grads["layers"]["q_proj"][1], hf.model.layers[1].self_attn.q_proj.weight.grad.T),
        "down_proj": (grads["layers"]["down_proj"][0], hf.model.layers[0].mlp.down_proj.weight.grad.T),
        "embed": (grads["embed"][:v], hf.model.embed_tokens.weight.grad),
    }
    for what, (ours, ref) in checks.items():
        assert rel_err(ours, ref.numpy()) <= TOL, what


def test_bfloat16_weights_close_to_float32(hf_models):
    path, _ = hf_models("gqa4")
    tokens = tokens_for("gqa4")
    f32 = spmd_lora.load_model(path, tp=2, dtype="float32")
    bf16 = spmd_lora.load_model(path, tp=2, dtype="bfloat16")
    assert bf16.params["layers"]["q_proj"].dtype == jnp.bfloat16
    out = bf16.logits(tokens)
    assert out.dtype == jnp.float32
    assert rel_err(out, f32.logits(tokens)) < 5e-2


def test_remat_policies_give_identical_gradients(hf_models):
    """remat none / full / save-dots: same loss and LoRA + base gradients (tp=2)."""
    from spmd_lora.config.lora_config import LoraConfig
    from spmd_lora.weights.lora import init_lora
    path, _ = hf_models("gqa4")
    model = spmd_lora.load_model(path, tp=2)
    lcfg = LoraConfig(rank=4, alpha=8.0, targets="all")
    lora = init_lora(model.config, lcfg, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), lora)
    tokens = tokens_for("gqa4")
    batch = model.put_batch({"tokens": tokens, "loss_mask": np.ones_like(tokens)})
    results = {}
    for remat in ("none", "full", "save-dots"):
        loss_sum = sharded.loss_sum_fn(ForwardOptions(model.config, 2, lcfg, remat=remat), model.mesh)
        results[remat] = jax.jit(jax.value_and_grad(
            lambda lp: loss_sum(model.params, lp, batch, None)[0]))(lora)
    for remat in ("full", "save-dots"):
        assert rel_err(results[remat][0], results["none"][0]) <= 1e-6
        errs = jax.tree.leaves(jax.tree.map(rel_err, results[remat][1], results["none"][1]))
        assert max(errs) <= 1e-5, (remat, max(errs))
