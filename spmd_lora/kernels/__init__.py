"""Attention kernels for spmd_lora (installed as ``spmd_lora.kernels``).

One public entry point: :func:`attention`, dispatching through :mod:`.registry` to

* ``"pallas"``    -- our fused Pallas kernel (:mod:`.flash_attention`; GPU, interpreted elsewhere)
* ``"blockwise"`` -- pure-JAX O(S)-memory attention (:mod:`.blockwise`; CPU default)
* ``"xla"``       -- the plain XLA oracle (:mod:`.reference`; O(S^2) memory)
* ``"cudnn"``     -- cuDNN fused attention (:mod:`.cudnn`; GPU only; packed segments on Hopper)
* ``"tokamax"``   -- tokamax's Mosaic GPU kernels (:mod:`.tokamax_attention`; optional extra)
* ``"auto"``      -- on a GPU the fastest supported impl of the measured kernel table
  (``SPMD_LORA_KERNEL_TABLE``, written by tools/gpu_suite.py), else pallas; blockwise
  elsewhere.

All of them take q [B, S, H, D], k/v [B, S, KV, D] (H a multiple of KV, q head h uses kv head
h // (H // KV) as in HF), optional segment_ids [B, S] int and return [B, S, H, D] in q's dtype,
and all work inside ``jax.shard_map(..., check_vma=True)`` with gradients.

Context parallelism: :func:`ring_attention` (:mod:`.ring_attention`), called inside shard_map
over a cp mesh axis, with explicit global token indices for the causal mask.
"""
from . import registry
from ._masks import BRANCH_ROLES, branch_segment
from .blockwise import blockwise_attention
from .cudnn import cudnn_attention
from .flash_attention import BlockSizes, flash_attention
from .reference import reference_attention
from .ring_attention import CP_IMPLS, cp_bytes_per_device, ring_attention
from .registry import IMPLS, resolve_impl
from .tokamax_attention import tokamax_attention


def attention(q, k, v, *, causal=True, segment_ids=None, impl="auto", block_sizes=None,
              branch_segments=False):
    """Multi-head attention. q [B, S, H, D]; k, v [B, S, KV, D]; returns [B, S, H, D].

    impl: "auto" | "pallas" | "blockwise" | "xla" | "cudnn" | "tokamax" (ValueError
    otherwise). block_sizes: optional :class:`BlockSizes` overriding the registry's choice
    (pallas uses all fields, blockwise uses block_q / block_k). branch_segments: the segment
    ids may hold shared-prefix branches (``_masks.branch_segment``), which only our own
    kernels (pallas, blockwise, xla) express; auto then never picks cuDNN or tokamax.
    """
    choice = registry.choose(impl, seq_len=q.shape[1], head_dim=q.shape[-1],
                             block_sizes=block_sizes, dtype=q.dtype,
                             segments="branches" if branch_segments else segment_ids is not None)
    if choice.impl == "xla":
        return reference_attention(q, k, v, causal=causal, segment_ids=segment_ids)
    if choice.impl == "blockwise":
        bs = choice.block_sizes
        return blockwise_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                   block_q=bs.block_q, block_k=bs.block_k)
    if choice.impl == "pallas":
        return flash_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                               block_sizes=choice.block_sizes)
    if choice.impl == "cudnn":
        def fallback(q, k, v, *, causal, segment_ids):
            return attention(q, k, v, causal=causal, segment_ids=segment_ids, impl="pallas")
        return cudnn_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                               compute_capability=registry.device_info()[2],
                               fallback=fallback)
    if choice.impl == "tokamax":
        return tokamax_attention(q, k, v, causal=causal, segment_ids=segment_ids)
    raise AssertionError(choice)  # registry returned something unknown


__all__ = ["attention", "reference_attention", "blockwise_attention", "flash_attention",
           "BlockSizes", "IMPLS", "resolve_impl", "registry", "ring_attention", "CP_IMPLS",
           "cp_bytes_per_device", "branch_segment", "BRANCH_ROLES"]
