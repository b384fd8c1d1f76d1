"""LoRA parameters: PEFT-identical initialisation and their count.

LoRA factors are the only trainable state: for each targeted projection of every layer,
``a`` [L, in, r] and ``b`` [L, r, out] (fp32, replicated over the mesh). A layer computes
``x @ W + dropout(x) @ a @ b * scaling``; A·B is never added into W during training.
Init is PEFT's: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..config.lora_config import LoraConfig
from ..config.model_config import ModelConfig
from ..config.projections import projection_dims

def init_lora(cfg: ModelConfig, lora_cfg: LoraConfig, key) -> dict:
    """PEFT-identical init: {"layers": {proj: {"a": [L, in, r], "b": [L, r, out]}}}, fp32."""
    layers = {}
    for i, name in enumerate(lora_cfg.targets):
        fan_in, fan_out = projection_dims(cfg, name)
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (cfg.num_layers, fan_in, lora_cfg.rank),
                               jnp.float32, -bound, bound)
        layers[name] = {"a": a, "b": jnp.zeros((cfg.num_layers, lora_cfg.rank, fan_out), jnp.float32)}
    return {"layers": layers}


def lora_param_count(lora) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(lora)))
