"""Preference pairs for DPO: records -> (chosen, rejected) example pairs -> batches of pairs.

Rows (JSON / JSONL / Parquet / ..., as :func:`~.records.iter_records` reads them):

* ``{prompt, chosen, rejected}``: a plain-text prompt, tokenized like the alpaca / text
  prompts (BOS, then the prompt's tokens);
* ``{question, contexts, chosen, rejected}``: the prompt is the rag template's
  (:func:`~.templates.rag_prompt`, all passages kept; no trimming).

Each pair gives two :class:`Example` s, ``BOS + prompt + chosen + EOS`` and ``BOS + prompt +
rejected + EOS``, with the loss mask on the completion tokens and EOS only. The prompt and
each completion are tokenized separately, so both rows share the prompt's tokens exactly.

Two batch layouts (:mod:`spmd_lora.model.preference`), ``batch_size`` PAIRS per batch in both
(as TRL's batch size):

* shared prefix (default): one row per pair, :meth:`Pair.shared_row`: the prompt less its
  last token, then that token + chosen + EOS, then that token + rejected + EOS, with branch
  segment ids (``kernels.branch_segment``) and positions restarting after the prompt for each
  answer. The row is ``len(chosen) + len(rejected) - prompt + 1`` tokens;
* separate: pair i on rows 2i (chosen) and 2i+1 (rejected), each as long as its example.

A pair whose row (shared prefix) or longer row (separate) exceeds ``max_seq_len`` is skipped
(one counted :class:`DataWarning`, as the other templates). Pairs are tokenized in memory
(not through the tokenized-data cache).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import numpy as np

from ..errors import DataError
from ..kernels import branch_segment
from .batching import BatchIterator, collate
from .examples import DataWarning, Example, encode_texts, make_example, special_ids
from .records import load_records
from .rows import where_of
from .templates import get_str, rag_passages, rag_prompt

PAIR_FIELDS = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True, eq=False)
class Pair:
    """A tokenized preference pair: two examples sharing their first ``prompt_len`` tokens
    (BOS and the prompt); ``shared_prefix``: batched as one row (:meth:`shared_row`)."""

    chosen: Example
    rejected: Example
    prompt_len: int
    source: str = ""
    shared_prefix: bool = True

    def __len__(self) -> int:
        """The tokens of its longest row (what must fit in ``max_seq_len``)."""
        if self.shared_prefix:
            return len(self.chosen) + len(self.rejected) - max(self.prompt_len - 1, 0)
        return max(len(self.chosen), len(self.rejected))

    @property
    def tokens(self) -> int:
        """Tokens of its batch rows (not padding)."""
        return len(self) if self.shared_prefix else len(self.chosen) + len(self.rejected)

    def shared_row(self) -> dict[str, np.ndarray]:
        """The pair as ONE row: ``tokens``, ``loss_mask``, ``segment_ids``, ``positions``
        (np.int32 [len(self)]). The prompt less its last token is segment
        ``branch_segment(0, 0)``; each answer, led by a copy of the prompt's last token (whose
        output predicts the answer's first token), is ``branch_segment(0, 1)`` (chosen) /
        ``(0, 2)`` (rejected), its positions continuing the prompt's. An answer's first token
        is never a target (as at the start of a separate row)."""
        cut = max(self.prompt_len - 1, 0)
        parts, masks, segs, pos = [], [], [], []
        for role, ex in enumerate((None, self.chosen, self.rejected)):
            if ex is None:
                ids, mask = self.chosen.input_ids[:cut], np.zeros(cut, np.int32)
                start = 0
            else:
                ids, mask = ex.input_ids[cut:], ex.loss_mask[cut:].copy()
                mask[:1] = 0
                start = cut
            parts.append(ids)
            masks.append(mask)
            segs.append(np.full(len(ids), branch_segment(0, role), np.int32))
            pos.append(np.arange(start, start + len(ids), dtype=np.int32))
        return {"tokens": np.concatenate(parts), "loss_mask": np.concatenate(masks),
                "segment_ids": np.concatenate(segs), "positions": np.concatenate(pos)}


def _prompt_text(rec: dict, where: str) -> str:
    if "prompt" in rec:
        return get_str(rec, "prompt", where, "dpo")
    if "question" in rec:
        return rag_prompt(get_str(rec, "question", where, "dpo"), rag_passages(rec, where))
    raise DataError(f"{where}: a preference row needs 'prompt' (or 'question' and 'contexts'), "
                    f"'chosen' and 'rejected' (fields present: {sorted(rec)})")


def tokenize_pairs(records: Sequence[dict], tokenizer, max_seq_len: int,
                   shared_prefix: bool = True) -> list[Pair]:
    """Records -> :class:`Pair` s (module docstring) for the layout ``shared_prefix``;
    over-long pairs skipped with one DataWarning, a DataError when none fits."""
    bos, eos = special_ids(tokenizer)
    head = [] if bos is None else [bos]
    wheres = [where_of(rec, i) for i, rec in enumerate(records)]
    prompts = [_prompt_text(rec, w) for rec, w in zip(records, wheres)]
    completions = {f: [get_str(rec, f, w, "dpo") for rec, w in zip(records, wheres)]
                   for f in PAIR_FIELDS}
    p_ids = encode_texts(tokenizer, prompts)
    c_ids = {f: encode_texts(tokenizer, completions[f]) for f in PAIR_FIELDS}
    pairs, too_long = [], []
    for i, (where, p) in enumerate(zip(wheres, p_ids)):
        rows = []
        n_prompt = len(head) + len(p)
        for f in PAIR_FIELDS:
            ids = head + p + c_ids[f][i] + [eos]
            rows.append(make_example(ids, [0] * n_prompt + [1] * (len(ids) - n_prompt),
                                     f"{where} ({f})"))
        pair = Pair(rows[0], rows[1], n_prompt, where, shared_prefix)
        if len(pair) > max_seq_len:
            too_long.append((where, len(pair)))
            continue
        pairs.append(pair)
    if not pairs:
        raise DataError(f"every preference pair is longer than max_seq_len={max_seq_len} "
                        f"(first: {too_long[0][0] if too_long else 'none'}, "
                        f"{too_long[0][1] if too_long else 0} tokens); raise max_seq_len")
    if too_long:
        shown = "; ".join(f"{w} needs {n} tokens" for w, n in too_long[:3])
        warnings.warn(f"skipped {len(too_long)} of {len(records)} preference pairs longer than "
                      f"max_seq_len={max_seq_len} ({shown}{' ...' if len(too_long) > 3 else ''})",
                      DataWarning, stacklevel=2)
    return pairs


def load_pairs(path, tokenizer, max_seq_len: int, shared_prefix: bool = True) -> list[Pair]:
    """The preference pairs of a dataset file (:func:`tokenize_pairs` of its records)."""
    return tokenize_pairs(load_records(path), tokenizer, max_seq_len, shared_prefix)


def collate_shared(pairs: Sequence[Pair | None], max_seq_len: int, pad_id: int = 0):
    """One batch of shared-prefix rows (:meth:`Pair.shared_row`, None: an all-padding row):
    ``tokens``, ``loss_mask``, ``segment_ids``, ``positions`` np.int32 [len(pairs),
    max_seq_len], padding with segment 0 (a plain segment no answer sees)."""
    out = {"tokens": np.full((len(pairs), max_seq_len), pad_id, np.int32),
           **{k: np.zeros((len(pairs), max_seq_len), np.int32)
              for k in ("loss_mask", "segment_ids", "positions")}}
    for r, pair in enumerate(pairs):
        if pair is None:
            continue
        row = pair.shared_row()
        n = len(row["tokens"])
        if n > max_seq_len:
            raise DataError(f"preference pair {pair.source} needs {n} tokens, more than "
                            f"max_seq_len={max_seq_len}")
        for k, v in row.items():
            out[k][r, :n] = v
    return out


class PairBatchIterator(BatchIterator):
    """:class:`BatchIterator` over :class:`Pair` s: ``batch_size`` PAIRS per batch, in the
    pairs' layout: one row each (shared prefix: ``batch_size`` rows), or pair i on rows 2i
    (chosen) and 2i+1 (rejected) (separate: ``2 * batch_size`` rows). The pairs are shuffled
    every epoch (``default_rng(seed + epoch)``), the last incomplete batch dropped.
    ``state()`` / ``restore()`` as BatchIterator's (positions count pairs)."""

    def __init__(self, pairs: Sequence[Pair], batch_size: int, max_seq_len: int, *,
                 pad_id: int = 0, shuffle: bool = True, seed: int = 0,
                 epochs: int | None = None):
        super().__init__(pairs, batch_size, max_seq_len, pad_id=pad_id, shuffle=shuffle,
                         seed=seed, epochs=epochs)
        self.shared_prefix = bool(pairs[0].shared_prefix)
        self.pairs_per_batch = int(batch_size)
        self.batch_size = self.pairs_per_batch * (1 if self.shared_prefix else 2)   # rows

    def _pairs(self, epoch: int, index: int) -> np.ndarray:
        k = self.pairs_per_batch
        return self._order(epoch)[index * k:(index + 1) * k]

    def batch(self, epoch: int, index: int, rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Batch ``index`` of ``epoch``: ``batch_size`` rows, ``rows`` only these of them."""
        order = self._pairs(epoch, index)
        want = range(self.batch_size) if rows is None else rows
        if self.shared_prefix:
            return collate_shared([self.examples[int(order[j])] for j in want],
                                  self.max_seq_len, self.pad_id)
        picked = []
        for j in want:
            pair = self.examples[int(order[j // 2])]
            picked.append([pair.rejected if j % 2 else pair.chosen])
        return collate(picked, self.max_seq_len, self.pad_id, batch_size=len(want))

    def batch_tokens(self, epoch: int, index: int) -> int:
        """Tokens (not padding) of the batch's rows."""
        return int(sum(self.examples[int(i)].tokens for i in self._pairs(epoch, index)))
