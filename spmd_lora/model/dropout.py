"""Layout-independent LoRA dropout masks.

A mask element is a pure function of (key, global batch row, token index in the sequence,
global input feature): the projection's key and the batch row give a per-row key (one
Threefry-2x32 hash), under which the counter pair (token index, feature) is hashed. So the mask
a token sees is the same whatever the layout: tp degree, sequence parallelism, the zig-zag
context-parallel order, tiles, the dp split of the batch or the number of processes. Each
device hashes only its own elements.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

from ..kernels import _vma


@dataclasses.dataclass(frozen=True)
class Dropout:
    """What a projection needs to draw its mask: a PRNG ``key`` (typed key array), the global
    batch row ``batch_rows`` [B] and the token index in the (unpermuted) sequence ``rows``
    [B, N] (both uint32) of the input's rows."""

    key: jax.Array
    batch_rows: jax.Array
    rows: jax.Array


jax.tree_util.register_dataclass(Dropout, data_fields=["key", "batch_rows", "rows"],
                                 meta_fields=[])


def _threefry(k1, k2, x0, x1):
    """Threefry-2x32 of counters (x0, x1) under key words (k1, k2), all broadcast to one shape
    and one varying-manual-axes set. Returns the first output word."""
    shape = jnp.broadcast_shapes(*(jnp.shape(v) for v in (k1, k2, x0, x1)))
    args = [jnp.broadcast_to(jnp.asarray(v, jnp.uint32), shape) for v in (k1, k2, x0, x1)]
    axes = _vma.union_axes(*args)
    bits, _ = threefry2x32_p.bind(*(_vma.pvary(v, axes) for v in args))
    return bits


def keep_mask(drop: Dropout, cols, rate: float):
    """Boolean [B, N, len(cols)]: True where the element is kept. ``cols`` [C] int: global
    input-feature ids of the local columns."""
    k1, k2 = jax.random.key_data(drop.key).astype(jnp.uint32)
    batch_rows = drop.batch_rows.astype(jnp.uint32)
    row_k1 = _threefry(k1, k2, batch_rows, jnp.uint32(0))                   # [B] per-row key
    row_k2 = _threefry(k1, k2, batch_rows, jnp.uint32(1))
    bits = _threefry(row_k1[:, None, None], row_k2[:, None, None],
                     drop.rows.astype(jnp.uint32)[..., None],
                     jnp.asarray(cols, jnp.uint32)[None, None, :])         # [B, N, C]
    threshold = jnp.uint32(min(int(rate * 2.0 ** 32), 2 ** 32 - 1))
    return bits >= threshold


def apply(x, drop: Dropout | None, cols, rate: float):
    """Inverted dropout of x [B, N, C] (kept elements scaled by 1/(1-rate)), in x.dtype."""
    if drop is None or rate == 0.0:
        return x
    keep = keep_mask(drop, cols, rate)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
