"""Preference pairs for DPO: records -> (chosen, rejected) example pairs -> batches of pairs.

Rows (JSON / JSONL / Parquet / ..., as :func:`~.records.iter_records` reads them), each
with ``chosen`` and ``rejected`` answers (strings, or TRL's conversational form: a list of one
``{"role": "assistant", "content": ...}`` message):

* ``{prompt, chosen, rejected}``: a plain-text prompt, tokenized like the alpaca / text
  prompts (BOS, then the prompt's tokens), each answer followed by EOS;
* ``{question, contexts, chosen, rejected}``: the prompt is the rag template's
  (:func:`~.templates.rag_prompt`); when the pair is too long its passages are dropped or cut
  as for SFT's rag template (:func:`~.rag_fit.fit_rag_prompt`: with ``oracle_index`` the
  other passages go first);
* ``{messages, chosen, rejected}``: a conversation ending with the turn the answers reply to;
  each row is the chat template's rendering with the answer as the assistant's turn,
  tokenized whole, the loss on the text after the generation prompt (answer and end-of-turn).

The loss mask is on the answer tokens (and EOS) only. For prompt / rag rows the prompt and
each answer are tokenized separately (as TRL does), so both rows share the prompt's tokens
exactly; for chat rows the shared prompt is the tokens both renderings have in common before
their first answer token.

Two batch layouts (:mod:`spmd_lora.model.preference`), ``batch_size`` PAIRS per batch in both
(as TRL's batch size):

* shared prefix (default): one row per pair, :meth:`Pair.shared_row`: the prompt less its
  last token, then that token + chosen + EOS, then that token + rejected + EOS, with branch
  segment ids (``kernels.branch_segment``) and positions restarting after the prompt for each
  answer. The row is ``len(chosen) + len(rejected) - prompt + 1`` tokens;
* separate: pair i on rows 2i (chosen) and 2i+1 (rejected), each as long as its example.

With packing (shared prefix only) several pairs share a row, pair k of the row in branch
segments of group k, each seeing only its own prompt.

A pair whose row (shared prefix) or longer row (separate) exceeds ``max_seq_len`` is skipped
(one counted :class:`DataWarning`, as the other templates). :func:`tokenize_pair_chunk` does
the work for a slice of records, :func:`report_pairs` the dataset-level warnings;
:mod:`.pair_cache` stores the pairs in the tokenized-data cache.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError
from ..kernels import branch_segment
from .batching import BatchIterator, collate
from .chat import ChatRenderer, chat_messages
from .examples import DataWarning, Example, encode_texts, make_example, special_ids
from .rag_fit import fit_rag_prompt, rag_oracle_index
from .rows import where_of
from .templates import get_str, rag_passages, rag_prompt

PAIR_FIELDS = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True, eq=False)
class Pair:
    """A tokenized preference pair: two examples sharing their first ``prompt_len`` tokens
    (BOS and the prompt); ``shared_prefix``: batched as one row (:meth:`shared_row`)."""

    chosen: Example
    rejected: Example
    prompt_len: int
    source: str = ""
    shared_prefix: bool = True

    def __len__(self) -> int:
        """The tokens of its longest row (what must fit in ``max_seq_len``)."""
        p = self.prompt_len
        return int(pair_row_len(p, len(self.chosen) - p, len(self.rejected) - p,
                                self.shared_prefix))

    @property
    def tokens(self) -> int:
        """Tokens of its batch rows (not padding)."""
        return len(self) if self.shared_prefix else len(self.chosen) + len(self.rejected)

    def shared_row(self, group: int = 0) -> dict[str, np.ndarray]:
        """The pair as ONE row: ``tokens``, ``loss_mask``, ``segment_ids``, ``positions``
        (np.int32 [len(self)]). The prompt less its last token is segment
        ``branch_segment(group, 0)``; each answer, led by a copy of the prompt's last token
        (whose output predicts the answer's first token), is ``branch_segment(group, 1)``
        (chosen) / ``(group, 2)`` (rejected), its positions continuing the prompt's. An
        answer's first token is never a target (as at the start of a separate row).
        ``group``: the pair's index in a packed row."""
        cut = max(self.prompt_len - 1, 0)
        parts, masks, segs, pos = [], [], [], []
        for role, ex in enumerate((None, self.chosen, self.rejected)):
            if ex is None:
                ids, mask = self.chosen.input_ids[:cut], np.zeros(cut, np.int32)
                start = 0
            else:
                ids, mask = ex.input_ids[cut:], ex.loss_mask[cut:].copy()
                mask[:1] = 0
                start = cut
            parts.append(ids)
            masks.append(mask)
            segs.append(np.full(len(ids), branch_segment(group, role), np.int32))
            pos.append(np.arange(start, start + len(ids), dtype=np.int32))
        return {"tokens": np.concatenate(parts), "loss_mask": np.concatenate(masks),
                "segment_ids": np.concatenate(segs), "positions": np.concatenate(pos)}


def _answer_text(rec: dict, field: str, where: str) -> str:
    """A completion: a string, or (TRL's conversational rows) a list holding one assistant
    message ``[{"role": "assistant", "content": ...}]``."""
    value = rec.get(field)
    if isinstance(value, list):
        if (len(value) == 1 and isinstance(value[0], dict)
                and value[0].get("role") == "assistant"
                and isinstance(value[0].get("content"), str)):
            return value[0]["content"]
        raise DataError(f"{where}: field '{field}' must be a string or a list holding one "
                        f'{{"role": "assistant", "content": ...}} message')
    return get_str(rec, field, where, "dpo")


def _kind(rec: dict, where: str) -> str:
    for kind, field in (("chat", "messages"), ("text", "prompt"), ("rag", "question")):
        if field in rec:
            return kind
    raise DataError(f"{where}: a preference row needs 'prompt', 'messages' or 'question' (with "
                    f"'contexts'), and 'chosen' and 'rejected' (fields present: {sorted(rec)})")


def _chat_rows(rec, where, renderer: ChatRenderer, answers):
    """A ``messages`` row: (ids and loss mask of each answer's whole conversation, shared
    prompt length). Each conversation is rendered by the chat template with the answer as the
    assistant's turn and tokenized whole (as SFT's chat template); the loss covers the tokens
    of the text after the generation prompt (the answer and the template's end-of-turn); the
    prompt is the tokens both renderings share before their first answer token."""
    msgs = chat_messages(rec, where, training=False)
    if msgs[-1]["role"] == "assistant":
        raise DataError(f"{where}: field 'messages' must end with the turn the answers reply "
                        f"to (a user turn), not an assistant turn")
    prompt = renderer.render(msgs, add_generation_prompt=True)
    cut = len(prompt)
    texts = [renderer.render(msgs + [{"role": "assistant", "content": a}]) for a in answers]
    if any(not t.startswith(prompt) for t in texts):
        raise ConfigError("the chat template renders a conversation differently from its "
                          "beginning (it is not prefix-stable), so the answers cannot be "
                          "split from the prompt; use a built-in chat_template (llama2, "
                          "llama3, chatml) or fix the template")
    rows, firsts = [], []
    for ids, offsets in renderer.encode_texts(texts):
        mask = [int(e > cut) for _, e in offsets]
        rows.append((list(ids), mask))
        firsts.append(mask.index(1) if 1 in mask else len(ids))
    (a, _), (b, _) = rows
    common = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return rows, min(common, *firsts)


def _fit_rag(rec, where, tokenizer, budget):
    """A ``question`` / ``contexts`` row's prompt ids in at most ``budget`` tokens, passages
    dropped or cut as the SFT rag template does (:func:`~.rag_fit.fit_rag_prompt`, oracle
    passages kept longest); (ids, shortened) or None when the question alone does not fit."""
    passages = rag_passages(rec, where)
    question = get_str(rec, "question", where, "dpo")
    fit = fit_rag_prompt(tokenizer, question, passages, budget,
                         oracle_index=rag_oracle_index(rec, where, len(passages)))
    return None if fit is None else (fit[0], fit[2])


def pair_row_len(prompt, chosen, rejected, shared_prefix: bool):
    """Tokens of a pair's longest batch row from the tokens of its prompt and of each answer
    after it (ints, or arrays of them): one shared row (the prompt's last token leads each
    answer's segment), or the longer of the two separate rows."""
    if shared_prefix:
        return prompt + chosen + rejected + np.minimum(prompt, 1)
    return prompt + np.maximum(chosen, rejected)


def tokenize_pair_chunk(records: Sequence[dict], tokenizer, max_seq_len: int,
                        shared_prefix: bool = True, chat_template: str | None = None,
                        wheres: Sequence[str] | None = None) -> tuple[list[Pair], dict]:
    """Records -> (:class:`Pair` s, summary), no dataset-level warnings or errors (those are
    :func:`report_pairs`'). A rag row too long for ``max_seq_len`` has its passages fitted
    (as SFT's rag template); other over-long pairs are left out and counted. ``wheres``
    names each record (default: its own position); ``chat_template``: for ``messages`` rows
    (default: the tokenizer's). The summary has the keys of the SFT chunks' (records,
    examples = pairs kept, too_long, n_too_long, shortest, shortened), so the cache merges
    both alike."""
    bos, eos = special_ids(tokenizer)
    head = [] if bos is None else [bos]
    renderer = None
    pairs, too_long, shortened = [], [], 0
    for i, rec in enumerate(records):
        where = where_of(rec, i) if wheres is None else wheres[i]
        kind = _kind(rec, where)
        texts = [_answer_text(rec, f, where) for f in PAIR_FIELDS]
        if kind == "chat":
            renderer = renderer or ChatRenderer(tokenizer, chat_template)
            rows, n_prompt = _chat_rows(rec, where, renderer, texts)
        else:
            answers = [a + [eos] for a in encode_texts(tokenizer, texts)]
            if kind == "text":
                prompt = head + encode_texts(tokenizer, [get_str(rec, "prompt", where, "dpo")])[0]
            else:
                prompt = head + encode_texts(tokenizer, [rag_prompt(
                    get_str(rec, "question", where, "dpo"), rag_passages(rec, where))])[0]
                sizes = [len(a) for a in answers]
                if pair_row_len(len(prompt), *sizes, shared_prefix) > max_seq_len:
                    room = max_seq_len - pair_row_len(1, *sizes, shared_prefix) + 1 - len(head)
                    fit = _fit_rag(rec, where, tokenizer, room) if room > 0 else None
                    if fit is not None:
                        prompt, shortened = head + fit[0], shortened + fit[1]
            rows = [(prompt + a, [0] * len(prompt) + [1] * len(a)) for a in answers]
            n_prompt = len(prompt)
        rows = [make_example(ids, mask, f"{where} ({f})")
                for f, (ids, mask) in zip(PAIR_FIELDS, rows)]
        pair = Pair(rows[0], rows[1], n_prompt, where, shared_prefix)
        if len(pair) > max_seq_len:
            too_long.append((where, len(pair)))
            continue
        pairs.append(pair)
    summary = {"records": len(records), "examples": len(pairs), "too_long": too_long[:3],
               "n_too_long": len(too_long), "shortest": min((n for _, n in too_long),
                                                            default=None),
               "shortened": shortened}
    return pairs, summary


def report_pairs(summary: dict, max_seq_len: int) -> None:
    """Dataset-level outcome of :func:`tokenize_pair_chunk` (``summary``, or several merged):
    a DataError when no pair fits, else one DataWarning each for skipped pairs and for rag
    rows whose passages were shortened."""
    too_long, n_too_long = summary["too_long"], summary["n_too_long"]
    if not summary["examples"]:
        raise DataError(f"every preference pair is longer than max_seq_len={max_seq_len} "
                        f"(first: {too_long[0][0] if too_long else 'none'}, "
                        f"{too_long[0][1] if too_long else 0} tokens; the shortest needs "
                        f"{summary['shortest'] or 0}); raise max_seq_len")
    if n_too_long:
        shown = "; ".join(f"{w} needs {n} tokens" for w, n in too_long[:3])
        warnings.warn(f"skipped {n_too_long} of {summary['records']} preference pairs longer "
                      f"than max_seq_len={max_seq_len} ({shown}{' ...' if n_too_long > 3 else ''})",
                      DataWarning, stacklevel=3)
    if summary["shortened"]:
        warnings.warn(f"shortened the passages of {summary['shortened']} of {summary['records']} "
                      f"rag preference rows to fit max_seq_len={max_seq_len} (oracle passages "
                      f"kept longest)", DataWarning, stacklevel=3)


def tokenize_pairs(records: Sequence[dict], tokenizer, max_seq_len: int,
                   shared_prefix: bool = True, chat_template: str | None = None) -> list[Pair]:
    """Records -> :class:`Pair` s in memory (module docstring): :func:`tokenize_pair_chunk`
    and :func:`report_pairs`'s warnings / error."""
    pairs, summary = tokenize_pair_chunk(records, tokenizer, max_seq_len, shared_prefix,
                                         chat_template)
    report_pairs(summary, max_seq_len)
    return pairs


def collate_shared(rows: Sequence[Sequence[Pair]], max_seq_len: int, pad_id: int = 0):
    """One batch of shared-prefix rows, each the pairs of ``rows[r]`` one after the other
    (:meth:`Pair.shared_row` with group = the pair's index in its row; an empty row is all
    padding): ``tokens``, ``loss_mask``, ``segment_ids``, ``positions`` np.int32
    [len(rows), max_seq_len], padding with segment 0 (a plain segment no answer sees)."""
    out = {"tokens": np.full((len(rows), max_seq_len), pad_id, np.int32),
           **{k: np.zeros((len(rows), max_seq_len), np.int32)
              for k in ("loss_mask", "segment_ids", "positions")}}
    for r, pairs in enumerate(rows):
        off = 0
        for group, pair in enumerate(pairs):
            row = pair.shared_row(group)
            n = len(row["tokens"])
            if off + n > max_seq_len:
                raise DataError(f"preference pairs of row {r} need {off + n} tokens, more than "
                                f"max_seq_len={max_seq_len}")
            for k, v in row.items():
                out[k][r, off:off + n] = v
            off += n
    return out


class PairBatchIterator(BatchIterator):
    """:class:`BatchIterator` over :class:`Pair` s, in the pairs' layout: ``batch_size`` pairs
    per batch, one row each (shared prefix: ``batch_size`` rows), or pair i on rows 2i
    (chosen) and 2i+1 (rejected) (separate: ``2 * batch_size`` rows); with ``pack`` (shared
    prefix only) ``batch_size`` rows of pairs packed first-fit up to ``max_seq_len`` (as SFT
    packing; :attr:`pairs_per_row` the most in one row). The rows are shuffled every epoch
    (``default_rng(seed + epoch)``), the last incomplete batch dropped. ``state()`` /
    ``restore()`` as BatchIterator's (positions count rows of pairs)."""

    def __init__(self, pairs: Sequence[Pair], batch_size: int, max_seq_len: int, *,
                 pad_id: int = 0, pack: bool = False, shuffle: bool = True, seed: int = 0,
                 epochs: int | None = None):
        self.shared_prefix = bool(pairs[0].shared_prefix) if pairs else True
        if pack and not self.shared_prefix:
            raise DataError("packing preference pairs needs the shared-prefix layout")
        super().__init__(pairs, batch_size, max_seq_len, pad_id=pad_id, pack=pack,
                         shuffle=shuffle, seed=seed, epochs=epochs)
        self.rows_per_batch = int(batch_size)                # rows of pairs
        self.batch_size = self.rows_per_batch * (1 if self.shared_prefix else 2)   # rows
        self.pairs_per_row = max(map(len, self.rows)) if pack else 1

    def _pair_rows(self, epoch: int, index: int) -> list[list[int]]:
        k = self.rows_per_batch
        return [self.rows[int(r)] for r in self._order(epoch)[index * k:(index + 1) * k]]

    def batch(self, epoch: int, index: int, rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Batch ``index`` of ``epoch``: ``batch_size`` rows, ``rows`` only these of them."""
        pair_rows = self._pair_rows(epoch, index)
        want = range(self.batch_size) if rows is None else rows
        if self.shared_prefix:
            return collate_shared([[self.examples[i] for i in pair_rows[j]] for j in want],
                                  self.max_seq_len, self.pad_id)
        picked = []
        for j in want:
            pair = self.examples[pair_rows[j // 2][0]]
            picked.append([pair.rejected if j % 2 else pair.chosen])
        return collate(picked, self.max_seq_len, self.pad_id, batch_size=len(want))

    def batch_tokens(self, epoch: int, index: int) -> int:
        """Tokens (not padding) of the batch's rows."""
        return int(sum(self.examples[i].tokens for r in self._pair_rows(epoch, index) for i in r))
