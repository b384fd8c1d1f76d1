"""Datasets: records (JSON, JSONL, Parquet, Arrow, save_to_disk) -> token ids + loss mask ->
fixed-shape batches. One job per module:

* :mod:`.rows`: one row, :class:`Record` (remembers its file and line / row);
* :mod:`.records` / :mod:`.columnar`: read rows from every input format;
* :mod:`.templates`: Alpaca / RAG / raw-text fields and prompt text;
* :mod:`.chat`: ``messages`` rows rendered with a chat template, assistant-only loss mask;
* :mod:`.tokenize`: records -> :class:`Example` s (conventions in its docstring), with
  :mod:`.rag_fit` fitting RAG passages to a token budget and :mod:`.examples` the Example
  type, the special ids and the train / eval split;
* :mod:`.cache`: the tokenized-data cache (memory-mapped, built by worker processes, atomic);
* :mod:`.batching`: packing and the resumable :class:`BatchIterator`;
* :mod:`.preference`: DPO preference pairs (prompt / chosen / rejected) and their batches;
  :mod:`.pair_cache` keeps them in the tokenized-data cache.
"""
from .batching import BatchIterator, collate, eval_batches, pack_examples
from .cache import TokenizedData, load_or_build
from .chat import BUILTIN_CHAT_TEMPLATES, ChatRenderer, chat_messages, resolve_chat_template
from .rows import Record
from .records import iter_records, load_records
from .templates import (MIN_PARTIAL_PASSAGE_TOKENS, PROMPT_TEMPLATES, TEMPLATES, format_prompt,
                        infer_template)
from .examples import DataWarning, Example, pad_token_id, split_train_eval
from .tokenize import encode_prompt, load_dataset, tokenize_records
from .preference import Pair, PairBatchIterator, tokenize_pairs
from .pair_cache import TokenizedPairs, load_pairs

__all__ = ["PROMPT_TEMPLATES", "TEMPLATES", "MIN_PARTIAL_PASSAGE_TOKENS", "DataWarning", "Record",
           "Example", "load_records", "iter_records", "infer_template", "format_prompt",
           "encode_prompt", "tokenize_records", "load_dataset", "pad_token_id",
           "split_train_eval", "pack_examples", "collate", "BatchIterator", "eval_batches",
           "BUILTIN_CHAT_TEMPLATES", "ChatRenderer", "chat_messages", "resolve_chat_template",
           "TokenizedData", "load_or_build", "Pair", "PairBatchIterator", "TokenizedPairs",
           "load_pairs", "tokenize_pairs"]
