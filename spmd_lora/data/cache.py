"""The tokenized-data cache: tokenize a dataset once, then memory-map it.

:func:`load_or_build` returns a :class:`TokenizedData` for ``(data, tokenizer, template,
chat template, max_seq_len, train_on_inputs)``. The first call streams the records in chunks of
:data:`CHUNK_ROWS` to worker processes (``spawn``; each batch-encodes its chunk with the fast
tokenizer through :func:`~.tokenize.tokenize_chunk`) and appends the results, in order, to flat
files; later calls (a resume, a second run, the other processes of a multi-process run) open
those files with ``np.memmap`` instead of tokenizing again.

On disk, ``<cache_dir>/<key>/``:

* ``tokens.bin``: every example's token ids back to back, ``int32 [T]``;
* ``loss_mask.bin``: the matching loss mask, ``uint8 [T]``;
* ``lengths.npy``: tokens per example, ``int32 [N]`` (starts are its cumulative sum);
* ``meta.json``: the key's inputs, counts, and the skip / shorten summary (its warnings are
  repeated on every load).

``key`` hashes the data file's content (every file of a ``save_to_disk`` directory), the
tokenizer (its serialized vocabulary, merges, special tokens), the template, the chat template
text, ``max_seq_len``, ``train_on_inputs`` and :data:`CACHE_VERSION`. The entry is built in a
temporary sibling directory and renamed into place when complete (a killed build leaves nothing
a later run trusts, and the next build of that key removes its leftovers); one build at a time per key (``flock`` on ``<key>.lock``, so concurrent
processes wait and then read). The default ``cache_dir`` is ``$SPMD_LORA_CACHE`` or
``~/.cache/spmd_lora/tokenized``. A cache directory that cannot be created or written is an
error before the data is read (``paths.ensure_writable_dir``), not a silent fall back to no
cache: every later run, and every process of a multi-process run, would tokenize again, and
the user would not learn why; the message says to set ``data_cache_dir`` or
``$SPMD_LORA_CACHE``.

:func:`cached_build` is the keyed, locked, atomic build itself, shared with DPO's
preference pairs (:mod:`.pair_cache`, their own files layout and key).

Host memory while training is the batch being assembled, plus ``lengths`` (4 bytes per
example); the token files stay in the page cache, not in the process heap.
"""
from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import DataError
from ..paths import ensure_writable_dir
from .chat import resolve_chat_template
from .records import iter_records
from .rows import where_of
from .templates import resolve_template
from .examples import Example
from .tokenize import check_max_seq_len, check_template, report, tokenize_chunk

CACHE_VERSION = 1
#: Records per work item sent to a tokenizer worker.
CHUNK_ROWS = 512


class TokenizedData:
    """Examples stored flat (see the module docstring): a read-only sequence of
    :class:`~.tokenize.Example` whose arrays are views of the memory-mapped files.

    ``lengths`` (``int [N]``) gives every example's length without touching the tokens;
    ``subset(indices)`` is a view on some examples (used for the train / eval split);
    ``meta`` is the cache entry's ``meta.json`` (key fields, counts).
    """

    def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray, starts: np.ndarray,
                 lengths: np.ndarray, source: str = "", meta: dict | None = None):
        self.tokens, self.loss_mask = tokens, loss_mask
        self.starts, self.lengths = starts, lengths
        self.source, self.meta = source, meta or {}

    @classmethod
    def open(cls, directory: Path) -> "TokenizedData":
        meta, lengths, tokens, mask = open_entry(directory)
        return cls(tokens, mask, starts_of(lengths), lengths,
                   source=str(meta.get("data", directory)), meta=meta)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def __getitem__(self, i: int) -> Example:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        s, n = int(self.starts[i]), int(self.lengths[i])
        return Example(np.asarray(self.tokens[s:s + n]),
                       self.loss_mask[s:s + n].astype(np.int32),
                       f"{self.source} (example {i % len(self)})")

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def subset(self, indices: Sequence[int]) -> "TokenizedData":
        idx = np.asarray(indices, dtype=np.int64)
        return TokenizedData(self.tokens, self.loss_mask, self.starts[idx], self.lengths[idx],
                             self.source, self.meta)


def open_entry(directory) -> tuple[dict, np.ndarray, np.memmap, np.memmap]:
    """A built entry's files (module docstring): (meta, lengths, tokens ``int32 [T]`` and
    loss mask ``uint8 [T]``, both memory-mapped read-only)."""
    d = Path(directory)
    meta = json.loads((d / "meta.json").read_text())
    total = int(meta["tokens"])
    return (meta, np.load(d / "lengths.npy"),
            np.memmap(d / "tokens.bin", dtype=np.int32, mode="r", shape=(total,)),
            np.memmap(d / "loss_mask.bin", dtype=np.uint8, mode="r", shape=(total,)))


def starts_of(lengths: np.ndarray) -> np.ndarray:
    """Each item's first token in the flat files: the exclusive cumulative sum, ``int64``."""
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def default_cache_dir() -> Path:
    env = os.environ.get("SPMD_LORA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "spmd_lora" / "tokenized"


def data_digest(path) -> str:
    """Content hash of a data file, or of every file (and its name) in a data directory."""
    p = Path(path)
    h = hashlib.blake2b(digest_size=20)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides a tokenizer's ids: its serialized model (fast tokenizers) or
    vocabulary, its special tokens and its own chat template."""
    h = hashlib.blake2b(digest_size=20)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def _chunks(records: Iterator, n: int) -> Iterator[tuple[list[dict], list[str], int]]:
    """(plain dicts, where strings, index of the first record) for ``n`` records at a time."""
    batch, wheres, first, count = [], [], 0, 0
    for rec in records:
        batch.append(dict(rec))
        wheres.append(where_of(rec, count))
        count += 1
        if len(batch) == n:
            yield batch, wheres, first
            batch, wheres, first = [], [], count
    if batch:
        yield batch, wheres, first


# Worker-process state (set once per worker by _init_worker): the chunk function and its
# arguments after (records, wheres).
_WORKER: dict = {}


def _init_worker(fn, args: tuple) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER.update(fn=fn, args=args)


def _work(chunk) -> tuple:
    records, wheres, _ = chunk
    return _WORKER["fn"](records, wheres, *_WORKER["args"])


def _example_chunk(records, wheres, tokenizer, template, max_seq_len, train_on_inputs,
                   chat_template) -> tuple:
    """One chunk of SFT records -> (tokens, loss mask, lengths ``int32 [n]``, summary)."""
    res = tokenize_chunk(records, tokenizer, template, max_seq_len, train_on_inputs,
                         chat_template, wheres=wheres)
    lengths = np.array([len(e) for e in res.examples], dtype=np.int32)
    tokens = (np.concatenate([e.input_ids for e in res.examples]) if res.examples
              else np.zeros(0, np.int32))
    mask = (np.concatenate([e.loss_mask for e in res.examples]).astype(np.uint8)
            if res.examples else np.zeros(0, np.uint8))
    return tokens, mask, lengths, res.summary()


def _results(chunks: Iterator, workers: int, init_args: tuple) -> Iterator[tuple]:
    """Tokenized chunks in input order (``init_args``: :func:`_init_worker`'s); with
    ``workers`` > 1 (and more than one chunk) from a pool of spawned processes, at most
    ``2 * workers`` chunks in flight."""
    first = next(chunks, None)
    second = next(chunks, None) if first is not None else None
    if first is None:
        return
    if second is None or workers <= 1:
        _init_worker(*init_args)
        for chunk in (first, second) if second is not None else (first,):
            yield _work(chunk)
        for chunk in chunks:
            yield _work(chunk)
        return
    import concurrent.futures
    import itertools
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                initargs=init_args) as pool:
        pending: collections.deque = collections.deque()
        for chunk in itertools.chain((first, second), chunks):
            pending.append(pool.submit(_work, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _progress(label: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return None
    return tqdm(desc=label, unit=" rows", disable=None, file=sys.stderr, leave=False)


def load_or_build(data, tokenizer, template: str = "auto", max_seq_len: int = 2048,
                  train_on_inputs: bool = False, chat_template: str | None = None,
                  cache_dir=None, workers: int = 0) -> TokenizedData:
    """The cached :class:`TokenizedData` of a dataset, built first if needed.

    ``workers``: tokenizer processes (0: ``min(cpu count, 8)``; 1: in this process). Warnings
    and errors are those of :func:`~.tokenize.tokenize_records`.
    """
    check_max_seq_len(max_seq_len)
    root = cache_root(cache_dir)
    first, records = first_record(data)
    template = resolve_template(template, [first])
    check_template(template, chat_template)
    chat_text = None
    if template == "chat" or chat_template:
        chat_text = resolve_chat_template(tokenizer, chat_template)
    key_fields = {"version": CACHE_VERSION, "data_digest": data_digest(data),
                  "tokenizer": tokenizer_fingerprint(tokenizer), "template": template,
                  "chat_template": chat_text, "max_seq_len": int(max_seq_len),
                  "train_on_inputs": bool(train_on_inputs)}
    work = (_example_chunk, (tokenizer, template, int(max_seq_len), bool(train_on_inputs),
                             chat_template))
    final = cached_build(root, key_fields, data, records, work, workers,
                         lambda summary: report(summary, template, int(max_seq_len)))
    return TokenizedData.open(final)


def cache_root(cache_dir) -> Path:
    """The cache directory (created; refused when it cannot be written)."""
    return ensure_writable_dir(default_cache_dir() if cache_dir is None else cache_dir,
                               "tokenized-data cache directory",
                               hint="set data_cache_dir or $SPMD_LORA_CACHE to a writable directory")


def first_record(data) -> tuple:
    """(the dataset's first record, an iterator over all its records, that one first); an
    empty dataset is refused."""
    records = iter_records(data)
    first = next(records, None)
    if first is None:
        raise DataError(f"{data}: the dataset is empty (no records); add at least one record")
    return first, _prepend(first, records)


def cached_build(root: Path, key_fields: dict, data, records: Iterator, work: tuple,
                 workers: int, report_summary) -> Path:
    """The directory of the cache entry for ``key_fields``, built first if needed (one build
    at a time per key; a killed build's leftovers removed): ``work`` = (chunk function, its
    arguments after (records, wheres)), run by ``workers`` processes (0: ``min(cpu count,
    8)``); each returns (tokens, loss mask, lengths rows, summary). ``report_summary(summary)``
    gives the dataset-level warnings, on every load, and the error when nothing fits."""
    key = hashlib.blake2b(json.dumps(key_fields, sort_keys=True).encode(),
                          digest_size=16).hexdigest()
    lock = open(root / f"{key}.lock", "w")
    final = root / key
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "meta.json").is_file():
            for dead in root.glob(f".tmp_{key}_*"):    # left by a killed build of this key
                shutil.rmtree(dead, ignore_errors=True)
            workers = int(workers) or min(os.cpu_count() or 1, 8)
            _build(final, data, records, key_fields, work, workers, report_summary)
    report_summary(json.loads((final / "meta.json").read_text())["summary"])
    return final


def _prepend(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _build(final: Path, data, records: Iterator, key_fields: dict, work: tuple, workers: int,
           report_summary) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{final.name}_", dir=final.parent))
    bar = _progress(f"tokenizing {Path(data).name}")
    try:
        summary, all_lengths, total = None, [], 0
        with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "loss_mask.bin", "wb") as fm:
            for tokens, mask, lengths, part in _results(_chunks(records, CHUNK_ROWS), workers,
                                                        work):
                ft.write(tokens.tobytes())
                fm.write(mask.tobytes())
                all_lengths.append(lengths)
                total += int(tokens.size)
                summary = part if summary is None else merge_summaries(summary, part)
                if bar is not None:
                    bar.update(part["records"])
            ft.flush(), fm.flush()
            os.fsync(ft.fileno()), os.fsync(fm.fileno())
        if not summary["examples"]:
            report_summary(summary)                    # the "nothing fits" error
        np.save(tmp / "lengths.npy", np.concatenate(all_lengths))
        meta = {**key_fields, "data": str(data), "examples": int(sum(map(len, all_lengths))),
                "tokens": total, "summary": summary}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()


def merge_summaries(a: dict, b: dict) -> dict:
    """Combine the :meth:`~.tokenize.ChunkResult.summary` of consecutive chunks."""
    return {"records": a["records"] + b["records"], "examples": a["examples"] + b["examples"],
            "too_long": (a["too_long"] + b["too_long"])[:3],
            "n_too_long": a["n_too_long"] + b["n_too_long"],
            "shortest": min((x for x in (a["shortest"], b["shortest"]) if x is not None),
                            default=None),
            "shortened": a["shortened"] + b["shortened"]}
