"""Model configuration: from an HF ``config.json`` or a named preset, validated with clear errors.

``ModelConfig`` describes a Llama-family decoder (Llama 2, Llama 3, any HF ``LlamaForCausalLM``).
``check_tp`` tells whether a tensor-parallel degree can split it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ..errors import ConfigError

ROPE_TYPES = ("default", "linear", "llama3")


def read_json_config(directory, filename: str, kind: str, needed_by: str, error):
    """(path, dict) of ``directory/filename``; ``error`` (an SpmdLoraError class) with a clear
    message when the directory or file is missing, not JSON, or not a JSON object. ``kind``
    names the directory ("model"), ``needed_by`` what needs the file ("a HF model")."""
    directory = Path(directory)
    if not directory.is_dir():
        raise error(f"{kind} directory not found: {directory}")
    path = directory / filename
    if not path.is_file():
        raise error(f"{path} not found: {needed_by} directory needs {filename}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return path, data


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling (HF ``rope_scaling`` / ``rope_parameters``)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.rope_scaling.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"model config: unsupported rope type {self.rope_scaling.rope_type!r}; "
                f"supported: {', '.join(ROPE_TYPES)}")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def padded_vocab(self, tp: int) -> int:
        """Vocab rounded up to a multiple of tp (vocab-parallel embedding and LM head)."""
        return int(math.ceil(self.vocab_size / tp) * tp)

    def kv_heads_per_device(self, tp: int) -> int:
        """kv heads each tp device holds: KV/tp, or 1 (a replicated kv head) when tp > KV."""
        return max(self.num_kv_heads // tp, 1)

    def check_tp(self, tp: int) -> None:
        """Raise ConfigError unless tensor parallelism of degree ``tp`` can split this model."""
        if tp < 1:
            raise ConfigError(f"tp must be >= 1, got {tp}")
        if self.num_heads % tp:
            raise ConfigError(
                f"tp={tp} does not divide num_attention_heads={self.num_heads}; "
                f"choose tp from {_divisors(self.num_heads)}")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            raise ConfigError(
                f"tp={tp} and num_key_value_heads={self.num_kv_heads}: one must divide the other "
                f"(kv heads are split over tp, or replicated when tp > kv heads)")
        if self.intermediate_size % tp:
            raise ConfigError(
                f"tp={tp} does not divide intermediate_size={self.intermediate_size}; "
                f"choose tp from {_divisors(self.intermediate_size, self.num_heads)}")

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a HF LlamaConfig dict (transformers 4.x ``rope_scaling`` or 5.x
        ``rope_parameters``)."""
        def need(key):
            if key not in d:
                raise ConfigError(f"{source}: missing field {key!r} (is this a Llama checkpoint?)")
            return d[key]

        model_type = d.get("model_type", "llama")
        if model_type not in ("llama",):
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported; only 'llama'")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {d['hidden_act']!r} unsupported; only 'silu'")
        for bias in ("attention_bias", "mlp_bias"):
            if d.get(bias):
                raise ConfigError(f"{source}: {bias}=true is not supported")
        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        rope = dict(d.get("rope_parameters") or {})
        rope.update(d.get("rope_scaling") or {})
        rope_theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", d.get("max_position_embeddings", 8192))),
        )
        eos = d.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        try:
            return cls(
                vocab_size=int(need("vocab_size")),
                hidden_size=hidden,
                intermediate_size=int(need("intermediate_size")),
                num_layers=int(need("num_hidden_layers")),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                bos_token_id=d.get("bos_token_id", 1),
                eos_token_id=eos,
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, model_dir) -> "ModelConfig":
        path, d = read_json_config(model_dir, "config.json", "model", "a HF model", ConfigError)
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict:
        """The HF ``config.json`` fields of this model (transformers 5.x layout)."""
        rope = {"rope_theta": self.rope_theta, "rope_type": self.rope_scaling.rope_type}
        if self.rope_scaling.rope_type == "linear":
            rope["factor"] = self.rope_scaling.factor
        elif self.rope_scaling.rope_type == "llama3":
            rope.update(factor=self.rope_scaling.factor,
                        low_freq_factor=self.rope_scaling.low_freq_factor,
                        high_freq_factor=self.rope_scaling.high_freq_factor,
                        original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings)
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_parameters": rope, "rope_scaling": None if len(rope) == 2 else rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
        }


def _divisors(*ns: int) -> list[int]:
    g = math.gcd(*ns)
    return [d for d in range(1, g + 1) if g % d == 0]


PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                             rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama2-13b": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                              num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128,
                              rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama2-70b": ModelConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                              num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                              rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                             rms_norm_eps=1e-5, rope_theta=500000.0,
                             max_position_embeddings=8192, bos_token_id=128000,
                             eos_token_id=128001),
}


def resolve_model_config(model: str) -> ModelConfig:
    """A preset name (``llama2-7b`` ...) or a HF model directory."""
    if model in PRESETS:
        return PRESETS[model]
    if not Path(model).exists():
        raise ConfigError(
            f"--model {model!r} is neither a model directory nor a preset "
            f"({', '.join(PRESETS)})")
    return ModelConfig.from_pretrained(model)
