"""Preference pairs through the tokenized-data cache: tokenize a DPO dataset once, then
memory-map it.

:func:`load_pairs` returns a :class:`TokenizedPairs` for ``(data, tokenizer, chat template,
max_seq_len, layout)``, built by :func:`~.cache.cached_build` (worker processes, one build at
a time per key, renamed into place when complete) like the SFT cache; a second run, a resume
and the other processes of a multi-process run open it instead of tokenizing again.

On disk, ``<cache_dir>/<key>/`` (the SFT entry's files, pairs laid out flat):

* ``tokens.bin`` ``int32``: per pair its prompt (shared by both answers, stored once), then
  the chosen answer's tokens, then the rejected answer's;
* ``loss_mask.bin`` ``uint8``: the matching loss mask (0 on the prompt);
* ``lengths.npy`` ``int32 [N, 3]``: (prompt, chosen, rejected) tokens of each pair;
* ``meta.json``: the key's inputs, counts and the skip / shorten summary (its warnings are
  repeated on every load).

The key hashes the data, the tokenizer, the ``chat_template`` text when one is given, ``max_seq_len``,
the layout (it decides which pairs fit) and :data:`PAIR_CACHE_VERSION`. A rag row's fitted
passages are stored as fitted. Host memory is the batch's pairs plus 12 bytes per pair.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .cache import (cache_root, cached_build, data_digest, first_record, open_entry,
                    starts_of, tokenizer_fingerprint)
from .chat import resolve_chat_template
from .examples import Example
from .preference import Pair, pair_row_len, report_pairs, tokenize_pair_chunk
from .tokenize import check_max_seq_len

PAIR_CACHE_VERSION = 1


class TokenizedPairs:
    """Pairs stored flat (module docstring): a read-only sequence of :class:`Pair` whose
    arrays are copies of the memory-mapped slices, built when indexed.

    ``lengths`` (``int [N]``): each pair's longest batch row in its layout (``len(pair)``),
    without touching the tokens; ``subset(indices)`` a view on some pairs (the train / eval
    split); ``meta`` the entry's ``meta.json``.
    """

    def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray, starts: np.ndarray,
                 parts: np.ndarray, shared_prefix: bool, source: str = "",
                 meta: dict | None = None):
        self.tokens, self.loss_mask, self.starts, self.parts = tokens, loss_mask, starts, parts
        self.shared_prefix, self.source, self.meta = bool(shared_prefix), source, meta or {}
        prompt, chosen, rejected = (parts[:, k].astype(np.int64) for k in range(3))
        self.lengths = pair_row_len(prompt, chosen, rejected, self.shared_prefix)

    @classmethod
    def open(cls, directory: Path) -> "TokenizedPairs":
        meta, parts, tokens, mask = open_entry(directory)
        parts = parts.reshape(-1, 3)
        return cls(tokens, mask, starts_of(parts.sum(axis=1)), parts, meta["shared_prefix"],
                   source=str(meta.get("data", directory)), meta=meta)

    def __len__(self) -> int:
        return int(self.parts.shape[0])

    def __getitem__(self, i: int) -> Pair:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        s = int(self.starts[i])
        n_prompt, n_chosen, n_rejected = (int(n) for n in self.parts[i])
        where = f"{self.source} (pair {i})"

        def answer(offset: int, n: int, name: str) -> Example:
            spans = (slice(s, s + n_prompt), slice(s + offset, s + offset + n))
            return Example(np.concatenate([self.tokens[sp] for sp in spans]),
                           np.concatenate([self.loss_mask[sp] for sp in spans]).astype(np.int32),
                           f"{where} ({name})")

        return Pair(answer(n_prompt, n_chosen, "chosen"),
                    answer(n_prompt + n_chosen, n_rejected, "rejected"), n_prompt, where,
                    self.shared_prefix)

    def __iter__(self) -> Iterator[Pair]:
        return (self[i] for i in range(len(self)))

    def subset(self, indices: Sequence[int]) -> "TokenizedPairs":
        idx = np.asarray(indices, dtype=np.int64)
        return TokenizedPairs(self.tokens, self.loss_mask, self.starts[idx],
                              self.parts[idx].reshape(-1, 3), self.shared_prefix, self.source,
                              self.meta)


def _pair_chunk(records, wheres, tokenizer, max_seq_len, shared_prefix, chat_template) -> tuple:
    """One chunk of records -> (tokens, loss mask, ``int32 [n, 3]`` part lengths, summary)
    laid out as the module docstring says."""
    pairs, summary = tokenize_pair_chunk(records, tokenizer, max_seq_len, shared_prefix,
                                         chat_template, wheres=wheres)
    tokens, masks, parts = [], [], []
    for p in pairs:
        cut = p.prompt_len
        tokens += [p.chosen.input_ids[:cut], p.chosen.input_ids[cut:], p.rejected.input_ids[cut:]]
        masks += [p.chosen.loss_mask[:cut], p.chosen.loss_mask[cut:], p.rejected.loss_mask[cut:]]
        parts.append((cut, len(p.chosen) - cut, len(p.rejected) - cut))
    flat = (lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype))
    return (flat(tokens, np.int32), flat(masks, np.uint8),
            np.asarray(parts, np.int32).reshape(-1, 3), summary)


def load_pairs(data, tokenizer, max_seq_len: int, shared_prefix: bool = True,
               chat_template: str | None = None, cache_dir=None,
               workers: int = 0) -> TokenizedPairs:
    """The preference pairs of a dataset (``spmd_lora.data.preference``'s rows), from the
    tokenized-data cache, built first if needed. ``workers``: tokenizer processes (0:
    ``min(cpu count, 8)``; 1: in this process). Warnings and errors are
    :func:`~.preference.report_pairs`'."""
    check_max_seq_len(max_seq_len)
    root = cache_root(cache_dir)
    _, records = first_record(data)
    key_fields = {"version": PAIR_CACHE_VERSION, "kind": "preference pairs",
                  "data_digest": data_digest(data),
                  "tokenizer": tokenizer_fingerprint(tokenizer),
                  "chat_template": (resolve_chat_template(tokenizer, chat_template)
                                    if chat_template else None),
                  "max_seq_len": int(max_seq_len), "shared_prefix": bool(shared_prefix)}
    work = (_pair_chunk, (tokenizer, int(max_seq_len), bool(shared_prefix), chat_template))
    final = cached_build(root, key_fields, data, records, work, workers,
                         lambda summary: report_pairs(summary, int(max_seq_len)))
    return TokenizedPairs.open(final)
