"""Tokenized examples: :class:`Example` (token ids + loss mask), what a tokenizing pass made of
a slice of records (:class:`ChunkResult`), the tokenizer's special ids, and the train / eval
split. The conventions an Example follows are in :mod:`.tokenize`."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError


class DataWarning(UserWarning):
    """Examples were skipped or shortened while tokenizing a dataset."""


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One tokenized example: ``input_ids`` and ``loss_mask``, ``np.int32`` of equal length."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_targets(self) -> int:
        return int(self.loss_mask.sum())


def make_example(ids: list[int], mask: list[int], source: str) -> Example:
    """An :class:`Example` from token id and loss-mask lists."""
    return Example(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.int32), source)


def pad_token_id(tokenizer) -> int:
    """Id used for padding batches: ``tokenizer.pad_token_id``, or 0 when it has none."""
    pid = getattr(tokenizer, "pad_token_id", None)
    return 0 if pid is None else int(pid)


def special_ids(tokenizer) -> tuple[int | None, int]:
    """(BOS id or None, EOS id); ConfigError when the tokenizer has no EOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token_id; training needs an end-of-sequence "
                          "token (set tokenizer.eos_token)")
    return (None if bos is None else int(bos)), int(eos)


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    if not texts:
        return []
    out = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [list(x) for x in out]


@dataclasses.dataclass
class ChunkResult:
    """What :func:`tokenize_chunk` made of a slice of records: the examples, the records it
    skipped as too long (``(where, tokens needed)``) and how many it shortened to fit."""

    examples: list
    too_long: list
    shortened: int = 0
    records: int = 0

    def summary(self) -> dict:
        """JSON-able counts for :func:`report` (the first three skipped records named)."""
        return {"records": self.records, "examples": len(self.examples),
                "too_long": [list(t) for t in self.too_long[:3]],
                "n_too_long": len(self.too_long),
                "shortest": min((n for _, n in self.too_long), default=None),
                "shortened": int(self.shortened)}


def split_train_eval(examples: Sequence, eval_fraction: float, seed: int = 0
                     ) -> tuple[list, list]:
    """Deterministic split: a random ``eval_fraction`` of the examples (at least one when the
    fraction is > 0) goes to eval. Both parts keep the original relative order. Examples with
    a ``subset(indices)`` method (the cache's memory-mapped examples) are split into views."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    n = len(examples)
    if eval_fraction == 0.0 or n == 0:
        return (examples, examples.subset([])) if hasattr(examples, "subset") else (
            list(examples), [])
    n_eval = max(1, int(round(n * eval_fraction)))
    if n_eval >= n:
        raise DataError(f"eval_fraction={eval_fraction} of {n} examples leaves no training "
                        "examples; lower eval_fraction or add data")
    perm = np.random.default_rng(seed).permutation(n)
    is_eval = np.zeros(n, dtype=bool)
    is_eval[perm[:n_eval]] = True
    if hasattr(examples, "subset"):
        return examples.subset(np.flatnonzero(~is_eval)), examples.subset(np.flatnonzero(is_eval))
    return ([e for e, f in zip(examples, is_eval) if not f],
            [e for e, f in zip(examples, is_eval) if f])
