"""Preference pairs for DPO: records -> (chosen, rejected) example pairs -> batches of pairs.

Rows (JSON / JSONL / Parquet / ..., as :func:`~.records.iter_records` reads them):

* ``{prompt, chosen, rejected}``: a plain-text prompt, tokenized like the alpaca / text
  prompts (BOS, then the prompt's tokens);
* ``{question, contexts, chosen, rejected}``: the prompt is the rag template's
  (:func:`~.templates.rag_prompt`, all passages kept; no trimming).

Each pair gives two :class:`Example` s, ``BOS + prompt + chosen + EOS`` and ``BOS + prompt +
rejected + EOS``, with the loss mask on the completion tokens and EOS only. The prompt and
each completion are tokenized separately, so both rows share the prompt's tokens exactly. A
pair whose longer row exceeds ``max_seq_len`` is skipped (one counted :class:`DataWarning`,
as the other templates).

Batch layout (phase 1): :class:`PairBatchIterator` puts pair i of a batch on rows 2i (chosen)
and 2i+1 (rejected), so with ``batch_size`` a multiple of 2*dp both halves of a pair land on
the same dp shard (:mod:`spmd_lora.model.preference`). Pairs are tokenized in memory (not
through the tokenized-data cache).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import numpy as np

from ..errors import DataError
from .batching import BatchIterator, collate
from .examples import DataWarning, Example, encode_texts, make_example, special_ids
from .records import load_records
from .rows import where_of
from .templates import get_str, rag_passages, rag_prompt

PAIR_FIELDS = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True, eq=False)
class Pair:
    """A tokenized preference pair: two examples sharing their prompt tokens."""

    chosen: Example
    rejected: Example
    source: str = ""

    def __len__(self) -> int:
        """The longer row's tokens (what must fit in ``max_seq_len``)."""
        return max(len(self.chosen), len(self.rejected))

    @property
    def tokens(self) -> int:
        return len(self.chosen) + len(self.rejected)


def _prompt_text(rec: dict, where: str) -> str:
    if "prompt" in rec:
        return get_str(rec, "prompt", where, "dpo")
    if "question" in rec:
        return rag_prompt(get_str(rec, "question", where, "dpo"), rag_passages(rec, where))
    raise DataError(f"{where}: a preference row needs 'prompt' (or 'question' and 'contexts'), "
                    f"'chosen' and 'rejected' (fields present: {sorted(rec)})")


def tokenize_pairs(records: Sequence[dict], tokenizer, max_seq_len: int) -> list[Pair]:
    """Records -> :class:`Pair` s (module docstring); over-long pairs skipped with one
    DataWarning, a DataError when none fits."""
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
        for f in PAIR_FIELDS:
            ids = head + p + c_ids[f][i] + [eos]
            n_prompt = len(head) + len(p)
            rows.append(make_example(ids, [0] * n_prompt + [1] * (len(ids) - n_prompt),
                                     f"{where} ({f})"))
        pair = Pair(rows[0], rows[1], where)
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


def load_pairs(path, tokenizer, max_seq_len: int) -> list[Pair]:
    """The preference pairs of a dataset file (:func:`tokenize_pairs` of its records)."""
    return tokenize_pairs(load_records(path), tokenizer, max_seq_len)


class PairBatchIterator(BatchIterator):
    """:class:`BatchIterator` over :class:`Pair` s: ``batch_size`` ROWS per batch (even), i.e.
    ``batch_size // 2`` pairs, pair i on rows 2i (chosen) and 2i+1 (rejected); the pairs are
    shuffled every epoch (``default_rng(seed + epoch)``), the last incomplete batch dropped.
    ``state()`` / ``restore()`` as BatchIterator's (positions count pairs)."""

    def __init__(self, pairs: Sequence[Pair], batch_size: int, max_seq_len: int, *,
                 pad_id: int = 0, shuffle: bool = True, seed: int = 0,
                 epochs: int | None = None):
        if batch_size < 2 or batch_size % 2:
            raise DataError(f"batch_size={batch_size} must be even: each preference pair takes "
                            f"two rows")
        super().__init__(pairs, batch_size // 2, max_seq_len, pad_id=pad_id, shuffle=shuffle,
                         seed=seed, epochs=epochs)
        self.pairs_per_batch, self.batch_size = batch_size // 2, int(batch_size)

    def _pairs(self, epoch: int, index: int) -> np.ndarray:
        k = self.pairs_per_batch
        return self._order(epoch)[index * k:(index + 1) * k]

    def batch(self, epoch: int, index: int, rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Batch ``index`` of ``epoch``: ``batch_size`` rows, ``rows`` only these of them."""
        order = self._pairs(epoch, index)
        want = range(self.batch_size) if rows is None else rows
        picked = []
        for j in want:
            pair = self.examples[int(order[j // 2])]
            picked.append([pair.rejected if j % 2 else pair.chosen])
        return collate(picked, self.max_seq_len, self.pad_id, batch_size=len(want))

    def batch_tokens(self, epoch: int, index: int) -> int:
        """Tokens (not padding) of both rows of every pair of the batch."""
        return int(sum(self.examples[int(i)].tokens for i in self._pairs(epoch, index)))
