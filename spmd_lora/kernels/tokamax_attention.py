"""tokamax's Mosaic GPU flash attention (optional extra: ``pip install "spmd_lora[tokamax]"``,
Python >= 3.12, jax >= 0.11.1; sm80/sm90/sm100 GPUs).

What fits and what does not (tokamax 0.0.17):

* GQA: native (k/v with fewer heads than q).
* causal: native (``is_causal``).
* segment ids: NOT in the public ``tokamax.dot_product_attention`` (it takes a dense boolean
  [B, H, T, S] mask, O(S^2) memory, or padding lengths). Its internal ``Mask`` has per-query
  key ranges (``k_start`` inclusive, ``k_end`` exclusive), which express packed sequences
  exactly when every segment is one contiguous run of equal ids (what packing produces):
  a query in the run [s0, s1) sees keys [s0, s1) (and, causal, only up to itself). So this
  module calls tokamax's implementation object with such a ``Mask`` (a private API: pinned by
  the extra's version range). Non-contiguous segment ids (e.g. [0, 1, 0]) are not supported.

q [B, S, H, D]; k, v [B, S, KV, D]; segment_ids [B, S] int; returns [B, S, H, D] in q.dtype.
"""
from __future__ import annotations

import importlib.util

import jax.numpy as jnp
from jax import lax

IMPLEMENTATION = "mosaic_gpu"


def available() -> bool:
    return importlib.util.find_spec("tokamax") is not None


def segment_key_ranges(segment_ids):
    """Contiguous segment ids [B, S] -> (k_start, k_end) [B, S] int32: the first key of each
    query's segment and one past its last key."""
    seg = segment_ids.astype(jnp.int32)
    s = seg.shape[1]
    pos = jnp.arange(s, dtype=jnp.int32)
    new = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    start = lax.cummax(jnp.where(new, pos, 0), axis=1)
    last = jnp.concatenate([seg[:, 1:] != seg[:, :-1], jnp.ones_like(seg[:, :1], bool)], axis=1)
    end = lax.cummin(jnp.where(last, pos + 1, s), axis=1, reverse=True)
    return start, end


def tokamax_mask(segment_ids, causal: bool):
    """The tokamax ``Mask`` for causal / segment ids (k ranges broadcast over heads)."""
    from tokamax._src.ops.attention import base
    if segment_ids is None:
        return base.Mask(is_causal=causal)
    start, end = segment_key_ranges(segment_ids)
    return base.Mask(k_start=start[:, None, :], k_end=end[:, None, :], is_causal=causal)


def tokamax_attention(q, k, v, *, causal, segment_ids, implementation=IMPLEMENTATION):
    """Attention through tokamax (``implementation``: "mosaic_gpu" on GPUs; "xla" runs
    anywhere, for tests)."""
    if not available():
        raise ValueError("attention impl 'tokamax' needs the tokamax package: pip install "
                         "'spmd_lora[tokamax]' (Python >= 3.12, jax >= 0.11.1)")
    from tokamax._src.ops.attention import api
    impl = api.IMPLEMENTATIONS.get(implementation)
    if impl is None:
        raise ValueError(f"tokamax has no {implementation!r} attention here (has: "
                         f"{', '.join(sorted(api.IMPLEMENTATIONS))})")
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    out = impl(q, k, v, bias=None, mask=tokamax_mask(segment_ids, causal),
               logits_scale=1.0 / float(q.shape[-1]) ** 0.5, precision=None,
               logits_soft_cap=None, q_sharding=None)
    return out.astype(q.dtype)


def supports(*, dtype, compute_capability):
    """(ok, reason) for the registry's 'auto'."""
    if not available():
        return False, "tokamax is not installed"
    cc = tuple(compute_capability) if compute_capability is not None else (0, 0)
    if cc < (8, 0):
        return False, "tokamax's Mosaic GPU kernels need sm80+"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                jnp.dtype(jnp.float32)):
        return False, "tokamax takes f32/f16/bf16"
    return True, "ok"
