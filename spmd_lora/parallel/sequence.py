"""Sequence layout of the residual stream over the ``tp`` axis, and its collectives.

Two layouts, chosen once per model by :class:`SeqLayout` (static, compile time):

* **replicated** (plain Megatron tensor parallelism, or tp = 1): every tp device holds the whole
  sequence, ``[B, S, D]``. A column-parallel block's input is marked tp-varying with
  ``pcast`` (Megatron's ``f``: identity forward, one psum of the input gradient backward) and a
  row-parallel block's partial output is summed with ``psum`` (Megatron's ``g``).
* **sequence-parallel** (Megatron-SP, Korthikanti et al. 2022): device ``d`` holds rows
  ``[d*R, (d+1)*R)`` of the sequence padded to ``S_pad = tp*R``, i.e. ``[B, R, D]``. A column
  block's input is ``all_gather``-ed along S over tp (backward: ``psum_scatter``), a row block's
  partial output is ``psum_scatter``-ed along S (backward: ``all_gather``). Same bytes on the
  wire as the all-reduce (an all-reduce is a reduce-scatter plus an all-gather), tp x less
  memory for everything outside the column -> row blocks: the residual stream, the norms and the
  remat-saved layer inputs.

Token-level inputs (tokens, positions, segment ids, loss mask) stay whole ``[B, S]`` on every tp
device in both layouts (a few bytes per token): the vocab-parallel embedding needs every token
on every device, and attention needs every position. With sequence parallelism the sequence is
padded to ``S_pad`` internally: padded tokens come last, get loss weight 0, and causal masking
keeps every real token from seeing them.

**Tiles.** Position-wise work (the MLP, the cross-entropy) may run over tiles of the local rows
so no ``[S, F/tp]`` or ``[S, V/tp]`` intermediate is ever whole: tile ``j`` of ``n`` takes local
rows ``[j*c, (j+1)*c)``; gathered, it holds global rows ``d*R + j*c + i`` (d-major), which
:meth:`SeqLayout.tile_rows` returns. The replicated layout tiles the same way with tp = 1 rows.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .mesh import TP


@dataclasses.dataclass(frozen=True)
class SeqLayout:
    """How one device holds a sequence of ``seq_len`` tokens. Static (hashable)."""

    seq_len: int          # S: the sequence length of the batch
    tp: int
    sp: bool              # sequence-parallel (only meaningful with tp > 1)

    @property
    def padded_len(self) -> int:
        """S_pad: S rounded up to a multiple of tp under sequence parallelism, else S."""
        if not self.sp:
            return self.seq_len
        return -(-self.seq_len // self.tp) * self.tp

    @property
    def local_rows(self) -> int:
        """R: residual-stream rows this device holds (S_pad / tp, or S)."""
        return self.padded_len // self.tp if self.sp else self.seq_len

    @property
    def gather_factor(self) -> int:
        """How many devices' rows one gather brings together (tp, or 1)."""
        return self.tp if self.sp else 1

    # ------------------------------------------------------------------ token-level inputs

    def pad(self, x, value=0):
        """[B, S, ...] -> [B, S_pad, ...] (padding last, filled with ``value``)."""
        return pad_axis(x, 1, self.padded_len, value)

    def tile_rows(self, start, size: int):
        """Global sequence indices [gather_factor * size] of the gathered tile whose local rows
        are ``[start, start + size)`` (d-major; ``start`` may be traced)."""
        local = start + jnp.arange(size, dtype=jnp.int32)
        if not self.sp:
            return local
        devices = jnp.arange(self.tp, dtype=jnp.int32)[:, None] * self.local_rows
        return (devices + local[None, :]).reshape(-1)

    # ------------------------------------------------------------------ collectives

    def gather(self, x, axis: int = 1):
        """Column-block input: local rows -> the rows of every tp device along ``axis``
        (all_gather), or, replicated, the same array marked tp-varying (pcast)."""
        if self.sp:
            return jax.lax.all_gather(x, TP, axis=axis, tiled=True)
        return jax.lax.pcast(x, TP, to="varying")

    def scatter(self, y, axis: int = 1):
        """Row-block partial output: sum over tp, keeping this device's rows along ``axis``
        (psum_scatter), or, replicated, the whole sum (psum)."""
        if self.sp:
            return jax.lax.psum_scatter(y, TP, scatter_dimension=axis, tiled=True)
        return jax.lax.psum(y, TP)


def pad_axis(x, axis: int, length: int, value=0):
    """x padded at the end of ``axis`` to ``length`` (filled with ``value``)."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def tiled(fn, x, chunk: int, *, axis: int = 1):
    """Run a row-wise ``fn`` over tiles of ``chunk`` rows of ``x`` (along ``axis``) inside a
    rematerialised ``lax.scan``: ``fn(tile, start) -> out tile`` (same rows, any trailing
    shape). Rows are zero-padded up to a multiple of ``chunk`` and the padding is cut off
    again, so any length works. Only one tile's intermediates are ever live, forward or backward
    (each tile is recomputed from its input in the backward pass)."""
    rows = x.shape[axis]
    chunk = max(1, min(chunk, rows))
    n = -(-rows // chunk)
    x = pad_axis(x, axis, n * chunk)
    tiles = jnp.moveaxis(x.reshape(*x.shape[:axis], n, chunk, *x.shape[axis + 1:]), axis, 0)
    out = jnp.moveaxis(_scan_tiles(lambda t, j: fn(t, j * chunk), tiles), 0, axis)
    out = out.reshape(*out.shape[:axis], n * chunk, *out.shape[axis + 2:])   # [.., n*chunk, ..]
    return jax.lax.slice_in_dim(out, 0, rows, axis=axis)


def _scan_tiles(fn, tiles):
    """Rematerialised scan of ``fn(tile, j)`` over the leading axis of ``tiles``."""
    @jax.checkpoint
    def body(carry, xs):
        tile, j = xs
        return carry, fn(tile, j)

    _, out = jax.lax.scan(body, None, (tiles, jnp.arange(tiles.shape[0], dtype=jnp.int32)))
    return out


def gather_tiles(fn, x, chunk: int, layout: SeqLayout, pre=None):
    """Column side of a tiled block. x [B, R, D] local rows; each tile of ``chunk`` local rows
    is mapped by the row-wise ``pre`` when given (a norm: then no normed [B, R, D] copy is ever
    whole), gathered over tp (``layout.gather``: [B, g*c, D], rows d*R + j*c + i, d-major) and
    mapped by ``fn(gathered_tile, start) -> [B, g*c, F]`` (or a tuple of such arrays, any F
    each). Returns [B, S_pad, F] (or the tuple) in sequence order, so the whole gathered
    [B, S_pad, D] input never exists. Tiles are rematerialised.

    The scan runs over [n, c, B, D] tiles, not [n, B, c, D] (the same bytes for B = 1): the
    backward's input-gradient tiles start as a broadcast ``lax.scan`` allocates for its stacked
    outputs, and XLA CSEs equal broadcasts into one buffer. With the MLP's and o_proj's tiles
    (:func:`tiled`, :func:`scatter_tiles`: [n, B, c, D]) that one [B, S, D] buffer would stay
    live from the MLP backward to the end of this block's, across the attention backward
    (+11 GiB at 1.5M tokens on Llama-3-8B)."""
    b, rows, d = x.shape
    g = layout.gather_factor
    n = -(-rows // chunk)
    x = pad_axis(x, 1, n * chunk)
    tiles = x.reshape(b, n, chunk, d).transpose(1, 2, 0, 3)                  # [n, c, B, D]
    pre = pre or (lambda t: t)

    def tile_fn(t, j):                                                      # t [c, B, D]
        return fn(layout.gather(pre(t.transpose(1, 0, 2))), j * chunk)      # [B, g*c, F]
    ys = _scan_tiles(tile_fn, tiles)                                        # [n, B, g*c, F]

    def in_order(y):
        f = y.shape[-1]
        y = y.reshape(n, b, g, chunk, f).transpose(1, 2, 0, 3, 4)            # [B, g, n, c, F]
        return y.reshape(b, g, n * chunk, f)[:, :, :rows].reshape(b, g * rows, f)
    return jax.tree.map(in_order, ys)


def scatter_tiles(fn, y, chunk: int, layout: SeqLayout):
    """Row side of a tiled block. y [B, S_pad, F] in sequence order; tile j takes rows
    d*R + j*c + i of every device d ([B, g*c, F]), ``fn(tile, start) -> [B, g*c, D]`` partial
    sums, reduced by ``layout.scatter`` to this device's [B, c, D]. Returns [B, R, D]."""
    b, s, f = y.shape
    g = layout.gather_factor
    rows = s // g
    n = -(-rows // chunk)
    y = pad_axis(y.reshape(b, g, rows, f), 2, n * chunk)
    tiles = y.reshape(b, g, n, chunk, f).transpose(2, 0, 1, 3, 4).reshape(n, b, g * chunk, f)
    out = _scan_tiles(lambda t, j: layout.scatter(fn(t, j * chunk)), tiles)  # [n, B, c, D]
    d = out.shape[-1]
    return out.transpose(1, 0, 2, 3).reshape(b, n * chunk, d)[:, :rows]
