"""Datasets: Alpaca / RAG / raw-text records -> token ids + loss mask -> fixed-shape batches.

Conventions (the model and the trainer rely on them)
----------------------------------------------------
* An :class:`Example` is ``input_ids`` and ``loss_mask`` (``np.int32``, same length).
  ``input_ids`` starts with BOS and, for training, ends with EOS. ``loss_mask[t] == 1`` means
  token ``t`` is a prediction *target* (exactly HF's ``labels != -100``): the model predicts
  token ``t`` from tokens ``< t``, so ``loss_mask[0]`` is always 0.
* BOS / EOS are added explicitly from ``tokenizer.bos_token_id`` / ``eos_token_id`` (text is
  encoded with ``add_special_tokens=False``). A tokenizer without a BOS token gets none; one
  without an EOS token is refused.
* The prompt and the response are tokenized separately and concatenated, so the loss-mask
  boundary is exact. (With sentencepiece tokenizers the response therefore starts with the
  usual word-boundary piece, e.g. ``"▁Paris"``; generation sees the same prompt tokens.)

Templates
---------
* ``alpaca``: fields ``instruction``, optional ``input`` (missing, null or blank -> the
  no-input prompt), ``output``. The standard Stanford Alpaca prompts
  (:data:`PROMPT_TEMPLATES` ``["alpaca"]``). Loss on the response and EOS only, unless
  ``train_on_inputs`` (then on every token but BOS). Examples longer than ``max_seq_len`` are
  skipped (one counted :class:`DataWarning`).
* ``rag``: fields ``question``, ``contexts`` (list of strings or ``{"title", "text"}``
  objects), ``answer``. Prompt = header, numbered passages (``[1] Title\\ntext``), the
  question, then ``"### Answer:\\n"``. When too long, passages are dropped from the end; the
  first passage that does not fit whole is kept truncated (its leading tokens) if at least
  :data:`MIN_PARTIAL_PASSAGE_TOKENS` of it fit. The question and answer are never truncated:
  if they alone do not fit, the example is skipped (counted warning).
* ``text``: field ``text``; loss on every token but BOS. Long texts are **split into chunks**
  of ``max_seq_len`` tokens (each chunk starts with BOS; only the last one ends with EOS), so no
  text is lost.
* ``auto``: inferred from the fields of the first record.

Batching
--------
:class:`BatchIterator` yields dicts of ``np.int32`` arrays ``tokens``, ``loss_mask``,
``segment_ids`` (1, 2, 3, ... per example in a row, 0 for padding) and ``positions`` (restart
at 0 for every example, 0 for padding), all ``[batch_size, max_seq_len]``. Without packing
there is one example per row; with ``pack=True`` whole examples are packed greedily (first
fit) into rows of ``max_seq_len`` tokens, never split. Rows are shuffled every epoch with
``np.random.default_rng(seed + epoch)``; the last incomplete batch of an epoch is dropped
(``drop_last=True``, the default) unless that leaves no batch at all, which is an error.
``state()`` / ``restore()`` give an exactly resumable position.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# Prompt templates
# ---------------------------------------------------------------------------------------------

PROMPT_TEMPLATES: dict[str, dict[str, str]] = {
    "alpaca": {
        "prompt_input": (
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
        "prompt_no_input": (
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n"),
    },
    "rag": {
        "header": ("Below is a question together with passages that may help to answer it. "
                   "Answer the question.\n\n### Passages:\n"),
        "header_no_passages": "Below is a question. Answer the question.\n\n",
        "passage": "[{index}] {title}\n{text}\n\n",
        "passage_no_title": "[{index}] {text}\n\n",
        "question": "### Question:\n{question}\n\n### Answer:\n",
    },
    "text": {"prompt": "{text}"},
}

TEMPLATES = ("alpaca", "rag", "text")
#: A truncated RAG passage is kept only if at least this many of its tokens fit.
MIN_PARTIAL_PASSAGE_TOKENS = 8


class DataWarning(UserWarning):
    """Examples were skipped or shortened while tokenizing a dataset."""


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------

class Record(dict):
    """A dataset row (a plain dict) that remembers where it came from, for error messages."""

    __slots__ = ("path", "line", "index")

    def __init__(self, data=(), path: str | None = None, line: int | None = None,
                 index: int | None = None):
        super().__init__(data)
        self.path, self.line, self.index = path, line, index

    @property
    def where(self) -> str:
        return _where(self, self.index)


def _where(rec: Any, i: int | None) -> str:
    path = getattr(rec, "path", None)
    line = getattr(rec, "line", None)
    if path is not None:
        loc = f"{path}, line {line}" if line is not None else str(path)
        idx = getattr(rec, "index", None)
        return loc + (f" (record {idx})" if idx is not None else "")
    return f"record {i}" if i is not None else "record"


_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "true/false",
               list: "a list", dict: "an object", type(None): "null"}


def _json_type(v: Any) -> str:
    return _JSON_TYPES.get(type(v), type(v).__name__)


def load_records(path) -> list[Record]:
    """Read a JSON list file or a JSONL file (one JSON object per line) into records.

    The format is detected from the content (a file whose first character is ``[`` is a JSON
    list), so a ``.json`` file holding JSONL also works. Blank JSONL lines are ignored.
    Raises :class:`DataError` naming the file and line for a missing file, malformed JSON, a
    row that is not a JSON object, or an empty dataset.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {p} (check the --data path)")
    if not p.is_file():
        raise DataError(f"data path {p} is not a file; pass a .json or .jsonl file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{p}, line {line}: the file is not valid UTF-8 text ({e.reason}); "
                        "save it as UTF-8") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{p}: the file is empty; it must hold a JSON list of records (.json) "
                        "or one JSON object per line (.jsonl)")
    if p.suffix.lower() == ".json" and stripped[0] == "{" and "\n" not in text.strip():
        raise DataError(f"{p}: a .json file must hold a JSON list of records ([{{...}}, ...]), "
                        "not one object; wrap it in [ ], or name the file .jsonl")
    records = _load_json_list(p, text) if stripped[0] == "[" else _load_jsonl(p, text)
    if not records:
        raise DataError(f"{p}: the dataset is empty (no records); add at least one record")
    return records


def _load_jsonl(p: Path, text: str) -> list[Record]:
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            hint = ""
            if not records:
                try:  # a pretty-printed single JSON object is a common mistake
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    whole = None
                if isinstance(whole, dict):
                    hint = (" The file holds a single JSON object; put the records in a JSON "
                            "list ([{...}, {...}]) or write one object per line (JSONL).")
            raise DataError(
                f"{p}, line {lineno}: malformed JSON ({e.msg} at column {e.colno}). Each line of "
                f"a JSONL file must be one complete JSON object; fix or remove this line.{hint}"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}, line {lineno}: expected a JSON object such as "
                            f'{{"instruction": ..., "output": ...}}, got {_json_type(obj)}')
        records.append(Record(obj, path=str(p), line=lineno, index=len(records)))
    return records


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _load_json_list(p: Path, text: str) -> list[Record]:
    dec = json.JSONDecoder()
    records: list[Record] = []
    pos = text.index("[") + 1
    line, counted = 1, 0

    def line_at(q: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, q)
        counted = q
        return line

    def bad(q: int, what: str) -> DataError:
        return DataError(f"{p}, line {line_at(q)}: malformed JSON ({what}). A .json data file must "
                         "be one JSON list of objects: [{...}, {...}]; fix the file or use JSONL "
                         "(one object per line).")

    pos = _skip_ws(text, pos)
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            pos = _skip_ws(text, pos)
            if pos >= len(text):
                raise bad(pos, "the list is not closed with ']'")
            try:
                obj, end = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}, line {e.lineno}: malformed JSON ({e.msg} at column "
                                f"{e.colno}). A .json data file must be one JSON list of objects:"
                                " [{...}, {...}]; fix the file or use JSONL.") from None
            ln = line_at(pos)
            if not isinstance(obj, dict):
                raise DataError(f"{p}, line {ln} (record {len(records)}): expected a JSON object "
                                f'such as {{"instruction": ..., "output": ...}}, got '
                                f"{_json_type(obj)}")
            records.append(Record(obj, path=str(p), line=ln, index=len(records)))
            pos = _skip_ws(text, end)
            if pos < len(text) and text[pos] == ",":
                pos += 1
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise bad(pos, "expected ',' or ']' after a record")
    if _skip_ws(text, pos) != len(text):
        raise bad(_skip_ws(text, pos), "extra data after the closing ']'")
    return records


# ---------------------------------------------------------------------------------------------
# Field validation and prompt formatting
# ---------------------------------------------------------------------------------------------

_FIELDS_HELP = ("expected 'instruction' (+ optional 'input', 'output') for alpaca, "
                "'question' + 'contexts' + 'answer' for rag, or 'text' for raw text")


def infer_template(record: dict, where: str = "record 0") -> str:
    """The template a record's fields imply: 'alpaca', 'rag' or 'text'."""
    if "instruction" in record:
        return "alpaca"
    if "question" in record:
        return "rag"
    if "text" in record:
        return "text"
    raise DataError(f"{where}: cannot infer the data template from the fields "
                    f"{sorted(record)}; {_FIELDS_HELP}; or pass the template explicitly")


def _resolve_template(template: str, records: Sequence[dict]) -> str:
    if template == "auto":
        if not records:
            raise DataError("the dataset is empty; cannot infer its template")
        return infer_template(records[0], _where(records[0], 0))
    if template not in TEMPLATES:
        raise ConfigError(f"unknown data template {template!r}; choose one of "
                          f"{', '.join(TEMPLATES + ('auto',))}")
    return template


def _get_str(rec: dict, field: str, where: str, template: str, *, optional: bool = False):
    if field not in rec:
        if optional:
            return None
        raise DataError(f"{where}: missing required field '{field}' for the {template} template "
                        f"(fields present: {sorted(rec)}); {_FIELDS_HELP}")
    v = rec[field]
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {_json_type(v)} "
                        f"({json.dumps(v)[:60]})")
    return v


def _rag_passages(rec: dict, where: str) -> list[tuple[str | None, str]]:
    if "contexts" not in rec:
        raise DataError(f"{where}: missing required field 'contexts' for the rag template "
                        f"(fields present: {sorted(rec)}); it must be a list of passages "
                        '(strings or {"title": ..., "text": ...} objects), possibly empty')
    ctx = rec["contexts"]
    if not isinstance(ctx, list):
        raise DataError(f"{where}: field 'contexts' must be a list of passages (strings or "
                        f'{{"title", "text"}} objects), got {_json_type(ctx)}')
    out = []
    for j, c in enumerate(ctx):
        if isinstance(c, str):
            out.append((None, c))
        elif isinstance(c, dict):
            if not isinstance(c.get("text"), str):
                raise DataError(f"{where}: field 'contexts[{j}].text' must be a string, got "
                                f"{_json_type(c.get('text')) if 'text' in c else 'nothing'}")
            title = c.get("title")
            if title is not None and not isinstance(title, str):
                raise DataError(f"{where}: field 'contexts[{j}].title' must be a string, got "
                                f"{_json_type(title)}")
            out.append((title or None, c["text"]))
        else:
            raise DataError(f"{where}: field 'contexts[{j}]' must be a string or a "
                            f'{{"title", "text"}} object, got {_json_type(c)}')
    return out


def _alpaca_prompt(instruction: str, inp: str | None) -> str:
    t = PROMPT_TEMPLATES["alpaca"]
    if inp is not None and inp.strip():
        return t["prompt_input"].format(instruction=instruction, input=inp)
    return t["prompt_no_input"].format(instruction=instruction)


def _rag_prompt(question: str, passages: Sequence[tuple[str | None, str]]) -> str:
    t = PROMPT_TEMPLATES["rag"]
    parts = [t["header"] if passages else t["header_no_passages"]]
    for i, (title, text) in enumerate(passages, 1):
        parts.append(t["passage"].format(index=i, title=title, text=text) if title
                     else t["passage_no_title"].format(index=i, text=text))
    parts.append(t["question"].format(question=question))
    return "".join(parts)


def format_prompt(record: dict, template: str = "auto") -> str:
    """The prompt text of a record (everything before the response), as used for generation.

    For ``rag`` all passages are included (see :func:`encode_prompt` to fit a token budget);
    for ``text`` the prompt is the text itself.
    """
    template = _resolve_template(template, [record])
    where = _where(record, None)
    if template == "alpaca":
        return _alpaca_prompt(_get_str(record, "instruction", where, template),
                              _get_str(record, "input", where, template, optional=True))
    if template == "rag":
        return _rag_prompt(_get_str(record, "question", where, template),
                           _rag_passages(record, where))
    return _get_str(record, "text", where, template)


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------

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


def _example(ids: list[int], mask: list[int], source: str) -> Example:
    return Example(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.int32), source)


def pad_token_id(tokenizer) -> int:
    """Id used for padding batches: ``tokenizer.pad_token_id``, or 0 when it has none."""
    pid = getattr(tokenizer, "pad_token_id", None)
    return 0 if pid is None else int(pid)


def _special_ids(tokenizer) -> tuple[int | None, int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token_id; training needs an end-of-sequence "
                          "token (set tokenizer.eos_token)")
    return (None if bos is None else int(bos)), int(eos)


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    out = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [list(x) for x in out]


def _skip_warning(skipped: list[str], total: int, max_seq_len: int, what: str) -> None:
    if skipped:
        shown = "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        warnings.warn(f"skipped {len(skipped)} of {total} examples {what} max_seq_len="
                      f"{max_seq_len} ({shown})", DataWarning, stacklevel=3)


def tokenize_records(records: Sequence[dict], tokenizer, template: str = "auto",
                     max_seq_len: int = 2048, train_on_inputs: bool = False) -> list[Example]:
    """Tokenize records with a template into :class:`Example` s (see the module docstring).

    ``tokenizer`` is any Hugging Face tokenizer. Raises :class:`DataError` for a missing or
    wrongly typed field (naming file, line and field), an empty dataset, or when every example
    is longer than ``max_seq_len``; skipped / shortened examples give one :class:`DataWarning`.
    """
    if not records:
        raise DataError("the dataset is empty (no records); add at least one record")
    if int(max_seq_len) < 4:
        raise ConfigError(f"max_seq_len={max_seq_len} is too small; use at least 4")
    max_seq_len = int(max_seq_len)
    template = _resolve_template(template, records)
    bos, eos = _special_ids(tokenizer)
    head = [] if bos is None else [bos]
    wheres = [_where(r, i) for i, r in enumerate(records)]

    if template == "alpaca":
        examples, too_long = _tokenize_alpaca(records, wheres, tokenizer, head, eos, max_seq_len,
                                              train_on_inputs)
    elif template == "rag":
        examples, too_long = _tokenize_rag(records, wheres, tokenizer, head, eos, max_seq_len,
                                           train_on_inputs)
    else:
        examples, too_long = _tokenize_text(records, wheres, tokenizer, head, eos, max_seq_len)

    if not examples:
        first = next((w for w, _ in too_long), wheres[0])
        shortest = min((n for _, n in too_long), default=0)
        raise DataError(f"every example is longer than max_seq_len={max_seq_len} (the shortest "
                        f"needs {shortest} tokens; first: {first}); raise max_seq_len to at "
                        f"least {shortest} or shorten the data")
    _skip_warning([f"{w} needs {n} tokens" for w, n in too_long], len(records), max_seq_len,
                  "longer than" if template == "alpaca" else "whose question + answer exceed")
    return examples


def _tokenize_alpaca(records, wheres, tokenizer, head, eos, max_seq_len, train_on_inputs):
    prompts, responses = [], []
    for rec, where in zip(records, wheres):
        instruction = _get_str(rec, "instruction", where, "alpaca")
        inp = _get_str(rec, "input", where, "alpaca", optional=True)
        responses.append(_get_str(rec, "output", where, "alpaca"))
        prompts.append(_alpaca_prompt(instruction, inp))
    p_ids, r_ids = _encode(tokenizer, prompts), _encode(tokenizer, responses)
    examples, too_long = [], []
    for where, p, r in zip(wheres, p_ids, r_ids):
        ids = head + p + r + [eos]
        if len(ids) > max_seq_len:
            too_long.append((where, len(ids)))
            continue
        n_prompt = len(head) + len(p)
        if train_on_inputs:
            mask = [0] + [1] * (len(ids) - 1)
        else:
            mask = [0] * n_prompt + [1] * (len(ids) - n_prompt)
        mask[0] = 0
        examples.append(_example(ids, mask, where))
    return examples, too_long


def _tokenize_text(records, wheres, tokenizer, head, eos, max_seq_len):
    texts = [_get_str(rec, "text", where, "text") for rec, where in zip(records, wheres)]
    chunk = max_seq_len - len(head)
    examples = []
    for where, ids in zip(wheres, _encode(tokenizer, texts)):
        ids = ids + [eos]
        for start in range(0, len(ids), chunk):
            piece = ids[start:start + chunk]
            if start > 0 and len(piece) == 1:  # only the EOS left over: nothing to learn
                break
            toks = head + piece
            mask = [0] + [1] * (len(toks) - 1)
            examples.append(_example(toks, mask, where if start == 0 else
                                     f"{where} (chunk {start // chunk})"))
    return examples, []


def _fit_rag_prompt(tokenizer, question, passages, budget) -> tuple[list[int], int, bool] | None:
    """Prompt ids of at most ``budget`` tokens: (ids, passages kept, last one truncated)."""
    ids = _encode(tokenizer, [_rag_prompt(question, passages)])[0]
    if len(ids) <= budget:
        return ids, len(passages), False
    base = _encode(tokenizer, [_rag_prompt(question, [])])[0]
    if len(base) > budget:
        return None
    # Estimate the largest k whole passages that fit, then correct with exact tokenization.
    blocks = [PROMPT_TEMPLATES["rag"]["passage"].format(index=i, title=t, text=x) if t else
              PROMPT_TEMPLATES["rag"]["passage_no_title"].format(index=i, text=x)
              for i, (t, x) in enumerate(passages, 1)]
    costs = [len(c) for c in _encode(tokenizer, blocks)]
    k, total = 0, len(base)
    while k < len(passages) and total + costs[k] <= budget:
        total += costs[k]
        k += 1

    def enc(ps):
        return _encode(tokenizer, [_rag_prompt(question, ps)])[0]

    cur = enc(passages[:k]) if k else base
    while k > 0 and len(cur) > budget:
        k -= 1
        cur = enc(passages[:k]) if k else base
    while k + 1 < len(passages):
        nxt = enc(passages[:k + 1])
        if len(nxt) > budget:
            break
        k, cur = k + 1, nxt
    # Keep the leading tokens of the next passage if enough of them fit.
    title, text = passages[k]
    text_ids = _encode(tokenizer, [text])[0]
    overhead = costs[k] - len(text_ids)
    m = min(len(text_ids) - 1, budget - len(cur) - max(overhead, 0))
    while m >= MIN_PARTIAL_PASSAGE_TOKENS:
        partial = tokenizer.decode(text_ids[:m], skip_special_tokens=True)
        cand = enc(list(passages[:k]) + [(title, partial)])
        if len(cand) <= budget:
            return cand, k + 1, True
        m -= max(1, len(cand) - budget)
    return cur, k, False


def _tokenize_rag(records, wheres, tokenizer, head, eos, max_seq_len, train_on_inputs):
    examples, too_long, shortened = [], [], 0
    for rec, where in zip(records, wheres):
        question = _get_str(rec, "question", where, "rag")
        passages = _rag_passages(rec, where)
        answer = _get_str(rec, "answer", where, "rag")
        a = _encode(tokenizer, [answer])[0]
        budget = max_seq_len - len(head) - len(a) - 1
        fit = _fit_rag_prompt(tokenizer, question, passages, budget) if budget > 0 else None
        if fit is None:
            base = _encode(tokenizer, [_rag_prompt(question, [])])[0]
            too_long.append((where, len(head) + len(base) + len(a) + 1))
            continue
        p, kept, truncated = fit
        shortened += kept < len(passages) or truncated
        ids = head + p + a + [eos]
        n_prompt = len(head) + len(p)
        if train_on_inputs:
            mask = [0] + [1] * (len(ids) - 1)
        else:
            mask = [0] * n_prompt + [1] * (len(ids) - n_prompt)
        examples.append(_example(ids, mask, where))
    if shortened:
        warnings.warn(f"{shortened} of {len(records)} RAG examples were longer than max_seq_len="
                      f"{max_seq_len}: passages were dropped from the end or truncated",
                      DataWarning, stacklevel=3)
    return examples, too_long


def encode_prompt(record: dict, tokenizer, template: str = "auto",
                  max_len: int | None = None) -> list[int]:
    """BOS + prompt token ids of a record (for generation / evaluation).

    For ``rag`` with ``max_len``, passages are dropped / truncated exactly as in training so the
    prompt fits ``max_len`` tokens (raises :class:`DataError` if even the question does not).
    """
    template = _resolve_template(template, [record])
    bos, _ = _special_ids(tokenizer)
    head = [] if bos is None else [bos]
    if template == "rag" and max_len is not None:
        where = _where(record, None)
        question = _get_str(record, "question", where, "rag")
        fit = _fit_rag_prompt(tokenizer, question, _rag_passages(record, where),
                              int(max_len) - len(head))
        if fit is None:
            raise DataError(f"{where}: the question alone is longer than {max_len} tokens")
        return head + fit[0]
    return head + _encode(tokenizer, [format_prompt(record, template)])[0]


def load_dataset(path, tokenizer, template: str = "auto", max_seq_len: int = 2048,
                 train_on_inputs: bool = False) -> list[Example]:
    """:func:`load_records` + :func:`tokenize_records`."""
    return tokenize_records(load_records(path), tokenizer, template, max_seq_len,
                            train_on_inputs)


def split_train_eval(examples: Sequence, eval_fraction: float, seed: int = 0
                     ) -> tuple[list, list]:
    """Deterministic split: a random ``eval_fraction`` of the examples (at least one when the
    fraction is > 0) goes to eval. Both parts keep the original relative order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    n = len(examples)
    if eval_fraction == 0.0 or n == 0:
        return list(examples), []
    n_eval = max(1, int(round(n * eval_fraction)))
    if n_eval >= n:
        raise DataError(f"eval_fraction={eval_fraction} of {n} examples leaves no training "
                        "examples; lower eval_fraction or add data")
    perm = np.random.default_rng(seed).permutation(n)
    is_eval = np.zeros(n, dtype=bool)
    is_eval[perm[:n_eval]] = True
    return ([e for e, f in zip(examples, is_eval) if not f],
            [e for e, f in zip(examples, is_eval) if f])


# ---------------------------------------------------------------------------------------------
# Packing and batching
# ---------------------------------------------------------------------------------------------

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


class BatchIterator:
    """Fixed-shape batches over epochs, deterministic and exactly resumable.

    Args:
      examples: tokenized examples, each at most ``max_seq_len`` tokens.
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
        self.examples = list(examples)
        self.batch_size, self.max_seq_len = int(batch_size), int(max_seq_len)
        self.pad_id, self.pack, self.shuffle = int(pad_id), bool(pack), bool(shuffle)
        self.seed, self.epochs, self.drop_last = int(seed), epochs, bool(drop_last)
        lengths = [len(e) for e in self.examples]
        for e, n in zip(self.examples, lengths):
            if n > self.max_seq_len:
                raise DataError(f"example {e.source or ''} has {n} tokens, more than "
                                f"max_seq_len={self.max_seq_len}; tokenize with the same "
                                "max_seq_len")
        if self.pack:
            order = (np.random.default_rng((self.seed, 1)).permutation(len(lengths))
                     if self.shuffle else np.arange(len(lengths)))
            rows = pack_examples([lengths[i] for i in order], self.max_seq_len)
            self.rows = [[int(order[i]) for i in row] for row in rows]
        else:
            self.rows = [[i] for i in range(len(self.examples))]
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

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """Batch ``index`` of ``epoch`` (does not move the position)."""
        rows = self._order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        return collate([[self.examples[i] for i in self.rows[r]] for r in rows],
                       self.max_seq_len, self.pad_id, batch_size=self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        out = self.batch(self.epoch, self.index)
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return out


def eval_batches(examples: Sequence[Example], batch_size: int, max_seq_len: int, *,
                 pad_id: int = 0, pack: bool = False) -> Iterable[dict[str, np.ndarray]]:
    """One ordered pass over every example (last batch padded with empty rows)."""
    return BatchIterator(examples, batch_size, max_seq_len, pad_id=pad_id, pack=pack,
                         shuffle=False, epochs=1, drop_last=False)


__all__ = ["PROMPT_TEMPLATES", "TEMPLATES", "MIN_PARTIAL_PASSAGE_TOKENS", "DataWarning", "Record",
           "Example", "load_records", "infer_template", "format_prompt", "encode_prompt",
           "tokenize_records", "load_dataset", "pad_token_id", "split_train_eval",
           "pack_examples", "collate", "BatchIterator", "eval_batches"]
