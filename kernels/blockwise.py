"""Pure-JAX blockwise attention with O(S) memory (CPU path and portable fallback).

Same contract as ``reference_attention``. The forward maps over q blocks and, inside, loops
over key blocks with an online softmax in fp32 (FlashAttention-2 in plain XLA); it keeps only
the output and the per-row log-sum-exp. The backward (``jax.custom_vjp``) scans over key
blocks, loops over q blocks, recomputes the probabilities from the lse and accumulates dq in
an fp32 carry, so neither pass ever holds more than one score tile: the compiled train step's
temporary memory grows linearly in S.

Layout: every tile product is a plain batched matmul over n = B * KV. q is laid out once as
"rows" [n, S * G, D] (row = position * G + group: the G query heads that share a kv head sit
in the rows of one matmul, so GQA repeats nothing) and k, v as [n, S, D]. The forward's score
tile is [n, bq * G, bk] (softmax along the minor axis); the backward works on its transpose
[n, bk, bq * G], which makes the dv and dk products untransposed. q is scaled by the softmax
scale once, up front. On XLA:CPU this layout runs the tile matmuls without the per-tile
transposing copies that a [B, S, H, D] einsum needs (measured in docs/benchmarks.md, issue 17).

Causal: key blocks entirely above the diagonal are skipped (dynamic loop bounds), blocks
entirely below it are not masked. Segment ids mask every block. Lengths that are not a
multiple of the block are padded and the padded keys masked.
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


def _cdiv(a, b):
    return (a + b - 1) // b


def _to_rows(x, seq_pad, kvh):
    """[B, S, H, ...] -> [B * KV, S_pad * G, ...]: row = position * G + group (q head
    h = kv head h // G, group h % G)."""
    b, s, h = x.shape[:3]
    g = h // kvh
    x = _pad_seq(x, seq_pad).reshape(b, seq_pad, kvh, g, *x.shape[3:])
    return jnp.moveaxis(x, 2, 1).reshape(b * kvh, seq_pad * g, *x.shape[4:])


def _from_rows(x, b, seq_pad, s):
    """Inverse of :func:`_to_rows`: [B * KV, S_pad * G, D] -> [B, S, H, D]."""
    n, r, d = x.shape
    kvh, g = n // b, r // seq_pad
    x = x.reshape(b, kvh, seq_pad, g, d).transpose(0, 2, 1, 3, 4)
    return x.reshape(b, seq_pad, kvh * g, d)[:, :s]


def _to_kv(x, seq_pad):
    """[B, S, KV, D] -> [B * KV, S_pad, D]."""
    b, _, kvh, d = x.shape
    return _pad_seq(x, seq_pad).transpose(0, 2, 1, 3).reshape(b * kvh, seq_pad, d)


def _from_kv(blocks, b, s):
    """Stacked per-block results [nk, B * KV, bk, D] -> [B, S, KV, D]."""
    nk, n, bk, d = blocks.shape
    x = blocks.transpose(1, 0, 2, 3).reshape(b, n // b, nk * bk, d)
    return x.transpose(0, 2, 1, 3)[:, :s]


def _segments(seg, seq_pad, kvh, g):
    """Segment ids [B, S] -> (per q row [n, S_pad * G], per key [n, S_pad]); padding -1."""
    segp = _pad_seq(seg.astype(jnp.int32), seq_pad, -1)
    b = segp.shape[0]
    rows = jnp.broadcast_to(segp[:, None, :, None], (b, kvh, seq_pad, g))
    keys = jnp.broadcast_to(segp[:, None, :], (b, kvh, seq_pad))
    return rows.reshape(b * kvh, seq_pad * g), keys.reshape(b * kvh, seq_pad)


def _mask(q_pos, k_pos, q_seg, k_seg, *, causal, kv_len, seq_pad):
    """Mask broadcastable to a [n, rows, bk] score tile, or None. q_pos [rows] and k_pos [bk]
    positions; q_seg [n, rows] and k_seg [n, bk] segment ids or None."""
    mask = position_mask(q_pos, k_pos, causal=causal, kv_len=kv_len, seq_pad=seq_pad)
    if mask is not None:
        mask = mask[None]
    if q_seg is not None:
        m = q_seg[:, :, None] == k_seg[:, None, :]
        mask = m if mask is None else mask & m
    return mask


def _layout(q, k, v, seg, cfg: _Cfg):
    """Shared set-up of both passes: padded length, q rows pre-scaled by the softmax scale,
    k and v per kv head, segment ids in both layouts, and each row's position in a q tile."""
    b, s, h, _ = q.shape
    kvh = k.shape[2]
    g = h // kvh
    step = _lcm(cfg.bq, cfg.bk)
    seq_pad = _cdiv(s, step) * step
    qr = _to_rows(q * jnp.asarray(cfg.sm_scale, q.dtype), seq_pad, kvh)
    seg_rows = seg_keys = None
    if seg is not None:
        seg_rows, seg_keys = _segments(seg, seq_pad, kvh, g)
    row_pos = jnp.arange(cfg.bq * g, dtype=jnp.int32) // g
    return seq_pad, qr, _to_kv(k, seq_pad), _to_kv(v, seq_pad), seg_rows, seg_keys, row_pos


def _forward(q, k, v, seg, cfg: _Cfg):
    """q [B, S, H, D] -> out [B, S, H, D] (q.dtype), lse [B * KV, S_pad * G] fp32 (rows)."""
    b, s, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    bq, bk = cfg.bq, cfg.bk
    n, rq = b * kvh, bq * g
    seq_pad, qr, kr, vr, seg_rows, seg_keys, row_pos = _layout(q, k, v, seg, cfg)
    nq, nk = seq_pad // bq, seq_pad // bk
    axes = _vma.union_axes(q, k, v, seg)

    def q_block(i):
        q_start = i * bq
        qi = lax.dynamic_slice_in_dim(qr, q_start * g, rq, axis=1)              # [n, rq, D]
        q_pos = q_start + row_pos
        q_seg = (None if seg_rows is None
                 else lax.dynamic_slice_in_dim(seg_rows, q_start * g, rq, axis=1))

        def body(j, carry, masked):
            acc, m_prev, l_prev = carry
            k_start = j.astype(jnp.int32) * bk  # fori_loop counters are int64 under x64
            kj = lax.dynamic_slice_in_dim(kr, k_start, bk, axis=1)               # [n, bk, D]
            vj = lax.dynamic_slice_in_dim(vr, k_start, bk, axis=1)
            sc = jnp.einsum("nrd,nsd->nrs", qi, kj, preferred_element_type=jnp.float32)
            k_pos = k_start + jnp.arange(bk, dtype=jnp.int32)
            k_seg = (None if seg_keys is None
                     else lax.dynamic_slice_in_dim(seg_keys, k_start, bk, axis=1))
            mask = _mask(q_pos, k_pos, q_seg, k_seg, causal=cfg.causal and masked,
                         kv_len=s if masked else seq_pad, seq_pad=seq_pad)
            if mask is not None:
                sc = jnp.where(mask, sc, MASK_VALUE)
            m_new = jnp.maximum(m_prev, jnp.max(sc, axis=-1))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.exp(sc - m_new[..., None])
            l_new = alpha * l_prev + jnp.sum(p, axis=-1)
            pv = jnp.einsum("nrs,nsd->nrd", p.astype(vj.dtype), vj,
                            preferred_element_type=jnp.float32)
            return acc * alpha[..., None] + pv, m_new, l_new

        full_kv = s // bk
        if cfg.causal:
            end = jnp.minimum(_cdiv(q_start + bq, bk), nk)
            unmasked_end = jnp.minimum((q_start + 1) // bk, full_kv)
        else:
            end, unmasked_end = nk, full_kv
        carry = (_vma.zeros((n, rq, d), jnp.float32, axes),
                 _vma.full((n, rq), MASK_VALUE, jnp.float32, axes),
                 _vma.zeros((n, rq), jnp.float32, axes))
        carry = lax.fori_loop(0, unmasked_end, functools.partial(body, masked=False), carry)
        acc, m, l = lax.fori_loop(unmasked_end, end, functools.partial(body, masked=True),
                                  carry)
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    outs, lses = lax.map(q_block, jnp.arange(nq, dtype=jnp.int32))   # [nq, n, rq, (D)]
    out = _from_rows(outs.transpose(1, 0, 2, 3).reshape(n, seq_pad * g, d), b, seq_pad, s)
    return out, lses.transpose(1, 0, 2).reshape(n, seq_pad * g)


def _backward(q, k, v, seg, out, lse, do, cfg: _Cfg):
    b, s, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    bq, bk = cfg.bq, cfg.bk
    n, rq = b * kvh, bq * g
    seq_pad, qr, kr, vr, seg_rows, seg_keys, row_pos = _layout(q, k, v, seg, cfg)
    nq, nk = seq_pad // bq, seq_pad // bk
    axes = _vma.union_axes(q, k, v, seg, do)
    # A batched dot, not sum(out * do, -1): XLA:CPU reduces a minor axis of 64 ~15x slower.
    delta = jnp.einsum("bshd,bshd->bsh", out.astype(jnp.float32), do.astype(jnp.float32))
    delta = _to_rows(delta, seq_pad, kvh)                                      # [n, S_pad*G]
    dor = _to_rows(do.astype(q.dtype), seq_pad, kvh)

    def k_block(dq, j):
        k_start = j * bk
        kj = lax.dynamic_slice_in_dim(kr, k_start, bk, axis=1)                   # [n, bk, D]
        vj = lax.dynamic_slice_in_dim(vr, k_start, bk, axis=1)
        k_pos = k_start + jnp.arange(bk, dtype=jnp.int32)
        k_seg = (None if seg_keys is None
                 else lax.dynamic_slice_in_dim(seg_keys, k_start, bk, axis=1))

        def body(i, carry, masked):
            dq, dk, dv = carry
            q_start = i.astype(jnp.int32) * bq  # fori_loop counters are int64 under x64
            r0 = q_start * g
            qi = lax.dynamic_slice_in_dim(qr, r0, rq, axis=1)                    # [n, rq, D]
            doi = lax.dynamic_slice_in_dim(dor, r0, rq, axis=1)
            lse_i = lax.dynamic_slice_in_dim(lse, r0, rq, axis=1)                # [n, rq]
            delta_i = lax.dynamic_slice_in_dim(delta, r0, rq, axis=1)
            # Transposed tiles [n, bk, rq]: dv and dk are then plain (untransposed) products.
            pt = jnp.exp(jnp.einsum("nsd,nrd->nsr", kj, qi, preferred_element_type=jnp.float32)
                         - lse_i[:, None, :])
            q_seg = None if seg_rows is None else lax.dynamic_slice_in_dim(seg_rows, r0, rq, 1)
            mask = _mask(q_start + row_pos, k_pos, q_seg, k_seg,
                         causal=cfg.causal and masked, kv_len=s if masked else seq_pad,
                         seq_pad=seq_pad)
            if mask is not None:
                pt = jnp.where(jnp.swapaxes(mask, -1, -2), pt, 0.0)
            dv = dv + jnp.einsum("nsr,nrd->nsd", pt.astype(doi.dtype), doi,
                                 preferred_element_type=jnp.float32)
            dpt = jnp.einsum("nsd,nrd->nsr", vj, doi, preferred_element_type=jnp.float32)
            dst = pt * (dpt - delta_i[:, None, :])
            dk = dk + jnp.einsum("nsr,nrd->nsd", dst.astype(qi.dtype), qi,
                                 preferred_element_type=jnp.float32)
            dq_i = jnp.einsum("nsr,nsd->nrd", dst.astype(kj.dtype), kj,
                              preferred_element_type=jnp.float32)
            dq = lax.dynamic_update_slice_in_dim(
                dq, lax.dynamic_slice_in_dim(dq, r0, rq, axis=1) + dq_i, r0, axis=1)
            return dq, dk, dv

        if cfg.causal:
            start = k_start // bq
            unmasked_start = jnp.minimum(_cdiv(k_start + bk - 1, bq), nq)
        else:
            start, unmasked_start = 0, 0
        if s < seq_pad:
            unmasked_start = jnp.where(k_start + bk > s, nq, unmasked_start)
        carry = (dq, _vma.zeros((n, bk, d), jnp.float32, axes),
                 _vma.zeros((n, bk, d), jnp.float32, axes))
        carry = lax.fori_loop(start, unmasked_start, functools.partial(body, masked=True), carry)
        dq, dk, dv = lax.fori_loop(unmasked_start, nq, functools.partial(body, masked=False),
                                   carry)
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))  # dk: q rows were pre-scaled

    dq0 = _vma.zeros((n, seq_pad * g, d), jnp.float32, axes)
    dq, (dks, dvs) = lax.scan(k_block, dq0, jnp.arange(nk, dtype=jnp.int32))
    dq = _from_rows(dq * cfg.sm_scale, b, seq_pad, s).astype(q.dtype)
    return dq, _from_kv(dks, b, s), _from_kv(dvs, b, s)


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


# ----------------------------------------------------------------------------- index-masked blocks
# Building blocks for context parallelism (ring_attention.py): one q block against one k block
# of another length, the causal mask taken from explicit global token indices, per-row lse
# out, and the backward from the *final* (merged) lse and delta. Not differentiable themselves:
# callers wrap them in their own custom_vjp.

INDEX_PAD_Q = -1                              # padded q rows see no key
INDEX_PAD_K = int(np.iinfo(np.int32).max)     # padded keys are seen by no query
_TILE_SKIP, _TILE_MASKED, _TILE_FULL = 0, 1, 2


def _tile_kind(q_idx, k_idx, has_seg: bool):
    """q_idx [B, bq], k_idx [B, bk] int32 -> which branch a (q tile, k tile) pair takes:
    skip (no key of the tile is visible to any row: min k > max q), full (every key visible to
    every row and no segment ids: max k <= min q) or masked."""
    skip = jnp.min(k_idx) > jnp.max(q_idx)
    if has_seg:
        return jnp.where(skip, _TILE_SKIP, _TILE_MASKED)
    full = jnp.max(k_idx) <= jnp.min(q_idx)
    return jnp.where(skip, _TILE_SKIP, jnp.where(full, _TILE_FULL, _TILE_MASKED))


def _opaque(n: int):
    """The trip count ``n`` as a traced int32: a ``fori_loop`` over it is a ``while`` loop,
    which autodiff never unrolls into a ``scan`` with per-iteration residuals."""
    return lax.optimization_barrier(jnp.int32(n))


def _index_mask(q_idx, k_idx, q_seg, k_seg):
    """[B, 1, 1, bq, bk]: key visible iff k_index <= q_index and (segments given) same segment."""
    mask = k_idx[:, None, :] <= q_idx[:, :, None]
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])
    return mask[:, None, None]


def _block_inputs(q, k, v, q_index, k_index, q_seg, k_seg, bq, bk):
    """Pad q-side arrays to a multiple of bq and k-side ones to a multiple of bk (padding
    indices as INDEX_PAD_Q / INDEX_PAD_K, so padding needs no extra mask)."""
    sq, sk = q.shape[1], k.shape[1]
    sq_pad, sk_pad = _cdiv(sq, bq) * bq, _cdiv(sk, bk) * bk
    qi = _pad_seq(q_index.astype(jnp.int32), sq_pad, INDEX_PAD_Q)
    ki = _pad_seq(k_index.astype(jnp.int32), sk_pad, INDEX_PAD_K)
    qs = None if q_seg is None else _pad_seq(q_seg.astype(jnp.int32), sq_pad, 0)
    ks = None if k_seg is None else _pad_seq(k_seg.astype(jnp.int32), sk_pad, 0)
    return (_pad_seq(q, sq_pad), _pad_seq(k, sk_pad), _pad_seq(v, sk_pad), qi, ki, qs, ks,
            sq_pad, sk_pad)


def forward_state(q, k, block_q=None):
    """Empty running state of :func:`forward_accumulate` for q [B, Sq, H, D] and k/v with KV
    heads: o [B, Sq_pad, KV, G, D] = 0 and lse [B, KV, G, Sq_pad] = MASK_VALUE, fp32 (Sq
    padded to a multiple of the q tile; q head h = (kv head h // G, h % G))."""
    b, sq, h, d = q.shape
    kvh = k.shape[2]
    bq = min(int(block_q or DEFAULT_BLOCK_Q), sq)
    sq_pad = _cdiv(sq, bq) * bq
    axes = _vma.union_axes(q, k)
    return (_vma.zeros((b, sq_pad, kvh, h // kvh, d), jnp.float32, axes),
            _vma.full((b, kvh, h // kvh, sq_pad), MASK_VALUE, jnp.float32, axes))


def forward_result(state, sq: int):
    """(out [B, Sq, H, D], lse [B, H, Sq]) fp32 from a running state: rows that saw no key
    have out 0 and lse MASK_VALUE."""
    o, lse = state
    b, sq_pad, kvh, g, d = o.shape
    return (o.reshape(b, sq_pad, kvh * g, d)[:, :sq],
            lse.reshape(b, kvh * g, sq_pad)[:, :, :sq])


def _forward_accumulate(q, k, v, q_index, k_index, q_seg, k_seg, state, cfg: _Cfg):
    """Fold one k block into the running softmax state of every q row: state (o, lse) of
    :func:`forward_state` -> the state over the old keys and this block's. The state's o is
    normalised, so (o, lse) restart the online softmax as (acc = o, m = lse, l = 1); the q-tile
    loop updates the state in place, tile by tile, so nothing [Sq]-sized is allocated per
    call. Both loops are while loops (opaque trip counts), which autodiff never turns into
    scans with per-tile residuals."""
    b, sq, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    bq, bk = cfg.bq, cfg.bk
    qp, kp, vp, qi, ki, qs, ks, sq_pad, sk_pad = _block_inputs(
        q, k, v, q_index, k_index, q_seg, k_seg, bq, bk)
    qg = qp.reshape(b, sq_pad, kvh, g, d)
    has_seg = qs is not None
    axes = _vma.union_axes(q, k, v, q_index, k_index, q_seg, k_seg, *state)
    state = tuple(_vma.pvary(x, axes) for x in state)

    def q_tile(i, state):
        o_all, lse_all = state
        q_start = i * bq
        q_t = lax.dynamic_slice_in_dim(qg, q_start, bq, axis=1)
        qi_t = lax.dynamic_slice_in_dim(qi, q_start, bq, axis=1)
        qs_t = None if qs is None else lax.dynamic_slice_in_dim(qs, q_start, bq, axis=1)

        def tile(carry, k_t, v_t, ki_t, ks_t, masked):
            acc, m_prev, l_prev = carry
            sc = jnp.einsum("bqkgd,bskd->bkgqs", q_t, k_t,
                            preferred_element_type=jnp.float32) * cfg.sm_scale
            mask = _index_mask(qi_t, ki_t, qs_t, ks_t) if masked else None
            if mask is not None:
                sc = jnp.where(mask, sc, MASK_VALUE)
            m_new = jnp.maximum(m_prev, jnp.max(sc, axis=-1))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.exp(sc - m_new[..., None])
            if mask is not None:  # a row with nothing visible yet must not count masked keys
                p = jnp.where(mask, p, 0.0)
            l_new = alpha * l_prev + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_t.dtype), v_t,
                            preferred_element_type=jnp.float32)
            return acc * alpha[..., None] + pv, m_new, l_new

        def body(j, carry):
            k_start = j * bk
            k_t = lax.dynamic_slice_in_dim(kp, k_start, bk, axis=1)
            v_t = lax.dynamic_slice_in_dim(vp, k_start, bk, axis=1)
            ki_t = lax.dynamic_slice_in_dim(ki, k_start, bk, axis=1)
            ks_t = None if ks is None else lax.dynamic_slice_in_dim(ks, k_start, bk, axis=1)
            branches = [lambda c: c,
                        lambda c: tile(c, k_t, v_t, ki_t, ks_t, masked=True),
                        lambda c: tile(c, k_t, v_t, ki_t, ks_t, masked=False)]
            return lax.switch(_tile_kind(qi_t, ki_t, has_seg), branches, carry)

        o_t = lax.dynamic_slice_in_dim(o_all, q_start, bq, axis=1)          # [B, bq, KV, G, D]
        m_t = lax.dynamic_slice_in_dim(lse_all, q_start, bq, axis=3)        # [B, KV, G, bq]
        carry = (o_t.transpose(0, 2, 3, 1, 4), m_t, _vma.full(m_t.shape, 1.0, jnp.float32, axes))
        acc, m, l = lax.fori_loop(0, _opaque(sk_pad // bk), body, carry)
        o_t = (acc / l[..., None]).transpose(0, 3, 1, 2, 4)
        lse_t = m + jnp.log(l)             # rows that saw nothing: m = MASK_VALUE, l = 1
        return (lax.dynamic_update_slice_in_dim(o_all, o_t, q_start, axis=1),
                lax.dynamic_update_slice_in_dim(lse_all, lse_t, q_start, axis=3))

    return lax.fori_loop(0, _opaque(sq_pad // bq), q_tile, state)


def backward_state(q, k, block_q=None):
    """Zero dq accumulator of :func:`backward_accumulate`: [B, Sq_pad, KV, G, D] fp32,
    unscaled (the softmax scale is applied once, by :func:`backward_result`)."""
    return forward_state(q, k, block_q)[0]


def backward_result(dq_acc, sq: int, sm_scale: float):
    """dq [B, Sq, H, D] fp32 from a dq accumulator."""
    b, sq_pad, kvh, g, d = dq_acc.shape
    return (dq_acc * sm_scale).reshape(b, sq_pad, kvh * g, d)[:, :sq]


def _backward_accumulate(q, k, v, q_index, k_index, q_seg, k_seg, do, lse, delta, dq_acc,
                         cfg: _Cfg):
    """Gradients of one (q block, k block) pair given the final lse and delta [B, H, Sq] of
    every q row (over *all* keys the rows attend to): dq_acc (of :func:`backward_state`) plus
    this block's unscaled dq, and the block's dk, dv [B, Sk, KV, D], all fp32."""
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    bq, bk = cfg.bq, cfg.bk
    axes = _vma.union_axes(q, k, v, q_index, k_index, q_seg, k_seg, do, lse, delta, dq_acc)
    dq_acc = _vma.pvary(dq_acc, axes)
    qp, kp, vp, qi, ki, qs, ks, sq_pad, sk_pad = _block_inputs(
        q, k, v, q_index, k_index, q_seg, k_seg, bq, bk)
    qg = qp.reshape(b, sq_pad, kvh, g, d)
    dog = _pad_seq(do.astype(q.dtype), sq_pad).reshape(b, sq_pad, kvh, g, d)
    # Padded rows: lse 0 keeps exp() finite; their mask is empty anyway.
    lse_p = jnp.pad(lse, ((0, 0), (0, 0), (0, sq_pad - sq))).reshape(b, kvh, g, sq_pad)
    delta_p = jnp.pad(delta, ((0, 0), (0, 0), (0, sq_pad - sq))).reshape(b, kvh, g, sq_pad)
    has_seg = qs is not None

    def k_block(dq, j):
        k_start = j * bk
        k_t = lax.dynamic_slice_in_dim(kp, k_start, bk, axis=1)
        v_t = lax.dynamic_slice_in_dim(vp, k_start, bk, axis=1)
        ki_t = lax.dynamic_slice_in_dim(ki, k_start, bk, axis=1)
        ks_t = None if ks is None else lax.dynamic_slice_in_dim(ks, k_start, bk, axis=1)

        def tile(carry, i, masked):
            dk, dv, _ = carry
            q_start = i * bq
            q_t = lax.dynamic_slice_in_dim(qg, q_start, bq, axis=1)
            do_t = lax.dynamic_slice_in_dim(dog, q_start, bq, axis=1)
            lse_t = lax.dynamic_slice_in_dim(lse_p, q_start, bq, axis=3)
            delta_t = lax.dynamic_slice_in_dim(delta_p, q_start, bq, axis=3)
            qi_t = lax.dynamic_slice_in_dim(qi, q_start, bq, axis=1)
            qs_t = None if qs is None else lax.dynamic_slice_in_dim(qs, q_start, bq, axis=1)
            sc = jnp.einsum("bqkgd,bskd->bkgqs", q_t, k_t,
                            preferred_element_type=jnp.float32) * cfg.sm_scale
            p = jnp.exp(sc - lse_t[..., None])
            if masked:
                p = jnp.where(_index_mask(qi_t, ki_t, qs_t, ks_t), p, 0.0)
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do_t.dtype), do_t,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", do_t, v_t, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_t[..., None])
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(q_t.dtype), q_t,
                                 preferred_element_type=jnp.float32)
            dq_t = jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(k_t.dtype), k_t,
                              preferred_element_type=jnp.float32)
            return dk, dv, dq_t

        def body(i, carry):
            # The switch carries only tile-sized values (dk, dv of this k tile, one dq tile):
            # the full dq accumulator stays out of the conditional.
            dq, dk, dv = carry
            q_start = i * bq
            qi_t = lax.dynamic_slice_in_dim(qi, q_start, bq, axis=1)
            dq_zero = _vma.zeros((b, bq, kvh, g, d), jnp.float32, axes)
            branches = [lambda c: c,
                        lambda c: tile(c, i, masked=True),
                        lambda c: tile(c, i, masked=False)]
            dk, dv, dq_t = lax.switch(_tile_kind(qi_t, ki_t, has_seg), branches,
                                      (dk, dv, dq_zero))
            dq = lax.dynamic_update_slice_in_dim(
                dq, lax.dynamic_slice_in_dim(dq, q_start, bq, axis=1) + dq_t, q_start, axis=1)
            return dq, dk, dv

        carry = (dq, _vma.zeros((b, bk, kvh, d), jnp.float32, axes),
                 _vma.zeros((b, bk, kvh, d), jnp.float32, axes))
        dq, dk, dv = lax.fori_loop(0, sq_pad // bq, body, carry)
        return dq, (dk * cfg.sm_scale, dv)

    dq, (dks, dvs) = lax.scan(k_block, dq_acc, jnp.arange(sk_pad // bk, dtype=jnp.int32))
    dk = dks.transpose(1, 0, 2, 3, 4).reshape(b, sk_pad, kvh, d)[:, :sk]
    dv = dvs.transpose(1, 0, 2, 3, 4).reshape(b, sk_pad, kvh, d)[:, :sk]
    return dq, dk, dv


def _indexed_cfg(q, k, block_q, block_k, sm_scale):
    sq, sk, d = q.shape[1], k.shape[1], q.shape[3]
    bq = min(int(block_q or DEFAULT_BLOCK_Q), sq)
    bk = min(int(block_k or DEFAULT_BLOCK_K), sk)
    if bq <= 0 or bk <= 0:
        raise ValueError(f"block sizes must be positive, got block_q={block_q} block_k={block_k}")
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    return _Cfg(causal=True, sm_scale=scale, bq=bq, bk=bk)


def blockwise_block_fwd(q, k, v, *, q_index, k_index, q_segment_ids=None,
                        kv_segment_ids=None, block_q=None, block_k=None, sm_scale=None):
    """Attention of a q block against a k block, masked by global token indices; with lse.

    q [B, Sq, H, D]; k, v [B, Sk, KV, D] (Sq and Sk may differ); q_index [B, Sq] and
    k_index [B, Sk] int (global token positions, 0 <= index < 2**31 - 1): key visible iff
    k_index <= q_index and, with segment ids ([B, Sq] / [B, Sk] int), the segments match.
    Returns out [B, Sq, H, D] fp32 (normalised over this block's keys) and lse [B, H, Sq] fp32;
    rows with no visible key get out 0 and lse MASK_VALUE. Tile pairs with no visible key are
    skipped (min k_index > max q_index per tile). Not differentiable: see
    :func:`blockwise_block_bwd` and ``ring_attention.py``.
    """
    cfg = _indexed_cfg(q, k, block_q, block_k, sm_scale)
    state = forward_accumulate(q, k, v, forward_state(q, k, cfg.bq), q_index=q_index,
                               k_index=k_index, q_segment_ids=q_segment_ids,
                               kv_segment_ids=kv_segment_ids, block_q=block_q,
                               block_k=block_k, sm_scale=sm_scale)
    return forward_result(state, q.shape[1])


def forward_accumulate(q, k, v, state, *, q_index, k_index, q_segment_ids=None,
                       kv_segment_ids=None, block_q=None, block_k=None, sm_scale=None):
    """:func:`blockwise_block_fwd` folded into a running state (``forward_state``; read it
    with ``forward_result``): the state after this k block's keys are added. Lets ring
    attention merge its blocks in place, with no per-block [Sq]-sized output or merge."""
    cfg = _indexed_cfg(q, k, block_q, block_k, sm_scale)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    return _forward_accumulate(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids, state,
                               cfg)


def blockwise_block_bwd(q, k, v, do, lse, delta, *, q_index, k_index, q_segment_ids=None,
                        kv_segment_ids=None, block_q=None, block_k=None, sm_scale=None):
    """Backward of :func:`blockwise_block_fwd` for results merged over several k blocks.

    do [B, Sq, H, D] the output cotangent; lse [B, H, Sq] the *merged* log-sum-exp of each
    row over every key block it attends to; delta [B, H, Sq] = sum_d(out * do) with the merged
    output. Returns this k block's share: dq [B, Sq, H, D], dk and dv [B, Sk, KV, D], fp32.
    """
    cfg = _indexed_cfg(q, k, block_q, block_k, sm_scale)
    dq, dk, dv = backward_accumulate(
        q, k, v, do, lse, delta, backward_state(q, k, cfg.bq), q_index=q_index,
        k_index=k_index, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        block_q=block_q, block_k=block_k, sm_scale=sm_scale)
    return backward_result(dq, q.shape[1], cfg.sm_scale), dk, dv


def backward_accumulate(q, k, v, do, lse, delta, dq_acc, *, q_index, k_index,
                        q_segment_ids=None, kv_segment_ids=None, block_q=None, block_k=None,
                        sm_scale=None):
    """:func:`blockwise_block_bwd` with dq added into ``dq_acc`` (``backward_state``; read it
    with ``backward_result``). Returns (dq_acc, dk, dv)."""
    cfg = _indexed_cfg(q, k, block_q, block_k, sm_scale)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    return _backward_accumulate(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids, do,
                                lse.astype(jnp.float32), delta.astype(jnp.float32), dq_acc,
                                cfg)
