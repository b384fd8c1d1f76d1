"""Masks, padding and tile kinds: the one copy shared by the Pallas and the blockwise kernels.

Every kernel walks (q tile, k tile) pairs and asks three questions, answered here:

* how the sequences are padded (:func:`pad_seq`, :func:`pad_ids`, :func:`pad_block_ids`):
  position-masked attention pads segment ids with -1 and masks keys >= kv_len; index-masked
  blocks (ring attention) pad the indices with :data:`INDEX_PAD_Q` / :data:`INDEX_PAD_K`, so
  that padding is never visible and needs no mask of its own;
* which pairs to visit, and which of those need a mask (the tile kinds): for positions the
  loop bounds of :func:`key_spans` / :func:`query_spans` (tiles above the causal diagonal are
  never visited, tiles below it and inside the real keys are not masked); for explicit indices
  a per-pair branch, :func:`tile_kind`;
* the boolean mask of one pair (:func:`tile_mask`), from positions or indices alike.

Segment ids: a key is visible to a query of the same segment. Ids from
:data:`BRANCH_SEGMENT_BASE` on encode a shared prefix and its branches (DPO's prompt, chosen
and rejected answers in one row): ``branch_segment(group, role)``, role 0 the prefix, 1..3 the
branches; a branch also sees its group's prefix, never another branch
(:func:`segments_visible`). Ids below the base are plain segments (packing).

:class:`Masking` (static, one per kernel call) is the mask provider the kernels are written
against: it picks the answers for positions or for indices, and :func:`visit_tiles` runs a
kernel's tile loop from them.

Arrays of positions / indices / segment ids are [..., n] (a tile of one row, or of a batch):
masks are [..., bq, bk].
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)   # finite: exp(MASK_VALUE - m) is 0
INDEX_PAD_Q = -1                              # padded q rows see no key
INDEX_PAD_K = int(np.iinfo(np.int32).max)     # padded keys are seen by no query
SEGMENT_PAD = -1                              # position masking: padded rows' segment id
BRANCH_SEGMENT_BASE = 1 << 24                 # segment ids >= this: shared prefix + branches
BRANCH_ROLES = 4                              # role 0 the shared prefix, 1..3 its branches

# Tile kinds, the branch index of a (q tile, k tile) pair: nothing visible, some keys hidden
# from some rows, every key visible to every row.
TILE_SKIP, TILE_MASKED, TILE_FULL = 0, 1, 2


def cdiv(a, b: int):
    """ceil(a / b) for an int32 (traced) ``a`` and a static int ``b`` (int32 even under x64,
    and lowerable by Triton)."""
    return lax.div(a + (b - 1), jnp.int32(b))


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ----------------------------------------------------------------------------- padding

def pad_seq(x, length: int, value=0):
    """Pad axis 1 (the sequence) of ``x`` to ``length`` with ``value``."""
    s = x.shape[1]
    if s == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, length - s)
    return jnp.pad(x, widths, constant_values=value)


def pad_ids(ids, length: int, value: int = SEGMENT_PAD):
    """int32 [B, length] from [B, S] ids (segment ids or token indices); None stays None."""
    return None if ids is None else pad_seq(ids.astype(jnp.int32), length, value)


def pad_block_ids(q_index, k_index, q_seg, k_seg, sq_pad: int, sk_pad: int):
    """Index-masked blocks: (q_index, k_index, q_seg, k_seg) padded to sq_pad / sk_pad, the
    indices with INDEX_PAD_Q / INDEX_PAD_K (padding needs no extra mask), segment ids with 0."""
    return (pad_ids(q_index, sq_pad, INDEX_PAD_Q), pad_ids(k_index, sk_pad, INDEX_PAD_K),
            pad_ids(q_seg, sq_pad, 0), pad_ids(k_seg, sk_pad, 0))


# ----------------------------------------------------------------------------- masks

def branch_segment(group, role):
    """The segment id of ``role`` (0 the shared prefix, 1..BRANCH_ROLES-1 a branch) of prefix
    group ``group`` (>= 0): ``BRANCH_SEGMENT_BASE + BRANCH_ROLES * group + role``."""
    return BRANCH_SEGMENT_BASE + BRANCH_ROLES * group + role


def segments_visible(q_seg, k_seg):
    """Boolean [..., bq, bk] from q_seg [..., bq], k_seg [..., bk] (int32): a key is visible to
    a query of its own segment, and a branch segment's query (id >= BRANCH_SEGMENT_BASE) also
    sees the shared prefix of its group (the id with the role bits cleared)."""
    q, k = q_seg[..., :, None], k_seg[..., None, :]
    prefix = jnp.bitwise_and(q, jnp.int32(-BRANCH_ROLES))       # role bits cleared
    return (q == k) | ((q >= BRANCH_SEGMENT_BASE) & (k == prefix))


def tile_mask(q_pos, k_pos, q_seg, k_seg, *, causal: bool, kv_len: int | None = None):
    """Boolean [..., bq, bk] mask of one tile, or None when nothing is masked.

    q_pos [..., bq] / k_pos [..., bk]: absolute positions or global token indices (int32).
    causal: key visible iff k_pos <= q_pos. kv_len: keys at positions >= kv_len are padding
    (None: no padding to mask). q_seg / k_seg: segment ids (or None), visible iff equal."""
    mask = None
    if causal:
        mask = k_pos[..., None, :] <= q_pos[..., :, None]
    if kv_len is not None:
        m = jnp.broadcast_to(k_pos[..., None, :] < kv_len, (*q_pos.shape, k_pos.shape[-1]))
        mask = m if mask is None else mask & m
    if q_seg is not None:
        m = segments_visible(q_seg, k_seg)
        mask = m if mask is None else mask & m
    return mask


# ----------------------------------------------------------------------------- tile kinds

def tile_kind(q_min, q_max, k_idx, has_seg: bool):
    """Index-masked blocks: the kind of a (q tile, k tile) pair from the q tile's index range
    and the k tile's indices: TILE_SKIP when no key is visible to any row (min k > max q),
    TILE_FULL when every key is visible to every row and there are no segment ids
    (max k <= min q), TILE_MASKED otherwise. An int32 scalar (a ``lax.switch`` index)."""
    # int32 arithmetic on the flags: Triton lowers where(pred, 0, 1) on Python ints to an i1
    # value, which the switch's index clamp then rejects (i32 vs i1).
    skip = (jnp.min(k_idx) > q_max).astype(jnp.int32)
    if has_seg:
        return (1 - skip) * TILE_MASKED
    full = (jnp.max(k_idx) <= q_min).astype(jnp.int32)
    return (1 - skip) * (TILE_MASKED + full)


def key_spans(q_start, bq: int, bk: int, nk: int, *, causal: bool, kv_len: int):
    """Position masking, the key tiles one q tile [q_start, q_start + bq) visits:
    ((0, unmasked_end), False), ((unmasked_end, end), True) -- (loop bounds, masked): first
    the tiles needing no position mask (below the causal diagonal, all keys < kv_len), then
    the masked ones; tiles from ``end`` on lie wholly above the diagonal and are never
    visited."""
    full_kv = kv_len // bk  # key tiles holding no padding
    if causal:
        end = jnp.minimum(cdiv(q_start + bq, bk), nk)
        unmasked_end = jnp.minimum(lax.div(q_start + 1, jnp.int32(bk)), full_kv)
    else:
        end, unmasked_end = nk, full_kv
    return ((0, unmasked_end), False), ((unmasked_end, end), True)


def query_spans(k_start, bq: int, bk: int, nq: int, *, causal: bool, kv_len: int,
                seq_pad: int):
    """Position masking, the q tiles one key tile [k_start, k_start + bk) is visited by:
    ((start, unmasked_start), True), ((unmasked_start, nq), False) -- (loop bounds, masked):
    first the masked tiles (on the diagonal, or every tile when the key tile holds padding),
    then the unmasked ones."""
    if causal:
        start = lax.div(k_start, jnp.int32(bq))  # first q tile with a row >= k_start
        # first q tile whose every row sees every key of this tile
        unmasked_start = jnp.minimum(cdiv(k_start + bk - 1, bq), nq)
    else:  # int32 values, not Python ints: with Python ints the where() below lowers to an
        # i1 value in Triton and the loop bound fails to lower ('i1' vs 'i32')
        start = jnp.int32(0)
        unmasked_start = jnp.int32(0)
    if kv_len < seq_pad:  # a tile holding padded keys is masked everywhere
        unmasked_start = jnp.where(k_start + bk > kv_len, nq, unmasked_start)
    return ((start, unmasked_start), True), ((unmasked_start, nq), False)


def visit_tiles(tile, carry, *, n, locate, spans=None, kind=None, split=None):
    """The tile loop of every kernel: ``carry = tile(start, pos, carry, masked)`` for each
    visited tile j of a loop over n tiles, ``locate(j) -> (start, pos)`` its first row / key
    and its positions (or indices).

    Position masking, ``spans`` (((lo, hi), masked) pairs, from :func:`key_spans` /
    :func:`query_spans`): the loop bounds decide which tiles are visited and masked. Index
    masking, ``kind(pos)`` (a :func:`tile_kind`): all n tiles, each branching three ways
    (skipped, masked, full). ``split(start, carry) -> (inner, join)``: only ``inner`` goes
    through the tile (and the branch), ``join(inner)`` is the next carry, so accumulators
    larger than a tile stay out of the conditional."""
    def step(j, carry, masked):
        start, pos = locate(j)
        inner, join = split(start, carry) if split else (carry, lambda c: c)
        if masked is None:  # branches in TILE_SKIP, TILE_MASKED, TILE_FULL order
            inner = lax.switch(kind(pos), [lambda c: c,
                                           lambda c: tile(start, pos, c, True),
                                           lambda c: tile(start, pos, c, False)], inner)
        else:
            inner = tile(start, pos, inner, masked)
        return join(inner)

    if spans is None:
        return lax.fori_loop(0, n, functools.partial(step, masked=None), carry)
    for (lo, hi), masked in spans:
        carry = lax.fori_loop(lo, hi, functools.partial(step, masked=masked), carry)
    return carry


@dataclasses.dataclass(frozen=True)
class Masking:
    """The mask provider of one kernel call (static, hashable): what is masked and which tiles
    a kernel visits. The kernels are written once against it.

    indexed=False, position masking (``attention``): the positions of a tile are an iota;
    causal by position, keys >= kv_len of the seq_pad padded ones are padding; tiles are
    visited by loop bounds. indexed=True, index masking (ring attention blocks): positions
    are explicit global token indices (padded with INDEX_PAD_Q / INDEX_PAD_K); key visible iff
    k_index <= q_index; every tile pair branches on its tile kind, and a row may see no key.
    has_seg: segment ids mask every tile in both."""
    indexed: bool
    has_seg: bool
    causal: bool = True
    kv_len: int = 0
    seq_pad: int = 0

    def mask(self, q_pos, k_pos, q_seg, k_seg, *, masked: bool):
        """The [..., bq, bk] mask of a tile, or None. ``masked=False``: the tile is known to
        need no position (index) mask, only segment ids can mask it (with indices such a tile
        has no segment ids: see :func:`tile_kind`)."""
        if self.indexed and not masked:
            return None
        padded = not self.indexed and self.kv_len < self.seq_pad
        return tile_mask(q_pos, k_pos, q_seg, k_seg, causal=masked and self.causal,
                         kv_len=self.kv_len if masked and padded else None)

    def key_visits(self, q_start, q_pos, bq: int, bk: int, nk: int):
        """``spans`` / ``kind`` of :func:`visit_tiles` for the key tiles of one q tile (at
        q_start, positions q_pos)."""
        if not self.indexed:
            return {"spans": key_spans(q_start, bq, bk, nk, causal=self.causal,
                                       kv_len=self.kv_len)}
        q_min, q_max = jnp.min(q_pos), jnp.max(q_pos)
        return {"kind": lambda k_pos: tile_kind(q_min, q_max, k_pos, self.has_seg)}

    def query_visits(self, k_start, k_pos, bq: int, bk: int, nq: int):
        """``spans`` / ``kind`` of :func:`visit_tiles` for the q tiles of one key tile."""
        if not self.indexed:
            return {"spans": query_spans(k_start, bq, bk, nq, causal=self.causal,
                                         kv_len=self.kv_len, seq_pad=self.seq_pad)}
        return {"kind": lambda q_pos: tile_kind(jnp.min(q_pos), jnp.max(q_pos), k_pos,
                                                self.has_seg)}
