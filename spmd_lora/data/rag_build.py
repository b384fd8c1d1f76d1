"""RAFT-style RAG training data (``spmd-lora rag-data``; Zhang et al. 2024, arXiv 2403.10131).

Inputs:

* passages: a JSONL file of ``{"id", "text"}`` objects (optional ``"title"``), or a directory
  of ``.txt`` / ``.md`` files (searched recursively, in sorted path order) cut into passages of
  ``chunk_tokens`` tokens of the model's tokenizer, with ids ``RELPATH#i`` and title ``RELPATH``;
* QA rows (JSONL): ``question``, ``answer``, ``oracle`` (a passage id or a list of ids), optional
  ``id`` and ``cot_answer``. A row's ``cot_answer``, when present and not null, is its training
  answer (RAFT trains on chain-of-thought answers that quote the oracle); else ``answer``.
  One of the two must be there.

Each output row (the ``rag`` template) holds the question, ``contexts`` (passages as
``{"title", "text"}`` objects, or strings when a passage has no title), the answer,
``oracle_index`` (the oracle passages' positions in ``contexts``; empty when they were left
out) and ``id`` (the QA row's ``id``, else its record number). With probability
``oracle_prob`` a row gets its oracle passages plus ``distractors`` others, else the
distractors alone; the order is shuffled. Distractors are drawn uniformly from the non-oracle
passages, or with ``hard`` are the BM25 (:mod:`.bm25`) best non-oracle passages for the
question (topped up with random ones when fewer than ``distractors`` share a word with it).

Randomness: row ``i`` draws from ``numpy.random.default_rng([seed, i])`` and the held-out
split from ``default_rng([seed, 2**31])``, so the same inputs and seed give byte-identical
files. With ``eval_fraction`` F, ``round(F * rows)`` rows chosen by the seed go to the eval
file ``OUTPUT`` with ``.eval`` before its suffix (``train.jsonl`` -> ``train.eval.jsonl``),
the rest to ``OUTPUT``, both in input order.

Memory: passages are streamed: a first pass keeps their ids (and for ``hard`` their lengths
and the document frequencies of the questions' words), a second one ranks them (``hard``
only), and a last one keeps only the texts some output row uses.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ConfigError, DataError
from ..paths import ensure_writable_dir
from . import bm25
from .records import iter_json_records
from .rows import json_type

DIR_SUFFIXES = (".txt", ".md")
EVAL_SPLIT_STREAM = 2 ** 31


@dataclass
class Passage:
    """One passage: its id, title (or None), text and where it came from (for errors)."""
    id: str
    title: str | None
    text: str
    where: str


def eval_path(output) -> Path:
    """The held-out file beside ``output``: ``.eval`` before the suffix (``a/train.jsonl`` ->
    ``a/train.eval.jsonl``; ``a/train`` -> ``a/train.eval``)."""
    p = Path(output)
    return p.with_name(f"{p.stem}.eval{p.suffix}") if p.suffix else p.with_name(p.name + ".eval")


class PassageSource:
    """A passage collection that can be read several times, the same way each time.

    Takes ``path`` (a JSONL file or a directory of ``.txt`` / ``.md`` files) and, for a
    directory, ``chunk_tokens`` and the ``tokenizer`` to cut files with. Iterating yields
    :class:`Passage` s in a fixed order."""

    def __init__(self, path, chunk_tokens: int | None = None, tokenizer=None):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"passages not found: {self.path} (check the --passages path: a "
                            ".jsonl file or a directory of .txt / .md files)")
        self.is_dir = self.path.is_dir()
        if self.is_dir:
            if chunk_tokens is not None and chunk_tokens < 1:
                raise ConfigError(f"--chunk-tokens must be at least 1, got {chunk_tokens}")
            if tokenizer is None or chunk_tokens is None:
                raise ConfigError(f"{self.path} is a directory: cutting its files into passages "
                                  "needs --chunk-tokens N and --model DIR (for the tokenizer)")
            self.files = sorted(p for p in self.path.rglob("*")
                                if p.is_file() and p.suffix.lower() in DIR_SUFFIXES)
            if not self.files:
                raise DataError(f"{self.path}: no .txt or .md files in this directory; put the "
                                "documents there or pass a passages .jsonl file")
        self.chunk_tokens, self.tokenizer = chunk_tokens, tokenizer

    def __iter__(self) -> Iterator[Passage]:
        return self._iter_dir() if self.is_dir else self._iter_jsonl()

    def _iter_jsonl(self) -> Iterator[Passage]:
        for rec in iter_json_records(self.path):
            where = rec.where
            pid = rec.get("id")
            if isinstance(pid, int) and not isinstance(pid, bool):
                pid = str(pid)
            if not isinstance(pid, str) or not pid:
                raise DataError(f"{where}: field 'id' must be a non-empty string (or number), "
                                f"got {json_type(rec['id']) if 'id' in rec else 'nothing'}; "
                                "give every passage a unique id")
            text = rec.get("text")
            if not isinstance(text, str):
                raise DataError(f"{where}: field 'text' must be a string, got "
                                f"{json_type(text) if 'text' in rec else 'nothing'}")
            title = rec.get("title")
            if title is not None and not isinstance(title, str):
                raise DataError(f"{where}: field 'title' must be a string, got "
                                f"{json_type(title)}")
            yield Passage(pid, title or None, text, where)

    def _iter_dir(self) -> Iterator[Passage]:
        n = self.chunk_tokens
        for f in self.files:
            rel = f.relative_to(self.path).as_posix()
            try:
                text = f.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: the file is not valid UTF-8 text ({e.reason}); save it "
                                "as UTF-8") from None
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for i in range(0, len(ids), n):
                chunk = self.tokenizer.decode(ids[i:i + n], skip_special_tokens=True).strip()
                if chunk:
                    yield Passage(f"{rel}#{i // n}", rel, chunk, f"{f}, chunk {i // n}")


@dataclass
class QARow:
    """One QA row: question, training answer, oracle passage numbers, output id."""
    question: str
    answer: str
    oracles: list[int]
    id: str


def _read_qa(path, index: dict[str, int]) -> list[QARow]:
    """The QA rows of the JSONL file ``path``, oracle ids resolved to passage numbers through
    ``index`` (id -> number). DataError naming file, line and field for a bad row."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"QA file not found: {p} (check the --qa path: a .jsonl file of "
                        '{"question", "answer", "oracle"} rows)')
    rows = []
    for rec in iter_json_records(p):
        where = rec.where
        for field in ("question", "oracle"):
            if field not in rec:
                raise DataError(f"{where}: missing required field '{field}' (fields present: "
                                f"{sorted(rec)}); a QA row needs 'question', 'answer' (or "
                                "'cot_answer') and 'oracle' (a passage id or a list of ids)")
        if not isinstance(rec["question"], str):
            raise DataError(f"{where}: field 'question' must be a string, got "
                            f"{json_type(rec['question'])}")
        answer = rec.get("cot_answer")
        field = "cot_answer"
        if answer is None:
            field = "answer"
            if "answer" not in rec:
                raise DataError(f"{where}: missing required field 'answer' (fields present: "
                                f"{sorted(rec)}); give the row an 'answer' or a 'cot_answer'")
            answer = rec["answer"]
        if not isinstance(answer, str):
            raise DataError(f"{where}: field '{field}' must be a string, got {json_type(answer)}")
        oracle = rec["oracle"]
        ids = oracle if isinstance(oracle, list) else [oracle]
        if not ids:
            raise DataError(f"{where}: field 'oracle' is an empty list; name at least one "
                            "passage id")
        numbers = []
        for o in ids:
            key = str(o) if isinstance(o, int) and not isinstance(o, bool) else o
            if not isinstance(key, str):
                raise DataError(f"{where}: field 'oracle' must be a passage id or a list of "
                                f"ids, got {json_type(o)} in it")
            if key not in index:
                raise DataError(f"{where}: field 'oracle': passage id {key!r} is not in the "
                                "passage collection; fix the id or add the passage")
            if index[key] not in numbers:
                numbers.append(index[key])
        rid = rec.get("id", rec.index)
        rows.append(QARow(rec["question"], answer, numbers, str(rid)))
    if not rows:
        raise DataError(f"{p}: the QA file holds no rows; add at least one")
    return rows


def _sample_distractors(rng, n: int, k: int, exclude: list[int]) -> list[int]:
    """``k`` distinct passage numbers in ``[0, n)`` outside ``exclude``, uniformly."""
    if k == 0:
        return []
    pick = rng.choice(n, size=min(n, k + len(exclude)), replace=False)
    bad = set(exclude)
    return [int(x) for x in pick if int(x) not in bad][:k]


def build_rag_data(passages, qa, output, *, distractors: int = 3, hard: bool = False,
                   oracle_prob: float = 0.8, seed: int = 0, eval_fraction: float = 0.0,
                   chunk_tokens: int | None = None, tokenizer=None,
                   overwrite: bool = False) -> dict:
    """Write the RAFT training rows (module docstring) to ``output`` (and the eval split).

    Takes the passages path, the QA JSONL path, the output path and the options above; returns
    a summary dict (rows written, eval rows, oracle-present fraction, passages, ...). Files are
    written to temporaries in the output's directory and renamed when complete. Raises
    DataError / ConfigError for bad inputs or options."""
    if not 0.0 <= oracle_prob <= 1.0:
        raise ConfigError(f"--oracle-prob must be in [0, 1], got {oracle_prob}")
    if distractors < 0:
        raise ConfigError(f"--distractors must be at least 0, got {distractors}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    out = Path(output)
    evp = eval_path(out)
    targets = [out] + ([evp] if eval_fraction > 0 else [])
    for t in targets:
        if t.exists() and not overwrite:
            raise ConfigError(f"{t} already exists; pass --overwrite to replace it")
        if t.is_dir():
            raise ConfigError(f"{t} is a directory; --output must be a file path")
    ensure_writable_dir(out.parent, "--output's directory")
    source = PassageSource(passages, chunk_tokens, tokenizer)

    # pass 1: ids (and the first BM25 pass)
    index: dict[str, int] = {}
    for p in source:
        if p.id in index:
            raise DataError(f"{p.where}: passage id {p.id!r} appears twice in the collection; "
                            "passage ids must be unique")
        index[p.id] = len(index)
    n = len(index)
    if n == 0:
        raise DataError(f"{passages}: the passage collection is empty; add passages")
    rows = _read_qa(qa, index)
    for r in rows:
        if distractors > n - len(r.oracles):
            raise ConfigError(f"--distractors {distractors} is more than the {n - len(r.oracles)}"
                              f" non-oracle passages of the collection ({n} passages); lower it")

    ranked = None
    if hard and distractors > 0:
        queries = bm25.QuerySet([r.question for r in rows])
        stats = bm25.collect_stats((p.text for p in source), queries)
        depth = distractors + max(len(r.oracles) for r in rows)
        ranked = bm25.top_k((p.text for p in source), queries, stats, depth)

    built = []
    for i, r in enumerate(rows):
        rng = np.random.default_rng([seed, i])
        with_oracle = bool(rng.random() < oracle_prob)
        if ranked is not None:
            bad = set(r.oracles)
            chosen = [d for d, _ in ranked[i] if d not in bad][:distractors]
            if len(chosen) < distractors:
                chosen += _sample_distractors(rng, n, distractors - len(chosen),
                                              r.oracles + chosen)
        else:
            chosen = _sample_distractors(rng, n, distractors, r.oracles)
        ctx = (list(r.oracles) if with_oracle else []) + chosen
        order = rng.permutation(len(ctx))
        ctx = [ctx[j] for j in order]
        oracle_pos = [j for j, d in enumerate(ctx) if with_oracle and d in r.oracles]
        built.append((r, ctx, oracle_pos))

    # last pass: only the texts the rows use
    need = {d for _, ctx, _ in built for d in ctx}
    texts: dict[int, Passage] = {}
    for j, p in enumerate(source):
        if j in need:
            texts[j] = p

    held = set()
    if eval_fraction > 0:
        n_eval = int(round(eval_fraction * len(rows)))
        perm = np.random.default_rng([seed, EVAL_SPLIT_STREAM]).permutation(len(rows))
        held = set(perm[:n_eval].tolist())

    def line(r, ctx, pos):
        contexts = [{"title": texts[d].title, "text": texts[d].text} if texts[d].title
                    else texts[d].text for d in ctx]
        return json.dumps({"question": r.question, "contexts": contexts, "answer": r.answer,
                           "oracle_index": pos, "id": r.id}, ensure_ascii=False) + "\n"

    temps, handles = [], {}
    try:
        for t in targets:
            fd, tmp = tempfile.mkstemp(prefix=f".{t.name}.", suffix=".tmp", dir=t.parent)
            temps.append((tmp, t))
            handles[t] = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        counts = {t: 0 for t in targets}
        for i, (r, ctx, pos) in enumerate(built):
            t = evp if i in held else out
            handles[t].write(line(r, ctx, pos))
            counts[t] += 1
        for h in handles.values():
            h.close()
        for tmp, t in temps:
            os.replace(tmp, t)
        temps = []
    finally:
        for h in handles.values():
            h.close()
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
    n_oracle = sum(bool(pos) for _, _, pos in built)
    summary = {"output": str(out), "rows": counts[out], "passages": n,
               "distractors": distractors, "hard_distractors": bool(hard),
               "oracle_present_fraction": round(n_oracle / len(built), 4)}
    if eval_fraction > 0:
        summary.update(eval_output=str(evp), eval_rows=counts[evp])
    return summary
