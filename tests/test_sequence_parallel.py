"""Sequence parallelism, tiled MLP and remat offload: the same function as the replicated layout.

Oracles: transformers + PEFT (torch autograd) for logits and every LoRA gradient, the tp=1 /
replicated run, and remat "full" for "offload" (bit for bit on CPU).
"""
import jax
import numpy as np
import pytest

import spmd_lora
from spmd_lora.engine import sharded
from spmd_lora.config.lora_config import LoraConfig
from spmd_lora.model import ForwardOptions

from conftest import CONFIGS, make_peft_adapter, peft_reference, rel_err

TOL = 1e-4
SEQ = 23            # divisible by neither 2 nor 4: padded to 24 internally


def _tokens(name, batch=2, seq=SEQ, seed=0):
    return np.random.RandomState(seed).randint(0, CONFIGS[name]["vocab_size"], (batch, seq))


def _our_grads(model, opts, tokens, mask, key=None):
    loss_sum = sharded.loss_sum_fn(opts, model.mesh)
    batch = model.put_batch({"tokens": tokens, "loss_mask": mask})

    def mean_loss(lora):
        total, count = loss_sum(model.params, lora, batch, key)
        return total / count

    return jax.jit(jax.value_and_grad(mean_loss))(model.lora)


# (dp, tp, MLP tile tokens, CE chunk tokens): tiles and chunks on and off
MESHES = [(1, 2, 8, 4096), (1, 4, 0, 16), (2, 2, 8, 12)]


@pytest.mark.parametrize("name", ["mha", "gqa4", "llama3_rope", "tied", "odd_vocab"])
@pytest.mark.parametrize("dp,tp,mlp_chunk,ce_chunk", MESHES)
def test_sp_logits_and_lora_grads_match_peft(hf_models, tmp_path, name, dp, tp, mlp_chunk,
                                             ce_chunk):
    path, hf = hf_models(name)
    tokens = _tokens(name)
    mask = (np.random.RandomState(1).rand(*tokens.shape) > 0.3).astype(np.int32)
    ref_logits, ref_loss, ref_grads = peft_reference(hf, tmp_path / "adapter", tokens, mask)
    model = spmd_lora.load_model(path, tp=tp, dp=dp, adapter=tmp_path / "adapter",
                                 sequence_parallel=True, mlp_chunk_tokens=mlp_chunk)
    assert model.options.layout(SEQ).sp and model.options.layout(SEQ).padded_len == 24
    assert rel_err(model.logits(tokens), ref_logits) <= TOL
    opts = ForwardOptions(model.config, tp, model.lora_config, ce_chunk_tokens=ce_chunk,
                          sequence_parallel=True, mlp_chunk_tokens=mlp_chunk)
    loss, grads = _our_grads(model, opts, tokens, mask)
    assert abs(float(loss) - ref_loss) <= TOL * ref_loss
    for (proj, factor), ref in ref_grads.items():
        assert rel_err(grads["layers"][proj][factor], ref) <= TOL, (proj, factor)


def test_sp_equals_replicated_and_tp1_with_packing(hf_models, tmp_path):
    """Packed rows (segment ids, restarted positions), GQA with tp > kv heads: SP (tiled and
    not) and the replicated layout at tp=1 tiled and tp=4 (tiled and not) equal the untiled tp=1
    run in loss and every LoRA gradient."""
    path, hf = hf_models("gqa4")
    make_peft_adapter(hf, tmp_path / "adapter")
    tokens = _tokens("gqa4", seq=22, seed=3)
    seg = np.array([[1] * 9 + [2] * 13, [1] * 15 + [2] * 5 + [0] * 2])
    pos = np.array([list(range(9)) + list(range(13)), list(range(15)) + list(range(5)) + [0, 0]])
    mask = (seg > 0).astype(np.int32)
    results = {}
    for tp, sp, chunk in ((1, False, 0), (4, False, 0), (4, True, 0), (4, True, 4), (1, False, 4),
                          (4, False, 4)):
        model = spmd_lora.load_model(path, tp=tp, adapter=tmp_path / "adapter")
        opts = ForwardOptions(model.config, tp, model.lora_config, sequence_parallel=sp,
                              mlp_chunk_tokens=chunk)
        fn = sharded.loss_sum_fn(opts, model.mesh)
        batch = model.put_batch({"tokens": tokens, "loss_mask": mask,
                                 "positions": pos, "segment_ids": seg})
        results[(tp, sp, chunk)] = jax.jit(jax.value_and_grad(
            lambda lp: fn(model.params, lp, batch, None)[0]))(model.lora)
    base = results.pop((1, False, 0))
    for k, (loss, grads) in results.items():
        assert rel_err(loss, base[0]) <= 1e-6, k
        errs = jax.tree.leaves(jax.tree.map(rel_err, grads, base[1]))
        assert max(errs) <= 1e-5, (k, max(errs))


# (remat, offload_layers): both offload policies, every layer on the host or only the first
# (the tiny models have 2 layers, so the layer scan splits in two), or none of them
OFFLOAD_POLICIES = [("offload", None), ("offload-input", None), ("offload", 1),
                    ("offload-input", 1), ("offload-input", 0)]


@pytest.mark.parametrize("tp,sp", [(1, False), pytest.param(2, False, marks=pytest.mark.slow),
                                   (2, True)])
def test_offload_policies_equal_full(hf_models, tmp_path, tp, sp):
    """remat offload (the two half-layer inputs in pinned_host memory, each half recomputed in
    its own backward), offload-input (only the layer input on the host) and partial offload
    (offload_layers: the first K layers on the host, the rest on the device) == remat full
    (the whole layer recomputed from its input) to float rounding: same loss and LoRA
    gradients; at tp=1 also transformers + PEFT. The jaxpr places the saved residuals in host
    memory exactly when some layer offloads."""
    path, hf = hf_models("mha")
    tokens = _tokens("mha")
    mask = np.ones_like(tokens)
    _, ref_loss, ref_grads = peft_reference(hf, tmp_path / "adapter", tokens, mask)
    model = spmd_lora.load_model(path, tp=tp, adapter=tmp_path / "adapter")

    def opts(remat, k=None):
        return ForwardOptions(model.config, tp, model.lora_config, remat=remat,
                              offload_layers=k, mlp_chunk_tokens=8, sequence_parallel=sp)

    full = _our_grads(model, opts("full"), tokens, mask)
    for remat, k in OFFLOAD_POLICIES:
        loss, grads = _our_grads(model, opts(remat, k), tokens, mask)
        assert rel_err(loss, full[0]) <= 1e-6, (remat, k)
        errs = jax.tree.leaves(jax.tree.map(rel_err, grads, full[1]))
        assert max(errs) <= 1e-5, (remat, k, max(errs))
        if tp == 1:
            assert abs(float(loss) - ref_loss) <= TOL * ref_loss
            for (proj, factor), ref in ref_grads.items():
                assert rel_err(grads["layers"][proj][factor], ref) <= TOL, (remat, k, proj)
        fn = sharded.loss_sum_fn(opts(remat, k), model.mesh)
        batch = model.put_batch({"tokens": tokens, "loss_mask": mask})
        jaxpr = str(jax.make_jaxpr(jax.grad(
            lambda lp: fn(model.params, lp, batch, None)[0]))(model.lora))
        assert ("<host>" in jaxpr) == (k != 0), (remat, k)   # residuals typed as host memory


def test_lora_dropout_is_layout_independent(hf_models, tmp_path):
    """The dropout mask of a token depends only on (key, global row, feature): the same loss and
    gradients at dp1/tp1, tp4 replicated, dp2 x tp2 with SP and tiles."""
    path, hf = hf_models("gqa4")
    make_peft_adapter(hf, tmp_path / "adapter", lora_dropout=0.3)
    tokens = _tokens("gqa4", batch=2, seq=20, seed=5)
    mask = np.ones_like(tokens)
    key = jax.random.key(7)
    runs = {}
    for dp, tp, sp, chunk in ((1, 1, False, 0), (1, 4, False, 0), (2, 2, True, 4),
                              (1, 2, False, 4)):
        model = spmd_lora.load_model(path, tp=tp, dp=dp, adapter=tmp_path / "adapter")
        assert model.lora_config.dropout == 0.3
        opts = ForwardOptions(model.config, tp, model.lora_config, sequence_parallel=sp,
                              mlp_chunk_tokens=chunk)
        runs[(dp, tp)] = _our_grads(model, opts, tokens, mask, key)
    no_drop = _our_grads(model, ForwardOptions(model.config, 2, LoraConfig(
        rank=4, alpha=8.0, targets="all")), tokens, mask, key)
    base = runs.pop((1, 1))
    assert abs(float(no_drop[0]) - float(base[0])) > 1e-4          # dropout did something
    for k, (loss, grads) in runs.items():
        assert rel_err(loss, base[0]) <= 1e-6, k
        assert max(jax.tree.leaves(jax.tree.map(rel_err, grads, base[1]))) <= 1e-5, k
