"""The custom_vjp wrapper shared by the fused attention paths (Pallas and blockwise).

Both save only their inputs, the output and the per-row log-sum-exp for the backward pass, so
activation memory stays O(S): the [S, S] probabilities are recomputed tile by tile.
"""
from __future__ import annotations

import functools

import jax


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
