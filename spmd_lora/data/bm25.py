"""Okapi BM25 in plain numpy, built for streaming over a large passage collection.

Two passes over the passages, the queries held in memory:

1. :func:`collect_stats` reads every passage once and keeps only its length (one int32 each)
   and the document frequency of the terms that occur in some query (a dict over the queries'
   vocabulary, not the collection's);
2. :func:`top_k` reads them again, scores each block of passages against all queries at
   once (sparse: only the (query, passage) pairs that share a term) and keeps the best
   ``k`` passages per query, merging each block into the running top ``k``.

Score of passage ``d`` for query ``q`` (each query token counted as often as it occurs)::

    sum_t idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t) = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

Tokens: the text lowercased, split on everything that is not a letter or digit
(:func:`tokenize`).
"""
from __future__ import annotations

import re
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

K1 = 1.5
B = 0.75
_TOKEN = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """The BM25 tokens of ``text``: lowercased runs of letters / digits (``"Hello, world-2"``
    -> ``["hello", "world", "2"]``)."""
    return _TOKEN.findall(text.lower())


def idf(df, n_docs: int):
    """Inverse document frequency ``log(1 + (N - df + 0.5) / (df + 0.5))`` of terms that occur
    in ``df`` (a number or numpy array) of ``n_docs`` documents; always positive."""
    df = np.asarray(df, dtype=np.float64)
    return np.log1p((n_docs - df + 0.5) / (df + 0.5))


class QuerySet:
    """Queries held in memory, as term ids over their own vocabulary.

    Takes the query texts; ``vocab`` maps each query term to an id, ``terms[i]`` /
    ``counts[i]`` are query ``i``'s distinct term ids and how often each occurs, and
    ``term_queries(j)`` (a CSR index) are the queries holding term ``j`` with those counts."""

    def __init__(self, texts: Sequence[str]):
        self.vocab: dict[str, int] = {}
        self.terms: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        for text in texts:
            c = Counter(tokenize(text))
            ids = [self.vocab.setdefault(t, len(self.vocab)) for t in c]
            self.terms.append(np.asarray(ids, dtype=np.int64))
            self.counts.append(np.asarray(list(c.values()), dtype=np.float64))
        n_terms = len(self.vocab)
        all_terms = np.concatenate(self.terms) if self.terms else np.zeros(0, np.int64)
        all_counts = np.concatenate(self.counts) if self.counts else np.zeros(0)
        all_queries = np.repeat(np.arange(len(self.terms), dtype=np.int64),
                                [len(t) for t in self.terms])
        order = np.argsort(all_terms, kind="stable")
        self.q_of_term = all_queries[order]
        self.qtf_of_term = all_counts[order]
        self.ptr = np.zeros(n_terms + 1, dtype=np.int64)
        np.cumsum(np.bincount(all_terms, minlength=n_terms), out=self.ptr[1:])

    def __len__(self) -> int:
        return len(self.terms)


@dataclass
class CorpusStats:
    """What BM25 needs of the collection: ``n_docs``, ``lengths`` (tokens per passage, int32,
    in reading order), ``avgdl`` and ``df`` (passages holding each query term, indexed by the
    :class:`QuerySet`'s term ids)."""
    n_docs: int
    lengths: np.ndarray
    avgdl: float
    df: np.ndarray


def _doc_terms(text: str, vocab: dict[str, int]) -> tuple[int, list[int], list[int]]:
    """(token count, ids of the query terms in ``text``, their counts in it)."""
    toks = tokenize(text)
    c = Counter(t for t in toks if t in vocab)
    return len(toks), [vocab[t] for t in c], list(c.values())


def collect_stats(texts: Iterable[str], queries: QuerySet) -> CorpusStats:
    """First pass: takes the passage texts (any iterable, read once) and the queries; returns
    the :class:`CorpusStats` (memory: 4 bytes per passage plus one int per query term)."""
    lengths = array("i")
    df = np.zeros(len(queries.vocab), dtype=np.int64)
    for text in texts:
        n, ids, _ = _doc_terms(text, queries.vocab)
        lengths.append(n)
        if ids:
            df[ids] += 1
    lens = np.frombuffer(lengths, dtype=np.int32).copy() if lengths else np.zeros(0, np.int32)
    avgdl = float(lens.mean()) if len(lens) else 0.0
    return CorpusStats(len(lens), lens, avgdl, df)


def score_matrix(texts: Sequence[str], queries: QuerySet, stats: CorpusStats, first: int = 0,
                 k1: float = K1, b: float = B) -> np.ndarray:
    """Dense BM25 scores ``[len(queries), len(texts)]`` of the passages ``texts``, which are
    passages ``first ..`` of the collection ``stats`` describes (for small collections and
    tests; :func:`top_k` streams)."""
    q, d, s = _block_scores(texts, queries, stats, first, k1, b)
    out = np.zeros((len(queries), len(texts)))
    out[q, d - first] = s
    return out


def _block_scores(texts, queries: QuerySet, stats: CorpusStats, first: int, k1: float,
                  b: float):
    """Sparse scores of one block of passages (global numbers ``first ..``): arrays
    ``(query, passage, score)`` of the pairs sharing at least one term, sorted by
    (query, passage)."""
    doc, term, tf = [], [], []
    for j, text in enumerate(texts):
        _, ids, counts = _doc_terms(text, queries.vocab)
        doc.extend([first + j] * len(ids))
        term.extend(ids)
        tf.extend(counts)
    if not doc:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    doc = np.asarray(doc, dtype=np.int64)
    term = np.asarray(term, dtype=np.int64)
    tf = np.asarray(tf, dtype=np.float64)
    dl = stats.lengths[doc].astype(np.float64)
    norm = k1 * (1.0 - b + b * dl / max(stats.avgdl, 1e-12))
    w = idf(stats.df[term], stats.n_docs) * tf * (k1 + 1.0) / (tf + norm)
    # join each (passage, term) pair with the queries holding the term
    start, stop = queries.ptr[term], queries.ptr[term + 1]
    reps = stop - start
    pair = np.repeat(np.arange(len(term)), reps)
    offs = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
    pos = start[pair] + offs
    qid = queries.q_of_term[pos]
    contrib = w[pair] * queries.qtf_of_term[pos]
    key = qid * stats.n_docs + doc[pair]
    uniq, inv = np.unique(key, return_inverse=True)
    sums = np.bincount(inv.ravel(), weights=contrib, minlength=len(uniq))
    return uniq // stats.n_docs, uniq % stats.n_docs, sums


def top_k(texts: Iterable[str], queries: QuerySet, stats: CorpusStats, k: int,
          block: int = 1024, k1: float = K1, b: float = B) -> list[list[tuple[int, float]]]:
    """Second pass: takes the passage texts (read once, in the order :func:`collect_stats` saw
    them), the queries, their stats and ``k``; returns per query up to ``k`` pairs
    ``(passage number, score)``, best first (ties: the lower passage number first). Only
    passages sharing a term with the query (score > 0) are ranked."""
    best_q = np.zeros(0, np.int64)
    best_d = np.zeros(0, np.int64)
    best_s = np.zeros(0)
    buf: list[str] = []
    first = 0

    def merge(buf, first):
        nonlocal best_q, best_d, best_s
        q, d, s = _block_scores(buf, queries, stats, first, k1, b)
        q = np.concatenate([best_q, q])
        d = np.concatenate([best_d, d])
        s = np.concatenate([best_s, s])
        order = np.lexsort((d, -s, q))
        q, d, s = q[order], d[order], s[order]
        group_start = np.searchsorted(q, q, side="left")
        keep = np.arange(len(q)) - group_start < k
        best_q, best_d, best_s = q[keep], d[keep], s[keep]

    for text in texts:
        buf.append(text)
        if len(buf) == block:
            merge(buf, first)
            first += len(buf)
            buf = []
    if buf:
        merge(buf, first)
    out: list[list[tuple[int, float]]] = [[] for _ in range(len(queries))]
    for qi, di, si in zip(best_q.tolist(), best_d.tolist(), best_s.tolist()):
        out[qi].append((di, si))
    return out
