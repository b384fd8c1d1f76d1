"""FlashAttention-2 style fused attention written in Pallas (Triton-style GPU API).

Two entry points, one set of kernels (:mod:`._flash_kernels`: forward, dq, dk/dv), told apart
by their mask provider (``_flash_kernels.Masking``):

* :func:`flash_attention` -- the attention of ``attention(impl="pallas")``: q [B, S, H, D];
  k, v [B, S, KV, D] (H a multiple of KV). Causal by position: tiles entirely above the
  diagonal are never visited (loop bounds), tiles entirely below it are processed without
  building a mask; only diagonal tiles are masked. ``jax.custom_vjp`` saves only the inputs,
  the output and the lse.
* :func:`flash_block_fwd` / :func:`flash_block_bwd` -- building blocks for context
  parallelism (``ring_attention.py``), like ``blockwise_block_fwd/_bwd``: a q block against a
  k block of another length, the causal mask from explicit global token indices (key visible
  iff k_index <= q_index), segment ids on both sides, lse out, and the backward from the
  merged lse and delta. Tile pairs with no visible key are skipped, pairs where every key is
  visible (and no segment ids) are not masked. Outputs are fp32 (callers merge them).

Segment ids (packed sequences) mask every tile. Sequence lengths that are not a multiple of
the tiles are padded here and the padding masked (:mod:`._masks`); head dims are padded to a
power of two (Triton needs power-of-two tiles). When the program is not compiled for GPUs
(``target.py``: the traced mesh's devices, not the default backend) the kernels run with
``interpret=True`` (slow, for tests).
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _vma
from ._custom_vjp import attention_inputs, attention_with_saved_lse
from ._custom_vjp import check_shapes  # noqa: F401  (part of this module's API)
from ._flash_kernels import Cfg, bwd_call, fwd_call
from ._masks import Masking, pad_block_ids, pad_ids, pad_seq, round_up, tile_kind
from .target import interpret_by_default

_tile_kind = tile_kind  # the tile kind one Pallas program computes (tested by this name)

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


def _clamp_block(block: int, seq_len: int) -> int:
    """Shrink a block to the smallest power of two (>= 16) covering the sequence."""
    return max(_MIN_BLOCK, min(block, pl.next_power_of_2(seq_len)))


def _make_cfg(causal, sq, sk, d, block_sizes, sm_scale, interpret) -> Cfg:
    """The kernels' static config: tiles clamped to the q / k lengths sq / sk."""
    bs = block_sizes or BlockSizes()
    return Cfg(causal=bool(causal),
               sm_scale=1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale),
               bq=_clamp_block(bs.block_q, sq), bk=_clamp_block(bs.block_k, sk),
               bq_bwd=_clamp_block(bs.block_q_bwd, sq), bk_bwd=_clamp_block(bs.block_k_bwd, sk),
               interpret=interpret_by_default() if interpret is None else bool(interpret),
               num_warps=bs.num_warps, num_stages=bs.num_stages,
               num_warps_bwd=bs.num_warps_bwd, num_stages_bwd=bs.num_stages_bwd)


def _pad_dim(x, d_pad):
    d = x.shape[-1]
    if d == d_pad:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d_pad - d)])


def _pad(x, seq_pad, d_pad):
    """[B, S, heads, D] -> [B, seq_pad, heads, d_pad] (zeros)."""
    return _pad_dim(pad_seq(x, seq_pad), d_pad)


def _head_dim_pad(d: int) -> int:
    return max(_MIN_BLOCK, pl.next_power_of_2(d))


# ----------------------------------------------------------------------------- flash_attention

def _positions(s: int, seq_pad: int, seg, cfg: Cfg):
    """Position masking: the Masking and the id inputs (the segment ids, padded with -1, if
    any) of a sequence of s tokens padded to seq_pad."""
    m = Masking(indexed=False, has_seg=seg is not None, causal=cfg.causal, kv_len=s,
                seq_pad=seq_pad)
    segp = pad_ids(seg, seq_pad)
    return m, () if segp is None else (segp,)


def _forward(q, k, v, seg, cfg: Cfg):
    """Returns out [B, S, H, D] and lse [B, H, S_pad] (fp32)."""
    s, d = q.shape[1], q.shape[3]
    seq_pad = round_up(s, max(cfg.bq, cfg.bk, cfg.bq_bwd, cfg.bk_bwd))
    d_pad = _head_dim_pad(d)
    m, ids = _positions(s, seq_pad, seg, cfg)

    def run(qp, kp, vp, *ids):
        return tuple(fwd_call(qp, kp, vp, ids, cfg, m, q.dtype))

    axes = _vma.union_axes(q, k, v, seg)
    args = tuple(_pad(x, seq_pad, d_pad) for x in (q, k, v)) + ids
    out, lse = _vma.call_unchecked(run, args, axes)
    return out[:, :s, :, :d], lse


def _backward(q, k, v, seg, out, lse, do, cfg: Cfg):
    s, d = q.shape[1], q.shape[3]
    seq_pad = lse.shape[-1]
    d_pad = _head_dim_pad(d)
    m, ids = _positions(s, seq_pad, seg, cfg)
    # delta_i = sum_d dO_id O_id (rows of the softmax Jacobian), fp32, [B, H, S_pad]
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    delta = pad_seq(delta, seq_pad).transpose(0, 2, 1)

    def run(qp, kp, vp, *rest):
        ids, (dop, lse, delta) = rest[:-3], rest[-3:]
        return tuple(bwd_call(qp, kp, vp, ids, dop, lse, delta, cfg, m, None))

    axes = _vma.union_axes(q, k, v, seg, do)
    qp, kp, vp, dop = (_pad(x, seq_pad, d_pad) for x in (q, k, v, do))
    dq, dk, dv = _vma.call_unchecked(run, (qp, kp, vp, *ids, dop, lse, delta), axes)
    return dq[:, :s, :, :d], dk[:, :s, :, :d], dv[:, :s, :, :d]


_flash = attention_with_saved_lse(_forward, _backward)


def flash_attention(q, k, v, *, causal=True, segment_ids=None, block_sizes=None,
                    sm_scale=None, interpret=None):
    """Fused attention (Pallas). Same contract as ``reference_attention``.

    q [B, S, H, D]; k, v [B, S, KV, D]; segment_ids optional [B, S] int. Returns
    [B, S, H, D] in q's dtype. ``interpret=None`` interprets the kernels unless the program is
    compiled for GPUs (the traced mesh's devices, else the default device: ``target.py``).
    Differentiable (custom VJP with Pallas backward kernels). Works inside
    ``jax.shard_map(..., check_vma=True)``.
    """
    q, k, v, segment_ids = attention_inputs(q, k, v, segment_ids)
    cfg = _make_cfg(causal, q.shape[1], q.shape[1], q.shape[3], block_sizes, sm_scale,
                    interpret)
    return _flash(q, k, v, segment_ids, cfg)


# ----------------------------------------------------------------------------- index-masked blocks

def _block_inputs(q, k, v, q_index, k_index, q_seg, k_seg, cfg: Cfg):
    """Index masking: pad S of the q side to a multiple of bq/bq_bwd, of the k side to
    bk/bk_bwd (indices padded so that padding is never visible), head dims to a power of two
    >= 16. Returns the Masking, (q, k, v, *ids) padded and the padded lengths."""
    sq_pad = round_up(q.shape[1], max(cfg.bq, cfg.bq_bwd))
    sk_pad = round_up(k.shape[1], max(cfg.bk, cfg.bk_bwd))
    d_pad = _head_dim_pad(q.shape[3])
    qi, ki, qs, ks = pad_block_ids(q_index, k_index, q_seg, k_seg, sq_pad, sk_pad)
    ids = (qi, ki) + (() if qs is None else (qs, ks))
    qkv = (_pad(q, sq_pad, d_pad), _pad(k, sk_pad, d_pad), _pad(v, sk_pad, d_pad))
    return Masking(indexed=True, has_seg=qs is not None), qkv + ids, sq_pad, d_pad


def flash_block_fwd(q, k, v, *, q_index, k_index, q_segment_ids=None, kv_segment_ids=None,
                    block_sizes=None, sm_scale=None, interpret=None):
    """Pallas version of ``blockwise.blockwise_block_fwd`` (same contract): q [B, Sq, H, D],
    k/v [B, Sk, KV, D], q_index [B, Sq] / k_index [B, Sk] int (key visible iff
    k_index <= q_index), optional segment ids on both sides. Returns out [B, Sq, H, D] fp32
    and lse [B, H, Sq] fp32 (MASK_VALUE and out 0 for rows with no visible key)."""
    sq, d = q.shape[1], q.shape[3]
    cfg = _make_cfg(True, sq, k.shape[1], d, block_sizes, sm_scale, interpret)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    m, args, _, _ = _block_inputs(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids,
                                  cfg)

    def run(qp, kp, vp, *ids):
        return tuple(fwd_call(qp, kp, vp, ids, cfg, m, jnp.float32))

    axes = _vma.union_axes(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids)
    out, lse = _vma.call_unchecked(run, args, axes)
    return out[:, :sq, :, :d], lse[:, :, :sq]


def flash_block_bwd(q, k, v, do, lse, delta, *, q_index, k_index, q_segment_ids=None,
                    kv_segment_ids=None, block_sizes=None, sm_scale=None, interpret=None):
    """Pallas version of ``blockwise.blockwise_block_bwd`` (same contract): this k block's
    share of dq [B, Sq, H, D] and dk, dv [B, Sk, KV, D] (fp32) from the merged lse and
    delta [B, H, Sq]."""
    sq, sk, d = q.shape[1], k.shape[1], q.shape[3]
    cfg = _make_cfg(True, sq, sk, d, block_sizes, sm_scale, interpret)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    m, args, sq_pad, d_pad = _block_inputs(q, k, v, q_index, k_index, q_segment_ids,
                                           kv_segment_ids, cfg)
    dop = _pad(do.astype(q.dtype), sq_pad, d_pad)
    # padded rows: lse 0 keeps exp() finite, their mask is empty
    pad_rows = lambda x: jnp.pad(x.astype(jnp.float32),  # noqa: E731
                                 ((0, 0), (0, 0), (0, sq_pad - sq)))

    def run(qp, kp, vp, *rest):
        ids, (dop, lse, delta) = rest[:-3], rest[-3:]
        return tuple(bwd_call(qp, kp, vp, ids, dop, lse, delta, cfg, m, jnp.float32))

    axes = _vma.union_axes(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids, do, lse,
                           delta)
    dq, dk, dv = _vma.call_unchecked(run, (*args, dop, pad_rows(lse), pad_rows(delta)), axes)
    return dq[:, :sq, :, :d], dk[:, :sk, :, :d], dv[:, :sk, :, :d]
