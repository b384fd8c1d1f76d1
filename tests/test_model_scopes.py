"""The model's parts are named in the compiled program: every step of the layer runs under a
``jax.named_scope`` (embed, attn_norm, qkv, rope, attention, o_proj, mlp_norm, mlp, final_norm,
loss, lm_head), so the HLO ``op_name`` metadata (profiles, the HLO census) names model parts,
forward and backward, not only source lines."""
import re

import jax
import numpy as np
import pytest

from spmd_lora.config.lora_config import LoraConfig
from spmd_lora.config.model_config import ModelConfig
from spmd_lora.engine.step import OptimizerConfig, make_optimizer, make_train_step
from spmd_lora.model import ForwardOptions
from spmd_lora.parallel.mesh import make_mesh
from spmd_lora.parallel.placement import replicate, shard_micro_batches
from spmd_lora.weights.lora import init_lora
from spmd_lora.weights.shapes import random_params

CFG = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)
SCOPES = ("embed", "attn_norm", "qkv", "rope", "attention", "o_proj", "mlp_norm", "mlp",
          "final_norm", "loss", "lm_head")


def _op_names(tp: int, cp: int, **options) -> list[str]:
    mesh = make_mesh(1, tp, cp)
    lcfg = LoraConfig(rank=2, alpha=4.0, targets="all", dropout=0.1)
    opts = ForwardOptions(CFG, tp, lcfg, attention_impl="xla" if cp == 1 else "blockwise",
                          cp=cp, **options)
    opt = make_optimizer(OptimizerConfig())
    lora = replicate(init_lora(CFG, lcfg, jax.random.key(0)), mesh)
    state = replicate(opt.init(lora), mesh)
    tokens = np.arange(2 * 16, dtype=np.int32).reshape(1, 2, 16) % CFG.vocab_size
    batches = shard_micro_batches({"tokens": tokens, "loss_mask": np.ones_like(tokens)}, mesh)
    step = make_train_step(opts, mesh, opt)
    text = step.lower(random_params(CFG, mesh), lora, state, batches,
                      jax.random.key(1)).compile().as_text()
    return re.findall(r'op_name="([^"]*)"', text)


def _scope(part: str) -> str:
    """An op_name segment without its transforms: 'transpose(jvp(qkv))' -> 'qkv'."""
    return re.sub(r"^(?:[\w-]+\()+|\)+$", "", part)


@pytest.mark.parametrize("tp,cp,options", [
    (2, 1, {"mlp_chunk_tokens": 8, "remat": "full"}),     # sequence parallel, tiled
    (1, 2, {}),                                           # context parallel
])
def test_train_step_hlo_names_the_model_parts(tp, cp, options):
    names = _op_names(tp, cp, **options)
    forward = {_scope(p) for name in names for p in name.split("/")}
    missing = [s for s in SCOPES if s not in forward]
    assert not missing, (missing, sorted(forward))
    # the backward of the layer scan: its ops sit under a transpose(...) of the step
    backward = {_scope(p) for name in names if "transpose(" in name for p in name.split("/")}
    missing = [s for s in ("qkv", "rope", "attention", "o_proj", "mlp_norm", "mlp")
               if s not in backward]
    assert not missing, (missing, sorted(backward))
