"""RAG answer quality measured with generation: exact match, token F1 and citation accuracy.

Rows are ``rag`` records: ``{"question", "contexts": [...], "answer", optional "answers":
[more reference strings], optional "oracle_index": [0-based positions in contexts of the
passages that hold the answer; empty = the oracle is absent]}``. The rag prompt numbers the
passages ``[1]``, ``[2]``, ... (``spmd_lora.data.templates.rag_prompt``), so an answer may cite
them as ``[n]`` (or ``[n, m]``). Passages dropped to fit the prompt budget are dropped from the
end, so ``[n]`` always means ``contexts[n - 1]``.

Definitions (one generated answer ``g`` per row, references ``R``):

* ``normalize_answer``: SQuAD v1.1's: lower case, drop ASCII punctuation, drop the articles
  a / an / the as whole words, collapse whitespace. Before it, citation markers ``[n]`` are
  removed from the answer and the references (a citation is not part of the answer's text).
* ``em``: 1 when the normalised ``g`` equals a normalised reference, else 0 (max over ``R``).
* ``f1``: token F1 of the normalised texts' whitespace tokens (bag of tokens; 0 when they share
  none, so an empty answer or reference scores 0, as in SQuAD v1.1), max over ``R``.
* ``cite_rate``: the fraction of answers that cite at least one ``[n]``.
* ``citation_accuracy``: over the rows whose oracle is present (non-empty ``oracle_index``) and
  whose answer cites anything: the fraction whose citations (a) include at least one oracle
  passage (``[n]`` with ``n - 1`` in ``oracle_index``) and (b) all name passages of the row
  (``1 <= n <= len(contexts)``). None (JSON null) when no row qualifies.

Each metric is a mean over rows; when any row has ``oracle_index``, ``em``, ``f1`` and
``cite_rate`` are also given as ``..._oracle_present`` / ``..._oracle_absent`` (over the rows
with a non-empty / empty ``oracle_index``; None when there are none).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

from .data.records import iter_records
from .data.rows import where_of
from .data.tokenize import tokenize_chunk
from .errors import ConfigError, DataError

#: Greedy tokens generated per answer during training (``--eval-generate``) and by default in
#: ``spmd-lora eval --generate``.
EVAL_MAX_NEW_TOKENS = 64
#: Rows of the sample table (question, generated answer, reference).
SAMPLE_ROWS = 5

_CITATION = re.compile(r"\[\s*(\d+(?:\s*,\s*\d+)*)\s*\]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_DROP_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation of ``text`` (citations are not removed here)."""
    text = text.lower().translate(_DROP_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def strip_citations(text: str) -> str:
    """``text`` without its ``[n]`` / ``[n, m]`` citation markers."""
    return _CITATION.sub(" ", text)


def citations(text: str) -> list[int]:
    """The passage numbers (1-based, sorted, unique) an answer cites as ``[n]`` or ``[n, m]``."""
    found = set()
    for m in _CITATION.finditer(text):
        found.update(int(x) for x in m.group(1).split(","))
    return sorted(found)


def exact_match(prediction: str, references: Sequence[str] | str) -> float:
    """1.0 when the normalised ``prediction`` equals a normalised reference, else 0.0."""
    refs = [references] if isinstance(references, str) else list(references)
    pred = normalize_answer(strip_citations(prediction))
    return float(any(pred == normalize_answer(strip_citations(r)) for r in refs))


def token_f1(prediction: str, references: Sequence[str] | str) -> float:
    """Token F1 of ``prediction`` against the best of ``references`` (normalised texts)."""
    refs = [references] if isinstance(references, str) else list(references)
    pred = normalize_answer(strip_citations(prediction)).split()
    best = 0.0
    for r in refs:
        ref = normalize_answer(strip_citations(r)).split()
        same = sum((Counter(pred) & Counter(ref)).values())
        if same:
            precision, recall = same / len(pred), same / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def references_of(record: dict) -> list[str]:
    """A record's reference answers: ``answer`` (a string or a list of strings) plus the
    strings of an optional ``answers`` list."""
    out = []
    for key in ("answer", "answers"):
        value = record.get(key)
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(v for v in value if isinstance(v, str))
    if not out:
        raise DataError(f"{_where(record)}: a rag record needs an 'answer' string (or a list of "
                        f"reference strings) to score a generated answer")
    return out


def oracle_of(record: dict) -> list[int] | None:
    """A record's ``oracle_index`` as a list of ints (None when the record has none)."""
    value = record.get("oracle_index")
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataError(f"{_where(record)}: field 'oracle_index' must be a list of 0-based "
                        f"passage positions (integers), got {value!r}")
    return [int(v) for v in value]


def citation_correct(cited: Sequence[int], oracle: Sequence[int], n_passages: int) -> bool:
    """Whether an answer citing passages ``cited`` (1-based) is correct: it cites at least one
    oracle passage (0-based ``oracle``) and every citation names one of the ``n_passages``."""
    cited = list(cited)
    return (bool(cited) and any(n - 1 in set(oracle) for n in cited)
            and all(1 <= n <= n_passages for n in cited))


def score_answers(records: Sequence[dict], answers: Sequence[str]) -> dict:
    """The metrics (see the module docstring) of generated ``answers``, one per record.

    Returns ``{"n", "em", "f1", "cite_rate", "citation_accuracy", "n_citation"}`` (means over
    rows; ``n_citation`` the rows citation_accuracy is over), plus the ``_oracle_present`` /
    ``_oracle_absent`` splits of em, f1 and cite_rate when any record has ``oracle_index``.
    """
    if len(records) != len(answers):
        raise DataError(f"score_answers: {len(records)} records but {len(answers)} answers")
    if not records:
        raise DataError("score_answers: no records")
    rows = []
    for rec, ans in zip(records, answers):
        cited = citations(ans)
        oracle = oracle_of(rec)
        refs = references_of(rec)
        n_passages = len(rec.get("contexts") or [])
        rows.append({"em": exact_match(ans, refs), "f1": token_f1(ans, refs),
                     "cite_rate": float(bool(cited)), "oracle": oracle,
                     "correct": (citation_correct(cited, oracle, n_passages)
                                 if oracle and cited else None)})

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else None

    out = {"n": len(rows)}
    for key in ("em", "f1", "cite_rate"):
        out[key] = mean(r[key] for r in rows)
    judged = [r["correct"] for r in rows if r["correct"] is not None]
    out["citation_accuracy"] = mean(float(c) for c in judged)
    out["n_citation"] = len(judged)
    if any(r["oracle"] is not None for r in rows):
        for split, keep in (("oracle_present", lambda o: bool(o)),
                            ("oracle_absent", lambda o: o is not None and not o)):
            for key in ("em", "f1", "cite_rate"):
                out[f"{key}_{split}"] = mean(r[key] for r in rows if keep(r["oracle"]))
    return out


def sample_table(records: Sequence[dict], answers: Sequence[str], rows: int = SAMPLE_ROWS
                 ) -> list[dict]:
    """The first ``rows`` (question, generated answer, reference) rows, as dicts."""
    return [{"question": rec.get("question"), "generated": ans,
             "reference": references_of(rec)[0]} for rec, ans in list(zip(records, answers))[:rows]]


def generate_answers(model, tokenizer, records: Sequence[dict],
                     max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
                     max_prompt_tokens: int | None = None, chat_template: str | None = None
                     ) -> list[str]:
    """Greedy answers to rag ``records`` from ``model`` (a :class:`spmd_lora.api.Model` with its
    LoRA, cp = 1), with the sharded KV-cache generator exactly as ``spmd-lora generate
    --template rag`` runs it: prompts fitted to ``max_prompt_tokens`` as training fits them."""
    from .engine.generate import generate_text
    return generate_text(model, tokenizer, list(records), template="rag",
                         max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                         chat_template=chat_template)


def evaluate_generation(model, tokenizer, records: Sequence[dict],
                        max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
                        max_prompt_tokens: int | None = None, chat_template: str | None = None
                        ) -> tuple[dict, list[dict]]:
    """Generate greedy answers to ``records`` (rag rows) and score them.

    Returns ``(metrics, samples)``: the dict of :func:`score_answers` and the first
    :data:`SAMPLE_ROWS` rows of :func:`sample_table`.
    """
    records = list(records)
    if not records:
        raise DataError("evaluate_generation: no records to generate for")
    for rec in records:                                  # bad rows fail before generating
        references_of(rec)
        oracle_of(rec)
    answers = generate_answers(model, tokenizer, records, max_new_tokens, max_prompt_tokens,
                               chat_template)
    return score_answers(records, answers), sample_table(records, answers)


def records_of_examples(data_path, indices: Sequence[int], tokenizer, max_seq_len: int,
                        train_on_inputs: bool = False, chat_template: str | None = None,
                        chunk_rows: int = 512) -> list[dict]:
    """The rag records that became the tokenized examples at ``indices`` (positions in the
    examples of ``data_path`` tokenized with the ``rag`` template and ``max_seq_len``, as the
    training cache holds them; records too long to fit were skipped there, so positions are
    found by tokenizing the records again, chunk by chunk, up to the last one wanted).
    Returned in the order of ``indices``."""
    wanted = {int(i): None for i in indices}
    if not wanted:
        return []
    last, seen, chunk = max(wanted), 0, []

    def flush(chunk, seen):
        res = tokenize_chunk(chunk, tokenizer, "rag", max_seq_len, train_on_inputs, chat_template,
                             wheres=[str(j) for j in range(len(chunk))])
        for k, ex in enumerate(res.examples):          # an example's source: its record's j
            if seen + k in wanted:
                wanted[seen + k] = chunk[int(ex.source)]
        return seen + len(res.examples)

    for rec in iter_records(data_path):
        chunk.append(rec)
        if len(chunk) == chunk_rows:
            seen, chunk = flush(chunk, seen), []
            if seen > last:
                break
    if chunk and seen <= last:
        seen = flush(chunk, seen)
    missing = [i for i, r in wanted.items() if r is None]
    if missing:
        raise DataError(f"{data_path}: no example at positions {missing[:3]} (the data has "
                        f"{seen} examples)")
    return [wanted[int(i)] for i in indices]


def check_eval_generate(eval_generate: int, template: str, flag: str = "--eval-generate") -> None:
    """ConfigError unless ``eval_generate`` >= 0 and, when > 0, the template is rag."""
    if eval_generate < 0:
        raise ConfigError(f"{flag} must be >= 0 (0 = off), got {eval_generate}")
    if eval_generate > 0 and template != "rag":
        raise ConfigError(f"{flag} {eval_generate} scores generated RAG answers and needs "
                          f"the rag template, but the template is {template}")


def _where(record) -> str:
    return where_of(record, None)
