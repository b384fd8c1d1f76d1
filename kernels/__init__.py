"""Attention kernels for spmd_lora (installed as ``spmd_lora.kernels``).

One public entry point: :func:`attention`, dispatching through :mod:`.registry` to

* ``"pallas"``    -- our fused Pallas kernel (:mod:`.flash_attention`; GPU, interpreted elsewhere)
* ``"blockwise"`` -- pure-JAX O(S)-memory attention (:mod:`.blockwise`; CPU default)
* ``"xla"``       -- the plain XLA oracle (:mod:`.reference`; O(S^2) memory)
* ``"cudnn"``     -- ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU only)
* ``"auto"``      -- pallas on GPU, blockwise elsewhere.

All of them take q [B, S, H, D], k/v [B, S, KV, D] (H a multiple of KV, q head h uses kv head
h // (H // KV) as in HF), optional segment_ids [B, S] int and return [B, S, H, D] in q's dtype,
and all work inside ``jax.shard_map(..., check_vma=True)`` with gradients.

Context parallelism: :func:`ring_attention` (:mod:`.ring_attention`), called inside shard_map
over a cp mesh axis, with explicit global token indices for the causal mask.
"""
import jax

from . import registry
from .blockwise import blockwise_attention
from .flash_attention import BlockSizes, flash_attention
from .reference import reference_attention
from .ring_attention import CP_IMPLS, cp_bytes_per_device, ring_attention
from .registry import IMPLS, resolve_impl


def _cudnn_attention(q, k, v, *, causal, segment_ids):
    mask = None
    if segment_ids is not None:
        # cuDNN has no segment-id mask: pass a dense [B, 1, S, S] mask (O(S^2) memory).
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    if k.dtype != q.dtype:
        k = k.astype(q.dtype)
    if v.dtype != q.dtype:
        v = v.astype(q.dtype)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                       implementation="cudnn")
    return out.astype(q.dtype)


def attention(q, k, v, *, causal=True, segment_ids=None, impl="auto", block_sizes=None):
    """Multi-head attention. q [B, S, H, D]; k, v [B, S, KV, D]; returns [B, S, H, D].

    impl: "auto" | "pallas" | "blockwise" | "xla" | "cudnn" (ValueError otherwise).
    block_sizes: optional :class:`BlockSizes` overriding the registry's choice (pallas uses
    all fields, blockwise uses block_q / block_k).
    """
    choice = registry.choose(impl, seq_len=q.shape[1], head_dim=q.shape[-1],
                             block_sizes=block_sizes)
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
        return _cudnn_attention(q, k, v, causal=causal, segment_ids=segment_ids)
    raise AssertionError(choice)  # registry returned something unknown


__all__ = ["attention", "reference_attention", "blockwise_attention", "flash_attention",
           "BlockSizes", "IMPLS", "resolve_impl", "registry", "ring_attention", "CP_IMPLS",
           "cp_bytes_per_device"]
