"""LoRA configuration and parameters.

LoRA factors are the only trainable state: for each targeted projection of every layer,
``a`` [L, in, r] and ``b`` [L, r, out] (fp32, replicated over the mesh). A layer computes
``x @ W + dropout(x) @ a @ b * scaling``; A·B is never added into W during training.
Init is PEFT's: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .errors import ConfigError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False

    def __post_init__(self):
        targets = self.targets
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        if targets in (("all",), ("all-linear",), ("all_linear",)):
            targets = TARGETS
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets:
            raise ConfigError(
                f"lora_targets {unknown or list(targets)} invalid; choose from "
                f"{', '.join(TARGETS)} or 'all'")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))
        if self.rank < 1:
            raise ConfigError(f"lora_rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (as PEFT)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def projection_dims(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection, as in the HF checkpoint (no kv expansion)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}[name]


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
