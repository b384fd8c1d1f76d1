"""The position part of the attention mask, shared by the Pallas and blockwise kernels."""
from __future__ import annotations

import jax.numpy as jnp


def position_mask(q_pos, k_pos, *, causal: bool, kv_len: int, seq_pad: int):
    """Boolean [bq, bk] mask of one tile from absolute positions (int32 vectors), or None when
    nothing is masked: causal (key not after query) and padding (key < kv_len when the sequence
    was padded to seq_pad). Segment ids are combined by each kernel in its own layout."""
    mask = None
    if causal:
        mask = q_pos[:, None] >= k_pos[None, :]
    if kv_len < seq_pad:
        m = jnp.broadcast_to(k_pos[None, :] < kv_len, (q_pos.shape[0], k_pos.shape[0]))
        mask = m if mask is None else mask & m
    return mask
