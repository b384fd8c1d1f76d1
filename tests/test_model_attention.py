"""The whole model (tp=2, inside shard_map with check_vma) with the fused attention paths:
attention="pallas" (interpreted on CPU) and "blockwise" give the same logits and LoRA gradients
as attention="xla" on the parity configs, with packed sequences and several attention blocks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmd_lora

from spmd_lora.engine import sharded
from spmd_lora.kernels import BlockSizes, registry
from spmd_lora.config.lora_config import LoraConfig
from spmd_lora.weights.lora import init_lora

SMALL_BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
SEQ = 40                      # not a multiple of the 16-wide blocks
TOL = 1e-4
_XLA_CACHE = {}               # name -> (logits, LoRA grads) with attention="xla"


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture
def small_blocks(monkeypatch):
    """Force 16-wide tiles so a 40-token sequence spans several query and key blocks."""
    choose = registry.choose
    monkeypatch.setattr(registry, "choose",
                        lambda impl, **kw: choose(impl, **{**kw, "block_sizes": SMALL_BLOCKS}))


def _inputs(cfg):
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, cfg.vocab_size, (2, SEQ))
    segments = np.array([[1] * 17 + [2] * 23, [1] * 40])            # row 0: two packed examples
    positions = np.array([list(range(17)) + list(range(23)), list(range(40))])
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets="all")
    lora = init_lora(cfg, lora_cfg, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), lora)
    return tokens, segments, positions, lora_cfg, lora


@pytest.mark.parametrize("impl", ["pallas", "blockwise"])
@pytest.mark.parametrize("name", ["mha", "gqa4", "llama3_rope", "tied", "odd_vocab"])
def test_whole_model_matches_xla_attention(hf_models, small_blocks, name, impl):
    path, _ = hf_models(name)
    base = spmd_lora.load_model(path, tp=2)
    tokens, segments, positions, lora_cfg, lora = _inputs(base.config)
    batch = base.put_batch({"tokens": tokens, "loss_mask": np.ones_like(tokens),
                            "positions": positions, "segment_ids": segments})

    def run(attention):
        model = spmd_lora.load_model(path, tp=2, attention=attention)
        model.lora, model.lora_config = lora, lora_cfg
        logits = model.logits(tokens, positions=positions, segment_ids=segments)
        loss_sum = sharded.loss_sum_fn(model.options, model.mesh)
        grads = jax.jit(jax.grad(lambda lp: loss_sum(model.params, lp, batch, None)[0]))(lora)
        return logits, grads

    if name not in _XLA_CACHE:
        _XLA_CACHE[name] = run("xla")
    ref_logits, ref_grads = _XLA_CACHE[name]
    logits, grads = run(impl)
    assert rel_err(logits, ref_logits) <= TOL
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for f in ("a", "b"):
            assert rel_err(grads["layers"][proj][f], ref_grads["layers"][proj][f]) <= TOL, (proj, f)
    assert jnp.all(jnp.isfinite(grads["layers"]["q_proj"]["a"]))
