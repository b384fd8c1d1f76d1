"""Layout-independent LoRA dropout masks.

A mask element is a pure function of (key, global token row, global input feature): the
Threefry-2x32 hash of the counter pair (row, feature) under the projection's key. So the mask a
token sees is the same whatever the layout: tp degree, sequence parallelism, tiles, the dp
split of the batch or the number of processes. Each device hashes only its own elements.

Global token row = ``batch_row * S + position_in_sequence`` (batch_row counted over the global
batch), assumed < 2**32.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

from .kernels import _vma


@dataclasses.dataclass(frozen=True)
class Dropout:
    """What a projection needs to draw its mask: a PRNG ``key`` (typed key array) and the global
    token row ids ``rows`` [B, N] (uint32) of the input's rows."""

    key: jax.Array
    rows: jax.Array

    def at(self, index: int) -> "Dropout":
        """The same rows under an independent key (one per projection)."""
        return Dropout(jax.random.fold_in(self.key, index), self.rows)


jax.tree_util.register_dataclass(Dropout, data_fields=["key", "rows"], meta_fields=[])


def keep_mask(drop: Dropout, cols, rate: float):
    """Boolean [B, N, len(cols)]: True where the element is kept. ``cols`` [C] int: global
    input-feature ids of the local columns."""
    k1, k2 = jax.random.key_data(drop.key).astype(jnp.uint32)
    rows = drop.rows.astype(jnp.uint32)[..., None]
    cols = jnp.asarray(cols, jnp.uint32)
    shape = drop.rows.shape + (cols.shape[0],)
    x0, x1 = jnp.broadcast_to(rows, shape), jnp.broadcast_to(cols, shape)
    axes = _vma.union_axes(k1, k2, x0, x1)
    k1, k2, x0, x1 = (_vma.pvary(v, axes) for v in (k1, k2, x0, x1))
    bits, _ = threefry2x32_p.bind(k1, k2, x0, x1)
    threshold = jnp.uint32(min(int(rate * 2.0 ** 32), 2 ** 32 - 1))
    return bits >= threshold


def apply(x, drop: Dropout | None, cols, rate: float):
    """Inverted dropout of x [B, N, C] (kept elements scaled by 1/(1-rate)), in x.dtype."""
    if drop is None or rate == 0.0:
        return x
    keep = keep_mask(drop, cols, rate)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
