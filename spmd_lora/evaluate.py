"""Evaluation: mean next-token loss and perplexity of a model (with its LoRA) over examples."""
from __future__ import annotations

import math

import numpy as np

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
