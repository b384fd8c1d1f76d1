"""Chat data: ``messages`` rows rendered with a chat template, loss on the assistant turns.

A chat record is ``{"messages": [{"role": "system" | "user" | "assistant", "content": str},
...]}``: an optional system message first, at least one user or assistant turn, and (for
training) an assistant turn last.

Rendering
---------
The conversation is rendered to text by ``tokenizer.apply_chat_template(..., tokenize=False)``
with the model's own chat template, or with ``chat_template`` = a built-in name
(:data:`BUILTIN_CHAT_TEMPLATES`: ``llama2``, ``llama3``, ``chatml``) or the path of a Jinja
file. The text is tokenized once with ``add_special_tokens=False`` (the template writes BOS
and the turn markers itself), so the ids equal ``apply_chat_template(messages,
tokenize=True)``.

Loss mask
---------
Assistant turn ``i`` occupies the characters between the rendering of ``messages[:i]`` with
the generation prompt and the rendering of ``messages[:i + 1]``: its content and the
template's end-of-turn text (``<|eot_id|>``, `` </s>``, ``<|im_end|>``). Every token whose
character span overlaps an assistant turn is a target (``loss_mask = 1``), in every assistant
turn of the row; with ``train_on_inputs`` every token but the first is. A template whose
renderings are not prefixes of each other cannot give a mask and is refused.

Over-long conversations
-----------------------
When a row has more than ``max_seq_len`` tokens, whole earliest turns are dropped (up to the
next user turn, the system prompt kept) until it fits; an assistant answer is never split. A
row whose last user + assistant exchange alone does not fit is skipped. Both are counted in the
dataset's :class:`~.tokenize.DataWarning`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import ConfigError, DataError
from .rows import json_type, required_list

ROLES = ("system", "user", "assistant")

# Our renderings of the three common formats. Each turn is written by one expression so the
# prefix renderings used for the loss mask line up with the whole conversation.
_LLAMA2 = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' -%}"
    "{%- set msgs = messages[1:] -%}"
    "{%- else -%}{%- set sys = '' -%}{%- set msgs = messages -%}{%- endif -%}"
    "{%- for m in msgs -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'] | trim + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{ ' ' + m['content'] | trim + ' ' + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}")

_LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}")

_CHATML = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

#: Built-in chat templates by name (Llama-2-chat, Llama-3-Instruct and ChatML layouts).
BUILTIN_CHAT_TEMPLATES = {"llama2": _LLAMA2, "llama3": _LLAMA3, "chatml": _CHATML}


def resolve_chat_template(tokenizer, spec: str | None = None) -> str:
    """The Jinja source to render with: ``spec`` (a built-in name or a Jinja file), else the
    tokenizer's own ``chat_template``. Raises :class:`ConfigError` naming the fix."""
    if spec:
        if spec in BUILTIN_CHAT_TEMPLATES:
            return BUILTIN_CHAT_TEMPLATES[spec]
        p = Path(spec)
        if not p.is_file():
            raise ConfigError(f"chat_template {spec!r} is neither a built-in "
                              f"({', '.join(BUILTIN_CHAT_TEMPLATES)}) nor a Jinja file; pass one "
                              "of those names or the path of a .jinja file")
        try:
            return p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"chat_template file {p} is unreadable ({e})") from None
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default")
    if not own:
        raise ConfigError("the tokenizer has no chat template; set chat_template to a built-in "
                          f"({', '.join(BUILTIN_CHAT_TEMPLATES)}) or a Jinja file")
    return own


def chat_messages(rec: dict, where: str, *, training: bool = True) -> list[dict]:
    """The validated ``messages`` of a record as ``[{"role", "content"}]``.

    Raises :class:`DataError` (file, line, field) for a missing or empty list, a message that
    is not an object, an unknown role, non-string content, a system message after the first
    position, no user/assistant turn, or (``training``) a last turn that is not the assistant's.
    """
    msgs = required_list(rec, "messages", where, "chat",
                         'a list of {"role": ..., "content": ...} objects')
    if not msgs:
        raise DataError(f"{where}: field 'messages' is an empty conversation; add at least a "
                        "user and an assistant turn")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field 'messages[{j}]' must be an object with 'role' and "
                            f"'content', got {json_type(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: field 'messages[{j}].role' is {role!r}; it must be one of "
                            f"{', '.join(ROLES)}")
        if role == "system" and j > 0:
            raise DataError(f"{where}: field 'messages[{j}].role' is 'system' after the first "
                            "message; put the system prompt first")
        if not isinstance(content, str):
            raise DataError(f"{where}: field 'messages[{j}].content' must be a string, got "
                            f"{json_type(content)}")
        out.append({"role": role, "content": content})
    if all(m["role"] == "system" for m in out):
        raise DataError(f"{where}: field 'messages' holds only a system prompt; add a user and an "
                        "assistant turn")
    if training and out[-1]["role"] != "assistant":
        raise DataError(f"{where}: field 'messages[{len(out) - 1}]' is a {out[-1]['role']} turn; "
                        "the last turn of a training conversation must be the assistant's")
    return out


class ChatRenderer:
    """Render and tokenize conversations with one chat template (see the module docstring)."""

    def __init__(self, tokenizer, chat_template: str | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("chat data needs a fast tokenizer (tokenizer.json) for the "
                              "assistant-token mask; save the tokenizer with tokenizers")
        self.tokenizer = tokenizer
        self.template = resolve_chat_template(tokenizer, chat_template)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), chat_template=self.template, tokenize=False,
                add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja errors: raise_exception() in a template, syntax, ...
            raise DataError(f"the chat template failed on a conversation with roles "
                            f"{[m['role'] for m in messages]}: {e}") from None

    def assistant_spans(self, messages: Sequence[dict], text: str) -> list[tuple[int, int]]:
        """Character spans ``[start, end)`` of the assistant turns in ``text`` (the rendering
        of ``messages``)."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            through = self.render(messages[:i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise ConfigError("the chat template renders a conversation differently from its "
                                  "beginning (it is not prefix-stable), so the assistant tokens "
                                  "cannot be located; use a built-in chat_template (llama2, "
                                  "llama3, chatml) or fix the template")
            spans.append((len(before), len(through)))
        return spans

    def encode_texts(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Batch-tokenize rendered conversations: ``(ids, character offsets)`` per text."""
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True,
                             verbose=False)
        return list(zip(enc["input_ids"], enc["offset_mapping"]))

    def encode(self, messages: Sequence[dict], train_on_inputs: bool = False,
               text: str | None = None, encoded=None) -> tuple[list[int], list[int]]:
        """``(input_ids, loss_mask)`` of a conversation (``text`` / ``encoded`` when already
        rendered / tokenized by :meth:`encode_texts`)."""
        text = self.render(messages) if text is None else text
        ids, offsets = self.encode_texts([text])[0] if encoded is None else encoded
        if train_on_inputs:
            mask = [1] * len(ids)
        else:
            spans = self.assistant_spans(messages, text)
            mask = [int(any(s < e1 and e > s1 for s1, e1 in spans)) for s, e in offsets]
        if mask:
            mask[0] = 0
        return list(ids), mask

    def encode_fitting(self, messages: list[dict], max_seq_len: int, train_on_inputs: bool,
                       text: str | None = None, encoded=None):
        """:meth:`encode`, dropping whole earliest turns until the row fits ``max_seq_len``.

        Returns ``(ids, mask, dropped_turns)``, or ``(None, None, n_tokens)`` when even the last
        exchange does not fit (``n_tokens``: the shortest length reached).
        """
        ids, mask = self.encode(messages, train_on_inputs, text, encoded)
        dropped = 0
        head = 1 if messages[0]["role"] == "system" else 0
        while len(ids) > max_seq_len:
            rest = messages[head:]
            nxt = next((k for k in range(1, len(rest)) if rest[k]["role"] == "user"), None)
            if nxt is None:
                return None, None, len(ids)
            messages = messages[:head] + rest[nxt:]
            dropped += nxt
            ids, mask = self.encode(messages, train_on_inputs)
        return ids, mask, dropped

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a conversation plus the generation prompt (for generation / eval):
        a trailing assistant turn is left out, the model writes it."""
        msgs = list(messages)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if not msgs:
            raise DataError("a generation prompt needs at least one user turn")
        return self.encode_texts([self.render(msgs, add_generation_prompt=True)])[0][0]
