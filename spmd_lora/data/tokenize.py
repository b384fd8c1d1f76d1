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
  truncated: if they alone do not fit, the example is skipped (counted warning). A record
  with ``oracle_index`` drops its non-oracle passages first (last first), and only then drops /
  truncates oracle passages as above; kept passages are renumbered [1..n]. With a
  ``chat_template`` the prompt is the user turn and the answer the assistant turn of a chat.
* ``text``: loss on every token but BOS. Long texts are **split into chunks** of
  ``max_seq_len`` tokens (each chunk starts with BOS; only the last one ends with EOS).
* ``chat``: see :mod:`.chat` (earliest turns dropped when too long).

:func:`tokenize_chunk` does the work for a slice of records and returns what it skipped or
shortened; :func:`tokenize_records` adds the dataset-level warnings and errors (the cache's
worker processes call the first and report through :func:`report`).
"""
from __future__ import annotations

import warnings
from typing import Sequence

from ..errors import ConfigError, DataError
from .chat import ChatRenderer, chat_messages
from .examples import (ChunkResult, DataWarning, Example, encode_texts, make_example,
                       special_ids)
from .rag_fit import fit_rag_prompt, rag_oracle_index, tokenize_rag
from .records import load_records
from .rows import where_of
from .templates import (alpaca_prompt, format_prompt, get_str, rag_passages,
                        rag_prompt, resolve_template)


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
        bos, eos = special_ids(tokenizer)
        head = [] if bos is None else [bos]
        if template == "alpaca":
            res = _tokenize_alpaca(records, wheres, tokenizer, head, eos, max_seq_len,
                                   train_on_inputs)
        elif template == "rag":
            renderer = ChatRenderer(tokenizer, chat_template) if chat_template else None
            res = tokenize_rag(records, wheres, tokenizer, head, eos, max_seq_len,
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
    p_ids, r_ids = encode_texts(tokenizer, prompts), encode_texts(tokenizer, responses)
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
        examples.append(make_example(ids, mask, where))
    return ChunkResult(examples, too_long)


def _tokenize_text(records, wheres, tokenizer, head, eos, max_seq_len):
    texts = [get_str(rec, "text", where, "text") for rec, where in zip(records, wheres)]
    chunk = max_seq_len - len(head)
    examples = []
    for where, ids in zip(wheres, encode_texts(tokenizer, texts)):
        ids = ids + [eos]
        for start in range(0, len(ids), chunk):
            piece = ids[start:start + chunk]
            if start > 0 and len(piece) == 1:  # only the EOS left over: nothing to learn
                break
            toks = head + piece
            mask = [0] + [1] * (len(toks) - 1)
            examples.append(make_example(toks, mask, where if start == 0 else
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
        examples.append(make_example(ids, mask, where))
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
        empty = encode_texts(tokenizer, [rag_prompt(question, [], chat=True)])[0]
        fit = fit_rag_prompt(tokenizer, question, passages,
                             int(max_len) - (len(ids_for([])) - len(empty)), chat=True,
                             oracle_index=rag_oracle_index(record, where, len(passages)))
        if fit is None or len(ids_for(fit[1])) > max_len:
            raise DataError(f"{where}: the question alone is longer than {max_len} tokens")
        return ids_for(fit[1])
    bos, _ = special_ids(tokenizer)
    head = [] if bos is None else [bos]
    if template == "rag" and max_len is not None:
        question = get_str(record, "question", where, "rag")
        passages = rag_passages(record, where)
        fit = fit_rag_prompt(tokenizer, question, passages, int(max_len) - len(head),
                             oracle_index=rag_oracle_index(record, where, len(passages)))
        if fit is None:
            raise DataError(f"{where}: the question alone is longer than {max_len} tokens")
        return head + fit[0]
    return head + encode_texts(tokenizer, [format_prompt(record, template)])[0]


def load_dataset(path, tokenizer, template: str = "auto", max_seq_len: int = 2048,
                 train_on_inputs: bool = False, chat_template: str | None = None
                 ) -> list[Example]:
    """:func:`~.records.load_records` + :func:`tokenize_records` (in memory, no cache)."""
    return tokenize_records(load_records(path), tokenizer, template, max_seq_len,
                            train_on_inputs, chat_template)


