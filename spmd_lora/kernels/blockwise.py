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

The kernels (the forward, the backward and their rows layout) are in
:mod:`._blockwise_kernels`; this module holds the entry points. The ring blocks' states are
[B, KV, Sq_pad, G, ...], which is the rows layout reshaped.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from . import _vma
from ._blockwise_kernels import (Cfg, backward_rows, fold_forward, from_kv, from_rows,
                                 index_layout, positions_layout, to_rows)
from ._custom_vjp import attention_inputs, attention_with_saved_lse
from ._masks import MASK_VALUE, round_up, tile_kind

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


def _cfg(causal, sq, sk, d, block_q, block_k, sm_scale) -> Cfg:
    bq = min(int(block_q or DEFAULT_BLOCK_Q), sq)
    bk = min(int(block_k or DEFAULT_BLOCK_K), sk)
    if bq <= 0 or bk <= 0:
        raise ValueError(f"block sizes must be positive, got block_q={block_q} block_k={block_k}")
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    return Cfg(causal=bool(causal), sm_scale=scale, bq=bq, bk=bk)


def _forward(q, k, v, seg, cfg: Cfg):
    """q [B, S, H, D] -> out [B, S, H, D] (q.dtype), lse [B * KV, S_pad * G] fp32 (rows)."""
    b, s, h, d = q.shape
    lay = positions_layout(q, k, v, seg, cfg)
    axes = _vma.union_axes(q, k, v, seg)
    o, lse = fold_forward(lay, _vma.zeros(lay.qr.shape, q.dtype, axes),
                          _vma.full(lay.qr.shape[:2], MASK_VALUE, jnp.float32, axes), cfg, axes)
    return from_rows(o, b, lay.m.seq_pad, s), lse


def _backward(q, k, v, seg, out, lse, do, cfg: Cfg):
    b, s, h, d = q.shape
    lay = positions_layout(q, k, v, seg, cfg)
    seq_pad, kvh = lay.m.seq_pad, k.shape[2]
    axes = _vma.union_axes(q, k, v, seg, do)
    # A batched dot, not sum(out * do, -1): XLA:CPU reduces a minor axis of 64 ~15x slower.
    delta = jnp.einsum("bshd,bshd->bsh", out.astype(jnp.float32), do.astype(jnp.float32))
    dq, dks, dvs = backward_rows(lay, to_rows(do.astype(q.dtype), seq_pad, kvh), lse,
                                 to_rows(delta, seq_pad, kvh),
                                 _vma.zeros(lay.qr.shape, jnp.float32, axes), cfg, axes,
                                 (k.dtype, v.dtype))
    dq = from_rows(dq * cfg.sm_scale, b, seq_pad, s).astype(q.dtype)
    return dq, from_kv(dks, b, s), from_kv(dvs, b, s)


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
    lay = index_layout(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids, cfg)
    axes = _vma.union_axes(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids, *state)
    o, lse = (_vma.pvary(x, axes) for x in state)
    o_r, lse_r = fold_forward(lay, _as_rows(o), _as_rows(lse), cfg, axes)
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
    lay = index_layout(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids, cfg)
    sq_pad = dq_acc.shape[2]
    # Padded rows: lse 0 keeps exp() finite; their mask is empty anyway.
    rows = lambda x: to_rows(x.astype(jnp.float32).transpose(0, 2, 1), sq_pad, kvh)  # noqa: E731
    dq, dks, dvs = backward_rows(lay, to_rows(do.astype(q.dtype), sq_pad, kvh), rows(lse),
                                 rows(delta), _as_rows(_vma.pvary(dq_acc, axes)), cfg, axes,
                                 (jnp.float32, jnp.float32))
    return dq.reshape(dq_acc.shape), from_kv(dks, b, sk), from_kv(dvs, b, sk)
