"""Packing and batching: examples -> fixed-shape, resumable batches.

:class:`BatchIterator` yields dicts of ``np.int32`` arrays ``tokens``, ``loss_mask``,
``segment_ids`` (1, 2, 3, ... per example in a row, 0 for padding) and ``positions`` (restart
at 0 for every example, 0 for padding), all ``[batch_size, max_seq_len]``. Without packing
there is one example per row; with ``pack=True`` whole examples are packed greedily (first
fit) into rows of ``max_seq_len`` tokens, never split. Rows are shuffled every epoch with
``np.random.default_rng(seed + epoch)``; the last incomplete batch of an epoch is dropped
(``drop_last=True``, the default) unless that leaves no batch at all, which is an error.
``state()`` / ``restore()`` give an exactly resumable position. Only the rows of the current
batch are read from the examples, so memory-mapped examples stay on disk.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .examples import Example


def pack_examples(lengths: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """Greedy first fit: rows of example indices (in the given order), each row's total length
    at most ``max_seq_len``; examples are never split."""
    rem = np.empty(max(16, len(lengths)), dtype=np.int64)
    rows: list[list[int]] = []
    for i, n in enumerate(lengths):
        if n > max_seq_len:
            raise DataError(f"example {i} has {n} tokens, more than max_seq_len={max_seq_len}")
        nb = len(rows)
        j = int(np.argmax(rem[:nb] >= n)) if nb else 0
        if nb and rem[j] >= n:
            rows[j].append(i)
            rem[j] -= n
        else:
            rows.append([i])
            rem[nb] = max_seq_len - n
    return rows


def collate(rows: Sequence[Sequence[Example]], max_seq_len: int, pad_id: int = 0,
            batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Build one batch from rows of examples (each row's examples are packed in order).

    Returns ``tokens``, ``loss_mask``, ``segment_ids``, ``positions``: ``np.int32
    [batch_size or len(rows), max_seq_len]``; missing rows are all padding.
    """
    b = len(rows) if batch_size is None else batch_size
    tokens = np.full((b, max_seq_len), pad_id, dtype=np.int32)
    loss_mask = np.zeros((b, max_seq_len), dtype=np.int32)
    segment_ids = np.zeros((b, max_seq_len), dtype=np.int32)
    positions = np.zeros((b, max_seq_len), dtype=np.int32)
    for r, row in enumerate(rows):
        off = 0
        for s, ex in enumerate(row, 1):
            n = len(ex)
            if off + n > max_seq_len:
                raise DataError(f"examples of row {r} need {off + n} tokens, more than "
                                f"max_seq_len={max_seq_len}")
            tokens[r, off:off + n] = ex.input_ids
            loss_mask[r, off:off + n] = ex.loss_mask
            segment_ids[r, off:off + n] = s
            positions[r, off:off + n] = np.arange(n, dtype=np.int32)
            off += n
    return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids,
            "positions": positions}


class _OneExamplePerRow:
    """The rows of an unpacked dataset (row ``r`` holds example ``r``), in constant memory."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, r: int) -> list[int]:
        return [int(r)]


class BatchIterator:
    """Fixed-shape batches over epochs, deterministic and exactly resumable.

    Args:
      examples: tokenized examples, each at most ``max_seq_len`` tokens: a list, or anything
        with ``lengths`` and indexing (:class:`~.cache.TokenizedData`, read lazily).
      batch_size: rows per batch (with packing a row holds several examples).
      max_seq_len: the fixed sequence length S of every batch.
      pad_id: token id of padding (``pad_token_id(tokenizer)``).
      pack: pack whole examples greedily (first fit) into rows. The packing is computed once
        (examples visited in the order ``default_rng((seed, 1)).permutation`` when shuffling,
        else in order), so every epoch has the same rows and ``steps_per_epoch`` is constant.
      shuffle: shuffle the rows every epoch with ``np.random.default_rng(seed + epoch)``.
      epochs: stop after this many epochs (``None``: iterate forever).
      drop_last: drop the last incomplete batch of each epoch (default). With ``False`` it is
        padded with empty rows (all-zero loss mask), which suits evaluation.

    ``state()`` returns ``{"epoch", "index", "seed", "num_rows"}`` (``index`` = the next batch
    within the epoch); ``restore(state)`` / ``BatchIterator.from_state`` continue exactly there.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, max_seq_len: int, *,
                 pad_id: int = 0, pack: bool = False, shuffle: bool = True, seed: int = 0,
                 epochs: int | None = None, drop_last: bool = True):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        if epochs is not None and epochs < 1:
            raise ConfigError(f"epochs={epochs} must be at least 1 (or None for no limit)")
        if not examples:
            raise DataError("no examples to batch (the dataset, or this split of it, is empty)")
        # Memory-mapped examples (the cache's TokenizedData) are kept as they are, not listed.
        self.examples = examples if hasattr(examples, "lengths") else list(examples)
        self.batch_size, self.max_seq_len = int(batch_size), int(max_seq_len)
        self.pad_id, self.pack, self.shuffle = int(pad_id), bool(pack), bool(shuffle)
        self.seed, self.epochs, self.drop_last = int(seed), epochs, bool(drop_last)
        lengths = (np.asarray(self.examples.lengths) if hasattr(self.examples, "lengths")
                   else np.array([len(e) for e in self.examples], dtype=np.int64))
        self._lengths = lengths
        over = np.flatnonzero(lengths > self.max_seq_len)
        if over.size:
            e, n = self.examples[int(over[0])], int(lengths[over[0]])
            raise DataError(f"example {e.source or ''} has {n} tokens, more than "
                            f"max_seq_len={self.max_seq_len}; tokenize with the same "
                            "max_seq_len")
        if self.pack:
            order = (np.random.default_rng((self.seed, 1)).permutation(len(lengths))
                     if self.shuffle else np.arange(len(lengths)))
            rows = pack_examples([lengths[i] for i in order], self.max_seq_len)
            self.rows = [[int(order[i]) for i in row] for row in rows]
        else:
            self.rows = _OneExamplePerRow(len(self.examples))
        n = len(self.rows)
        self.steps_per_epoch = (n // self.batch_size if self.drop_last
                                else math.ceil(n / self.batch_size))
        if self.steps_per_epoch == 0:
            raise DataError(
                f"batch_size={self.batch_size} is larger than the {n} "
                f"{'packed rows' if self.pack else 'examples'} per epoch, so no full batch "
                f"exists ({len(self.examples)} examples); lower the batch size (use gradient "
                "accumulation for larger effective batches) or add data")
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = -1, None

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def total_steps(self) -> int | None:
        return None if self.epochs is None else self.epochs * self.steps_per_epoch

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "num_rows": self.num_rows}

    def restore(self, state: dict) -> "BatchIterator":
        for key, mine in (("seed", self.seed), ("num_rows", self.num_rows)):
            if key in state and int(state[key]) != mine:
                raise DataError(f"cannot resume the data position: it was saved with {key}="
                                f"{state[key]} but this dataset has {key}={mine}; resume with "
                                "the same data, max_seq_len, packing and seed")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.steps_per_epoch:
            raise DataError(f"invalid data position {state} (steps_per_epoch="
                            f"{self.steps_per_epoch})")
        self.epoch, self.index = epoch, index
        return self

    @classmethod
    def from_state(cls, state: dict, examples: Sequence[Example], batch_size: int,
                   max_seq_len: int, **kwargs) -> "BatchIterator":
        return cls(examples, batch_size, max_seq_len, **kwargs).restore(state)

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = self.num_rows
            self._perm = (np.random.default_rng(self.seed + epoch).permutation(n)
                          if self.shuffle else np.arange(n))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, epoch: int, index: int, rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Batch ``index`` of ``epoch`` (does not move the position). ``rows``: only these
        rows of the batch, in this order (a process of a multi-process run builds only the
        rows its devices hold); default all ``batch_size``."""
        order = self._order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        want = range(self.batch_size) if rows is None else rows
        picked = [[self.examples[i] for i in self.rows[order[j]]] if j < len(order) else []
                  for j in want]
        return collate(picked, self.max_seq_len, self.pad_id, batch_size=len(want))

    def batch_tokens(self, epoch: int, index: int) -> int:
        """Tokens (not padding) in batch ``index`` of ``epoch``, from the lengths alone."""
        order = self._order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        return int(sum(self._lengths[i] for r in order for i in self.rows[r]))

    def take(self) -> tuple[int, int]:
        """The (epoch, index) of the next batch, moving past it without building it."""
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        out = (self.epoch, self.index)
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.batch(*self.take())


def eval_batches(examples: Sequence[Example], batch_size: int, max_seq_len: int, *,
                 pad_id: int = 0, pack: bool = False) -> Iterable[dict[str, np.ndarray]]:
    """One ordered pass over every example (last batch padded with empty rows)."""
    return BatchIterator(examples, batch_size, max_seq_len, pad_id=pad_id, pack=pack,
                         shuffle=False, epochs=1, drop_last=False)
