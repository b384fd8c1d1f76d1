"""Static (compile-time) options of the per-device forward: :class:`ForwardOptions`, and the
names the rest of the package checks its settings against.

``ForwardOptions`` fixes the model (``cfg``), the tp degree, LoRA, the attention kernel, the
remat policy, the sequence layout (sequence parallelism, cp, tiles of ``mlp_chunk_tokens`` and
``ce_chunk_tokens``). It is hashable: the jitted functions take it as a static argument.
"""
from __future__ import annotations

import dataclasses

from ..config.lora_config import LoraConfig
from ..config.model_config import ModelConfig
from ..config.train_config import check_offload_layers
from ..kernels import CP_IMPLS
from ..kernels.registry import BRANCH_SEGMENT_IMPLS_MISSING
from ..parallel.sequence import SeqLayout
from ..errors import ConfigError

REMAT_POLICIES = ("none", "full", "save-dots", "offload", "offload-input")
# Attention impls that have a context-parallel block kernel (ring attention needs the lse).
CP_ATTENTION_IMPLS = ("auto", "blockwise", "pallas")
# token_index of padded positions: later than every real token, so no real query sees them.
PAD_TOKEN_INDEX = 2 ** 30


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """Static (compile-time) settings of the per-device forward.

    ``sequence_parallel``: shard the residual stream along the sequence over tp (only matters
    when tp > 1). ``cp``: context-parallel degree (the batch, in the one schema of
    ``zigzag.prepare_batch``, arrives in zig-zag layout); ``cp_impl``: "ring" | "allgather".
    ``mlp_chunk_tokens``: run the MLP over tiles of this many tokens (0 = whole sequence at
    once). ``remat``: none | full | save-dots | offload (the two half-layer inputs in host
    memory, each half recomputed in its own backward) | offload-input (only the layer input in
    host memory); ``offload_layers``: with an offload policy, how many layers (the first ones)
    send their saved inputs to the host, the rest keeping them on the device (None: all).
    ``branch_segments``: the segment ids may hold shared-prefix branches (objective dpo's
    shared-prefix layout, ``kernels._masks.branch_segment``), which only our own attention
    kernels mask (not cudnn, not tokamax).
    """

    cfg: ModelConfig
    tp: int
    lora: LoraConfig | None = None
    attention_impl: str = "auto"
    remat: str = "none"
    ce_chunk_tokens: int = 4096
    sequence_parallel: bool = True
    mlp_chunk_tokens: int = 0
    cp: int = 1
    cp_impl: str = "ring"
    offload_layers: int | None = None
    branch_segments: bool = False

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat {self.remat!r} unknown; choose from {', '.join(REMAT_POLICIES)}")
        check_offload_layers(self.offload_layers, self.remat, self.cfg.num_layers)
        if self.mlp_chunk_tokens < 0:
            raise ConfigError(f"mlp_chunk_tokens must be >= 0 (0 = off), got {self.mlp_chunk_tokens}")
        if self.ce_chunk_tokens < 1:
            raise ConfigError(f"ce_chunk_tokens must be >= 1, got {self.ce_chunk_tokens}")
        if self.cp < 1:
            raise ConfigError(f"cp must be >= 1, got {self.cp}")
        if self.cp_impl not in CP_IMPLS:
            raise ConfigError(f"cp_impl {self.cp_impl!r} unknown; choose from {', '.join(CP_IMPLS)}")
        if self.cp > 1 and self.attention_impl not in CP_ATTENTION_IMPLS:
            raise ConfigError(
                f"attention {self.attention_impl!r} has no context-parallel block kernel (it "
                f"returns no log-sum-exp); with cp > 1 use one of {', '.join(CP_ATTENTION_IMPLS)}")

        if self.branch_segments and self.attention_impl in BRANCH_SEGMENT_IMPLS_MISSING:
            raise ConfigError(f"attention {self.attention_impl!r} cannot mask the shared-prefix "
                              f"layout of objective dpo; use attention auto, pallas, blockwise "
                              f"or xla, or --dpo-layout separate")

    def layout(self, seq_len: int) -> SeqLayout:
        """The sequence layout of a batch of ``seq_len`` tokens."""
        return SeqLayout(seq_len=seq_len, tp=self.tp, sp=self.sequence_parallel and self.tp > 1)

    def mlp_tile_rows(self, layout: SeqLayout) -> int | None:
        """Local rows per MLP tile (a tile gathers ``mlp_chunk_tokens`` tokens), or None when
        the MLP runs untiled (tiling off, or the sequence is no longer than one tile)."""
        rows = self.mlp_chunk_tokens // layout.gather_factor
        if self.mlp_chunk_tokens and rows < layout.local_rows:
            return max(rows, 1)
        return None

    def ce_chunk_rows(self, layout: SeqLayout, local_rows: int) -> int:
        """Local rows per cross-entropy chunk (a chunk gathers ``ce_chunk_tokens`` tokens)."""
        return max(1, min(self.ce_chunk_tokens // layout.gather_factor, local_rows))

    def tile_counts(self, seq_len: int, local_batch: int) -> tuple[int, int]:
        """(MLP tiles per layer, cross-entropy chunks) of one micro-batch, for the census."""
        layout = self.layout(seq_len)
        tile = self.mlp_tile_rows(layout)
        tiles = -(-layout.local_rows // tile) if tile else 1
        n = local_batch * layout.local_rows
        return tiles, -(-n // self.ce_chunk_rows(layout, n))
