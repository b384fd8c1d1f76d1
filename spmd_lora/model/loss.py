"""The LM head and the vocab-parallel, fused linear cross-entropy (per device).

The head's columns are split over tp ([D, Vl] local; the tied embedding's rows transposed).
The loss never gathers the full logits: the max and the sum-exp are reduced over tp
(``pmax``, ``psum``), as is the target's logit. It runs over chunks of ``ce_chunk_tokens``
tokens, and its forward also computes the gradient w.r.t. the hidden rows, so the backward
keeps only an [N, D] per chunk, never logits.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..kernels import _vma
from ..parallel.mesh import TP
from .lora_linear import like_vma
from .options import ForwardOptions

F32 = jnp.float32


def _head_local(params):
    """[D, Vl]: the lm_head's local columns, or the tied embedding's local rows transposed."""
    return params["lm_head"] if "lm_head" in params else params["embed"].T


def local_logits(h, params, opts: ForwardOptions):
    """h [N.., D] -> float32 logits over this device's vocab slice [N.., Vl]; padded vocab
    entries are -inf-like so they never win a max or add to a sum-exp."""
    with jax.named_scope("lm_head"):
        head = _head_local(params)
        logits = jnp.einsum("...d,dv->...v", h, head, preferred_element_type=F32)
        return _mask_padded_vocab(logits, opts)


def _mask_padded_vocab(logits, opts: ForwardOptions):
    """Padded vocab columns (global id >= vocab_size) -> -inf-like. Without padding (tp
    divides V) this is the identity: no pass over the [N, Vl] logits."""
    if opts.cfg.padded_vocab(opts.tp) == opts.cfg.vocab_size:
        return logits
    vl = logits.shape[-1]
    col = jax.lax.axis_index(TP) * vl + jnp.arange(vl)
    return jnp.where(col < opts.cfg.vocab_size, logits, jnp.finfo(F32).min)


class _VocabSoftmax(NamedTuple):
    """One chunk's softmax over the tp-sharded vocab (see :func:`_vocab_softmax`)."""

    m: jax.Array            # [N] the row max over the WHOLE vocab (pmax over tp)
    e: jax.Array            # [N, Vl] exp(logits - m) over this device's vocab slice
    sum_exp: jax.Array      # [N] the sum of exp(logits - m) over the WHOLE vocab (psum over tp)
    target_logit: jax.Array  # [N] the target's logit, replicated over tp
    here: jax.Array         # [N] bool: the target's column is on this device
    t_col: jax.Array        # [N] the target's local column (clipped into range when not here)


def _vocab_softmax(h, head, targets, opts: ForwardOptions) -> _VocabSoftmax:
    """The vocab-parallel log-softmax of one chunk, shared by the cross-entropy and the
    sequence log-probs: h [N, D] (the same rows on every tp device), head [D, Vl] local
    columns, targets [N] global ids. The row max is reduced over tp with ``pmax``, the sum-exp
    and the target's logit with ``psum``; the full logits are never gathered."""
    with jax.named_scope("lm_head"):
        logits = jnp.einsum("nd,dv->nv", h, head, preferred_element_type=F32)  # [N, Vl]
        logits = _mask_padded_vocab(logits, opts)
    vl = logits.shape[-1]
    m = jax.lax.pmax(jnp.max(logits, axis=-1), TP)                           # [N]
    e = jnp.exp(logits - m[:, None])
    sum_exp = jax.lax.psum(jnp.sum(e, axis=-1), TP)
    local_t = targets - jax.lax.axis_index(TP) * vl                          # out of range: not here
    here = (local_t >= 0) & (local_t < vl)                                   # [N]
    t_col = jnp.clip(local_t, 0, vl - 1)
    # The target's logit by gather (O(N)), not by a one-hot pass over [N, Vl].
    picked = jnp.take_along_axis(logits, t_col[:, None], axis=1)[:, 0]
    target_logit = jax.lax.psum(jnp.where(here, picked, 0.0), TP)
    return _VocabSoftmax(m, e, sum_exp, target_logit, here, t_col)


def _ce_chunk(h, targets, weights, params, opts: ForwardOptions):
    """Vocab-parallel cross-entropy of one chunk. h [N, D] (the same rows on every tp device);
    targets, weights [N]. Returns the weighted sum of per-token losses (replicated over tp).

    Fused linear cross-entropy: the forward also computes the gradient w.r.t. h,
    ``(weights * (softmax - onehot)) @ head^T``, and keeps only that [N, D] for the backward,
    which scales it by the incoming cotangent. So neither the [N, Vl] logits nor anything of
    their size is saved, and a chunked loss recomputes nothing (before, each chunk's logits
    were rematerialised in the backward)."""
    return _fused_ce(h, _head_local(params), targets, weights, opts)


def _ce_forward(h, head, targets, weights, opts: ForwardOptions, head_grad: bool = False):
    """(weighted loss sum, its gradient w.r.t. h, and w.r.t. the head when ``head_grad``, else
    None) of one chunk; see :func:`_ce_chunk`."""
    sm = _vocab_softmax(h, head, targets, opts)
    e, sum_exp, here, t_col = sm.e, sm.sum_exp, sm.here, sm.t_col
    vl = e.shape[-1]
    loss = jnp.sum((jnp.log(sum_exp) + sm.m - sm.target_logit) * weights)
    # dL/dlogits = e * scale - onehot * w (rows scaled: scale = w / sum_exp), so
    # dL/dh = (e @ head^T) * scale - w * head[:, target]^T: no [N, Vl] pass besides the matmul.
    scale = weights / sum_exp
    w_here = jnp.where(here, weights, 0.0)
    head_t = jnp.take(head, t_col, axis=1).T.astype(F32)                     # [N, D]
    dh = (jnp.einsum("nv,dv->nd", e.astype(head.dtype), head, preferred_element_type=F32)
          * scale[:, None] - w_here[:, None] * head_t)
    dh = like_vma(dh, h)             # summed over tp when h is the same on every tp device
    dhead = None
    if head_grad:   # only when the base itself is differentiated (tests, full fine-tuning)
        onehot = jnp.arange(vl, dtype=t_col.dtype)[None, :] == t_col[:, None]  # [N, Vl]
        dlogits = e * scale[:, None] - jnp.where(onehot, w_here[:, None], 0.0)
        dhead = jnp.einsum("nd,nv->dv", h.astype(F32), dlogits).astype(head.dtype)
    return loss, dh.astype(h.dtype), dhead


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_ce(h, head, targets, weights, opts: ForwardOptions):
    return _ce_forward(h, head, targets, weights, opts)[0]


def _fused_ce_fwd(h, head, targets, weights, opts):
    # symbolic_zeros: primals arrive as CustomVJPPrimal(value, perturbed); the head's gradient
    # is computed only when it is differentiated (never for LoRA: the base is frozen).
    loss, dh, dhead = _ce_forward(h.value, head.value, targets.value, weights.value, opts,
                                  head_grad=head.perturbed)
    return loss, (dh, dhead)


def _fused_ce_bwd(opts, res, g):
    dh, dhead = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None, None
    dh = dh * g.astype(dh.dtype)
    if dhead is not None:
        # The head (lm_head, or the tied embedding) varies over tp only (its sharding): sum
        # the per-device gradients over the other axes, as autodiff's transposes would.
        dhead = dhead * g.astype(dhead.dtype)
        extra = tuple(sorted(_vma.varying_axes(dhead) - {TP}))
        if extra:
            dhead = jax.lax.psum(dhead, extra)
    return dh, dhead, None, None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd, symbolic_zeros=True)


@jax.named_scope("loss")
def cross_entropy_sum(h, targets, weights, params, opts: ForwardOptions):
    """Next-token loss. h [B, R, D] local residual rows (``opts.layout``); targets, weights
    [B, S] (the target token and loss weight of each local position: the prepared batch's
    ``targets`` / ``target_weights``, :mod:`spmd_lora.parallel.zigzag`). Returns (sum of losses, sum of weights), local to this dp
    (and cp) shard.

    Runs over chunks of ``ce_chunk_tokens`` tokens with rematerialisation, so the [tokens, Vl]
    logits of only one chunk are ever live. Under sequence parallelism a chunk is gathered from
    every tp device's rows (all_gather; reduce-scatter of its gradient), so each token's loss is
    computed once and the LM head is never gathered."""
    layout = opts.layout(targets.shape[1])
    targets, weights = layout.pad(targets), layout.pad(weights.astype(F32))  # [B, S_pad]
    loss = _sum_over_chunks(h, targets, weights, layout, opts,
                            lambda hg, t, w, bi: _ce_chunk(hg, t, w, params, opts))
    return loss, jnp.sum(weights)


def _sum_over_chunks(h, targets, weights, layout, opts: ForwardOptions, chunk_fn, extra=None):
    """The sum over chunks of ``chunk_fn(hg, t, w, bi)`` (``chunk_fn(hg, t, w, bi, e)`` with
    ``extra``), the one chunk loop of the loss and the sequence log-probs. h [B, R, D] local
    residual rows; targets, weights (and ``extra``, any per-token int array) [B, S_pad]
    (padded by ``layout``). A chunk is ``opts.ce_chunk_rows`` local flat rows, gathered from
    every tp device's rows under sequence parallelism (all_gather; reduce-scatter of its
    gradient): hg [g*c, D], its targets t, weights w (0 past the last row) and extra e [g*c],
    and bi [g*c] the batch row of each. More than one chunk runs under ``lax.map``, so the
    [tokens, Vl] logits of only one chunk are ever live."""
    b, rows, d = h.shape
    n = b * rows                                                              # local rows
    g = layout.gather_factor
    chunk = opts.ce_chunk_rows(layout, n)
    n_chunks = -(-n // chunk)
    hf = jnp.pad(h.reshape(n, d), ((0, n_chunks * chunk - n), (0, 0)))

    def one_chunk(h_chunk, j):
        """Local flat rows [j*chunk, (j+1)*chunk), gathered over tp when SP."""
        flat = j * chunk + jnp.arange(chunk, dtype=jnp.int32)                # [c]
        bi, local = flat // rows, flat % rows
        seq_idx = (jnp.arange(g, dtype=jnp.int32)[:, None] * rows + local[None, :]).reshape(-1)
        bi = jnp.tile(jnp.minimum(bi, b - 1), g)                             # [g*c]
        valid = jnp.tile(flat < n, g)
        t = targets[bi, seq_idx]
        w = jnp.where(valid, weights[bi, seq_idx], 0.0)
        hg = layout.gather(h_chunk, axis=0) if layout.sp else h_chunk        # [g*c, D]
        if extra is None:
            return chunk_fn(hg, t, w, bi)
        return chunk_fn(hg, t, w, bi, extra[bi, seq_idx])

    if n_chunks == 1:
        return one_chunk(hf, 0)
    per_chunk = jax.lax.map(lambda xs: one_chunk(*xs),
                            (hf.reshape(n_chunks, chunk, d), jnp.arange(n_chunks, dtype=jnp.int32)))
    return jnp.sum(per_chunk, axis=0)


def _token_logp_forward(h, head, targets, opts: ForwardOptions):
    """(log p(target) of every row [N], replicated over tp; its gradient w.r.t. h [N, D]) of
    one chunk: h [N, D] (the same rows on every tp device), head [D, Vl] local columns,
    targets [N] global ids. The log-softmax normaliser is reduced over tp (``pmax`` of the row
    maxima, ``psum`` of the sum-exp and of the target logit), as in :func:`_ce_forward`."""
    sm = _vocab_softmax(h, head, targets, opts)
    # d logp / dh = head[:, target]^T - softmax @ head^T (this device's vocab slice; summed
    # over tp by like_vma when h is the same on every tp device).
    head_t = jnp.take(head, sm.t_col, axis=1).T.astype(F32)                  # [N, D]
    dh = (jnp.where(sm.here, 1.0, 0.0)[:, None] * head_t
          - jnp.einsum("nv,dv->nd", sm.e.astype(head.dtype), head, preferred_element_type=F32)
          / sm.sum_exp[:, None])
    logp = sm.target_logit - sm.m - jnp.log(sm.sum_exp)                      # [N]
    return logp, like_vma(dh, h).astype(h.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_token_logp(h, head, targets, opts: ForwardOptions):
    return _token_logp_forward(h, head, targets, opts)[0]


def _fused_token_logp_fwd(h, head, targets, opts):
    if head.perturbed:
        raise NotImplementedError("sequence_logps differentiates the hidden rows only (LoRA "
                                  "training; the LM head is frozen)")
    logp, dh = _token_logp_forward(h.value, head.value, targets.value, opts)
    return logp, dh


def _fused_token_logp_bwd(opts, dh, g):
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None
    return dh * g.astype(dh.dtype)[:, None], None, None


_fused_token_logp.defvjp(_fused_token_logp_fwd, _fused_token_logp_bwd, symbolic_zeros=True)


@jax.named_scope("loss")
def sequence_logps(h, targets, weights, params, opts: ForwardOptions, slots=None,
                   slots_per_row: int = 1):
    """Sums of target-token log-probabilities over each completion (DPO's sequence log-probs).

    h [B, R, D] local residual rows (``opts.layout``); targets, weights [B, S] (the prepared
    batch's ``targets`` / ``target_weights``; weight 1 on the completion tokens, 0 elsewhere);
    ``slots`` [B, S] int32 in [0, slots_per_row): which of its row's completions a token's
    log-prob counts for (None: one completion per row). Returns [B * slots_per_row] float32,
    entry ``b * slots_per_row + j`` = ``sum_t weights[b, t] * log p(targets[b, t])`` over the
    tokens of completion j of row b; replicated over tp, local to this dp (and cp) shard.

    The same vocab-parallel chunks as :func:`cross_entropy_sum` (``ce_chunk_tokens`` rows at a
    time, gathered over tp under sequence parallelism, the log-softmax reduced over tp), but
    each chunk returns its per-token log-probs, which are summed into their completions (a
    segment sum); the chunk's forward keeps only d logp / dh [N, D] for the backward."""
    b = targets.shape[0]
    layout = opts.layout(targets.shape[1])
    targets, weights = layout.pad(targets), layout.pad(weights.astype(F32))  # [B, S_pad]
    head = _head_local(params)
    n_out = b * slots_per_row

    def chunk_sums(hg, t, w, bi, slot=None):
        """[B * slots_per_row]: the chunk's weighted log-prob sums per completion."""
        logp = _fused_token_logp(hg, head, t, opts)                          # [g*c]
        index = bi if slot is None else bi * slots_per_row + slot
        return jax.ops.segment_sum(w * logp, index, num_segments=n_out)

    extra = None if slots is None else layout.pad(slots.astype(jnp.int32))
    return _sum_over_chunks(h, targets, weights, layout, opts, chunk_sums, extra)
