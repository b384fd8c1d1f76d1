"""Evaluation of a model (with its LoRA): mean next-token loss and perplexity over examples
(:func:`evaluate`); the DPO loss and TRL's reward metrics over preference pairs
(:func:`evaluate_preference`)."""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np

from . import model as model_lib
from .data.batching import collate
from .data.preference import collate_shared
from .engine import sharded
from .errors import DataError
from .parallel.mesh import DP


def _field(ex, name, default=None):
    if isinstance(ex, dict):
        return ex.get(name, default)
    return getattr(ex, name, default)


def evaluate(model, examples, batch_size: int = 8) -> dict:
    """Token-weighted loss over tokenized ``examples``.

    Each example has ``input_ids`` and ``loss_mask`` (int arrays of one length; ``loss_mask[t]=1``
    means token t is a target, i.e. HF ``labels != -100``), as attributes or dict keys, and
    optionally ``positions`` / ``segment_ids`` (packed sequences). Rows are right-padded to the
    longest example (one compiled shape; padding has mask 0) and each batch is padded to a
    multiple of dp with zero-mask rows. Loss sums and target counts are added over all batches, so
    the result is the mean over all target tokens (not a mean of per-batch means).

    Returns ``{"loss": float, "perplexity": float, "tokens": int}``.
    """
    examples = list(examples)
    if batch_size < 1:
        raise DataError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    if not examples:
        raise DataError("evaluate: no examples")
    rows = []
    for i, ex in enumerate(examples):
        ids, mask = _field(ex, "input_ids"), _field(ex, "loss_mask")
        if ids is None or mask is None:
            raise DataError(f"evaluate: example {i} needs input_ids and loss_mask")
        ids, mask = np.asarray(ids, np.int64).reshape(-1), np.asarray(mask).reshape(-1)
        if ids.shape != mask.shape:
            raise DataError(f"evaluate: example {i}: input_ids has {ids.size} tokens but loss_mask "
                            f"has {mask.size}")
        if ids.size and (ids.min() < 0 or ids.max() >= model.config.vocab_size):
            raise DataError(f"evaluate: example {i} holds token ids outside "
                            f"[0, {model.config.vocab_size})")
        pos, seg = _field(ex, "positions"), _field(ex, "segment_ids")
        rows.append((ids, mask, None if pos is None else np.asarray(pos).reshape(-1),
                     None if seg is None else np.asarray(seg).reshape(-1)))
    if not any(np.any(r[1][1:] != 0) for r in rows):
        raise DataError("evaluate: no target tokens (every loss_mask is 0 after the first token)")
    seq = max(1, max(r[0].size for r in rows))
    seq += (-seq) % 8
    dp = model.mesh.shape[DP]
    bs = batch_size + (-batch_size) % dp
    use_pos = any(r[2] is not None for r in rows)
    use_seg = any(r[3] is not None for r in rows)

    total, count = 0.0, 0.0
    for start in range(0, len(rows), bs):
        chunk = rows[start:start + bs]
        tokens = np.zeros((bs, seq), np.int32)
        mask = np.zeros((bs, seq), np.int32)
        positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (bs, seq)).copy()
        segments = np.zeros((bs, seq), np.int32)
        for j, (ids, m, pos, seg) in enumerate(chunk):
            n = ids.size
            tokens[j, :n], mask[j, :n] = ids, (m != 0)
            if pos is not None:
                positions[j, :n] = pos
            if seg is not None:
                segments[j, :n] = seg
                segments[j, n:] = seg.max(initial=0) + 1
        batch = model.put_batch({"tokens": tokens, "loss_mask": mask,
                                 "positions": positions if use_pos else None,
                                 "segment_ids": segments if use_seg else None})
        s, c = model._loss(model.params, model.lora or {}, batch, None)
        total += float(s)
        count += float(c)
    if count == 0:
        raise DataError("evaluate: no target tokens (every loss_mask is 0 after the first token)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}


@functools.lru_cache(maxsize=8)
def _preference_fn(opts, mesh, pref):
    return jax.jit(sharded.preference_sums_fn(opts, mesh, pref))


def evaluate_preference(model, pairs, pref, batch_size: int = 8, pad_id: int = 0) -> dict:
    """The DPO objective ``pref`` (a :class:`~spmd_lora.model.PreferenceLoss`) over
    preference ``pairs`` (:class:`~spmd_lora.data.preference.Pair` s): the forward of the DPO
    train step (policy = base + ``model.lora``, reference = the base), without gradients.

    Batches of ``batch_size`` pairs (rounded up to a multiple of dp) in the pairs' layout
    (``pref.shared_prefix``: one row per pair, never packed, whatever ``pref.pairs_per_row``;
    else pair i on rows 2i, 2i+1); every batch has the longest pair's length rounded up to 8
    (one compiled shape), the last one is padded with empty pairs, which count for nothing.
    Loss and metric sums are added over all batches and divided by the number of pairs: every
    pair weighs the same. Returns ``{"loss", "pairs", **metrics}``, metrics the means over
    pairs of ``model.PREFERENCE_METRICS`` (TRL's ``rewards/*`` and ``logps/*``)."""
    pairs = list(pairs)
    if batch_size < 1:
        raise DataError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    if not pairs:
        raise DataError("evaluate: no preference pairs")
    if any(p.shared_prefix != pref.shared_prefix for p in pairs):
        raise DataError(f"evaluate: pairs tokenized for the other layout (the loss has "
                        f"shared_prefix={pref.shared_prefix})")
    pref = dataclasses.replace(pref, pairs_per_row=1)
    dp = model.mesh.shape[DP]
    per_batch = batch_size + (-batch_size) % dp
    seq = max(len(p) for p in pairs)
    seq += (-seq) % 8
    fn = _preference_fn(model.options, model.mesh, pref)
    names = model_lib.PREFERENCE_METRICS
    total, count, sums = 0.0, 0.0, dict.fromkeys(names, 0.0)
    for start in range(0, len(pairs), per_batch):
        chunk = pairs[start:start + per_batch]
        if pref.shared_prefix:
            rows = collate_shared([[p] for p in chunk] + [[]] * (per_batch - len(chunk)), seq,
                                  pad_id)
        else:
            rows = collate([[ex] for p in chunk for ex in (p.chosen, p.rejected)], seq, pad_id,
                           batch_size=2 * per_batch)
        t, s, n = fn(model.params, model.lora or {}, model.put_batch(rows))
        total, count = total + float(t), count + float(n)
        sums = {k: sums[k] + float(s[k]) for k in names}
    if count == 0:
        raise DataError("evaluate: no preference pair has completion tokens")
    return {"loss": total / count, "pairs": int(count), **{k: v / count for k, v in sums.items()}}
