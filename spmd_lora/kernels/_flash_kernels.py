"""The Pallas kernels of :mod:`.flash_attention`: forward, dq and dk/dv, each written once.

Layout: q [B, S, H, D]; k, v [B, S, KV, D] (H a multiple of KV; q head h uses kv head
h // (H // KV), as in HF), already padded (sequence to the tiles, head dim to a power of two).

* forward, grid (q tiles, B, H): keeps a q tile resident, loops over key tiles with an online
  softmax in fp32, writes the output and the log-sum-exp (lse) per row;
* dq, grid (q tiles, B, H): recomputes the probabilities of one q tile from the lse and loops
  over key tiles;
* dk/dv, grid (k tiles, B, KV): keeps one k/v tile resident and loops over the q heads of its
  group and over q tiles, so GQA gradients are summed in the kernel and repeated kv heads are
  never materialised (the kv head is picked by the BlockSpec index_map from the q head).

What is masked, and which tiles are visited, comes from a ``_masks.Masking`` (the mask
provider: positions or explicit token indices; see :mod:`._masks`). With indices, the index
arrays [B, S_pad] int32 are two extra inputs after q, k, v (then the segment ids of both
sides), and the kernels load a tile's indices where they would otherwise build an iota of
positions; with positions, one row of segment ids serves both sides. A row masked by indices
may see no key at all (out 0, lse MASK_VALUE), so masked probabilities are zeroed before
they are summed.

Segment ids (packed sequences) mask every tile in both. Matmuls accumulate in fp32.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._masks import MASK_VALUE, Masking, visit_tiles


@dataclasses.dataclass(frozen=True)
class Cfg:
    """Static config of the kernels: ``BlockSizes`` clamped to the sequence, Triton launch
    parameters, interpret or compile."""
    causal: bool
    sm_scale: float
    bq: int
    bk: int
    bq_bwd: int
    bk_bwd: int
    interpret: bool
    num_warps: int | None
    num_stages: int
    num_warps_bwd: int | None
    num_stages_bwd: int


def _split_refs(m: Masking, refs):
    """The kernel's refs -> one fixed layout (q, k, v, q_index, k_index, q_seg, k_seg, *rest),
    None for the absent ones. Inputs: (q, k, v, *ids, *rest), ids as in :func:`_id_specs`."""
    (q, k, v), refs = refs[:3], refs[3:]
    qi = ki = qs = ks = None
    if m.indexed:
        (qi, ki), refs = refs[:2], refs[2:]
        if m.has_seg:
            (qs, ks), refs = refs[:2], refs[2:]
    elif m.has_seg:  # one sequence: one segment id row for both sides
        qs = ks = refs[0]
        refs = refs[1:]
    return (q, k, v, qi, ki, qs, ks, *refs)


def _positions(m: Masking, idx_ref, start, n, *, resident=False):
    """Positions (or token indices) of the n rows / keys from ``start``. ``resident``: the
    program's own tile (with indices, its index refs hold just that tile)."""
    if not m.indexed:
        return start + lax.broadcasted_iota(jnp.int32, (n,), 0)
    return idx_ref[...] if resident else idx_ref[pl.ds(start, n)]


def _segments(m: Masking, seg_ref, start, n, *, resident=False, masked=True):
    """Segment ids of the n rows / keys from ``start``, or None when the tile is not masked by
    them (no segment ids, or an unmasked tile of indices: see ``Masking.mask``)."""
    if not m.has_seg or (m.indexed and not masked):
        return None
    return seg_ref[...] if resident and m.indexed else seg_ref[pl.ds(start, n)]


def _segments_of(m: Masking, seg_ref, start, n, *, masked):
    """A loop tile's segment ids (:func:`_segments`) for the backward's mask, as a thunk:
    with positions loaded here, before the tile's products, with indices only where the
    mask is built (the orders that need the fewest registers, ``tools/kernel_report.py``)."""
    if m.indexed:
        return lambda: _segments(m, seg_ref, start, n, masked=masked)
    seg = _segments(m, seg_ref, start, n, masked=masked)
    return lambda: seg


def _visit(m: Masking, tile, carry, *, n: int, block: int, idx_ref, visits):
    """``_masks.visit_tiles`` over n tiles of ``block`` rows / keys."""
    def locate(j):
        start = pl.multiple_of(j.astype(jnp.int32) * block, block)  # int32 under x64
        return start, _positions(m, idx_ref, start, block)

    return visit_tiles(tile, carry, n=n, locate=locate, **visits)


def _compiler_params(num_warps, num_stages, head_dim, interpret):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu
    if num_warps is None:
        num_warps = 4 if head_dim <= 64 else 8
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _dot_nt(a, b):
    """a [m, d] @ b[n, d]^T -> [m, n] in fp32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a [m, n]^T @ b [m, d] -> [n, d] in fp32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _probs(q, k, lse, mask_of, cfg: Cfg):
    """Backward: the [bq, bk] softmax probabilities exp(q k^T * scale - lse), recomputed from
    the saved log-sum-exp and zeroed where ``mask_of()`` (the tile's mask or None) hides."""
    p = jnp.exp(_dot_nt(q, k) * cfg.sm_scale - lse[:, None])
    mask = mask_of()
    return p if mask is None else jnp.where(mask, p, 0.0)


# ----------------------------------------------------------------------------- kernels

def _fwd_kernel(*refs, cfg: Cfg, m: Masking):
    q_ref, k_ref, v_ref, qi_ref, ki_ref, qs_ref, ks_ref, o_ref, lse_ref = _split_refs(m, refs)
    bq, bk = cfg.bq, cfg.bk
    q_start = pl.program_id(0) * bq
    q = q_ref[...]
    q_pos = _positions(m, qi_ref, q_start, bq, resident=True)
    q_seg = _segments(m, qs_ref, q_start, bq, resident=True)

    def tile(k_start, k_pos, carry, masked):
        acc, m_prev, l_prev = carry
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot_nt(q, k) * cfg.sm_scale
        mask = m.mask(q_pos, k_pos, q_seg, _segments(m, ks_ref, k_start, bk, masked=masked),
                      masked=masked)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new[:, None])
        if m.indexed and mask is not None:  # a row with nothing visible yet must not count
            p = jnp.where(mask, p, 0.0)     # masked keys
        l_new = alpha * l_prev + jnp.sum(p, axis=1)
        return acc * alpha[:, None] + _dot(p.astype(v.dtype), v), m_new, l_new

    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    nk = k_ref.shape[0] // bk
    acc, mx, l = _visit(m, tile, carry, n=nk, block=bk, idx_ref=ki_ref,
                        visits=m.key_visits(q_start, q_pos, bq, bk, nk))
    if m.indexed:  # rows that saw no key: out 0, lse MASK_VALUE
        empty = l == 0.0
        l = jnp.where(empty, 1.0, l)
        lse = jnp.where(empty, MASK_VALUE, mx + jnp.log(l))
    else:  # l >= 1 for every row: the row maximum contributes exp(0)
        lse = mx + jnp.log(l)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(*refs, cfg: Cfg, m: Masking):
    (q_ref, k_ref, v_ref, qi_ref, ki_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
     dq_ref) = _split_refs(m, refs)
    bq, bk = cfg.bq_bwd, cfg.bk_bwd
    q_start = pl.program_id(0) * bq
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = _positions(m, qi_ref, q_start, bq, resident=True)
    q_seg = _segments(m, qs_ref, q_start, bq, resident=True)

    def tile(k_start, k_pos, dq, masked):
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        k_seg = _segments_of(m, ks_ref, k_start, bk, masked=masked)
        p = _probs(q, k, lse, lambda: m.mask(q_pos, k_pos, q_seg, k_seg(), masked=masked), cfg)
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    nk = k_ref.shape[0] // bk
    dq = _visit(m, tile, jnp.zeros(q.shape, jnp.float32), n=nk, block=bk, idx_ref=ki_ref,
                visits=m.key_visits(q_start, q_pos, bq, bk, nk))
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: Cfg, m: Masking, group: int):
    (q_ref, k_ref, v_ref, qi_ref, ki_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_ref,
     dv_ref) = _split_refs(m, refs)
    bq, bk = cfg.bq_bwd, cfg.bk_bwd
    k_start = pl.program_id(0) * bk
    k, v = k_ref[...], v_ref[...]
    k_pos = _positions(m, ki_ref, k_start, bk, resident=True)
    k_seg = _segments(m, ks_ref, k_start, bk, resident=True)

    def tile(q_start, q_pos, carry, masked, g):
        dk, dv = carry
        q = q_ref[pl.ds(q_start, bq), g, :]
        do = do_ref[pl.ds(q_start, bq), g, :]
        lse = lse_ref[g, pl.ds(q_start, bq)]
        delta = delta_ref[g, pl.ds(q_start, bq)]
        q_seg = _segments_of(m, qs_ref, q_start, bq, masked=masked)
        p = _probs(q, k, lse, lambda: m.mask(q_pos, k_pos, q_seg(), k_seg, masked=masked), cfg)
        dv = dv + _dot_tn(p.astype(do.dtype), do)
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dk + _dot_tn(ds.astype(q.dtype), q), dv

    nq = q_ref.shape[0] // bq
    visits = m.query_visits(k_start, k_pos, bq, bk, nq)

    def per_head(g, carry):
        return _visit(m, functools.partial(tile, g=g), carry, n=nq, block=bq, idx_ref=qi_ref,
                      visits=visits)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, group, per_head, carry)
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_calls

def _name(m: Masking, kernel: str) -> str:
    return f"spmd_lora_flash_{'block_' if m.indexed else ''}{kernel}"


def _id_specs(m: Masking, sq_pad, sk_pad, tile_q=None, tile_k=None):
    """BlockSpecs of the index / segment id inputs [B, S_pad] int32 for a grid (tile, B, head):
    with indices (q_index, k_index[, q_seg, k_seg]) the program's own tile (``tile_q`` or
    ``tile_k``) of its side and the whole row of the other; with positions one whole row of
    segment ids (both sides are the same sequence)."""
    if not m.indexed:
        return [pl.BlockSpec((None, sq_pad), lambda t, bi, hi: (bi, 0))] if m.has_seg else []
    q_spec, k_spec = (
        pl.BlockSpec((None, tile), lambda t, bi, hi: (bi, t)) if tile else
        pl.BlockSpec((None, full), lambda t, bi, hi: (bi, 0))
        for tile, full in ((tile_q, sq_pad), (tile_k, sk_pad)))
    return [q_spec, k_spec] * (2 if m.has_seg else 1)


def fwd_call(q, k, v, ids, cfg: Cfg, m: Masking, out_dtype):
    """Padded inputs -> (out [B, Sq_pad, H, D] in out_dtype, lse [B, H, Sq_pad] fp32). ``ids``:
    the index and segment id inputs of ``m``, in the order of :func:`_id_specs`."""
    b, sq_pad, h, d = q.shape
    sk_pad, kvh = k.shape[1], k.shape[2]
    group = h // kvh
    bq = cfg.bq
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, sk_pad, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
        pl.BlockSpec((None, sk_pad, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
        *_id_specs(m, sq_pad, sk_pad, tile_q=bq),
    ]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, m=m),
        grid=(sq_pad // bq, b, h),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, out_dtype),
                   jax.ShapeDtypeStruct((b, h, sq_pad), jnp.float32)],
        compiler_params=_compiler_params(cfg.num_warps, cfg.num_stages, d, cfg.interpret),
        interpret=cfg.interpret,
        name=_name(m, "fwd"),
    )(q, k, v, *ids)


def bwd_call(q, k, v, ids, do, lse, delta, cfg: Cfg, m: Masking, out_dtype):
    """Padded inputs, lse and delta [B, H, Sq_pad] fp32 -> (dq, dk, dv) in out_dtype (or in
    the input dtypes when None)."""
    b, sq_pad, h, d = q.shape
    sk_pad, kvh = k.shape[1], k.shape[2]
    group = h // kvh
    bq, bk = cfg.bq_bwd, cfg.bk_bwd
    cparams = _compiler_params(cfg.num_warps_bwd, cfg.num_stages_bwd, d, cfg.interpret)
    dtype = lambda x: x.dtype if out_dtype is None else out_dtype  # noqa: E731

    # dq: one program per (q tile, batch, q head)
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, sk_pad, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
        pl.BlockSpec((None, sk_pad, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
        *_id_specs(m, sq_pad, sk_pad, tile_q=bq),
        pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)),
        pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)),
    ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, m=m),
        grid=(sq_pad // bq, b, h),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, dtype(q)),
        compiler_params=cparams,
        interpret=cfg.interpret,
        name=_name(m, "dq"),
    )(q, k, v, *ids, do, lse, delta)

    # dk, dv: one program per (k tile, batch, kv head); loops over the group's q heads.
    in_specs = [
        pl.BlockSpec((None, sq_pad, group, d), lambda j, bi, ki: (bi, 0, ki, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, bi, ki: (bi, j, ki, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, bi, ki: (bi, j, ki, 0)),
        *_id_specs(m, sq_pad, sk_pad, tile_k=bk),
        pl.BlockSpec((None, sq_pad, group, d), lambda j, bi, ki: (bi, 0, ki, 0)),
        pl.BlockSpec((None, group, sq_pad), lambda j, bi, ki: (bi, ki, 0)),
        pl.BlockSpec((None, group, sq_pad), lambda j, bi, ki: (bi, ki, 0)),
    ]
    kv_spec = pl.BlockSpec((None, bk, None, d), lambda j, bi, ki: (bi, j, ki, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, m=m, group=group),
        grid=(sk_pad // bk, b, kvh),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, dtype(k)),
                   jax.ShapeDtypeStruct(v.shape, dtype(v))],
        compiler_params=cparams,
        interpret=cfg.interpret,
        name=_name(m, "dkv"),
    )(q, k, v, *ids, do, lse, delta)
    return dq, dk, dv
