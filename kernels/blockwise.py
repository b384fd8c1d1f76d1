"""Pure-JAX blockwise attention with O(S) memory (CPU path and portable fallback).

One forward and one backward, written once, with two mask providers (``_masks.Masking``):

* :func:`blockwise_attention` -- same contract as ``reference_attention``: positions, causal
  by position, padded keys masked; key tiles entirely above the diagonal are skipped
  (dynamic loop bounds), tiles entirely below it are not masked.
* the index-masked blocks of context parallelism (``ring_attention.py``):
  :func:`blockwise_block_fwd` / :func:`forward_accumulate` and :func:`blockwise_block_bwd` /
  :func:`backward_accumulate` -- a q block against a k block of another length, the causal
  mask from explicit global token indices, and the backward from the final (merged) lse and
  delta. Every tile pair branches three ways: skipped (no key visible), full or masked.

The forward loops over q tiles and, inside, over key tiles with an online softmax in fp32
(FlashAttention-2 in plain XLA), folding the keys into a running state (the normalised output
and the lse per row, updated in place): for ``blockwise_attention`` it starts empty, ring
attention carries it from block to block. The backward (``jax.custom_vjp`` for
``blockwise_attention``) scans over key tiles, loops over q tiles, recomputes the
probabilities from the lse and accumulates dq in an fp32 carry, so neither pass ever holds
more than one score tile: the compiled train step's temporary memory grows linearly in S.
The forward's loops are while loops (opaque trip counts), which autodiff never turns into
scans with per-tile residuals.

Layout: every tile product is a plain batched matmul over n = B * KV. q is laid out as "rows"
[n, S * G, D] (row = position * G + group: the G query heads that share a kv head sit in the
rows of one matmul, so GQA repeats nothing) and k, v as [n, S, D]. The forward's score tile
is [n, bq * G, bk] (softmax along the minor axis); the backward works on its transpose
[n, bk, bq * G], which makes the dv and dk products untransposed. q is scaled by the softmax
scale once, up front. On XLA:CPU this layout runs the tile matmuls without the per-tile
transposing copies that a [B, S, H, D] einsum needs (measured in docs/benchmarks.md, issue 17).
States are kept as [B, KV, S_pad, G, ...], which is the rows layout reshaped.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from . import _vma
from ._custom_vjp import attention_inputs, attention_with_saved_lse
from ._masks import (MASK_VALUE, Masking, pad_block_ids, pad_ids, pad_seq, round_up, tile_kind,
                     visit_tiles)

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


def _cfg(causal, sq, sk, d, block_q, block_k, sm_scale) -> _Cfg:
    bq = min(int(block_q or DEFAULT_BLOCK_Q), sq)
    bk = min(int(block_k or DEFAULT_BLOCK_K), sk)
    if bq <= 0 or bk <= 0:
        raise ValueError(f"block sizes must be positive, got block_q={block_q} block_k={block_k}")
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    return _Cfg(causal=bool(causal), sm_scale=scale, bq=bq, bk=bk)


def _opaque(n: int):
    """The trip count ``n`` as a traced int32: a ``fori_loop`` over it is a ``while`` loop,
    which autodiff never unrolls into a ``scan`` with per-iteration residuals."""
    return lax.optimization_barrier(jnp.int32(n))


def _slice(x, start, size):
    return None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis=1)


# ----------------------------------------------------------------------------- layout

def _to_rows(x, seq_pad, kvh):
    """[B, S, H, ...] -> [B * KV, S_pad * G, ...]: row = position * G + group (q head
    h = kv head h // G, group h % G)."""
    b, s, h = x.shape[:3]
    g = h // kvh
    x = pad_seq(x, seq_pad).reshape(b, seq_pad, kvh, g, *x.shape[3:])
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
    return pad_seq(x, seq_pad).transpose(0, 2, 1, 3).reshape(b * kvh, seq_pad, d)


def _from_kv(blocks, b, s):
    """Stacked per-tile results [nk, B * KV, bk, D] -> [B, S, KV, D]."""
    nk, n, bk, d = blocks.shape
    x = blocks.transpose(1, 0, 2, 3).reshape(b, n // b, nk * bk, d)
    return x.transpose(0, 2, 1, 3)[:, :s]


def _id_rows(ids, kvh, g):
    """Padded ids [B, S_pad] (indices or segment ids) -> per q row [n, S_pad * G]; None stays
    None."""
    if ids is None:
        return None
    b, s = ids.shape
    return jnp.broadcast_to(ids[:, None, :, None], (b, kvh, s, g)).reshape(b * kvh, s * g)


def _id_keys(ids, kvh):
    """Padded ids [B, S_pad] -> per key [n, S_pad]; None stays None."""
    if ids is None:
        return None
    b, s = ids.shape
    return jnp.broadcast_to(ids[:, None, :], (b, kvh, s)).reshape(b * kvh, s)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """One call's operands in the rows layout: q rows pre-scaled [n, Sq_pad * G, D], k and v
    [n, Sk_pad, D], ids (q index rows, k index keys, q segment rows, k segment keys; None
    where absent) and the mask provider."""
    qr: object
    kr: object
    vr: object
    ids: tuple
    m: Masking
    g: int


def _positions_layout(q, k, v, seg, cfg: _Cfg):
    """Position masking: one padded length (a multiple of both tiles), segment ids padded
    with -1, keys >= S masked."""
    b, s, h, _ = q.shape
    kvh = k.shape[2]
    g = h // kvh
    seq_pad = round_up(s, _lcm(cfg.bq, cfg.bk))
    segp = pad_ids(seg, seq_pad)
    m = Masking(indexed=False, has_seg=seg is not None, causal=cfg.causal, kv_len=s,
                seq_pad=seq_pad)
    return _Layout(_to_rows(q * jnp.asarray(cfg.sm_scale, q.dtype), seq_pad, kvh),
                   _to_kv(k, seq_pad), _to_kv(v, seq_pad),
                   (None, None, _id_rows(segp, kvh, g), _id_keys(segp, kvh)), m, g)


def _index_layout(q, k, v, q_index, k_index, q_seg, k_seg, cfg: _Cfg):
    """Index masking: q side padded to a multiple of bq, k side of bk, indices padded so that
    padding is never visible."""
    sq_pad, sk_pad = round_up(q.shape[1], cfg.bq), round_up(k.shape[1], cfg.bk)
    kvh = k.shape[2]
    g = q.shape[2] // kvh
    qi, ki, qs, ks = pad_block_ids(q_index, k_index, q_seg, k_seg, sq_pad, sk_pad)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    return _Layout(_to_rows(q * jnp.asarray(cfg.sm_scale, q.dtype), sq_pad, kvh),
                   _to_kv(k, sk_pad), _to_kv(v, sk_pad),
                   (_id_rows(qi, kvh, g), _id_keys(ki, kvh), _id_rows(qs, kvh, g),
                    _id_keys(ks, kvh)), Masking(indexed=True, has_seg=qs is not None), g)


def _q_tile(lay: _Layout, q_start, bq):
    """(first row, positions [rq] or indices [n, rq], segment ids [n, rq] or None) of the q
    tile at q_start."""
    r0, rq = q_start * lay.g, bq * lay.g
    pos = (_slice(lay.ids[0], r0, rq) if lay.m.indexed
           else q_start + jnp.arange(rq, dtype=jnp.int32) // lay.g)
    return r0, pos, _slice(lay.ids[2], r0, rq)


def _k_positions(lay: _Layout, k_start, bk):
    if lay.m.indexed:
        return _slice(lay.ids[1], k_start, bk)
    return k_start + jnp.arange(bk, dtype=jnp.int32)


# ----------------------------------------------------------------------------- forward

def _fold_forward(lay: _Layout, o, lse, cfg: _Cfg, axes):
    """Fold the keys of ``lay`` into the running state of every q row: o [n, Sq_pad * G, D]
    (normalised; fp32, or q's dtype when the state starts empty and is read once) and lse
    [n, Sq_pad * G] fp32, updated in place tile by tile. (o, lse) restart
    the online softmax as (acc = o, m = lse, l = 1); an empty state is (0, MASK_VALUE)."""
    bq, bk, m = cfg.bq, cfg.bk, lay.m
    nq, nk = lay.qr.shape[1] // (bq * lay.g), lay.kr.shape[1] // bk

    def q_tile(i, state):
        o_all, lse_all = state
        q_start = i.astype(jnp.int32) * bq
        r0, q_pos, q_seg = _q_tile(lay, q_start, bq)
        rq = bq * lay.g
        qi = _slice(lay.qr, r0, rq)                                            # [n, rq, D]

        def tile(k_start, k_pos, carry, masked):
            acc, m_prev, l_prev = carry
            kj, vj = _slice(lay.kr, k_start, bk), _slice(lay.vr, k_start, bk)  # [n, bk, D]
            sc = jnp.einsum("nrd,nsd->nrs", qi, kj, preferred_element_type=jnp.float32)
            mask = m.mask(q_pos, k_pos, q_seg, _slice(lay.ids[3], k_start, bk), masked=masked)
            if mask is not None:
                sc = jnp.where(mask, sc, MASK_VALUE)
            m_new = jnp.maximum(m_prev, jnp.max(sc, axis=-1))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.exp(sc - m_new[..., None])
            if m.indexed and mask is not None:  # a row with nothing visible yet must not
                p = jnp.where(mask, p, 0.0)     # count masked keys
            l_new = alpha * l_prev + jnp.sum(p, axis=-1)
            pv = jnp.einsum("nrs,nsd->nrd", p.astype(vj.dtype), vj,
                            preferred_element_type=jnp.float32)
            return acc * alpha[..., None] + pv, m_new, l_new

        def locate(j):
            k_start = j.astype(jnp.int32) * bk  # fori_loop counters are int64 under x64
            return k_start, _k_positions(lay, k_start, bk)

        m_t = _slice(lse_all, r0, rq)
        carry = (_slice(o_all, r0, rq).astype(jnp.float32), m_t,
                 _vma.full(m_t.shape, 1.0, jnp.float32, axes))
        acc, mx, l = visit_tiles(tile, carry, n=_opaque(nk) if m.indexed else nk, locate=locate,
                                 **m.key_visits(q_start, q_pos, bq, bk, nk))
        # rows that saw nothing: m = MASK_VALUE, l = 1
        o_t = (acc / l[..., None]).astype(o_all.dtype)
        return (lax.dynamic_update_slice_in_dim(o_all, o_t, r0, axis=1),
                lax.dynamic_update_slice_in_dim(lse_all, mx + jnp.log(l), r0, axis=1))

    return lax.fori_loop(0, _opaque(nq), q_tile, (o, lse))


def _forward(q, k, v, seg, cfg: _Cfg):
    """q [B, S, H, D] -> out [B, S, H, D] (q.dtype), lse [B * KV, S_pad * G] fp32 (rows)."""
    b, s, h, d = q.shape
    lay = _positions_layout(q, k, v, seg, cfg)
    axes = _vma.union_axes(q, k, v, seg)
    o, lse = _fold_forward(lay, _vma.zeros(lay.qr.shape, q.dtype, axes),
                           _vma.full(lay.qr.shape[:2], MASK_VALUE, jnp.float32, axes), cfg, axes)
    return _from_rows(o, b, lay.m.seq_pad, s), lse


# ----------------------------------------------------------------------------- backward

def _backward_rows(lay: _Layout, dor, lse, delta, dq, cfg: _Cfg, axes, dkv_dtypes):
    """Gradients of the keys of ``lay`` given every q row's final lse and delta [n, Sq_pad * G]
    and the output cotangent rows dor: dq (rows, fp32, unscaled: q was pre-scaled) plus this
    call's share, and dk, dv [nk, n, bk, D] per key tile in ``dkv_dtypes``."""
    bq, bk, m, g = cfg.bq, cfg.bk, lay.m, lay.g
    n, rq, d = lay.kr.shape[0], bq * g, lay.qr.shape[-1]
    nq, nk = lay.qr.shape[1] // rq, lay.kr.shape[1] // bk

    def k_tile(dq, j):
        k_start = j * bk
        kj, vj = _slice(lay.kr, k_start, bk), _slice(lay.vr, k_start, bk)      # [n, bk, D]
        k_pos = _k_positions(lay, k_start, bk)
        k_seg = _slice(lay.ids[3], k_start, bk)

        def tile(q_start, q_pos, carry, masked):
            dk, dv, _ = carry
            r0, _, q_seg = _q_tile(lay, q_start, bq)
            qi, doi = _slice(lay.qr, r0, rq), _slice(dor, r0, rq)              # [n, rq, D]
            lse_i, delta_i = _slice(lse, r0, rq), _slice(delta, r0, rq)        # [n, rq]
            # Transposed tiles [n, bk, rq]: dv and dk are then plain (untransposed) products.
            pt = jnp.exp(jnp.einsum("nsd,nrd->nsr", kj, qi, preferred_element_type=jnp.float32)
                         - lse_i[:, None, :])
            mask = m.mask(q_pos, k_pos, q_seg, k_seg, masked=masked)
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
            return dk, dv, dq_i

        def locate(i):
            q_start = i.astype(jnp.int32) * bq  # fori_loop counters are int64 under x64
            return q_start, _q_tile(lay, q_start, bq)[1]

        def split(q_start, carry):
            # Only tile-sized values (dk, dv of this k tile, one dq tile) go through the tile
            # (and the branch): the full dq accumulator stays out of the conditional.
            dq, dk, dv = carry
            r0 = q_start * g

            def join(inner):
                dk, dv, dq_i = inner
                return (lax.dynamic_update_slice_in_dim(dq, _slice(dq, r0, rq) + dq_i, r0,
                                                        axis=1), dk, dv)
            return (dk, dv, _vma.zeros((n, rq, d), jnp.float32, axes)), join

        carry = (dq, _vma.zeros((n, bk, d), jnp.float32, axes),
                 _vma.zeros((n, bk, d), jnp.float32, axes))
        dq, dk, dv = visit_tiles(tile, carry, n=nq, locate=locate, split=split,
                                 **m.query_visits(k_start, k_pos, bq, bk, nq))
        return dq, (dk.astype(dkv_dtypes[0]), dv.astype(dkv_dtypes[1]))  # q was pre-scaled

    dq, (dks, dvs) = lax.scan(k_tile, dq, jnp.arange(nk, dtype=jnp.int32))
    return dq, dks, dvs


def _backward(q, k, v, seg, out, lse, do, cfg: _Cfg):
    b, s, h, d = q.shape
    lay = _positions_layout(q, k, v, seg, cfg)
    seq_pad, kvh = lay.m.seq_pad, k.shape[2]
    axes = _vma.union_axes(q, k, v, seg, do)
    # A batched dot, not sum(out * do, -1): XLA:CPU reduces a minor axis of 64 ~15x slower.
    delta = jnp.einsum("bshd,bshd->bsh", out.astype(jnp.float32), do.astype(jnp.float32))
    dq, dks, dvs = _backward_rows(lay, _to_rows(do.astype(q.dtype), seq_pad, kvh), lse,
                                  _to_rows(delta, seq_pad, kvh),
                                  _vma.zeros(lay.qr.shape, jnp.float32, axes), cfg, axes,
                                  (k.dtype, v.dtype))
    dq = _from_rows(dq * cfg.sm_scale, b, seq_pad, s).astype(q.dtype)
    return dq, _from_kv(dks, b, s), _from_kv(dvs, b, s)


_blockwise = attention_with_saved_lse(_forward, _backward)


def blockwise_attention(q, k, v, *, causal=True, segment_ids=None, block_q=None, block_k=None,
                        sm_scale=None):
    """O(S)-memory attention in plain JAX; same contract as ``reference_attention``.

    block_q / block_k: tile sizes (default 512; shrunk to S when S is smaller). Any positive
    ints work; the sequence is padded to a multiple of both.
    """
    q, k, v, segment_ids = attention_inputs(q, k, v, segment_ids)
    cfg = _cfg(causal, q.shape[1], q.shape[1], q.shape[3], block_q, block_k, sm_scale)
    return _blockwise(q, k, v, segment_ids, cfg)


# ----------------------------------------------------------------------------- index-masked blocks
# Building blocks for context parallelism (ring_attention.py): one q block against one k block
# of another length, the causal mask taken from explicit global token indices, per-row lse
# out, and the backward from the *final* (merged) lse and delta. Not differentiable themselves:
# callers wrap them in their own custom_vjp. Their states are [B, KV, Sq_pad, G, ...] (the rows
# layout, reshaped), Sq padded to a multiple of the q tile.

def _tile_kind(q_idx, k_idx, has_seg: bool):
    """q_idx [B, bq], k_idx [B, bk] int32 -> the tile kind of a (q tile, k tile) pair across
    the batch (``_masks.tile_kind``)."""
    return tile_kind(jnp.min(q_idx), jnp.max(q_idx), k_idx, has_seg)


def forward_state(q, k, block_q=None):
    """Empty running state of :func:`forward_accumulate` for q [B, Sq, H, D] and k/v with KV
    heads: o [B, KV, Sq_pad, G, D] = 0 and lse [B, KV, Sq_pad, G] = MASK_VALUE, fp32."""
    b, sq, h, d = q.shape
    kvh = k.shape[2]
    sq_pad = round_up(sq, min(int(block_q or DEFAULT_BLOCK_Q), sq))
    axes = _vma.union_axes(q, k)
    return (_vma.zeros((b, kvh, sq_pad, h // kvh, d), jnp.float32, axes),
            _vma.full((b, kvh, sq_pad, h // kvh), MASK_VALUE, jnp.float32, axes))


def forward_result(state, sq: int):
    """(out [B, Sq, H, D], lse [B, H, Sq]) fp32 from a running state: rows that saw no key
    have out 0 and lse MASK_VALUE."""
    o, lse = state
    b, kvh, sq_pad, g, d = o.shape
    return (o.transpose(0, 2, 1, 3, 4).reshape(b, sq_pad, kvh * g, d)[:, :sq],
            lse.transpose(0, 1, 3, 2).reshape(b, kvh * g, sq_pad)[:, :, :sq])


def backward_state(q, k, block_q=None):
    """Zero dq accumulator of :func:`backward_accumulate`: [B, KV, Sq_pad, G, D] fp32,
    unscaled (the softmax scale is applied once, by :func:`backward_result`)."""
    return forward_state(q, k, block_q)[0]


def backward_result(dq_acc, sq: int, sm_scale: float):
    """dq [B, Sq, H, D] fp32 from a dq accumulator."""
    b, kvh, sq_pad, g, d = dq_acc.shape
    return (dq_acc * sm_scale).transpose(0, 2, 1, 3, 4).reshape(b, sq_pad, kvh * g, d)[:, :sq]


def _as_rows(x):
    """A state [B, KV, Sq_pad, G, ...] -> rows [B * KV, Sq_pad * G, ...] (a reshape)."""
    b, kvh, s, g = x.shape[:4]
    return x.reshape(b * kvh, s * g, *x.shape[4:])


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
    cfg = _cfg(True, q.shape[1], k.shape[1], q.shape[3], block_q, block_k, sm_scale)
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
    cfg = _cfg(True, q.shape[1], k.shape[1], q.shape[3], block_q, block_k, sm_scale)
    lay = _index_layout(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids, cfg)
    axes = _vma.union_axes(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids, *state)
    o, lse = (_vma.pvary(x, axes) for x in state)
    o_r, lse_r = _fold_forward(lay, _as_rows(o), _as_rows(lse), cfg, axes)
    return o_r.reshape(o.shape), lse_r.reshape(lse.shape)


def blockwise_block_bwd(q, k, v, do, lse, delta, *, q_index, k_index, q_segment_ids=None,
                        kv_segment_ids=None, block_q=None, block_k=None, sm_scale=None):
    """Backward of :func:`blockwise_block_fwd` for results merged over several k blocks.

    do [B, Sq, H, D] the output cotangent; lse [B, H, Sq] the *merged* log-sum-exp of each
    row over every key block it attends to; delta [B, H, Sq] = sum_d(out * do) with the merged
    output. Returns this k block's share: dq [B, Sq, H, D], dk and dv [B, Sk, KV, D], fp32.
    """
    cfg = _cfg(True, q.shape[1], k.shape[1], q.shape[3], block_q, block_k, sm_scale)
    dq, dk, dv = backward_accumulate(
        q, k, v, do, lse, delta, backward_state(q, k, cfg.bq), q_index=q_index,
        k_index=k_index, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        block_q=block_q, block_k=block_k, sm_scale=sm_scale)
    return backward_result(dq, q.shape[1], cfg.sm_scale), dk, dv


def backward_accumulate(q, k, v, do, lse, delta, dq_acc, *, q_index, k_index,
                        q_segment_ids=None, kv_segment_ids=None, block_q=None, block_k=None,
                        sm_scale=None):
    """:func:`blockwise_block_bwd` with dq added into ``dq_acc`` (``backward_state``; read it
    with ``backward_result``). Returns (dq_acc, dk, dv): the gradients of one (q block,
    k block) pair given the final lse and delta [B, H, Sq] of every q row (over *all* keys the
    rows attend to), all fp32."""
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    cfg = _cfg(True, sq, sk, d, block_q, block_k, sm_scale)
    axes = _vma.union_axes(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids, do, lse,
                           delta, dq_acc)
    lay = _index_layout(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids, cfg)
    sq_pad = dq_acc.shape[2]
    # Padded rows: lse 0 keeps exp() finite; their mask is empty anyway.
    rows = lambda x: _to_rows(x.astype(jnp.float32).transpose(0, 2, 1), sq_pad, kvh)  # noqa: E731
    dq, dks, dvs = _backward_rows(lay, _to_rows(do.astype(q.dtype), sq_pad, kvh), rows(lse),
                                  rows(delta), _as_rows(_vma.pvary(dq_acc, axes)), cfg, axes,
                                  (jnp.float32, jnp.float32))
    return dq.reshape(dq_acc.shape), _from_kv(dks, b, sk), _from_kv(dvs, b, sk)
