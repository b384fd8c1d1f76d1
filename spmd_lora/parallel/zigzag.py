"""Zig-zag layout of a batch for context parallelism (the batch preparation; numpy on the host,
or jax.numpy inside a jitted function).

With causal attention, splitting a sequence into cp contiguous shards gives the last rank
cp times the attention work of the first. The zig-zag layout cuts the (padded) sequence into
2*cp chunks of equal length c and gives cp rank r chunks r and 2*cp-1-r, so every rank does
the same work. A batch [B, S, ...] is padded and permuted on the host; sharding the permuted
S axis into cp contiguous pieces then hands rank r exactly its two chunks.

    layout position j  <-  global token zigzag_permutation(S_pad, cp)[j]

The model passes the global index of each local token (:func:`zigzag_token_index`, sharded
like the tokens) as ``q_index`` / ``k_index`` to ``spmd_lora.kernels.ring_attention``, so the
causal mask is exact in any layout.

Padding rule (S padded up to a multiple of 2*cp*tp, at the *end* of the sequence, so each
rank's two chunks also split evenly over tp under sequence parallelism): tokens get
``pad_id``, the loss mask 0, segment ids ``PAD_SEGMENT_ID`` (-1, a segment no real token
belongs to), positions 0. The padding lies after every real token, so under the causal mask
no real token ever sees it, and its loss weight is 0: the loss and every gradient are those
of the unpadded batch.

Next-token targets must be formed *before* permuting (the target of token t is token t + 1,
which may land on another rank): :func:`next_token_targets`, and :func:`zigzag_batch` which
does all of it.

The batch schema (:func:`prepare_batch`, the same at every cp): ``tokens``, ``targets``,
``target_weights``, ``positions``, ``token_index`` (:data:`BATCH_FIELDS`) and, for packed rows,
``segment_ids``, all int [..., B, S]. With cp > 1 they are padded and in zig-zag layout; with
cp = 1 they are the whole sequences in their order, unpadded (``token_index`` = 0..S-1). The
model reads only these fields.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PAD_SEGMENT_ID = -1
# The fields of a prepared batch at every cp (:func:`prepare_batch`); and ``segment_ids``
# when packed.
BATCH_FIELDS = ("tokens", "targets", "target_weights", "positions", "token_index")


def _xp(x):
    """numpy for host arrays, jax.numpy for jax arrays and tracers."""
    return jnp if isinstance(x, jax.Array) else np


def padded_seq_len(seq_len: int, cp: int, tp: int = 1) -> int:
    """Smallest multiple of 2*cp*tp that is >= seq_len."""
    if cp < 1 or tp < 1 or seq_len < 1:
        raise ValueError(f"need cp, tp >= 1 and seq_len >= 1, got cp={cp} tp={tp} "
                         f"seq_len={seq_len}")
    m = 2 * cp * tp
    return -(-seq_len // m) * m


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
    xp = _xp(x)
    x = xp.asarray(x)
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, seq_len_padded - x.shape[1])
    return xp.pad(x, widths, constant_values=value)


def to_zigzag(x, cp: int, pad_value=0, tp: int = 1):
    """[B, S, ...] in global order -> [B, S_pad, ...] in zig-zag layout (padded with
    ``pad_value`` to a multiple of 2*cp*tp)."""
    s_pad = padded_seq_len(x.shape[1], cp, tp)
    return pad_to(x, s_pad, pad_value)[:, zigzag_permutation(s_pad, cp)]


def from_zigzag(x, cp: int, seq_len: int):
    """Inverse of :func:`to_zigzag`: [B, S_pad, ...] zig-zag -> [B, seq_len, ...] global
    order (padding dropped). Works on numpy and jax arrays."""
    s_pad = x.shape[1]
    return x[:, inverse_permutation(zigzag_permutation(s_pad, cp))][:, :seq_len]


def zigzag_token_index(batch: int, seq_len: int, cp: int, tp: int = 1) -> np.ndarray:
    """int32 [B, S_pad]: the global token index at each zig-zag layout position (the
    q_index / k_index of ring attention; padding gets indices >= seq_len)."""
    perm = zigzag_permutation(padded_seq_len(seq_len, cp, tp), cp).astype(np.int32)
    return np.broadcast_to(perm, (batch, perm.size)).copy()


def next_token_targets(tokens, loss_mask):
    """(targets, weights) [..., S]: targets[t] = tokens[t + 1], weights[t] = loss_mask[t + 1]
    (0 at the last position): the loss of position t, aligned with the input token t."""
    xp = _xp(tokens)
    tokens, loss_mask = xp.asarray(tokens), xp.asarray(loss_mask)
    targets = xp.concatenate([tokens[..., 1:], xp.zeros_like(tokens[..., :1])], axis=-1)
    weights = xp.concatenate([loss_mask[..., 1:], xp.zeros_like(loss_mask[..., :1])], axis=-1)
    return targets, weights


def zigzag_batch(tokens, loss_mask, cp: int, *, segment_ids=None, positions=None,
                 pad_id: int = 0, tp: int = 1) -> dict:
    """Pad and permute one batch for context parallelism (padding rule: module docstring).

    tokens, loss_mask [B, S] (loss_mask[t] = 1 when token t is a target); segment_ids and
    positions optional [B, S] int (positions default to arange(S)). Returns [B, S_pad] arrays
    (numpy, or jax for jax inputs) in zig-zag layout: tokens, targets and target_weights
    (next-token targets and their loss weights, formed before permuting), positions,
    token_index and, when given, segment_ids. S_pad is a multiple of 2*cp*tp.
    """
    xp = _xp(tokens)
    b, s = tokens.shape
    if positions is None:
        positions = xp.broadcast_to(xp.arange(s, dtype=np.int32), (b, s))
    targets, weights = next_token_targets(tokens, loss_mask)
    z = lambda x, value: to_zigzag(x, cp, value, tp)  # noqa: E731
    out = {
        "tokens": z(tokens, pad_id),
        "targets": z(targets, pad_id),
        "target_weights": z(weights, 0),
        "positions": z(positions, 0),
        "token_index": xp.asarray(zigzag_token_index(b, s, cp, tp)),
    }
    if segment_ids is not None:
        out["segment_ids"] = z(segment_ids, PAD_SEGMENT_ID)
    return out


def whole_batch(tokens, loss_mask, *, segment_ids=None, positions=None) -> dict:
    """The fields of :func:`zigzag_batch` for cp = 1: whole sequences in their order, unpadded.

    tokens, loss_mask [..., S]; segment_ids, positions optional [..., S] (positions default to
    arange(S)). Returns [..., S] arrays: tokens, targets, target_weights, positions,
    token_index (0..S-1) and, when given, segment_ids. No reshape, so inside a jitted function
    the arrays keep their sharding."""
    xp = _xp(tokens)
    tokens = xp.asarray(tokens)
    index = xp.broadcast_to(xp.arange(tokens.shape[-1], dtype=np.int32), tokens.shape)
    targets, weights = next_token_targets(tokens, loss_mask)
    out = {"tokens": tokens, "targets": targets, "target_weights": weights,
           "positions": index if positions is None else positions, "token_index": index}
    if segment_ids is not None:
        out["segment_ids"] = segment_ids
    return out


def prepare_batch(batch: dict, cp: int, tp: int = 1) -> dict:
    """The batch preparation of a train or eval step, at every cp: every [..., B, S] array of
    ``batch`` (``tokens``, ``loss_mask``, optional ``positions`` / ``segment_ids``; any leading
    axes, e.g. micro-batches) -> the fields of the batch schema (module docstring): with cp > 1
    in the zig-zag layout of :func:`zigzag_batch`, with cp = 1 as :func:`whole_batch`. numpy
    on the host, jax.numpy inside a jitted function; a batch that has ``targets`` is prepared
    already and returned as it is. Without ``loss_mask`` (logits only) no token is a target."""
    if "targets" in batch:
        return batch
    if batch.get("loss_mask") is None:
        batch = {**batch, "loss_mask": _xp(batch["tokens"]).zeros_like(batch["tokens"])}
    if cp == 1:
        return whole_batch(batch["tokens"], batch["loss_mask"],
                           segment_ids=batch.get("segment_ids"), positions=batch.get("positions"))
    xp = _xp(batch["tokens"])
    tokens = xp.asarray(batch["tokens"])
    lead, s = tokens.shape[:-1], tokens.shape[-1]
    flat = lambda k: None if batch.get(k) is None else xp.asarray(batch[k]).reshape(-1, s)  # noqa: E731
    out = zigzag_batch(flat("tokens"), flat("loss_mask"), cp, segment_ids=flat("segment_ids"),
                       positions=flat("positions"), tp=tp)
    return {k: xp.asarray(v).reshape(*lead, -1) for k, v in out.items()}
