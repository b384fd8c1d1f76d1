"""cuDNN fused attention (GPU only), with packed sequences instead of a dense mask.

Without segment ids this is ``jax.nn.dot_product_attention(implementation="cudnn")``. The
public API has no segment ids, so packed sequences go through JAX's lower-level cuDNN entry
(``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention``) with ragged
``q_offsets``/``kv_offsets`` + per-segment lengths (cuDNN's packed layout, Hopper and newer):
O(S) memory. Segments must be contiguous runs of equal ids (what packing produces).

The packed layout takes a static maximum number of segments per row (:data:`MAX_SEGMENTS`);
a row with more segments is computed by the fallback kernel instead (``lax.cond`` on the
actual count), so the result is always exact. Where the packed path does not exist (older
GPUs, a JAX without it) segment ids need a dense [B, 1, S, S] mask; that is allowed up to
:data:`DENSE_MASK_MAX_LEN` tokens and refused above with a clear error.

q [B, S, H, D]; k, v [B, S, KV, D] (GQA handled by cuDNN); segment_ids [B, S] int; fp16/bf16.
"""
from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp

MAX_SEGMENTS = 64            # static segment slots per row for cuDNN's packed layout
DENSE_MASK_MAX_LEN = 4096    # longest S for which a dense [B, 1, S, S] mask is acceptable
PACKED_MIN_COMPUTE_CAPABILITY = (9, 0)


def has_packed_api() -> bool:
    """Whether this JAX has cuDNN's packed-sequence entry (q_offsets / kv_offsets)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError:
        return False
    params = inspect.signature(fa.dot_product_attention).parameters
    return "q_offsets" in params and "kv_offsets" in params


def segment_mode(seq_len: int, compute_capability) -> str:
    """How cuDNN handles segment ids here: "packed" (Hopper+, JAX with the packed API) or
    "dense" (a [B, 1, S, S] mask, S <= DENSE_MASK_MAX_LEN). Raises ValueError otherwise."""
    cc = tuple(compute_capability) if compute_capability is not None else None
    if cc is not None and cc >= PACKED_MIN_COMPUTE_CAPABILITY and has_packed_api():
        return "packed"
    if seq_len <= DENSE_MASK_MAX_LEN:
        return "dense"
    why = ("this JAX has no cuDNN packed-sequence path" if not has_packed_api() else
           f"cuDNN's packed-sequence path needs compute capability >= 9.0 (Hopper); this GPU "
           f"reports {cc}")
    raise ValueError(
        f"attention impl 'cudnn' with segment_ids at S={seq_len}: {why}, and a dense "
        f"[B, 1, S, S] mask is refused above S={DENSE_MASK_MAX_LEN}. Use impl='pallas' (or "
        f"'auto'), which masks segments inside the kernel.")


def packed_offsets(segment_ids, max_segments: int):
    """Segment ids [B, S] (contiguous runs) -> (offsets [B, M+1], lengths [B, M], count [B])
    int32, M = max_segments: start of each run (-1 past the last one), its length (-1 past
    the last one) and the number of runs per row."""
    seg = segment_ids.astype(jnp.int32)
    b, s = seg.shape
    starts = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    count = jnp.sum(starts, axis=1, dtype=jnp.int32)

    def row(start_row):
        pos = jnp.nonzero(start_row, size=max_segments + 1, fill_value=-1)[0].astype(jnp.int32)
        nxt = jnp.concatenate([pos[1:], jnp.full((1,), -1, jnp.int32)])
        end = jnp.where(nxt >= 0, nxt, s)
        lengths = jnp.where(pos >= 0, end - pos, -1)[:max_segments]
        return pos, lengths

    offsets, lengths = jax.vmap(row)(starts)
    return offsets, lengths, count


def _packed(q, k, v, segment_ids, causal, scale):
    from jax._src.cudnn import fused_attention_stablehlo as fa
    offsets, lengths, _ = packed_offsets(segment_ids, MAX_SEGMENTS)
    mask_type = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    return fa.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths,
                                    q_offsets=offsets, kv_offsets=offsets, scale=scale,
                                    mask_type=mask_type, qkv_layout="BTNH")


def cudnn_attention(q, k, v, *, causal, segment_ids, compute_capability, fallback):
    """cuDNN attention; ``fallback(q, k, v, causal=, segment_ids=)`` computes rows with more
    than MAX_SEGMENTS segments on the packed path. Returns [B, S, H, D] in q.dtype."""
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                            implementation="cudnn").astype(q.dtype)
    mode = segment_mode(q.shape[1], compute_capability)
    if mode == "dense":
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                            implementation="cudnn").astype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    _, _, count = packed_offsets(segment_ids, MAX_SEGMENTS)
    return jax.lax.cond(
        jnp.max(count) <= MAX_SEGMENTS,
        lambda: _packed(q, k, v, segment_ids, causal, scale).astype(q.dtype),
        lambda: fallback(q, k, v, causal=causal, segment_ids=segment_ids).astype(q.dtype))


def supports(*, dtype, head_dim: int, seq_len: int, segments: bool, compute_capability):
    """(ok, reason): whether cuDNN attention takes this call (used by the registry's 'auto')."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False, "cuDNN attention takes fp16/bf16 only"
    cc = tuple(compute_capability) if compute_capability is not None else (0, 0)
    max_d = 256 if cc >= (9, 0) else 128
    if head_dim % 8 or head_dim > max_d:
        return False, f"cuDNN needs head_dim % 8 == 0 and <= {max_d}"
    if segments:
        try:
            segment_mode(seq_len, compute_capability)
        except ValueError as e:
            return False, str(e)
    return True, "ok"
