"""Tokenization: records -> :class:`Example` s (token ids + loss mask), one template at a time.

Conventions (the model and the trainer rely on them)
----------------------------------------------------
* An :class:`Example` is ``input_ids`` and ``loss_mask`` (``np.int32``, same length).
  ``input_ids`` starts with BOS and, for training, ends with EOS (chat rows: with the
  template's BOS and end-of-turn token). ``loss_mask[t] == 1`` means token ``t`` is a
  prediction *target* (exactly HF's ``labels != -100``): the model predicts token ``t`` from
  tokens ``< t``, so ``loss_mask[0]`` is always 0.
* BOS / EOS are added explicitly from ``tokenizer.bos_token_id`` / ``eos_token_id`` (text is
  encoded with ``add_special_tokens=False``). A tokenizer without a BOS token gets none; one
  without an EOS token is refused.
* The prompt and the response are tokenized separately and concatenated, so the loss-mask
  boundary is exact. (With sentencepiece tokenizers the response therefore starts with the
  usual word-boundary piece, e.g. ``"▁Paris"``; generation sees the same prompt tokens.)
  Chat rows are tokenized whole, as ``apply_chat_template`` does (see :mod:`.chat`).

Per template (fields: :mod:`.templates`)
----------------------------------------
* ``alpaca``: loss on the response and EOS only, unless ``train_on_inputs`` (then on every
  token but BOS). Examples longer than ``max_seq_len`` are skipped (one counted
  :class:`DataWarning`).
* ``rag``: when too long, passages are dropped from the end; the first passage that does not
  fit whole is kept truncated (its leading tokens) if at least
  :data:`~.templates.MIN_PARTIAL_PASSAGE_TOKENS` of it fit. The question and answer are never
  truncated: if they alone do not fit, the example is skipped (counted warning). With a
  ``chat_template`` the prompt is the user turn and the answer the assistant turn of a chat.
* ``text``: loss on every token but BOS. Long texts are **split into chunks** of
  ``max_seq_len`` tokens (each chunk starts with BOS; only the last one ends with EOS).
* ``chat``: see :mod:`.chat` (earliest turns dropped when too long).

:func:`tokenize_chunk` does the work for a slice of records and returns what it skipped or
shortened; :func:`tokenize_records` adds the dataset-level warnings and errors (the cache's
worker processes call the first and report through :func:`report`).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .chat import ChatRenderer, chat_messages
from .records import load_records
from .rows import where_of
from .templates import (MIN_PARTIAL_PASSAGE_TOKENS, PROMPT_TEMPLATES, alpaca_prompt, format_prompt,
                        get_str, rag_passages, rag_prompt, resolve_template)


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


def check_template(template: str, chat_template: str | None) -> None:
    """Refuse a ``chat_template`` for a template that is not rendered as a chat."""
    if chat_template and template not in ("chat", "rag"):
        raise ConfigError(f"chat_template applies to chat and rag data, not to the {template} "
                          "template; drop --chat-template or use template chat / rag")


def tokenize_chunk(records: Sequence[dict], tokenizer, template: str, max_seq_len: int,
                   train_on_inputs: bool = False, chat_template: str | None = None,
                   wheres: Sequence[str] | None = None) -> ChunkResult:
    """Tokenize records with a resolved template (no dataset-level warnings or errors).

    ``wheres`` names each record in error messages (default: the records' own positions).
    """
    max_seq_len = int(max_seq_len)
    check_template(template, chat_template)
    if wheres is None:
        wheres = [where_of(r, i) for i, r in enumerate(records)]
    if template == "chat":
        res = _tokenize_chat(records, wheres, ChatRenderer(tokenizer, chat_template), max_seq_len,
                             train_on_inputs)
    else:
        bos, eos = _special_ids(tokenizer)
        head = [] if bos is None else [bos]
        if template == "alpaca":
            res = _tokenize_alpaca(records, wheres, tokenizer, head, eos, max_seq_len,
                                   train_on_inputs)
        elif template == "rag":
            renderer = ChatRenderer(tokenizer, chat_template) if chat_template else None
            res = _tokenize_rag(records, wheres, tokenizer, head, eos, max_seq_len,
                                train_on_inputs, renderer)
        else:
            res = _tokenize_text(records, wheres, tokenizer, head, eos, max_seq_len)
    res.records = len(records)
    return res


def report(summary: dict, template: str, max_seq_len: int, first_where: str = "record 0"
           ) -> None:
    """Dataset-level outcome of tokenization (``summary``: :meth:`ChunkResult.summary`, or
    several merged): an error when no example fits, else one :class:`DataWarning` each for
    skipped and for shortened examples."""
    too_long, n_too_long = summary["too_long"], summary["n_too_long"]
    if not summary["examples"]:
        first = too_long[0][0] if too_long else first_where
        shortest = summary["shortest"] or 0
        raise DataError(f"every example is longer than max_seq_len={max_seq_len} (the shortest "
                        f"needs {shortest} tokens; first: {first}); raise max_seq_len to at "
                        f"least {shortest} or shorten the data")
    what = {"alpaca": "longer than", "rag": "whose question + answer exceed",
            "chat": "whose last exchange exceeds"}.get(template, "longer than")
    if n_too_long:
        shown = "; ".join(f"{w} needs {n} tokens" for w, n in too_long[:3])
        shown += " ..." if n_too_long > 3 else ""
        warnings.warn(f"skipped {n_too_long} of {summary['records']} examples {what} "
                      f"max_seq_len={max_seq_len} ({shown})", DataWarning, stacklevel=3)
    if summary["shortened"]:
        how = ("their earliest turns were dropped" if template == "chat" else
               "passages were dropped from the end or truncated")
        kind = "conversations" if template == "chat" else "RAG examples"
        warnings.warn(f"{summary['shortened']} of {summary['records']} {kind} were longer than "
                      f"max_seq_len={max_seq_len}: {how}", DataWarning, stacklevel=3)


def tokenize_records(records: Sequence[dict], tokenizer, template: str = "auto",
                     max_seq_len: int = 2048, train_on_inputs: bool = False,
                     chat_template: str | None = None) -> list[Example]:
    """Tokenize records with a template into :class:`Example` s (see the module docstring).

    ``tokenizer`` is any Hugging Face tokenizer; ``chat_template`` (a built-in name or a Jinja
    file; default: the tokenizer's own) renders ``chat`` rows and, when given, ``rag`` rows as
    a chat. Raises :class:`DataError` for a missing or wrongly typed field (naming file, line
    and field), an empty dataset, or when every example is longer than ``max_seq_len``;
    skipped / shortened examples give one :class:`DataWarning` each.
    """
    if not records:
        raise DataError("the dataset is empty (no records); add at least one record")
    check_max_seq_len(max_seq_len)
    template = resolve_template(template, records)
    res = tokenize_chunk(records, tokenizer, template, max_seq_len, train_on_inputs,
                         chat_template)
    report(res.summary(), template, int(max_seq_len), where_of(records[0], 0))
    return res.examples


def check_max_seq_len(max_seq_len: int) -> None:
    if int(max_seq_len) < 4:
        raise ConfigError(f"max_seq_len={max_seq_len} is too small; use at least 4")


def _tokenize_alpaca(records, wheres, tokenizer, head, eos, max_seq_len, train_on_inputs):
    prompts, responses = [], []
    for rec, where in zip(records, wheres):
        instruction = get_str(rec, "instruction", where, "alpaca")
        inp = get_str(rec, "input", where, "alpaca", optional=True)
        responses.append(get_str(rec, "output", where, "alpaca"))
        prompts.append(alpaca_prompt(instruction, inp))
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
    return ChunkResult(examples, too_long)


def _tokenize_text(records, wheres, tokenizer, head, eos, max_seq_len):
    texts = [get_str(rec, "text", where, "text") for rec, where in zip(records, wheres)]
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
    return ChunkResult(examples, [])


def _tokenize_chat(records, wheres, renderer: ChatRenderer, max_seq_len, train_on_inputs):
    convs = [chat_messages(rec, where) for rec, where in zip(records, wheres)]
    texts = []
    for where, msgs in zip(wheres, convs):
        try:
            texts.append(renderer.render(msgs))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    examples, too_long, shortened = [], [], 0
    for where, msgs, text, enc in zip(wheres, convs, texts, renderer.encode_texts(texts)):
        ids, mask, dropped = renderer.encode_fitting(msgs, max_seq_len, train_on_inputs, text, enc)
        if ids is None:
            too_long.append((where, dropped))
            continue
        shortened += dropped > 0
        examples.append(_example(ids, mask, where))
    return ChunkResult(examples, too_long, shortened)


def _rag_chat(renderer: ChatRenderer, tokenizer, question, passages, answer, max_seq_len,
              train_on_inputs):
    """A RAG record as a (user, assistant) chat in at most ``max_seq_len`` tokens:
    ``(ids, mask, shortened)`` or None when the question and answer alone do not fit."""
    def chat(ps):
        return [{"role": "user", "content": rag_prompt(question, ps, chat=True)},
                {"role": "assistant", "content": answer}]

    ids, mask = renderer.encode(chat(passages), train_on_inputs)
    if len(ids) <= max_seq_len:
        return ids, mask, False
    # Tokens the chat adds around the user text, then fit the passages to what is left.
    empty = _encode(tokenizer, [rag_prompt(question, [], chat=True)])[0]
    budget = max_seq_len - (len(renderer.encode(chat([]), train_on_inputs)[0]) - len(empty))
    for _ in range(4):   # token counts are not exactly additive: correct and retry
        fit = fit_rag_prompt(tokenizer, question, passages, budget, chat=True)
        if fit is None:
            return None
        ids, mask = renderer.encode(chat(fit[1]), train_on_inputs)
        if len(ids) <= max_seq_len:
            return ids, mask, True
        budget -= len(ids) - max_seq_len
    return None


def _tokenize_rag(records, wheres, tokenizer, head, eos, max_seq_len, train_on_inputs,
                  renderer: ChatRenderer | None = None):
    examples, too_long, shortened = [], [], 0
    for rec, where in zip(records, wheres):
        question = get_str(rec, "question", where, "rag")
        passages = rag_passages(rec, where)
        answer = get_str(rec, "answer", where, "rag")
        if renderer is not None:
            out = _rag_chat(renderer, tokenizer, question, passages, answer, max_seq_len,
                            train_on_inputs)
            if out is None:
                need = renderer.encode([{"role": "user", "content":
                                         rag_prompt(question, [], chat=True)},
                                        {"role": "assistant", "content": answer}])[0]
                too_long.append((where, len(need)))
                continue
            ids, mask, short = out
            shortened += short
            examples.append(_example(ids, mask, where))
            continue
        a = _encode(tokenizer, [answer])[0]
        budget = max_seq_len - len(head) - len(a) - 1
        fit = fit_rag_prompt(tokenizer, question, passages, budget) if budget > 0 else None
        if fit is None:
            base = _encode(tokenizer, [rag_prompt(question, [])])[0]
            too_long.append((where, len(head) + len(base) + len(a) + 1))
            continue
        p, _, short = fit
        shortened += short
        ids = head + p + a + [eos]
        n_prompt = len(head) + len(p)
        if train_on_inputs:
            mask = [0] + [1] * (len(ids) - 1)
        else:
            mask = [0] * n_prompt + [1] * (len(ids) - n_prompt)
        examples.append(_example(ids, mask, where))
    return ChunkResult(examples, too_long, shortened)


def encode_prompt(record: dict, tokenizer, template: str = "auto",
                  max_len: int | None = None, chat_template: str | None = None) -> list[int]:
    """BOS + prompt token ids of a record (for generation / evaluation).

    For ``rag`` with ``max_len``, passages are dropped / truncated exactly as in training so the
    prompt fits ``max_len`` tokens (raises :class:`DataError` if even the question does not).
    ``chat`` records (and ``rag`` ones with a ``chat_template``) are rendered with the chat
    template up to the generation prompt (a trailing assistant turn is left out).
    """
    template = resolve_template(template, [record])
    check_template(template, chat_template)
    where = where_of(record, None)
    if template == "chat":
        return ChatRenderer(tokenizer, chat_template).prompt_ids(
            chat_messages(record, where, training=False))
    if template == "rag" and chat_template:
        question = get_str(record, "question", where, "rag")
        passages = rag_passages(record, where)
        renderer = ChatRenderer(tokenizer, chat_template)

        def ids_for(ps):
            return renderer.prompt_ids([{"role": "user",
                                         "content": rag_prompt(question, ps, chat=True)}])
        ids = ids_for(passages)
        if max_len is None or len(ids) <= max_len:
            return ids
        empty = _encode(tokenizer, [rag_prompt(question, [], chat=True)])[0]
        fit = fit_rag_prompt(tokenizer, question, passages,
                             int(max_len) - (len(ids_for([])) - len(empty)), chat=True)
        if fit is None or len(ids_for(fit[1])) > max_len:
            raise DataError(f"{where}: the question alone is longer than {max_len} tokens")
        return ids_for(fit[1])
    bos, _ = _special_ids(tokenizer)
    head = [] if bos is None else [bos]
    if template == "rag" and max_len is not None:
        question = get_str(record, "question", where, "rag")
        fit = fit_rag_prompt(tokenizer, question, rag_passages(record, where),
                             int(max_len) - len(head))
        if fit is None:
            raise DataError(f"{where}: the question alone is longer than {max_len} tokens")
        return head + fit[0]
    return head + _encode(tokenizer, [format_prompt(record, template)])[0]


def load_dataset(path, tokenizer, template: str = "auto", max_seq_len: int = 2048,
                 train_on_inputs: bool = False, chat_template: str | None = None
                 ) -> list[Example]:
    """:func:`~.records.load_records` + :func:`tokenize_records` (in memory, no cache)."""
    return tokenize_records(load_records(path), tokenizer, template, max_seq_len,
                            train_on_inputs, chat_template)


def fit_rag_prompt(tokenizer, question, passages, budget, chat: bool = False):
    """The RAG prompt in at most ``budget`` tokens: ``(ids, passages used, shortened)`` (the
    last used passage possibly truncated), or None when the question alone does not fit.
    With ``chat`` the prompt is the user turn of the chat rendering."""
    ids = _encode(tokenizer, [rag_prompt(question, passages, chat=chat)])[0]
    if len(ids) <= budget:
        return ids, list(passages), False
    base = _encode(tokenizer, [rag_prompt(question, [], chat=chat)])[0]
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
        return _encode(tokenizer, [rag_prompt(question, ps, chat=chat)])[0]

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
            return cand, list(passages[:k]) + [(title, partial)], True
        m -= max(1, len(cand) - budget)
    return cur, list(passages[:k]), k < len(passages)


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
