"""The seven projections of a Llama layer: their names and (in, out) features."""
from __future__ import annotations

from .model_config import ModelConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_dims(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection, as in the HF checkpoint (no kv expansion)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}[name]
