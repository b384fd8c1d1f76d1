"""Prompt templates: field validation and the prompt text of Alpaca / RAG / raw-text records.

* ``alpaca``: fields ``instruction``, optional ``input`` (missing, null or blank -> the
  no-input prompt), ``output``; the standard Stanford Alpaca prompts
  (:data:`PROMPT_TEMPLATES` ``["alpaca"]``).
* ``rag``: fields ``question``, ``contexts`` (list of strings or ``{"title", "text"}``
  objects), ``answer``, optional ``oracle_index`` (positions in ``contexts`` of the passages
  that hold the answer: kept longest when the prompt is too long, see :mod:`.rag_fit`). Prompt = header, numbered passages (``[1] Title\\ntext``), the
  question, then ``"### Answer:\\n"``. Rendered as a chat (``chat_template`` set), the same
  header and passages followed by :data:`RAG_CHAT_QUESTION` are the user turn.
* ``text``: field ``text``.
* ``chat``: field ``messages`` (see :mod:`.chat`).
* ``auto``: inferred from the fields of the first record (:func:`infer_template`).
"""
from __future__ import annotations

import json
from typing import Sequence

from ..errors import ConfigError, DataError
from .rows import json_type, required_list, where_of


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

TEMPLATES = ("alpaca", "rag", "text", "chat")
#: The user turn of a RAG record rendered as a chat (the passages come before it).
RAG_CHAT_QUESTION = "### Question:\n{question}"
#: A truncated RAG passage is kept only if at least this many of its tokens fit.
MIN_PARTIAL_PASSAGE_TOKENS = 8

FIELDS_HELP = ("expected 'instruction' (+ optional 'input', 'output') for alpaca, "
               "'question' + 'contexts' + 'answer' for rag, 'messages' for chat, or 'text' "
               "for raw text")


def infer_template(record: dict, where: str = "record 0") -> str:
    """The template a record's fields imply: 'alpaca', 'rag', 'chat' or 'text'."""
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "alpaca"
    if "question" in record:
        return "rag"
    if "text" in record:
        return "text"
    raise DataError(f"{where}: cannot infer the data template from the fields "
                    f"{sorted(record)}; {FIELDS_HELP}; or pass the template explicitly")


def resolve_template(template: str, records: Sequence[dict]) -> str:
    if template == "auto":
        if not records:
            raise DataError("the dataset is empty; cannot infer its template")
        return infer_template(records[0], where_of(records[0], 0))
    if template not in TEMPLATES:
        raise ConfigError(f"unknown data template {template!r}; choose one of "
                          f"{', '.join(TEMPLATES + ('auto',))}")
    return template


def get_str(rec: dict, field: str, where: str, template: str, *, optional: bool = False):
    if field not in rec:
        if optional:
            return None
        raise DataError(f"{where}: missing required field '{field}' for the {template} template "
                        f"(fields present: {sorted(rec)}); {FIELDS_HELP}")
    v = rec[field]
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {json_type(v)} "
                        f"({json.dumps(v)[:60]})")
    return v


def rag_passages(rec: dict, where: str) -> list[tuple[str | None, str]]:
    ctx = required_list(rec, "contexts", where, "rag", "a list of passages (strings or "
                        '{"title": ..., "text": ...} objects), possibly empty')
    out = []
    for j, c in enumerate(ctx):
        if isinstance(c, str):
            out.append((None, c))
        elif isinstance(c, dict):
            if not isinstance(c.get("text"), str):
                raise DataError(f"{where}: field 'contexts[{j}].text' must be a string, got "
                                f"{json_type(c.get('text')) if 'text' in c else 'nothing'}")
            title = c.get("title")
            if title is not None and not isinstance(title, str):
                raise DataError(f"{where}: field 'contexts[{j}].title' must be a string, got "
                                f"{json_type(title)}")
            out.append((title or None, c["text"]))
        else:
            raise DataError(f"{where}: field 'contexts[{j}]' must be a string or a "
                            f'{{"title", "text"}} object, got {json_type(c)}')
    return out


def alpaca_prompt(instruction: str, inp: str | None) -> str:
    t = PROMPT_TEMPLATES["alpaca"]
    if inp is not None and inp.strip():
        return t["prompt_input"].format(instruction=instruction, input=inp)
    return t["prompt_no_input"].format(instruction=instruction)


def rag_prompt(question: str, passages: Sequence[tuple[str | None, str]], *,
               chat: bool = False) -> str:
    """The RAG prompt; with ``chat`` the user turn of the chat rendering (no answer cue)."""
    t = PROMPT_TEMPLATES["rag"]
    parts = [t["header"] if passages else t["header_no_passages"]]
    for i, (title, text) in enumerate(passages, 1):
        parts.append(t["passage"].format(index=i, title=title, text=text) if title
                     else t["passage_no_title"].format(index=i, text=text))
    parts.append((RAG_CHAT_QUESTION if chat else t["question"]).format(question=question))
    return "".join(parts)


def format_prompt(record: dict, template: str = "auto") -> str:
    """The prompt text of a record (everything before the response), as used for generation.

    For ``rag`` all passages are included (see :func:`encode_prompt` to fit a token budget);
    for ``text`` the prompt is the text itself.
    """
    template = resolve_template(template, [record])
    where = where_of(record, None)
    if template == "alpaca":
        return alpaca_prompt(get_str(record, "instruction", where, template),
                             get_str(record, "input", where, template, optional=True))
    if template == "rag":
        return rag_prompt(get_str(record, "question", where, template),
                          rag_passages(record, where))
    if template == "chat":
        raise ConfigError("chat records have no plain-text prompt; they are rendered with a "
                          "chat template (spmd_lora.data.encode_prompt with chat_template)")
    return get_str(record, "text", where, template)
