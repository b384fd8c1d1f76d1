"""Zig-zag layout of a batch for context parallelism (host side, numpy).

With causal attention, splitting a sequence into cp contiguous shards gives the last rank
cp times the attention work of the first. The zig-zag layout cuts the (padded) sequence into
2*cp chunks of equal length c and gives cp rank r chunks r and 2*cp-1-r, so every rank does
the same work. A batch [B, S, ...] is padded and permuted on the host; sharding the permuted
S axis into cp contiguous pieces then hands rank r exactly its two chunks.

    layout position j  <-  global token zigzag_permutation(S_pad, cp)[j]

The model passes the global index of each local token (:func:`zigzag_token_index`, sharded
like the tokens) as ``q_index`` / ``k_index`` to ``spmd_lora.kernels.ring_attention``, so the
causal mask is exact in any layout.

Padding rule (S padded up to a multiple of 2*cp, at the *end* of the sequence): tokens get
``pad_id``, the loss mask 0, segment ids ``PAD_SEGMENT_ID`` (-1, a segment no real token
belongs to), positions 0. The padding lies after every real token, so under the causal mask
no real token ever sees it, and its loss weight is 0: the loss and every gradient are those
of the unpadded batch.

Next-token targets must be formed *before* permuting (the target of token t is token t + 1,
which may land on another rank): :func:`next_token_targets`, and :func:`zigzag_batch` which
does all of it.
"""
from __future__ import annotations

import numpy as np

PAD_SEGMENT_ID = -1


def padded_seq_len(seq_len: int, cp: int) -> int:
    """Smallest multiple of 2*cp that is >= seq_len."""
    if cp < 1 or seq_len < 1:
        raise ValueError(f"need cp >= 1 and seq_len >= 1, got cp={cp} seq_len={seq_len}")
    return -(-seq_len // (2 * cp)) * (2 * cp)


def zigzag_permutation(seq_len_padded: int, cp: int) -> np.ndarray:
    """int64 [S_pad]: global token index held at each layout position (rank r: chunks r and
    2*cp-1-r of length S_pad / (2*cp), in that order)."""
    if seq_len_padded % (2 * cp):
        raise ValueError(f"padded length {seq_len_padded} is not a multiple of 2*cp={2 * cp}")
    c = seq_len_padded // (2 * cp)
    chunks = np.arange(seq_len_padded).reshape(2 * cp, c)
    order = [i for r in range(cp) for i in (r, 2 * cp - 1 - r)]
    return chunks[order].reshape(-1)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """inv with inv[perm[j]] = j: ``x_layout[:, inv]`` restores global order."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return inv


def pad_to(x, seq_len_padded: int, value):
    """Pad axis 1 of ``x`` [B, S, ...] at the end to seq_len_padded with ``value``."""
    x = np.asarray(x)
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, seq_len_padded - x.shape[1])
    return np.pad(x, widths, constant_values=value)


def to_zigzag(x, cp: int, pad_value=0):
    """[B, S, ...] in global order -> [B, S_pad, ...] in zig-zag layout (padded with
    ``pad_value``)."""
    x = np.asarray(x)
    s_pad = padded_seq_len(x.shape[1], cp)
    return pad_to(x, s_pad, pad_value)[:, zigzag_permutation(s_pad, cp)]


def from_zigzag(x, cp: int, seq_len: int):
    """Inverse of :func:`to_zigzag`: [B, S_pad, ...] zig-zag -> [B, seq_len, ...] global
    order (padding dropped). Works on numpy and jax arrays."""
    s_pad = x.shape[1]
    return x[:, inverse_permutation(zigzag_permutation(s_pad, cp))][:, :seq_len]


def zigzag_token_index(batch: int, seq_len: int, cp: int) -> np.ndarray:
    """int32 [B, S_pad]: the global token index at each zig-zag layout position (the
    q_index / k_index of ring attention; padding gets indices >= seq_len)."""
    perm = zigzag_permutation(padded_seq_len(seq_len, cp), cp).astype(np.int32)
    return np.broadcast_to(perm, (batch, perm.size)).copy()


def next_token_targets(tokens, loss_mask):
    """(targets, weights) [B, S]: targets[t] = tokens[t + 1], weights[t] = loss_mask[t + 1]
    (0 at the last position): the loss of position t, aligned with the input token t."""
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
    targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
    weights = np.concatenate([loss_mask[:, 1:], np.zeros_like(loss_mask[:, :1])], axis=1)
    return targets, weights


def zigzag_batch(tokens, loss_mask, cp: int, *, segment_ids=None, positions=None,
                 pad_id: int = 0) -> dict:
    """Pad and permute one batch for context parallelism (padding rule: module docstring).

    tokens, loss_mask [B, S] (loss_mask[t] = 1 when token t is a target); segment_ids and
    positions optional [B, S] int (positions default to arange(S)). Returns [B, S_pad] numpy
    arrays in zig-zag layout: tokens, loss_mask, targets and target_weights (next-token
    targets and their loss weights, formed before permuting), positions, token_index and,
    when given, segment_ids.
    """
    tokens = np.asarray(tokens)
    b, s = tokens.shape
    if positions is None:
        positions = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    targets, weights = next_token_targets(tokens, loss_mask)
    out = {
        "tokens": to_zigzag(tokens, cp, pad_id),
        "loss_mask": to_zigzag(loss_mask, cp, 0),
        "targets": to_zigzag(targets, cp, pad_id),
        "target_weights": to_zigzag(weights, cp, 0),
        "positions": to_zigzag(positions, cp, 0),
        "token_index": zigzag_token_index(b, s, cp),
    }
    if segment_ids is not None:
        out["segment_ids"] = to_zigzag(segment_ids, cp, PAD_SEGMENT_ID)
    return out
