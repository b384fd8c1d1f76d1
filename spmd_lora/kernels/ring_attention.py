"""Context-parallel attention: ring (ppermute of K/V blocks) and all-gather, inside shard_map.

Called *inside* ``jax.shard_map`` over a context-parallel mesh axis ``axis_name`` of size n:
each device holds its local chunk of the sequence, q [B, Sq, H, D] and k, v [B, Sk, KV, D]
(Sq = Sk = S / n in a train step), with the global token index of every local token
(``q_index`` [B, Sq], ``k_index`` [B, Sk] int32; for the zig-zag layout see
``spmd_lora.parallel.zigzag``) and optional segment ids on both sides. The causal mask is
positional: key visible iff k_index <= q_index (and same segment). Other manual mesh axes
(dp, tp) may be present; nothing here communicates over them.

``impl="ring"`` (forward): n steps. At step t the device holds the K/V block (with its indices
and segment ids) of device (r - t) mod n; it *first* sends that block to device r + 1
(``ppermute``) and then attends to it with the local block kernel, so the transfer overlaps the
compute. Partial results merge exactly by log-sum-exp (fp32). Only (out, lse) are saved.
Backward (``jax.custom_vjp``): K/V go around the ring again; each device computes its q rows'
share of dq and the block's dK/dV from the merged lse and delta = rowsum(out * dout); the dK/dV
accumulator (fp32) travels *with* its K/V block, and one last ppermute returns it to its owner.
Nothing [S, S]-shaped and no full-sequence K/V ever lives on a device. Fully masked work is
skipped inside the block kernels, tile pair by tile pair (min k_index > max q_index), so a
ring step whose K/V block lies wholly in the future of the local queries costs only the
checks and the merge.

Collective-permutes of one call over an axis of size n, each operand an array (k, v, k_index,
plus kv_segment_ids when given: m = 3 or 4 arrays of one K/V block):

* forward: (n - 1) * m  -- (n - 1) sends of the K/V block, none on the last step;
* backward: (n - 1) * m + 2 * n -- K/V again, plus dK and dV passed on after each of the n
  steps (the n-th send delivers them to their owner).

The code runs the first n - 1 steps in a ``lax.fori_loop`` (trip count n - 1) and the last one
after it, so the compiled HLO holds m permutes in the forward loop body, m + 2 in the backward
loop body and 2 after it. XLA may combine the operands of one ``ppermute`` into fewer ops; the
``operands`` count of ``spmd_lora.analysis.hlo.collective_census`` is what matches the formula. Under
remat (``jax.checkpoint`` around a layer) the forward runs again in the backward pass, so a
train step has 2 * (n - 1) * m + (n - 1) * m + 2 * n per layer.

``impl="allgather"``: all-gather K/V, k_index and kv segment ids over the axis (tiled along S),
then one local attention of the q chunk against the whole sequence; its backward
reduce-scatters dK/dV (the transpose of all_gather). Every device then holds full-S K/V
(2 * S * KV * D elements per layer, kept as a residual for the backward unless remat drops
it), so it pays only where K/V are small: GQA models with few kv heads.

Elements one device sends per call (S the global length, K/V in the input dtype, index and
segment arrays of S int32 not counted):

* ring: forward (n - 1)/n * 2*S*KV*D; backward the same again plus 2*S*KV*D in fp32 (dK/dV).
* allgather: forward (n - 1)/n * 2*S*KV*D; backward (n - 1)/n * 2*S*KV*D (reduce-scatter).

So the ring moves more bytes in training (its backward resends K/V and sends fp32 dK/dV) but
in n - 1 pieces that overlap the block computations, holds only two K/V blocks at a time, and
never holds full-S K/V.

The local block kernel is chosen like ``attention``'s ``impl`` (``kernel``: "auto" |
"blockwise" | "pallas"; "auto" is Pallas on GPU, blockwise elsewhere).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from . import _vma, registry
from .blockwise import (MASK_VALUE, backward_accumulate, backward_result, backward_state,
                        forward_accumulate, forward_result, forward_state)
from .flash_attention import BlockSizes, flash_block_bwd, flash_block_fwd

CP_IMPLS = ("ring", "allgather")
BLOCK_KERNELS = ("auto", "blockwise", "pallas")


@dataclasses.dataclass(frozen=True)
class _RingCfg:
    axis_name: str | None      # mesh axis of the ring; None: local attention only
    kernel: str                # "blockwise" | "pallas"
    block_sizes: BlockSizes
    sm_scale: float | None


# ----------------------------------------------------------------------------- block kernels
#
# The ring folds one K/V block at a time into a running state. With the blockwise kernel the
# state is the kernel's own (normalised output and lse per q row, padded and grouped by kv
# head), updated in place tile by tile; with Pallas it is (out, lse) and each block's partial
# result is merged by log-sum-exp. Backward: a dq accumulator, likewise.

def _fwd_init(cfg: _RingCfg, q, k, axes):
    if cfg.kernel == "pallas":
        b, sq, h, d = q.shape
        return (_vma.zeros((b, sq, h, d), jnp.float32, axes),
                _vma.full((b, h, sq), MASK_VALUE, jnp.float32, axes))
    return tuple(_vma.pvary(x, axes) for x in forward_state(q, k, cfg.block_sizes.block_q))


def _fwd_step(cfg: _RingCfg, state, q, k, v, q_index, k_index, q_seg, k_seg):
    """The running state after one more K/V block's keys."""
    bs = cfg.block_sizes
    if cfg.kernel == "pallas":
        o_b, lse_b = flash_block_fwd(q, k, v, q_index=q_index, k_index=k_index,
                                     q_segment_ids=q_seg, kv_segment_ids=k_seg, block_sizes=bs,
                                     sm_scale=cfg.sm_scale)
        return merge_partials(*state, o_b, lse_b)
    return forward_accumulate(q, k, v, state, q_index=q_index, k_index=k_index,
                              q_segment_ids=q_seg, kv_segment_ids=k_seg, block_q=bs.block_q,
                              block_k=bs.block_k, sm_scale=cfg.sm_scale)


def _fwd_result(cfg: _RingCfg, state, sq):
    """(out [B, Sq, H, D], lse [B, H, Sq]) fp32."""
    return state if cfg.kernel == "pallas" else forward_result(state, sq)


def _bwd_init(cfg: _RingCfg, q, k, axes):
    if cfg.kernel == "pallas":
        return _vma.zeros(q.shape, jnp.float32, axes)
    return _vma.pvary(backward_state(q, k, cfg.block_sizes.block_q_bwd), axes)


def _bwd_step(cfg: _RingCfg, dq, q, k, v, q_index, k_index, q_seg, k_seg, do, lse, delta):
    """(dq accumulator with this K/V block's share added, the block's dk, dv), fp32."""
    bs = cfg.block_sizes
    if cfg.kernel == "pallas":
        dq_b, dk, dv = flash_block_bwd(q, k, v, do, lse, delta, q_index=q_index,
                                       k_index=k_index, q_segment_ids=q_seg,
                                       kv_segment_ids=k_seg, block_sizes=bs,
                                       sm_scale=cfg.sm_scale)
        return dq + dq_b, dk, dv
    return backward_accumulate(q, k, v, do, lse, delta, dq, q_index=q_index, k_index=k_index,
                               q_segment_ids=q_seg, kv_segment_ids=k_seg,
                               block_q=bs.block_q_bwd, block_k=bs.block_k_bwd,
                               sm_scale=cfg.sm_scale)


def _bwd_result(cfg: _RingCfg, dq, q):
    if cfg.kernel == "pallas":
        return dq
    scale = 1.0 / math.sqrt(q.shape[3]) if cfg.sm_scale is None else cfg.sm_scale
    return backward_result(dq, q.shape[1], scale)


def merge_partials(out, lse, out_b, lse_b):
    """Exact log-sum-exp merge of two partial attentions over disjoint key sets.

    out, out_b [B, S, H, D] fp32 (each normalised over its own keys); lse, lse_b [B, H, S]
    fp32 (MASK_VALUE for rows that saw no key). Returns the merged (out, lse)."""
    m = jnp.maximum(lse, lse_b)
    w, w_b = jnp.exp(lse - m), jnp.exp(lse_b - m)   # one of them is 1: the sum is >= 1
    tot = w + w_b
    to_rows = lambda x: jnp.swapaxes(x, 1, 2)[..., None]  # noqa: E731 - [B,H,S] -> [B,S,H,1]
    out = out * to_rows(w / tot) + out_b * to_rows(w_b / tot)
    return out, m + jnp.log(tot)


# ----------------------------------------------------------------------------- ring

def _axis_size(axis_name):
    return 1 if axis_name is None else lax.axis_size(axis_name)


def _shift(xs, axis_name):
    """Send every array of ``xs`` to the next device of the ring (r -> r + 1 mod n)."""
    n = _axis_size(axis_name)
    perm = [(i, (i + 1) % n) for i in range(n)]
    return lax.ppermute(xs, axis_name, perm)


def _ring_fwd_pass(cfg: _RingCfg, q, k, v, q_index, k_index, q_seg, k_seg):
    n = _axis_size(cfg.axis_name)
    axes = _vma.union_axes(q, k, v, q_index, k_index, q_seg, k_seg)

    def step(_, carry):
        state, blk = carry
        nxt = _shift(blk, cfg.axis_name)   # issued before the compute on blk: they overlap
        return _fwd_step(cfg, state, q, blk[0], blk[1], q_index, blk[2], q_seg, blk[3]), nxt

    state, blk = _fwd_init(cfg, q, k, axes), (k, v, k_index, k_seg)
    if n > 1:
        state, blk = lax.fori_loop(0, n - 1, step, (state, blk))
    state = _fwd_step(cfg, state, q, blk[0], blk[1], q_index, blk[2], q_seg, blk[3])
    return _fwd_result(cfg, state, q.shape[1])


def _ring_bwd_pass(cfg: _RingCfg, q, k, v, q_index, k_index, q_seg, k_seg, out, lse, do):
    n = _axis_size(cfg.axis_name)
    axes = _vma.union_axes(q, k, v, q_index, k_index, q_seg, k_seg, do)
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), do.astype(jnp.float32))
    dkv = (_vma.zeros(k.shape, jnp.float32, axes), _vma.zeros(v.shape, jnp.float32, axes))

    def grads(dq, dkv, blk):
        dq, dk_b, dv_b = _bwd_step(cfg, dq, q, blk[0], blk[1], q_index, blk[2], q_seg, blk[3],
                                   do, lse, delta)
        return dq, (dkv[0] + dk_b, dkv[1] + dv_b)

    def step(_, carry):
        dq, dkv, blk = carry
        nxt = _shift(blk, cfg.axis_name)
        dq, dkv = grads(dq, dkv, blk)
        return dq, _shift(dkv, cfg.axis_name), nxt   # dK/dV travel with their block

    dq, blk = _bwd_init(cfg, q, k, axes), (k, v, k_index, k_seg)
    if n > 1:
        dq, dkv, blk = lax.fori_loop(0, n - 1, step, (dq, dkv, blk))
    dq, dkv = grads(dq, dkv, blk)
    if n > 1:
        dkv = _shift(dkv, cfg.axis_name)   # the block in hand came from r + 1: return it
    dq = _bwd_result(cfg, dq, q)
    return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg, q, k, v, q_index, k_index, q_seg, k_seg):
    out, _ = _ring_fwd_pass(cfg, q, k, v, q_index, k_index, q_seg, k_seg)
    return out.astype(q.dtype)


def _ring_vjp_fwd(cfg, q, k, v, q_index, k_index, q_seg, k_seg):
    out, lse = _ring_fwd_pass(cfg, q, k, v, q_index, k_index, q_seg, k_seg)
    out = out.astype(q.dtype)
    return out, (q, k, v, q_index, k_index, q_seg, k_seg, out, lse)


def _ring_vjp_bwd(cfg, res, do):
    q, k, v, q_index, k_index, q_seg, k_seg, out, lse = res
    dq, dk, dv = _ring_bwd_pass(cfg, q, k, v, q_index, k_index, q_seg, k_seg, out, lse, do)
    return dq, dk, dv, None, None, None, None


_ring.defvjp(_ring_vjp_fwd, _ring_vjp_bwd)


# ----------------------------------------------------------------------------- public API

def cp_bytes_per_device(impl, *, batch, seq_len, cp, kv_heads, head_dim, kv_itemsize,
                        segments=False, backward=True) -> int:
    """Bytes one device sends over the cp axis in one attention call (forward, plus the
    backward when ``backward``), as ``spmd_lora.analysis.hlo.collective_census`` counts ``wire_bytes``.

    seq_len: the global (padded) S, a multiple of cp; kv_heads: the kv heads *on this
    device* (after tp); kv_itemsize: bytes per K/V element (2 for bf16). Indices and segment
    ids are int32; the ring's dK/dV are fp32, the allgather's reduce-scatter is in K/V's dtype.
    """
    if impl not in CP_IMPLS:
        raise ValueError(f"cp impl must be one of {CP_IMPLS}, got {impl!r}")
    if cp == 1:
        return 0
    local = batch * (seq_len // cp)
    kv = 2 * local * kv_heads * head_dim            # elements of one K/V block (k and v)
    block = kv * kv_itemsize + local * 4 * (2 if segments else 1)
    if impl == "ring":
        fwd = (cp - 1) * block
        return fwd + (fwd + cp * kv * 4 if backward else 0)
    fwd = (cp - 1) * block                          # all-gather: (n-1)/n of the gathered S
    return fwd + ((cp - 1) * kv * kv_itemsize if backward else 0)


def _check(q, k, v, q_index, k_index, q_seg, k_seg):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"ring_attention expects q [B, Sq, H, D], k/v [B, Sk, KV, D]; got "
                         f"q{q.shape} k{k.shape} v{v.shape}")
    b, sq, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k/v must be [B, Sk, KV, D] matching q {q.shape}; got k{k.shape} "
                         f"v{v.shape}")
    if h % k.shape[2]:
        raise ValueError(f"q heads ({h}) must be a multiple of kv heads ({k.shape[2]})")
    sk = k.shape[1]
    for name, x, shape in (("q_index", q_index, (b, sq)), ("k_index", k_index, (b, sk)),
                           ("q_segment_ids", q_seg, (b, sq)),
                           ("kv_segment_ids", k_seg, (b, sk))):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(x.shape)}")
    if (q_seg is None) != (k_seg is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")


def _resolve_kernel(kernel, seq_len, head_dim, block_sizes):
    if kernel not in BLOCK_KERNELS:
        raise ValueError(f"kernel must be one of {BLOCK_KERNELS}, got {kernel!r}")
    choice = registry.choose(kernel, seq_len=seq_len, head_dim=head_dim,
                             block_sizes=block_sizes)
    return choice.impl, choice.block_sizes


def ring_attention(q, k, v, *, axis_name, q_index, k_index, q_segment_ids=None,
                   kv_segment_ids=None, impl="ring", kernel="auto", block_sizes=None,
                   sm_scale=None):
    """Causal attention of the local q chunk against the whole (context-parallel) sequence.

    Call inside ``jax.shard_map`` (check_vma True or False) over ``axis_name`` (a mesh axis
    name; None runs the local block only, i.e. ordinary index-masked attention). q [B, Sq, H,
    D]; k, v [B, Sk, KV, D], H % KV == 0 (q head h uses kv head h // (H // KV)); q_index
    [B, Sq], k_index [B, Sk] int32 global token positions (key visible iff k_index <= q_index);
    q_segment_ids / kv_segment_ids: optional [B, Sq] / [B, Sk] int (attend only within a
    segment; both or neither). impl: "ring" | "allgather" (see the module docstring).
    kernel: local block kernel, "auto" | "blockwise" | "pallas"; block_sizes: optional
    :class:`BlockSizes`. Returns [B, Sq, H, D] in q's dtype; differentiable in q, k, v
    (softmax and all accumulation in fp32).
    """
    if impl not in CP_IMPLS:
        raise ValueError(f"cp impl must be one of {CP_IMPLS}, got {impl!r}")
    _check(q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    q_index, k_index = q_index.astype(jnp.int32), k_index.astype(jnp.int32)
    if q_segment_ids is not None:
        q_segment_ids = q_segment_ids.astype(jnp.int32)
        kv_segment_ids = kv_segment_ids.astype(jnp.int32)
    if axis_name is not None and impl == "allgather":
        gather = lambda x: None if x is None else lax.all_gather(  # noqa: E731
            x, axis_name, axis=1, tiled=True)
        k, v, k_index, kv_segment_ids = (gather(x) for x in (k, v, k_index, kv_segment_ids))
        axis_name = None
    kern, bs = _resolve_kernel(kernel, max(q.shape[1], k.shape[1]), q.shape[3], block_sizes)
    cfg = _RingCfg(axis_name=axis_name, kernel=kern, block_sizes=bs, sm_scale=sm_scale)
    args = (q, k, v, q_index, k_index, q_segment_ids, kv_segment_ids)
    axes = _vma.union_axes(*args)
    if axis_name is not None and axes:  # check_vma=True: the ring's carries vary over it
        axes = axes | {axis_name}
    # Cast to a common vma outside the custom_vjp so AD sums the gradient of inputs that were
    # replicated over an axis (e.g. kv heads shared by two tp devices).
    args = tuple(_vma.pvary(x, axes) for x in args)
    return _ring(cfg, *args)
