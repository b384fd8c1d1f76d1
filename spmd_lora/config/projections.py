"""THE projection table: the seven linears of a Llama layer, and everything known about them.

Each :class:`Projection` says its ``name``, the ``block`` it belongs to (``attention`` |
``mlp``), how tensor parallelism splits it (``parallel``: ``column`` | ``row``) and its
``(in, out)`` features as a function of :class:`ModelConfig`, in HF orientation (HF stores the
weight as ``[out, in]``; we store ``x @ W`` as ``[in, out]``) with the checkpoint's kv heads,
i.e. before any replication of kv heads for tp > KV. With ``D`` hidden, ``F`` intermediate,
``H``/``KV`` heads and ``hd`` head dim::

    name       block      parallel  (in, out)     tp splits  global weight (L layers)
    q_proj     attention  column    (D, H*hd)     out        [L, D, H*hd]    P(None, None, tp)
    k_proj     attention  column    (D, KV*hd)    out        [L, D, KVe*hd]  P(None, None, tp)
    v_proj     attention  column    (D, KV*hd)    out        [L, D, KVe*hd]  P(None, None, tp)
    o_proj     attention  row       (H*hd, D)     in         [L, H*hd, D]    P(None, tp, None)
    gate_proj  mlp        column    (D, F)        out        [L, D, F]       P(None, None, tp)
    up_proj    mlp        column    (D, F)        out        [L, D, F]       P(None, None, tp)
    down_proj  mlp        row       (F, D)        in         [L, F, D]       P(None, tp, None)

(``KVe`` = kv heads after replication, ``tp * max(KV // tp, 1)``: pass ``kv_heads`` to
:meth:`Projection.dims`.) A block is Megatron's pair: its column-parallel projections read the
block's (normed) input, whole or all-gathered over tp; its one row-parallel projection ends it
with a partial sum, all-reduced (or reduce-scattered) over tp. So per layer and pass there is one
gather per block and one reduction per row-parallel projection.

Derived from this table, and nowhere else re-listed: ``TARGETS`` (LoRA targets, HF order),
``COLUMN_PARALLEL`` / ``ROW_PARALLEL``, ``BLOCKS``, the weight PartitionSpecs
(``parallel/mesh.py``), quantised layouts (``weights/quant.py``), HF / PEFT tensor names
(``weights/hf.py``, ``weights/peft.py``), parameter shapes (``weights/shapes.py``), FLOPs
(``analysis/flops.py``) and the expected collectives (``analysis/hlo.py``).
"""
from __future__ import annotations

import dataclasses

from .model_config import ModelConfig

#: HF module holding each block's projections (``model.layers.{i}.<module>.<name>``).
HF_MODULES = {"attention": "self_attn", "mlp": "mlp"}


def _features(cfg: ModelConfig, kv_heads: int | None = None) -> dict[str, int]:
    kv = cfg.num_kv_heads if kv_heads is None else kv_heads
    return {"hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
            "heads": cfg.num_heads * cfg.head_dim, "kv_heads": kv * cfg.head_dim}


@dataclasses.dataclass(frozen=True)
class Projection:
    """One linear of the layer. ``in_features`` / ``out_features`` name a size of the model:
    ``hidden`` (D), ``intermediate`` (F), ``heads`` (H*hd) or ``kv_heads`` (KV*hd)."""

    name: str
    block: str                      # "attention" | "mlp"
    parallel: str                   # "column" (split along out) | "row" (split along in)
    in_features: str
    out_features: str

    @property
    def column(self) -> bool:
        return self.parallel == "column"

    @property
    def hf_module(self) -> str:
        """Its HF module path inside a layer, e.g. ``self_attn.q_proj``."""
        return f"{HF_MODULES[self.block]}.{self.name}"

    @property
    def kv_expanded(self) -> bool:
        """True if its output is kv heads (replicated when tp > KV)."""
        return self.out_features == "kv_heads"

    def dims(self, cfg: ModelConfig, kv_heads: int | None = None) -> tuple[int, int]:
        """(in, out) features; ``kv_heads`` overrides the config's (kv expansion)."""
        f = _features(cfg, kv_heads)
        return f[self.in_features], f[self.out_features]


PROJECTIONS: dict[str, Projection] = {p.name: p for p in (
    Projection("q_proj", "attention", "column", "hidden", "heads"),
    Projection("k_proj", "attention", "column", "hidden", "kv_heads"),
    Projection("v_proj", "attention", "column", "hidden", "kv_heads"),
    Projection("o_proj", "attention", "row", "heads", "hidden"),
    Projection("gate_proj", "mlp", "column", "hidden", "intermediate"),
    Projection("up_proj", "mlp", "column", "hidden", "intermediate"),
    Projection("down_proj", "mlp", "row", "intermediate", "hidden"),
)}

TARGETS = tuple(PROJECTIONS)
COLUMN_PARALLEL = tuple(n for n, p in PROJECTIONS.items() if p.parallel == "column")
ROW_PARALLEL = tuple(n for n, p in PROJECTIONS.items() if p.parallel == "row")
#: The layer's blocks in execution order (each ends with its row-parallel projection).
BLOCKS = tuple(dict.fromkeys(p.block for p in PROJECTIONS.values()))
# What the sharding plan and the collective count rely on: a block is column-parallel
# projections, then exactly one row-parallel projection.
assert all([p.parallel for p in PROJECTIONS.values() if p.block == b][-1:] == ["row"]
           and sum(p.block == b and not p.column for p in PROJECTIONS.values()) == 1
           for b in BLOCKS), "each block must end with its one row-parallel projection"


def projection_dims(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection, as in the HF checkpoint (no kv expansion)."""
    return PROJECTIONS[name].dims(cfg)


def canonical_dims(name: str, in_out: tuple[int, int]) -> tuple[int, int]:
    """(N, D) of a projection with features ``in_out``: ``N`` the dimension tp splits (out of a
    column-parallel projection, in of a row-parallel one), ``D`` the other one (the hidden size).
    This is HF's ``[out, in]`` for a column-parallel projection and its transpose for a row one."""
    fan_in, fan_out = in_out
    return (fan_out, fan_in) if PROJECTIONS[name].column else (fan_in, fan_out)
