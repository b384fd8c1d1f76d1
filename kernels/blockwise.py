"""Pure-JAX blockwise attention with O(S) memory (CPU path and portable fallback).

Same contract as ``reference_attention``. The forward maps over q blocks and, inside, loops
over key blocks with an online softmax in fp32 (FlashAttention-2 in plain XLA); it keeps only
the output and the per-row log-sum-exp. The backward (``jax.custom_vjp``) scans over key
blocks, loops over q blocks, recomputes the probabilities from the lse and accumulates dq in
an fp32 carry, so neither pass ever holds more than one [B, H, block_q, block_k] score tile:
the compiled train step's temporary memory grows linearly in S.

GQA: q is viewed as [B, S, KV, G, D] (a free reshape) and contracted against k/v
[B, S, KV, D] directly; repeated kv heads are never materialised and the dk/dv sums over the
group come out of the einsums. Causal: key blocks entirely above the diagonal are skipped
(dynamic loop bounds), blocks entirely below it are not masked. Segment ids mask every block.
Lengths that are not a multiple of the block are padded and the padded keys masked.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _vma
from ._custom_vjp import attention_with_saved_lse
from ._masks import position_mask

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


@dataclasses.dataclass(frozen=True)
class _Cfg:
    causal: bool
    sm_scale: float
    bq: int
    bk: int


def _lcm(a, b):
    return a * b // math.gcd(a, b)


def _pad_seq(x, seq_pad, value=0):
    s = x.shape[1]
    if s == seq_pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, seq_pad - s)
    return jnp.pad(x, widths, constant_values=value)


def _mask(q_pos, k_pos, q_seg, k_seg, *, causal, kv_len, seq_pad):
    """Mask broadcastable to [B, KV, G, bq, bk], or None."""
    mask = position_mask(q_pos, k_pos, causal=causal, kv_len=kv_len, seq_pad=seq_pad)
    if mask is not None:
        mask = mask[None, None, None]
    if q_seg is not None:  # [B, bq], [B, bk]
        m = (q_seg[:, :, None] == k_seg[:, None, :])[:, None, None]
        mask = m if mask is None else mask & m
    return mask


def _cdiv(a, b):
    return (a + b - 1) // b


def _forward(q, k, v, seg, cfg: _Cfg):
    """q [B, S, H, D] -> out [B, S, H, D] (q.dtype), lse [B, KV, G, S_pad] fp32."""
    b, s, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    bq, bk = cfg.bq, cfg.bk
    seq_pad = -(-s // _lcm(bq, bk)) * _lcm(bq, bk)
    nq, nk = seq_pad // bq, seq_pad // bk
    axes = _vma.union_axes(q, k, v, seg)
    qg = _pad_seq(q, seq_pad).reshape(b, seq_pad, kvh, g, d)
    kp, vp = _pad_seq(k, seq_pad), _pad_seq(v, seq_pad)
    segp = None if seg is None else _pad_seq(seg.astype(jnp.int32), seq_pad, -1)

    def q_block(i):
        q_start = i * bq
        qi = lax.dynamic_slice_in_dim(qg, q_start, bq, axis=1)
        q_pos = q_start + jnp.arange(bq, dtype=jnp.int32)
        q_seg = None if segp is None else lax.dynamic_slice_in_dim(segp, q_start, bq, axis=1)

        def body(j, carry, masked):
            acc, m_prev, l_prev = carry
            k_start = j.astype(jnp.int32) * bk  # fori_loop counters are int64 under x64
            kj = lax.dynamic_slice_in_dim(kp, k_start, bk, axis=1)
            vj = lax.dynamic_slice_in_dim(vp, k_start, bk, axis=1)
            sc = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj,
                            preferred_element_type=jnp.float32) * cfg.sm_scale
            k_pos = k_start + jnp.arange(bk, dtype=jnp.int32)
            k_seg = None if segp is None else lax.dynamic_slice_in_dim(segp, k_start, bk, 1)
            mask = _mask(q_pos, k_pos, q_seg, k_seg, causal=cfg.causal and masked,
                         kv_len=s if masked else seq_pad, seq_pad=seq_pad)
            if mask is not None:
                sc = jnp.where(mask, sc, MASK_VALUE)
            m_new = jnp.maximum(m_prev, jnp.max(sc, axis=-1))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.exp(sc - m_new[..., None])
            l_new = alpha * l_prev + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vj.dtype), vj,
                            preferred_element_type=jnp.float32)
            return acc * alpha[..., None] + pv, m_new, l_new

        full_kv = s // bk
        if cfg.causal:
            end = jnp.minimum(_cdiv(q_start + bq, bk), nk)
            unmasked_end = jnp.minimum((q_start + 1) // bk, full_kv)
        else:
            end, unmasked_end = nk, full_kv
        carry = (_vma.zeros((b, kvh, g, bq, d), jnp.float32, axes),
                 _vma.full((b, kvh, g, bq), MASK_VALUE, jnp.float32, axes),
                 _vma.zeros((b, kvh, g, bq), jnp.float32, axes))
        carry = lax.fori_loop(0, unmasked_end, functools.partial(body, masked=False), carry)
        acc, m, l = lax.fori_loop(unmasked_end, end, functools.partial(body, masked=True),
                                  carry)
        out = (acc / l[..., None]).astype(q.dtype).transpose(0, 3, 1, 2, 4)  # [B,bq,KV,G,D]
        return out, m + jnp.log(l)

    outs, lses = lax.map(q_block, jnp.arange(nq, dtype=jnp.int32))
    out = outs.transpose(1, 0, 2, 3, 4, 5).reshape(b, seq_pad, h, d)[:, :s]
    lse = lses.transpose(1, 2, 3, 0, 4).reshape(b, kvh, g, seq_pad)
    return out, lse


def _backward(q, k, v, seg, out, lse, do, cfg: _Cfg):
    b, s, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    bq, bk = cfg.bq, cfg.bk
    seq_pad = lse.shape[-1]
    nq, nk = seq_pad // bq, seq_pad // bk
    axes = _vma.union_axes(q, k, v, seg, do)
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, S, H]
    delta = _pad_seq(delta, seq_pad).reshape(b, seq_pad, kvh, g).transpose(0, 2, 3, 1)
    qg = _pad_seq(q, seq_pad).reshape(b, seq_pad, kvh, g, d)
    dog = _pad_seq(do.astype(q.dtype), seq_pad).reshape(b, seq_pad, kvh, g, d)
    kp, vp = _pad_seq(k, seq_pad), _pad_seq(v, seq_pad)
    segp = None if seg is None else _pad_seq(seg.astype(jnp.int32), seq_pad, -1)

    def k_block(dq, j):
        k_start = j * bk
        kj = lax.dynamic_slice_in_dim(kp, k_start, bk, axis=1)
        vj = lax.dynamic_slice_in_dim(vp, k_start, bk, axis=1)
        k_pos = k_start + jnp.arange(bk, dtype=jnp.int32)
        k_seg = None if segp is None else lax.dynamic_slice_in_dim(segp, k_start, bk, 1)

        def body(i, carry, masked):
            dq, dk, dv = carry
            q_start = i.astype(jnp.int32) * bq  # fori_loop counters are int64 under x64
            qi = lax.dynamic_slice_in_dim(qg, q_start, bq, axis=1)
            doi = lax.dynamic_slice_in_dim(dog, q_start, bq, axis=1)
            lse_i = lax.dynamic_slice_in_dim(lse, q_start, bq, axis=3)
            delta_i = lax.dynamic_slice_in_dim(delta, q_start, bq, axis=3)
            sc = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj,
                            preferred_element_type=jnp.float32) * cfg.sm_scale
            p = jnp.exp(sc - lse_i[..., None])
            q_pos = q_start + jnp.arange(bq, dtype=jnp.int32)
            q_seg = None if segp is None else lax.dynamic_slice_in_dim(segp, q_start, bq, 1)
            mask = _mask(q_pos, k_pos, q_seg, k_seg, causal=cfg.causal and masked,
                         kv_len=s if masked else seq_pad, seq_pad=seq_pad)
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(doi.dtype), doi,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None])
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(qi.dtype), qi,
                                 preferred_element_type=jnp.float32)
            dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(kj.dtype), kj,
                              preferred_element_type=jnp.float32)
            dq = lax.dynamic_update_slice_in_dim(
                dq, lax.dynamic_slice_in_dim(dq, q_start, bq, axis=1) + dq_i, q_start, axis=1)
            return dq, dk, dv

        if cfg.causal:
            start = k_start // bq
            unmasked_start = jnp.minimum(_cdiv(k_start + bk - 1, bq), nq)
        else:
            start, unmasked_start = 0, 0
        if s < seq_pad:
            unmasked_start = jnp.where(k_start + bk > s, nq, unmasked_start)
        carry = (dq, _vma.zeros((b, bk, kvh, d), jnp.float32, axes),
                 _vma.zeros((b, bk, kvh, d), jnp.float32, axes))
        carry = lax.fori_loop(start, unmasked_start, functools.partial(body, masked=True), carry)
        dq, dk, dv = lax.fori_loop(unmasked_start, nq, functools.partial(body, masked=False),
                                   carry)
        return dq, ((dk * cfg.sm_scale).astype(k.dtype), dv.astype(v.dtype))

    dq0 = _vma.zeros((b, seq_pad, kvh, g, d), jnp.float32, axes)
    dq, (dks, dvs) = lax.scan(k_block, dq0, jnp.arange(nk, dtype=jnp.int32))
    dq = (dq * cfg.sm_scale).reshape(b, seq_pad, h, d)[:, :s].astype(q.dtype)
    dk = dks.transpose(1, 0, 2, 3, 4).reshape(b, seq_pad, kvh, d)[:, :s]
    dv = dvs.transpose(1, 0, 2, 3, 4).reshape(b, seq_pad, kvh, d)[:, :s]
    return dq, dk, dv


_blockwise = attention_with_saved_lse(_forward, _backward)


def blockwise_attention(q, k, v, *, causal=True, segment_ids=None, block_q=None, block_k=None,
                        sm_scale=None):
    """O(S)-memory attention in plain JAX; same contract as ``reference_attention``.

    block_q / block_k: tile sizes (default 512; shrunk to S when S is smaller). Any positive
    ints work; the sequence is padded to a multiple of both.
    """
    from .flash_attention import check_shapes
    check_shapes(q, k, v, segment_ids)
    s, d = q.shape[1], q.shape[3]
    bq = min(int(block_q or DEFAULT_BLOCK_Q), s)
    bk = min(int(block_k or DEFAULT_BLOCK_K), s)
    if bq <= 0 or bk <= 0:
        raise ValueError(f"block sizes must be positive, got block_q={block_q} block_k={block_k}")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    cfg = _Cfg(causal=bool(causal), sm_scale=float(sm_scale), bq=bq, bk=bk)
    if k.dtype != q.dtype:
        k = k.astype(q.dtype)
    if v.dtype != q.dtype:
        v = v.astype(q.dtype)
    axes = _vma.union_axes(q, k, v, segment_ids)
    q, k, v, segment_ids = (_vma.pvary(x, axes) for x in (q, k, v, segment_ids))
    return _blockwise(q, k, v, segment_ids, cfg)
