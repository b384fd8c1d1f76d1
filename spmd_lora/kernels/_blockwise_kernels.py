"""The forward and the backward of :mod:`.blockwise`, each written once, in the rows layout.

Every tile product is a plain batched matmul over n = B * KV. q is laid out as "rows"
[n, S * G, D] (row = position * G + group: the G query heads that share a kv head sit in the
rows of one matmul, so GQA repeats nothing) and k, v as [n, S, D]. The forward's score tile
is [n, bq * G, bk] (softmax along the minor axis); the backward works on its transpose
[n, bk, bq * G], which makes the dv and dk products untransposed. q is scaled by the softmax
scale once, up front. On XLA:CPU this layout runs the tile matmuls without the per-tile
transposing copies that a [B, S, H, D] einsum needs (measured in docs/benchmarks.md, issue 17).

What is masked and which tiles are visited comes from the call's ``_masks.Masking`` (held by
its :class:`Layout`): positions (iotas, loop bounds) or explicit token indices (laid out per
row like q and per key like k; a three-way branch per tile pair).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from . import _vma
from ._masks import MASK_VALUE, Masking, pad_block_ids, pad_ids, pad_seq, round_up, visit_tiles


@dataclasses.dataclass(frozen=True)
class Cfg:
    """Static config (the custom_vjp's nondiff argument): tiles bq / bk of any size."""
    causal: bool
    sm_scale: float
    bq: int
    bk: int


def _lcm(a, b):
    return a * b // math.gcd(a, b)


def _opaque(n: int):
    """The trip count ``n`` as a traced int32: a ``fori_loop`` over it is a ``while`` loop,
    which autodiff never unrolls into a ``scan`` with per-iteration residuals."""
    return lax.optimization_barrier(jnp.int32(n))


def _slice(x, start, size):
    return None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis=1)


# ----------------------------------------------------------------------------- layout

def to_rows(x, seq_pad, kvh):
    """[B, S, H, ...] -> [B * KV, S_pad * G, ...]: row = position * G + group (q head
    h = kv head h // G, group h % G)."""
    b, s, h = x.shape[:3]
    g = h // kvh
    x = pad_seq(x, seq_pad).reshape(b, seq_pad, kvh, g, *x.shape[3:])
    return jnp.moveaxis(x, 2, 1).reshape(b * kvh, seq_pad * g, *x.shape[4:])


def from_rows(x, b, seq_pad, s):
    """Inverse of :func:`to_rows`: [B * KV, S_pad * G, D] -> [B, S, H, D]."""
    n, r, d = x.shape
    kvh, g = n // b, r // seq_pad
    x = x.reshape(b, kvh, seq_pad, g, d).transpose(0, 2, 1, 3, 4)
    return x.reshape(b, seq_pad, kvh * g, d)[:, :s]


def _to_kv(x, seq_pad):
    """[B, S, KV, D] -> [B * KV, S_pad, D]."""
    b, _, kvh, d = x.shape
    return pad_seq(x, seq_pad).transpose(0, 2, 1, 3).reshape(b * kvh, seq_pad, d)


def from_kv(blocks, b, s):
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
class Layout:
    """One call's operands in the rows layout: q rows pre-scaled [n, Sq_pad * G, D], k and v
    [n, Sk_pad, D], ids (q index rows, k index keys, q segment rows, k segment keys; None
    where absent) and the mask provider."""
    qr: object
    kr: object
    vr: object
    ids: tuple
    m: Masking
    g: int


def positions_layout(q, k, v, seg, cfg: Cfg):
    """Position masking: one padded length (a multiple of both tiles), segment ids padded
    with -1, keys >= S masked."""
    b, s, h, _ = q.shape
    kvh = k.shape[2]
    g = h // kvh
    seq_pad = round_up(s, _lcm(cfg.bq, cfg.bk))
    segp = pad_ids(seg, seq_pad)
    m = Masking(indexed=False, has_seg=seg is not None, causal=cfg.causal, kv_len=s,
                seq_pad=seq_pad)
    return Layout(to_rows(q * jnp.asarray(cfg.sm_scale, q.dtype), seq_pad, kvh),
                  _to_kv(k, seq_pad), _to_kv(v, seq_pad),
                  (None, None, _id_rows(segp, kvh, g), _id_keys(segp, kvh)), m, g)


def index_layout(q, k, v, q_index, k_index, q_seg, k_seg, cfg: Cfg):
    """Index masking: q side padded to a multiple of bq, k side of bk, indices padded so that
    padding is never visible."""
    sq_pad, sk_pad = round_up(q.shape[1], cfg.bq), round_up(k.shape[1], cfg.bk)
    kvh = k.shape[2]
    g = q.shape[2] // kvh
    qi, ki, qs, ks = pad_block_ids(q_index, k_index, q_seg, k_seg, sq_pad, sk_pad)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    return Layout(to_rows(q * jnp.asarray(cfg.sm_scale, q.dtype), sq_pad, kvh),
                  _to_kv(k, sk_pad), _to_kv(v, sk_pad),
                  (_id_rows(qi, kvh, g), _id_keys(ki, kvh), _id_rows(qs, kvh, g),
                   _id_keys(ks, kvh)), Masking(indexed=True, has_seg=qs is not None), g)


def _q_tile(lay: Layout, q_start, bq):
    """(first row, positions [rq] or indices [n, rq], segment ids [n, rq] or None) of the q
    tile at q_start."""
    r0, rq = q_start * lay.g, bq * lay.g
    pos = (_slice(lay.ids[0], r0, rq) if lay.m.indexed
           else q_start + jnp.arange(rq, dtype=jnp.int32) // lay.g)
    return r0, pos, _slice(lay.ids[2], r0, rq)


def _k_positions(lay: Layout, k_start, bk):
    if lay.m.indexed:
        return _slice(lay.ids[1], k_start, bk)
    return k_start + jnp.arange(bk, dtype=jnp.int32)


# ----------------------------------------------------------------------------- forward

def fold_forward(lay: Layout, o, lse, cfg: Cfg, axes):
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


# ----------------------------------------------------------------------------- backward

def backward_rows(lay: Layout, dor, lse, delta, dq, cfg: Cfg, axes, dkv_dtypes):
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
