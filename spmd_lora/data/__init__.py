"""Datasets: records (JSON, JSONL, Parquet, Arrow, save_to_disk) -> token ids + loss mask ->
fixed-shape batches. One job per module:

* :mod:`.records` / :mod:`.columnar`: read rows (:class:`Record` remembers file and line/row);
* :mod:`.templates`: Alpaca / RAG / raw-text fields and prompt text;
* :mod:`.chat`: ``messages`` rows rendered with a chat template, assistant-only loss mask;
* :mod:`.tokenize`: records -> :class:`Example` s (conventions in its docstring);
* :mod:`.cache`: the tokenized-data cache (memory-mapped, built by worker processes, atomic);
* :mod:`.batching`: packing and the resumable :class:`BatchIterator`.
"""
from .batching import BatchIterator, collate, eval_batches, pack_examples
from .cache import TokenizedData, load_or_build
from .chat import BUILTIN_CHAT_TEMPLATES, ChatRenderer, chat_messages, resolve_chat_template
from .rows import Record
from .records import iter_records, load_records
from .templates import (MIN_PARTIAL_PASSAGE_TOKENS, PROMPT_TEMPLATES, TEMPLATES, format_prompt,
                        infer_template)
from .tokenize import (DataWarning, Example, encode_prompt, load_dataset, pad_token_id,
                       split_train_eval, tokenize_records)

__all__ = ["PROMPT_TEMPLATES", "TEMPLATES", "MIN_PARTIAL_PASSAGE_TOKENS", "DataWarning", "Record",
           "Example", "load_records", "iter_records", "infer_template", "format_prompt",
           "encode_prompt", "tokenize_records", "load_dataset", "pad_token_id",
           "split_train_eval", "pack_examples", "collate", "BatchIterator", "eval_batches",
           "BUILTIN_CHAT_TEMPLATES", "ChatRenderer", "chat_messages", "resolve_chat_template",
           "TokenizedData", "load_or_build"]
