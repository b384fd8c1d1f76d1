"""RAG records in a token budget: the prompt with as many passages as fit (the first one that
does not fit whole kept truncated when enough of it fits), as plain text or as a chat.

A record with ``oracle_index`` (the positions of the passages that hold the answer, as
``spmd-lora rag-data`` writes) loses its other passages first, the last ones first; only
when the oracle passages alone are still too long are they dropped / truncated as above.
Kept passages stay in their order and are numbered [1..n] again."""
from __future__ import annotations

from ..errors import DataError
from .chat import ChatRenderer
from .examples import ChunkResult, encode_texts, make_example
from .rows import json_type
from .templates import (MIN_PARTIAL_PASSAGE_TOKENS, PROMPT_TEMPLATES, get_str, rag_passages,
                        rag_prompt)


def rag_oracle_index(rec: dict, where: str, n_passages: int) -> list[int] | None:
    """The record's ``oracle_index`` (distinct positions in ``contexts``), None when absent or
    null; DataError naming the record when it is not a list of such positions."""
    value = rec.get("oracle_index")
    if value is None:
        return None
    if (not isinstance(value, list) or
            any(not isinstance(i, int) or isinstance(i, bool) for i in value)):
        raise DataError(f"{where}: field 'oracle_index' must be a list of passage positions "
                        f"(whole numbers), got {json_type(value)}")
    bad = [i for i in value if not 0 <= i < n_passages]
    if bad or len(set(value)) != len(value):
        raise DataError(f"{where}: field 'oracle_index' {value} must hold distinct positions "
                        f"in 'contexts' (0..{n_passages - 1}); fix or drop the field")
    return value


def fit_rag_prompt(tokenizer, question, passages, budget, chat: bool = False,
                   oracle_index=None):
    """The RAG prompt in at most ``budget`` tokens: ``(ids, passages used, shortened)`` (the
    last used passage possibly truncated), or None when the question alone does not fit.
    With ``chat`` the prompt is the user turn of the chat rendering. With ``oracle_index``
    (positions of the oracle passages) the other passages are dropped first, last first,
    before any oracle passage is dropped or truncated."""
    ids = encode_texts(tokenizer, [rag_prompt(question, passages, chat=chat)])[0]
    if len(ids) <= budget:
        return ids, list(passages), False
    if oracle_index is not None:
        oracle = set(oracle_index)
        distractors = [j for j in range(len(passages)) if j not in oracle]
        for dropped in range(1, len(distractors) + 1):
            gone = set(distractors[len(distractors) - dropped:])
            kept = [p for j, p in enumerate(passages) if j not in gone]
            ids = encode_texts(tokenizer, [rag_prompt(question, kept, chat=chat)])[0]
            if len(ids) <= budget:
                return ids, kept, True
        oracles = [p for j, p in enumerate(passages) if j in oracle]
        if not oracles:
            return fit_rag_prompt(tokenizer, question, [], budget, chat=chat)
        fit = fit_rag_prompt(tokenizer, question, oracles, budget, chat=chat)
        return None if fit is None else (fit[0], fit[1], True)
    base = encode_texts(tokenizer, [rag_prompt(question, [], chat=chat)])[0]
    if len(base) > budget:
        return None
    # Estimate the largest k whole passages that fit, then correct with exact tokenization.
    blocks = [PROMPT_TEMPLATES["rag"]["passage"].format(index=i, title=t, text=x) if t else
              PROMPT_TEMPLATES["rag"]["passage_no_title"].format(index=i, text=x)
              for i, (t, x) in enumerate(passages, 1)]
    costs = [len(c) for c in encode_texts(tokenizer, blocks)]
    k, total = 0, len(base)
    while k < len(passages) and total + costs[k] <= budget:
        total += costs[k]
        k += 1

    def enc(ps):
        return encode_texts(tokenizer, [rag_prompt(question, ps, chat=chat)])[0]

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
    text_ids = encode_texts(tokenizer, [text])[0]
    overhead = costs[k] - len(text_ids)
    m = min(len(text_ids) - 1, budget - len(cur) - max(overhead, 0))
    while m >= MIN_PARTIAL_PASSAGE_TOKENS:
        partial = tokenizer.decode(text_ids[:m], skip_special_tokens=True)
        cand = enc(list(passages[:k]) + [(title, partial)])
        if len(cand) <= budget:
            return cand, list(passages[:k]) + [(title, partial)], True
        m -= max(1, len(cand) - budget)
    return cur, list(passages[:k]), k < len(passages)


def rag_chat(renderer: ChatRenderer, tokenizer, question, passages, answer, max_seq_len,
              train_on_inputs, oracle_index=None):
    """A RAG record as a (user, assistant) chat in at most ``max_seq_len`` tokens:
    ``(ids, mask, shortened)`` or None when the question and answer alone do not fit."""
    def chat(ps):
        return [{"role": "user", "content": rag_prompt(question, ps, chat=True)},
                {"role": "assistant", "content": answer}]

    ids, mask = renderer.encode(chat(passages), train_on_inputs)
    if len(ids) <= max_seq_len:
        return ids, mask, False
    # Tokens the chat adds around the user text, then fit the passages to what is left.
    empty = encode_texts(tokenizer, [rag_prompt(question, [], chat=True)])[0]
    budget = max_seq_len - (len(renderer.encode(chat([]), train_on_inputs)[0]) - len(empty))
    for _ in range(4):   # token counts are not exactly additive: correct and retry
        fit = fit_rag_prompt(tokenizer, question, passages, budget, chat=True,
                             oracle_index=oracle_index)
        if fit is None:
            return None
        ids, mask = renderer.encode(chat(fit[1]), train_on_inputs)
        if len(ids) <= max_seq_len:
            return ids, mask, True
        budget -= len(ids) - max_seq_len
    return None


def tokenize_rag(records, wheres, tokenizer, head, eos, max_seq_len, train_on_inputs,
                  renderer: ChatRenderer | None = None):
    """The ``rag`` template (see :mod:`.tokenize`): passages dropped from the end, the first
    one that does not fit whole kept truncated, to fit ``max_seq_len`` (with ``oracle_index``
    the non-oracle passages go first; see :func:`fit_rag_prompt`)."""
    examples, too_long, shortened = [], [], 0
    for rec, where in zip(records, wheres):
        question = get_str(rec, "question", where, "rag")
        passages = rag_passages(rec, where)
        answer = get_str(rec, "answer", where, "rag")
        oracle = rag_oracle_index(rec, where, len(passages))
        if renderer is not None:
            out = rag_chat(renderer, tokenizer, question, passages, answer, max_seq_len,
                            train_on_inputs, oracle)
            if out is None:
                need = renderer.encode([{"role": "user", "content":
                                         rag_prompt(question, [], chat=True)},
                                        {"role": "assistant", "content": answer}])[0]
                too_long.append((where, len(need)))
                continue
            ids, mask, short = out
            shortened += short
            examples.append(make_example(ids, mask, where))
            continue
        a = encode_texts(tokenizer, [answer])[0]
        budget = max_seq_len - len(head) - len(a) - 1
        fit = (fit_rag_prompt(tokenizer, question, passages, budget, oracle_index=oracle)
               if budget > 0 else None)
        if fit is None:
            base = encode_texts(tokenizer, [rag_prompt(question, [])])[0]
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
        examples.append(make_example(ids, mask, where))
    return ChunkResult(examples, too_long, shortened)
