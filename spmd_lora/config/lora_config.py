"""LoRA hyper-parameters (rank, alpha, dropout, targets, rsLoRA), validated on construction."""
from __future__ import annotations

import dataclasses
import math

from ..errors import ConfigError
from .projections import TARGETS


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
