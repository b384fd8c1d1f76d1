"""The custom_vjp wrapper shared by the fused attention paths (Pallas and blockwise).

Both save only their inputs, the output and the per-row log-sum-exp for the backward pass, so
activation memory stays O(S): the [S, S] probabilities are recomputed tile by tile. Their
entry points check and prepare their inputs alike (:func:`attention_inputs`).
"""
from __future__ import annotations

import functools

import jax

from . import _vma


def check_shapes(q, k, v, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects q [B, S, H, D], k/v [B, S, KV, D]; got "
                         f"q{q.shape} k{k.shape} v{v.shape}")
    b, s, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"k/v must be [B, S, KV, D] matching q {q.shape}; got k{k.shape} "
                         f"v{v.shape}")
    if h % k.shape[2]:
        raise ValueError(f"q heads ({h}) must be a multiple of kv heads ({k.shape[2]})")
    if segment_ids is not None and tuple(segment_ids.shape) != (b, s):
        raise ValueError(f"segment_ids must be [B, S] = {(b, s)}, got {segment_ids.shape}")


def attention_inputs(q, k, v, segment_ids):
    """(q, k, v, segment_ids) of an attention call, checked (:func:`check_shapes`), k and v in
    q's dtype, and all varying over the same manual axes -- outside the custom_vjp, so AD
    inserts the psum for inputs that are replicated over an axis (e.g. kv heads shared
    across tp)."""
    check_shapes(q, k, v, segment_ids)
    if k.dtype != q.dtype:
        k = k.astype(q.dtype)
    if v.dtype != q.dtype:
        v = v.astype(q.dtype)
    axes = _vma.union_axes(q, k, v, segment_ids)
    return tuple(_vma.pvary(x, axes) for x in (q, k, v, segment_ids))


def attention_with_saved_lse(forward, backward):
    """Build ``f(q, k, v, seg, cfg) -> out`` with a custom VJP.

    ``forward(q, k, v, seg, cfg) -> (out, lse)``;
    ``backward(q, k, v, seg, out, lse, do, cfg) -> (dq, dk, dv)``. ``cfg`` is static (hashable);
    ``seg`` (segment ids or None) gets no cotangent.
    """
    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def attend(q, k, v, seg, cfg):
        return forward(q, k, v, seg, cfg)[0]

    def attend_fwd(q, k, v, seg, cfg):
        out, lse = forward(q, k, v, seg, cfg)
        return out, (q, k, v, seg, out, lse)

    def attend_bwd(cfg, res, do):
        q, k, v, seg, out, lse = res
        return (*backward(q, k, v, seg, out, lse, do, cfg), None)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend
