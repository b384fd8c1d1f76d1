"""FlashAttention-2 style fused attention written in Pallas (Triton-style GPU API).

Layout: q [B, S, H, D]; k, v [B, S, KV, D] (H a multiple of KV; q head h uses kv head
h // (H // KV), as in HF). Three kernels:

* forward, grid (q blocks, B, H): keeps a q block resident, loops over key blocks with an
  online softmax in fp32, writes the output and the log-sum-exp (lse) per row;
* dq, grid (q blocks, B, H): recomputes the probabilities of one q block from the lse and
  loops over key blocks;
* dk/dv, grid (k blocks, B, KV): keeps one k/v block resident and loops over the q heads of
  its group and over q blocks, so GQA gradients are summed in the kernel and repeated kv heads
  are never materialised (the kv head is picked by the BlockSpec index_map from the q head).

Causal: blocks entirely above the diagonal are never visited (loop bounds), blocks entirely
below it are processed without building a mask; only diagonal blocks are masked. Segment ids
(packed sequences) mask every block. Sequence lengths that are not a multiple of the block
sizes are padded internally and the padded keys masked; head dims are padded to a power of
two (Triton needs power-of-two tiles). Matmuls accumulate in fp32 whatever the input dtype.

``jax.custom_vjp`` saves only the inputs, the output and the lse. When the program is not
compiled for GPUs (``target.py``: the traced mesh's devices, not the default backend) the
kernels run with ``interpret=True`` (slow, for tests).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from . import _vma
from ._custom_vjp import attention_with_saved_lse
from ._masks import position_mask
from .target import interpret_by_default

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# jax >= 0.11.2 warns on every Triton lowering that the Pallas Triton backend is deprecated (in
# favour of Mosaic GPU). It still works and it is what this kernel targets: keep that one
# message out of users' output (other warnings are untouched).
TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"


def quiet_triton_deprecation() -> None:
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


quiet_triton_deprecation()
_MIN_BLOCK = 16  # tl.dot needs every tile dim >= 16


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Pallas kernels (powers of two, >= 16).

    block_q/block_k: forward kernel (q rows resident per program, keys per loop step).
    block_q_bwd/block_k_bwd: both backward kernels (dq: q rows per program, keys per step;
    dk/dv: keys per program, q rows per step).
    num_warps/num_stages(_bwd): Triton launch parameters (None: chosen from the head dim).
    Blocks larger than the (padded) sequence are shrunk automatically.
    """
    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int | None = None
    num_stages: int = 2
    num_warps_bwd: int | None = None
    num_stages_bwd: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            val = getattr(self, name)
            if not isinstance(val, int) or not _is_pow2(val) or val < _MIN_BLOCK:
                raise ValueError(f"BlockSizes.{name} must be a power of two >= {_MIN_BLOCK}, "
                                 f"got {val!r}")


@dataclasses.dataclass(frozen=True)
class _Cfg:
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


def _with_seg_ref(refs, has_seg: bool):
    """A kernel's refs with the segment-id ref (4th, after q, k, v) set to None when the call
    has no segment ids, so every kernel unpacks one fixed layout."""
    return refs if has_seg else (*refs[:3], None, *refs[3:])


def _mask(q_pos, k_pos, q_seg, k_seg, *, causal, kv_len, seq_pad):
    """Boolean [bq, bk] mask or None. q_pos/k_pos: absolute positions (int32 vectors)."""
    mask = position_mask(q_pos, k_pos, causal=causal, kv_len=kv_len, seq_pad=seq_pad)
    if q_seg is not None:
        m = q_seg[:, None] == k_seg[None, :]
        mask = m if mask is None else mask & m
    return mask


def _cdiv(a, b):
    """ceil(a / b) for an int32 ``a`` and a static int ``b`` (int32 even under x64)."""
    return lax.div(a + (b - 1), jnp.int32(b))


def _tile_probs(q, k, lse, q_pos, k_pos, q_seg, k_seg, *, cfg, masked, kv_len, seq_pad):
    """Backward: the [bq, bk] softmax probabilities exp(q k^T * scale - lse), recomputed from the
    saved log-sum-exp and zeroed where masked. ``masked=False``: the tile lies wholly below the
    causal diagonal and inside the real keys, so only segment ids can mask it."""
    p = jnp.exp(_dot_nt(q, k) * cfg.sm_scale - lse[:, None])
    mask = _mask(q_pos, k_pos, q_seg, k_seg, causal=cfg.causal and masked,
                 kv_len=kv_len if masked else seq_pad, seq_pad=seq_pad)
    return p if mask is None else jnp.where(mask, p, 0.0)


# ----------------------------------------------------------------------------- forward

def _fwd_kernel(*refs, cfg: _Cfg, has_seg: bool, kv_len: int, seq_pad: int):
    q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref = _with_seg_ref(refs, has_seg)
    bq, bk = cfg.bq, cfg.bk
    nk = seq_pad // bk
    i = pl.program_id(0)
    q_start = i * bq
    q = q_ref[...]
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bq,), 0)
    q_seg = seg_ref[pl.ds(q_start, bq)] if has_seg else None

    def body(j, carry, masked):
        acc, m_prev, l_prev = carry
        k_start = pl.multiple_of(j.astype(jnp.int32) * bk, bk)  # int32 under x64
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot_nt(q, k) * cfg.sm_scale
        k_seg = seg_ref[pl.ds(k_start, bk)] if has_seg else None
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        mask = _mask(q_pos, k_pos, q_seg, k_seg, causal=cfg.causal and masked,
                     kv_len=kv_len if masked else seq_pad, seq_pad=seq_pad)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new[:, None])
        l_new = alpha * l_prev + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l_new

    full_kv = kv_len // bk  # key blocks with no padding
    if cfg.causal:
        end = jnp.minimum(_cdiv(q_start + bq, bk), nk)
        unmasked_end = jnp.minimum(lax.div(q_start + 1, jnp.int32(bk)), full_kv)
    else:
        end = nk
        unmasked_end = full_kv
    carry = (jnp.zeros(q.shape, jnp.float32),
             jnp.full((bq,), MASK_VALUE, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    carry = lax.fori_loop(0, unmasked_end, functools.partial(body, masked=False), carry)
    acc, m, l = lax.fori_loop(unmasked_end, end, functools.partial(body, masked=True), carry)
    # l >= 1 for every row: the row maximum contributes exp(0).
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _fwd_call(q, k, v, seg, cfg: _Cfg, kv_len: int):
    """Padded inputs -> (out [B, S_pad, H, D] in q.dtype, lse [B, H, S_pad] fp32)."""
    b, seq_pad, h, d = q.shape
    kvh = k.shape[2]
    group = h // kvh
    bq, bk = cfg.bq, cfg.bk
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, seq_pad, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
        pl.BlockSpec((None, seq_pad, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
    ]
    args = [q, k, v]
    if seg is not None:
        in_specs.append(pl.BlockSpec((None, seq_pad), lambda i, bi, hi: (bi, 0)))
        args.append(seg)
    kernel = functools.partial(_fwd_kernel, cfg=cfg, has_seg=seg is not None,
                               kv_len=kv_len, seq_pad=seq_pad)
    return pl.pallas_call(
        kernel,
        grid=(seq_pad // bq, b, h),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, seq_pad), jnp.float32)],
        compiler_params=_compiler_params(cfg.num_warps, cfg.num_stages, d, cfg.interpret),
        interpret=cfg.interpret,
        name="spmd_lora_flash_fwd",
    )(*args)


# ----------------------------------------------------------------------------- backward: dq

def _dq_kernel(*refs, cfg: _Cfg, has_seg: bool, kv_len: int, seq_pad: int):
    q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dq_ref = _with_seg_ref(refs, has_seg)
    bq, bk = cfg.bq_bwd, cfg.bk_bwd
    nk = seq_pad // bk
    i = pl.program_id(0)
    q_start = i * bq
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bq,), 0)
    q_seg = seg_ref[pl.ds(q_start, bq)] if has_seg else None

    def body(j, dq, masked):
        k_start = pl.multiple_of(j.astype(jnp.int32) * bk, bk)  # int32 under x64
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        k_seg = seg_ref[pl.ds(k_start, bk)] if has_seg else None
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        p = _tile_probs(q, k, lse, q_pos, k_pos, q_seg, k_seg, cfg=cfg, masked=masked,
                        kv_len=kv_len, seq_pad=seq_pad)
        dp = _dot_nt(do, v)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    full_kv = kv_len // bk
    if cfg.causal:
        end = jnp.minimum(_cdiv(q_start + bq, bk), nk)
        unmasked_end = jnp.minimum(lax.div(q_start + 1, jnp.int32(bk)), full_kv)
    else:
        end = nk
        unmasked_end = full_kv
    dq = jnp.zeros(q.shape, jnp.float32)
    dq = lax.fori_loop(0, unmasked_end, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(unmasked_end, end, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- backward: dk, dv

def _dkv_kernel(*refs, cfg: _Cfg, has_seg: bool, kv_len: int, seq_pad: int, group: int):
    (q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dk_ref,
     dv_ref) = _with_seg_ref(refs, has_seg)
    bq, bk = cfg.bq_bwd, cfg.bk_bwd
    nq = seq_pad // bq
    j = pl.program_id(0)
    k_start = j * bk
    k = k_ref[...]
    v = v_ref[...]
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    k_seg = seg_ref[pl.ds(k_start, bk)] if has_seg else None

    def body(i, carry, g, masked):
        dk, dv = carry
        q_start = pl.multiple_of(i.astype(jnp.int32) * bq, bq)  # int32 under x64
        q = q_ref[pl.ds(q_start, bq), g, :]
        do = do_ref[pl.ds(q_start, bq), g, :]
        lse = lse_ref[g, pl.ds(q_start, bq)]
        delta = delta_ref[g, pl.ds(q_start, bq)]
        q_seg = seg_ref[pl.ds(q_start, bq)] if has_seg else None
        q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bq,), 0)
        p = _tile_probs(q, k, lse, q_pos, k_pos, q_seg, k_seg, cfg=cfg, masked=masked,
                        kv_len=kv_len, seq_pad=seq_pad)
        dv = dv + _dot_tn(p.astype(do.dtype), do)
        dp = _dot_nt(do, v)
        ds = p * (dp - delta[:, None])
        dk = dk + _dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    if cfg.causal:
        start = lax.div(k_start, jnp.int32(bq))  # first q block with a row >= k_start
        # first q block whose every row sees every key of this block
        unmasked_start = jnp.minimum(_cdiv(k_start + bk - 1, bq), nq)
    else:  # int32 values, not Python ints: with Python ints the where() below lowers to an
        # i1 value in Triton and the loop bound fails to lower ('i1' vs 'i32')
        start = jnp.int32(0)
        unmasked_start = jnp.int32(0)
    if kv_len < seq_pad:  # a block holding padded keys is masked everywhere
        unmasked_start = jnp.where(k_start + bk > kv_len, nq, unmasked_start)

    def per_head(g, carry):
        carry = lax.fori_loop(start, unmasked_start,
                              functools.partial(body, g=g, masked=True), carry)
        return lax.fori_loop(unmasked_start, nq,
                             functools.partial(body, g=g, masked=False), carry)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, group, per_head, carry)
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_call(q, k, v, seg, do, lse, delta, cfg: _Cfg, kv_len: int):
    b, seq_pad, h, d = q.shape
    kvh = k.shape[2]
    group = h // kvh
    bq, bk = cfg.bq_bwd, cfg.bk_bwd
    has_seg = seg is not None
    cparams = _compiler_params(cfg.num_warps_bwd, cfg.num_stages_bwd, d, cfg.interpret)

    # dq: one program per (q block, batch, q head)
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, seq_pad, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
        pl.BlockSpec((None, seq_pad, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
    ]
    args = [q, k, v]
    if has_seg:
        in_specs.append(pl.BlockSpec((None, seq_pad), lambda i, bi, hi: (bi, 0)))
        args.append(seg)
    in_specs += [
        pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)),
        pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)),
    ]
    args += [do, lse, delta]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, has_seg=has_seg, kv_len=kv_len,
                          seq_pad=seq_pad),
        grid=(seq_pad // bq, b, h),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=cparams,
        interpret=cfg.interpret,
        name="spmd_lora_flash_dq",
    )(*args)

    # dk, dv: one program per (k block, batch, kv head); loops over the group's q heads.
    in_specs = [
        pl.BlockSpec((None, seq_pad, group, d), lambda j, bi, ki: (bi, 0, ki, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, bi, ki: (bi, j, ki, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, bi, ki: (bi, j, ki, 0)),
    ]
    args = [q, k, v]
    if has_seg:
        in_specs.append(pl.BlockSpec((None, seq_pad), lambda j, bi, ki: (bi, 0)))
        args.append(seg)
    in_specs += [
        pl.BlockSpec((None, seq_pad, group, d), lambda j, bi, ki: (bi, 0, ki, 0)),
        pl.BlockSpec((None, group, seq_pad), lambda j, bi, ki: (bi, ki, 0)),
        pl.BlockSpec((None, group, seq_pad), lambda j, bi, ki: (bi, ki, 0)),
    ]
    args += [do, lse, delta]
    kv_spec = pl.BlockSpec((None, bk, None, d), lambda j, bi, ki: (bi, j, ki, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, has_seg=has_seg, kv_len=kv_len,
                          seq_pad=seq_pad, group=group),
        grid=(seq_pad // bk, b, kvh),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=cparams,
        interpret=cfg.interpret,
        name="spmd_lora_flash_dkv",
    )(*args)
    return dq, dk, dv


# ----------------------------------------------------------------------------- padding + vjp

def _padded_len(s: int, cfg: _Cfg) -> int:
    m = max(cfg.bq, cfg.bk, cfg.bq_bwd, cfg.bk_bwd)
    return -(-s // m) * m


def _pad_seq(x, seq_pad, value=0):
    s = x.shape[1]
    if s == seq_pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, seq_pad - s)
    return jnp.pad(x, widths, constant_values=value)


def _pad_dim(x, d_pad):
    d = x.shape[-1]
    if d == d_pad:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d_pad - d)])


def _forward(q, k, v, seg, cfg: _Cfg):
    """Returns out [B, S, H, D] and lse [B, H, S_pad] (fp32)."""
    b, s, h, d = q.shape
    seq_pad = _padded_len(s, cfg)
    d_pad = max(_MIN_BLOCK, pl.next_power_of_2(d))
    qp, kp, vp = (_pad_dim(_pad_seq(x, seq_pad), d_pad) for x in (q, k, v))
    segp = None if seg is None else _pad_seq(seg.astype(jnp.int32), seq_pad, -1)

    def run(qp, kp, vp, segp):
        return tuple(_fwd_call(qp, kp, vp, segp, cfg, kv_len=s))

    axes = _vma.union_axes(q, k, v, seg)
    out, lse = _vma.call_unchecked(run, (qp, kp, vp, segp), axes)
    return out[:, :s, :, :d], lse


def _backward(q, k, v, seg, out, lse, do, cfg: _Cfg):
    b, s, h, d = q.shape
    seq_pad = lse.shape[-1]
    d_pad = max(_MIN_BLOCK, pl.next_power_of_2(d))
    # delta_i = sum_d dO_id O_id (rows of the softmax Jacobian), fp32, [B, H, S_pad]
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    delta = _pad_seq(delta, seq_pad).transpose(0, 2, 1)
    qp, kp, vp, dop = (_pad_dim(_pad_seq(x, seq_pad), d_pad) for x in (q, k, v, do))
    segp = None if seg is None else _pad_seq(seg.astype(jnp.int32), seq_pad, -1)

    def run(qp, kp, vp, segp, dop, lse, delta):
        return tuple(_bwd_call(qp, kp, vp, segp, dop, lse, delta, cfg, kv_len=s))

    axes = _vma.union_axes(q, k, v, seg, do)
    dq, dk, dv = _vma.call_unchecked(run, (qp, kp, vp, segp, dop, lse, delta), axes)
    return dq[:, :s, :, :d], dk[:, :s, :, :d], dv[:, :s, :, :d]


_flash = attention_with_saved_lse(_forward, _backward)


def _clamp_block(block: int, seq_len: int) -> int:
    """Shrink a block to the smallest power of two (>= 16) covering the sequence."""
    return max(_MIN_BLOCK, min(block, pl.next_power_of_2(seq_len)))


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


def flash_attention(q, k, v, *, causal=True, segment_ids=None, block_sizes=None,
                    sm_scale=None, interpret=None):
    """Fused attention (Pallas). Same contract as ``reference_attention``.

    q [B, S, H, D]; k, v [B, S, KV, D]; segment_ids optional [B, S] int. Returns
    [B, S, H, D] in q's dtype. ``interpret=None`` interprets the kernels unless the program is
    compiled for GPUs (the traced mesh's devices, else the default device: ``target.py``).
    Differentiable (custom VJP with Pallas backward kernels). Works inside
    ``jax.shard_map(..., check_vma=True)``.
    """
    check_shapes(q, k, v, segment_ids)
    if block_sizes is None:
        block_sizes = BlockSizes()
    if interpret is None:
        interpret = interpret_by_default()
    s, d = q.shape[1], q.shape[3]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    cfg = _Cfg(causal=bool(causal), sm_scale=float(sm_scale),
               bq=_clamp_block(block_sizes.block_q, s), bk=_clamp_block(block_sizes.block_k, s),
               bq_bwd=_clamp_block(block_sizes.block_q_bwd, s),
               bk_bwd=_clamp_block(block_sizes.block_k_bwd, s),
               interpret=bool(interpret),
               num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages,
               num_warps_bwd=block_sizes.num_warps_bwd,
               num_stages_bwd=block_sizes.num_stages_bwd)
    if k.dtype != q.dtype:
        k = k.astype(q.dtype)
    if v.dtype != q.dtype:
        v = v.astype(q.dtype)
    # Make every input vary over the same manual axes, outside the custom_vjp, so AD inserts
    # the psum for inputs that are replicated over an axis (e.g. kv heads shared across tp).
    axes = _vma.union_axes(q, k, v, segment_ids)
    q, k, v, segment_ids = (_vma.pvary(x, axes) for x in (q, k, v, segment_ids))
    return _flash(q, k, v, segment_ids, cfg)


# ----------------------------------------------------------------------------- index-masked blocks
# Building blocks for context parallelism (ring_attention.py), like blockwise_block_fwd/_bwd:
# a q block against a k block of another length, the causal mask from explicit global token
# indices (key visible iff k_index <= q_index), segment ids on both sides, lse out, and the
# backward from the merged lse and delta. Every key tile is visited by a loop with a
# three-way branch per tile: skipped when no key of it is visible to any row of the q tile
# (min k_index > max q_index), unmasked when all are (max k_index <= min q_index, no segment
# ids), masked otherwise. Outputs are fp32 (callers merge and accumulate them).

_INDEX_PAD_Q = -1
_INDEX_PAD_K = int(np.iinfo(np.int32).max)


def _tile_kind(q_min, q_max, k_idx, has_seg: bool):
    """0 skip, 1 masked, 2 full (see the section comment)."""
    # int32 arithmetic on the flags: Triton lowers where(pred, 0, 1) on Python ints to an i1
    # value, which the switch's index clamp then rejects (i32 vs i1).
    skip = (jnp.min(k_idx) > q_max).astype(jnp.int32)
    if has_seg:
        return 1 - skip
    full = (jnp.max(k_idx) <= q_min).astype(jnp.int32)
    return (1 - skip) * (1 + full)


def _index_mask(q_idx, k_idx, q_seg, k_seg):
    mask = k_idx[None, :] <= q_idx[:, None]
    if q_seg is not None:
        mask = mask & (q_seg[:, None] == k_seg[None, :])
    return mask


def _idx_refs(refs, has_seg: bool):
    """Kernel refs (q, k, v, q_index, k_index[, q_seg, k_seg], *rest) -> one fixed layout with
    the segment refs None when the call has no segment ids."""
    return refs if has_seg else (*refs[:5], None, None, *refs[5:])


def _fwd_indexed_kernel(*refs, cfg: _Cfg, has_seg: bool, sk_pad: int):
    q_ref, k_ref, v_ref, qi_ref, ki_ref, qs_ref, ks_ref, o_ref, lse_ref = _idx_refs(
        refs, has_seg)
    bq, bk = cfg.bq, cfg.bk
    q = q_ref[...]
    q_idx = qi_ref[...]
    q_seg = qs_ref[...] if has_seg else None
    q_min, q_max = jnp.min(q_idx), jnp.max(q_idx)

    def tile(carry, k_start, k_idx, masked):
        acc, m_prev, l_prev = carry
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot_nt(q, k) * cfg.sm_scale
        mask = None
        if masked:
            k_seg = ks_ref[pl.ds(k_start, bk)] if has_seg else None
            mask = _index_mask(q_idx, k_idx, q_seg, k_seg)
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new[:, None])
        if masked:  # a row with nothing visible yet must not count masked keys
            p = jnp.where(mask, p, 0.0)
        l_new = alpha * l_prev + jnp.sum(p, axis=1)
        return acc * alpha[:, None] + _dot(p.astype(v.dtype), v), m_new, l_new

    def body(j, carry):
        k_start = pl.multiple_of(j * bk, bk)
        k_idx = ki_ref[pl.ds(k_start, bk)]
        return lax.switch(_tile_kind(q_min, q_max, k_idx, has_seg),
                          [lambda c: c,
                           lambda c: tile(c, k_start, k_idx, masked=True),
                           lambda c: tile(c, k_start, k_idx, masked=False)], carry)

    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(0, sk_pad // bk, body, carry)
    empty = l == 0.0
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[...] = acc / safe_l[:, None]
    lse_ref[...] = jnp.where(empty, MASK_VALUE, m + jnp.log(safe_l))


def _dq_indexed_kernel(*refs, cfg: _Cfg, has_seg: bool, sk_pad: int):
    (q_ref, k_ref, v_ref, qi_ref, ki_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
     dq_ref) = _idx_refs(refs, has_seg)
    bk = cfg.bk_bwd
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_idx = qi_ref[...]
    q_seg = qs_ref[...] if has_seg else None
    q_min, q_max = jnp.min(q_idx), jnp.max(q_idx)

    def tile(dq, k_start, k_idx, masked):
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        p = jnp.exp(_dot_nt(q, k) * cfg.sm_scale - lse[:, None])
        if masked:
            k_seg = ks_ref[pl.ds(k_start, bk)] if has_seg else None
            p = jnp.where(_index_mask(q_idx, k_idx, q_seg, k_seg), p, 0.0)
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    def body(j, dq):
        k_start = pl.multiple_of(j * bk, bk)
        k_idx = ki_ref[pl.ds(k_start, bk)]
        return lax.switch(_tile_kind(q_min, q_max, k_idx, has_seg),
                          [lambda c: c,
                           lambda c: tile(c, k_start, k_idx, masked=True),
                           lambda c: tile(c, k_start, k_idx, masked=False)], dq)

    dq = lax.fori_loop(0, sk_pad // bk, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq * cfg.sm_scale


def _dkv_indexed_kernel(*refs, cfg: _Cfg, has_seg: bool, sq_pad: int, group: int):
    (q_ref, k_ref, v_ref, qi_ref, ki_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_ref,
     dv_ref) = _idx_refs(refs, has_seg)
    bq = cfg.bq_bwd
    k, v = k_ref[...], v_ref[...]
    k_idx = ki_ref[...]
    k_seg = ks_ref[...] if has_seg else None

    def tile(carry, g, q_start, q_idx, masked):
        dk, dv = carry
        q = q_ref[pl.ds(q_start, bq), g, :]
        do = do_ref[pl.ds(q_start, bq), g, :]
        lse = lse_ref[g, pl.ds(q_start, bq)]
        delta = delta_ref[g, pl.ds(q_start, bq)]
        p = jnp.exp(_dot_nt(q, k) * cfg.sm_scale - lse[:, None])
        if masked:
            q_seg = qs_ref[pl.ds(q_start, bq)] if has_seg else None
            p = jnp.where(_index_mask(q_idx, k_idx, q_seg, k_seg), p, 0.0)
        dv = dv + _dot_tn(p.astype(do.dtype), do)
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dk + _dot_tn(ds.astype(q.dtype), q), dv

    def body(i, carry, g):
        q_start = pl.multiple_of(i * bq, bq)
        q_idx = qi_ref[pl.ds(q_start, bq)]
        kind = _tile_kind(jnp.min(q_idx), jnp.max(q_idx), k_idx, has_seg)
        return lax.switch(kind, [lambda c: c,
                                 lambda c: tile(c, g, q_start, q_idx, masked=True),
                                 lambda c: tile(c, g, q_start, q_idx, masked=False)], carry)

    def per_head(g, carry):
        return lax.fori_loop(0, sq_pad // bq, functools.partial(body, g=g), carry)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, group, per_head, carry)
    dk_ref[...] = dk * cfg.sm_scale
    dv_ref[...] = dv


def _idx_specs(b_q, b_k, sq_pad, sk_pad, has_seg, q_tiled: bool):
    """BlockSpecs of (q_index, k_index[, q_seg, k_seg]) [B, S_pad] for a grid (tile, B, head):
    the tiled side gets its tile, the other side the whole (padded) row."""
    if q_tiled:
        q_spec = pl.BlockSpec((None, b_q), lambda i, bi, hi: (bi, i))
        k_spec = pl.BlockSpec((None, sk_pad), lambda i, bi, hi: (bi, 0))
    else:
        q_spec = pl.BlockSpec((None, sq_pad), lambda j, bi, ki: (bi, 0))
        k_spec = pl.BlockSpec((None, b_k), lambda j, bi, ki: (bi, j))
    return [q_spec, k_spec] * (2 if has_seg else 1)


def _fwd_indexed_call(q, k, v, qi, ki, qs, ks, cfg: _Cfg):
    b, sq_pad, h, d = q.shape
    sk_pad, kvh = k.shape[1], k.shape[2]
    group = h // kvh
    has_seg = qs is not None
    in_specs = [
        pl.BlockSpec((None, cfg.bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, sk_pad, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
        pl.BlockSpec((None, sk_pad, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
        *_idx_specs(cfg.bq, None, sq_pad, sk_pad, has_seg, q_tiled=True),
    ]
    args = [q, k, v, qi, ki] + ([qs, ks] if has_seg else [])
    return pl.pallas_call(
        functools.partial(_fwd_indexed_kernel, cfg=cfg, has_seg=has_seg, sk_pad=sk_pad),
        grid=(sq_pad // cfg.bq, b, h),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, cfg.bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
                   pl.BlockSpec((None, None, cfg.bq), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32),
                   jax.ShapeDtypeStruct((b, h, sq_pad), jnp.float32)],
        compiler_params=_compiler_params(cfg.num_warps, cfg.num_stages, d, cfg.interpret),
        interpret=cfg.interpret,
        name="spmd_lora_flash_block_fwd",
    )(*args)


def _bwd_indexed_call(q, k, v, qi, ki, qs, ks, do, lse, delta, cfg: _Cfg):
    b, sq_pad, h, d = q.shape
    sk_pad, kvh = k.shape[1], k.shape[2]
    group = h // kvh
    bq, bk = cfg.bq_bwd, cfg.bk_bwd
    has_seg = qs is not None
    cparams = _compiler_params(cfg.num_warps_bwd, cfg.num_stages_bwd, d, cfg.interpret)
    idx_args = [qi, ki] + ([qs, ks] if has_seg else [])

    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, sk_pad, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
        pl.BlockSpec((None, sk_pad, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
        *_idx_specs(bq, bk, sq_pad, sk_pad, has_seg, q_tiled=True),
        pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)),
        pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)),
    ]
    dq = pl.pallas_call(
        functools.partial(_dq_indexed_kernel, cfg=cfg, has_seg=has_seg, sk_pad=sk_pad),
        grid=(sq_pad // bq, b, h),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        compiler_params=cparams,
        interpret=cfg.interpret,
        name="spmd_lora_flash_block_dq",
    )(q, k, v, *idx_args, do, lse, delta)

    in_specs = [
        pl.BlockSpec((None, sq_pad, group, d), lambda j, bi, ki: (bi, 0, ki, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, bi, ki: (bi, j, ki, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, bi, ki: (bi, j, ki, 0)),
        *_idx_specs(bq, bk, sq_pad, sk_pad, has_seg, q_tiled=False),
        pl.BlockSpec((None, sq_pad, group, d), lambda j, bi, ki: (bi, 0, ki, 0)),
        pl.BlockSpec((None, group, sq_pad), lambda j, bi, ki: (bi, ki, 0)),
        pl.BlockSpec((None, group, sq_pad), lambda j, bi, ki: (bi, ki, 0)),
    ]
    kv_spec = pl.BlockSpec((None, bk, None, d), lambda j, bi, ki: (bi, j, ki, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_indexed_kernel, cfg=cfg, has_seg=has_seg, sq_pad=sq_pad,
                          group=group),
        grid=(sk_pad // bk, b, kvh),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, jnp.float32),
                   jax.ShapeDtypeStruct(v.shape, jnp.float32)],
        compiler_params=cparams,
        interpret=cfg.interpret,
        name="spmd_lora_flash_block_dkv",
    )(q, k, v, *idx_args, do, lse, delta)
    return dq, dk, dv


def _block_cfg(q, k, block_sizes, sm_scale, interpret):
    bs = block_sizes or BlockSizes()
    sq, sk, d = q.shape[1], k.shape[1], q.shape[3]
    return _Cfg(causal=True, sm_scale=1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale),
                bq=_clamp_block(bs.block_q, sq), bk=_clamp_block(bs.block_k, sk),
                bq_bwd=_clamp_block(bs.block_q_bwd, sq), bk_bwd=_clamp_block(bs.block_k_bwd, sk),
                interpret=interpret_by_default() if interpret is None else bool(interpret),
                num_warps=bs.num_warps, num_stages=bs.num_stages,
                num_warps_bwd=bs.num_warps_bwd, num_stages_bwd=bs.num_stages_bwd)


def _block_padded(q, k, v, q_index, k_index, q_seg, k_seg, cfg: _Cfg):
    """Pad S of the q side to a multiple of bq/bq_bwd, of the k side to bk/bk_bwd (indices
    padded so that padding is never visible), head dims to a power of two >= 16."""
    sq_pad = -(-q.shape[1] // max(cfg.bq, cfg.bq_bwd)) * max(cfg.bq, cfg.bq_bwd)
    sk_pad = -(-k.shape[1] // max(cfg.bk, cfg.bk_bwd)) * max(cfg.bk, cfg.bk_bwd)
    d_pad = max(_MIN_BLOCK, pl.next_power_of_2(q.shape[3]))
    qp = _pad_dim(_pad_seq(q, sq_pad), d_pad)
    kp, vp = (_pad_dim(_pad_seq(x, sk_pad), d_pad) for x in (k, v))
    qi = _pad_seq(q_index.astype(jnp.int32), sq_pad, _INDEX_PAD_Q)
    ki = _pad_seq(k_index.astype(jnp.int32), sk_pad, _INDEX_PAD_K)
    qs = None if q_seg is None else _pad_seq(q_seg.astype(jnp.int32), sq_pad, 0)
    ks = None if k_seg is None else _pad_seq(k_seg.astype(jnp.int32), sk_pad, 0)
    return qp, kp, vp, qi, ki, qs, ks, d_pad


def flash_block_fwd(q, k, v, *, q_index, k_index, q_segment_ids=None, kv_segment_ids=None,
                    block_sizes=None, sm_scale=None, interpret=None):
    """Pallas version of ``blockwise.blockwise_block_fwd`` (same contract): q [B, Sq, H, D],
    k/v [B, Sk, KV, D], q_index [B, Sq] / k_index [B, Sk] int (key visible iff
    k_index <= q_index), optional segment ids on both sides. Returns out [B, Sq, H, D] fp32
    and lse [B, H, Sq] fp32 (MASK_VALUE and out 0 for rows with no visible key)."""
    cfg = _block_cfg(q, k, block_sizes, sm_scale, interpret)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    sq, d = q.shape[1], q.shape[3]
    padded = _block_padded(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids, cfg)

    def run(*args):
        return tuple(_fwd_indexed_call(*args, cfg))

    axes = _vma.union_axes(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids)
    out, lse = _vma.call_unchecked(run, padded[:7], axes)
    return out[:, :sq, :, :d], lse[:, :, :sq]


def flash_block_bwd(q, k, v, do, lse, delta, *, q_index, k_index, q_segment_ids=None,
                    kv_segment_ids=None, block_sizes=None, sm_scale=None, interpret=None):
    """Pallas version of ``blockwise.blockwise_block_bwd`` (same contract): this k block's
    share of dq [B, Sq, H, D] and dk, dv [B, Sk, KV, D] (fp32) from the merged lse and
    delta [B, H, Sq]."""
    cfg = _block_cfg(q, k, block_sizes, sm_scale, interpret)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    sq, sk, d = q.shape[1], k.shape[1], q.shape[3]
    qp, kp, vp, qi, ki, qs, ks, d_pad = _block_padded(q, k, v, q_index, k_index,
                                                      q_segment_ids, kv_segment_ids, cfg)
    sq_pad = qp.shape[1]
    dop = _pad_dim(_pad_seq(do.astype(q.dtype), sq_pad), d_pad)
    # padded rows: lse 0 keeps exp() finite, their mask is empty
    pad_rows = lambda x: jnp.pad(x.astype(jnp.float32),  # noqa: E731
                                 ((0, 0), (0, 0), (0, sq_pad - sq)))

    def run(*args):
        return tuple(_bwd_indexed_call(*args, cfg))

    axes = _vma.union_axes(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids, do, lse,
                           delta)
    dq, dk, dv = _vma.call_unchecked(
        run, (qp, kp, vp, qi, ki, qs, ks, dop, pad_rows(lse), pad_rows(delta)), axes)
    return dq[:, :sq, :, :d], dk[:, :sk, :, :d], dv[:, :sk, :, :d]
