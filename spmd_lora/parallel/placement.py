"""Host <-> device transfer: every array the package places on, or reads back from, a mesh.

* :func:`put_global` / :func:`replicate`: a host value every process holds in full, onto a
  sharding (each process fills only its own devices' shards).
* :func:`shard_micro_batches` / :func:`place_micro_batches`: THE batch placement of a train
  step. Host ``[A, B, S]`` int arrays (``tokens``, ``loss_mask``, optional ``positions`` /
  ``segment_ids``) become the batch schema of :func:`.zigzag.prepare_batch` (next-token
  targets, token indices; the zig-zag layout when cp > 1) and are placed on
  ``MICRO_BATCH_SPEC``: B split over dp, S over cp. ``place_micro_batches`` builds on each
  process only the rows of its own devices (:func:`local_rows`, :func:`put_rows`).
  :func:`shard_batch` does the same for one ``[B, S]`` batch of a forward (``api.Model``).
* :func:`replicated_to_host` / :func:`to_host`: numpy copies back, also of arrays that span
  several processes.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from .mesh import BATCH_SPEC, CP, DP, REPLICATED, TP
from .zigzag import padded_seq_len, prepare_batch

MICRO_BATCH_SPEC = P(None, DP, CP)      # [accum, batch, seq]: batch over dp, sequence over cp


def put_global(x, sharding):
    """Place a host value that every process holds in full onto ``sharding``. Works with one
    process and with several (each process fills only its own devices' shards)."""
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicated_to_host(x):
    """numpy copy of a replicated array, also when it spans several processes (any local shard
    of a replicated array is the whole of it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_shards[0].data
    return np.asarray(jax.device_get(x))


def shard_micro_batches(batches: dict, mesh) -> dict:
    """The batch preparation of a step: host arrays [A, B, S] (``tokens``, ``loss_mask``,
    optional ``positions`` / ``segment_ids``) in the batch schema of
    :func:`.zigzag.prepare_batch` (zig-zag with cp > 1), placed with B split over dp and S
    over cp."""
    return _shard(batches, mesh, MICRO_BATCH_SPEC)


def shard_batch(batch: dict, mesh) -> dict:
    """One batch of a forward (logits, eval loss): host arrays [B, S] laid out as
    :func:`shard_micro_batches` lays out each micro-batch (``BATCH_SPEC``)."""
    return _shard(batch, mesh, BATCH_SPEC)


def _shard(batches: dict, mesh, spec) -> dict:
    batches = prepare_batch(batches, mesh.shape[CP], mesh.shape[TP])
    sharding = NamedSharding(mesh, spec)
    return {k: put_global(np.asarray(v, np.int32), sharding) for k, v in batches.items()}


def replicate(tree, mesh):
    """Replicate a (small) tree, e.g. LoRA factors and optimizer state, on every device."""
    replicated = NamedSharding(mesh, REPLICATED)
    return jax.tree.map(lambda x: put_global(x, replicated), tree)


def local_rows(shape, sharding, row_axis: int = 1) -> list[int]:
    """The indices along ``row_axis`` that this process's devices hold, ascending."""
    rows = set()
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        rows.update(range(*index[row_axis].indices(shape[row_axis])))
    return sorted(rows)


def put_rows(shape, sharding, rows: list[int], local: np.ndarray, row_axis: int = 1) -> jax.Array:
    """A global array of ``shape`` on ``sharding`` from ``local``, which holds only the rows
    ``rows`` (from :func:`local_rows`) along ``row_axis``."""
    where = {r: i for i, r in enumerate(rows)}

    def piece(index):
        picked = [where[r] for r in range(*index[row_axis].indices(shape[row_axis]))]
        block = np.take(local, picked, axis=row_axis)
        index = tuple(slice(None) if a == row_axis else s for a, s in enumerate(index))
        return block[index]

    return jax.make_array_from_callback(tuple(shape), sharding, piece)


def to_host(x) -> np.ndarray:
    """numpy copy of a whole array, also one split over devices of several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def place_micro_batches(batches, where: list[tuple[int, int]], mesh) -> dict:
    """The micro-batches at positions ``where`` ((epoch, index) pairs of a
    :class:`~spmd_lora.data.BatchIterator`) as ``[A, B, S]`` arrays with B split over dp and
    (zig-zag, with cp > 1) S over cp, the layout of :func:`shard_micro_batches`; this process
    builds only its devices' rows."""
    sharding = NamedSharding(mesh, MICRO_BATCH_SPEC)
    cp, tp = mesh.shape[CP], mesh.shape[TP]
    seq = padded_seq_len(batches.max_seq_len, cp, tp) if cp > 1 else batches.max_seq_len
    shape = (len(where), batches.batch_size, seq)
    rows = local_rows(shape, sharding)
    parts = [batches.batch(epoch, index, rows) for epoch, index in where]
    local = prepare_batch({k: np.stack([p[k] for p in parts]) for k in parts[0]}, cp, tp)
    return {k: put_rows(shape, sharding, rows, v.astype(np.int32)) for k, v in local.items()}
