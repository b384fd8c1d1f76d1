"""Dataset readers: every input format to :class:`~.rows.Record` rows.

:func:`load_records` reads JSON lists, JSONL, Parquet / Arrow files and ``save_to_disk``
directories (the last three through :mod:`.columnar`). Nothing here tokenizes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from . import columnar
from .rows import Record, json_type


def load_records(path) -> list[Record]:
    """All records of a dataset (see :func:`iter_records`); an empty dataset is an error."""
    records = list(iter_records(path))
    if not records:
        raise DataError(f"{path}: the dataset is empty (no records); add at least one record")
    return records


def iter_records(path) -> Iterator[Record]:
    """Stream the records of a dataset: a ``.json`` (list) / ``.jsonl`` file, a ``.parquet`` or
    ``.arrow`` file, or a directory written by Hugging Face ``datasets``' ``save_to_disk``.

    JSONL and columnar inputs are read incrementally (memory bounded by one line / one record
    batch). Parquet, Arrow and ``save_to_disk`` inputs need ``pyarrow`` (``pip install
    'spmd_lora[data]'``); their records name the row instead of a line. Raises
    :class:`DataError` naming the file and line / row for a missing file, malformed JSON or a
    row that is not an object.
    """

    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {p} (check the --data path)")
    if p.is_dir():
        return columnar.iter_saved_dataset(p)
    if not p.is_file():
        raise DataError(f"data path {p} is not a file; pass a .json, .jsonl, .parquet or .arrow "
                        "file, or a datasets save_to_disk directory")
    if p.suffix.lower() in columnar.SUFFIXES:
        return columnar.iter_table_file(p)
    if p.suffix.lower() in UNSUPPORTED_SUFFIXES:
        raise DataError(f"{p}: {p.suffix} files are not a supported data format; convert it to "
                        f".jsonl (one JSON object per line), .json, .parquet or .arrow")
    return iter_json_records(p)


#: Table and document formats people try first; anything else is read as JSON / JSONL.
UNSUPPORTED_SUFFIXES = (".csv", ".tsv", ".xlsx", ".xls", ".pdf", ".docx", ".pkl", ".pickle")


def iter_json_records(p: Path) -> Iterator[Record]:
    """Records of a JSON list file or a JSONL file (one JSON object per line).

    The format is detected from the content (a file whose first character is ``[`` is a JSON
    list), so a ``.json`` file holding JSONL also works. Blank JSONL lines are ignored.
    Raises :class:`DataError` naming the file and line for text that is not UTF-8, malformed
    JSON or a row that is not a JSON object.
    """
    with open(p, "rb") as f:
        head = f.read(4096)
        while head.strip() == b"" and (more := f.read(1 << 20)):
            head = more
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if not first:
        raise DataError(f"{p}: the file is empty; it must hold a JSON list of records (.json) "
                        "or one JSON object per line (.jsonl)")
    if first == b"[":
        raw = p.read_bytes()
        yield from _load_json_list(p, _decode(p, raw, 0))
        return
    if p.suffix.lower() == ".json" and first == b"{" and _one_line(p):
        raise DataError(f"{p}: a .json file must hold a JSON list of records ([{{...}}, ...]), "
                        "not one object; wrap it in [ ], or name the file .jsonl")
    count = 0
    with open(p, "rb") as f:
        for lineno, raw_line in enumerate(f, 1):
            line = _decode(p, raw_line, lineno - 1)
            if line.strip():
                yield _jsonl_record(p, line, lineno, count)
                count += 1


def _one_line(p: Path) -> bool:
    """Whether the file holds at most one non-blank line (read until a second one appears)."""
    seen = 0
    with open(p, "rb") as f:
        for line in f:
            if line.strip():
                seen += 1
                if seen > 1:
                    return False
    return True


def _decode(p: Path, raw: bytes, lines_before: int) -> str:
    try:
        return raw.decode("utf-8-sig" if lines_before == 0 else "utf-8")
    except UnicodeDecodeError as e:
        line = lines_before + raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{p}, line {line}: the file is not valid UTF-8 text ({e.reason}); "
                        "save it as UTF-8") from None


def _jsonl_record(p: Path, line: str, lineno: int, index: int) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        hint = ""
        try:  # a pretty-printed single JSON object is a common mistake
            whole = json.loads(p.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError):
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
                        f'{{"instruction": ..., "output": ...}}, got {json_type(obj)}')
    return Record(obj, path=str(p), line=lineno, index=index)


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
                                f"{json_type(obj)}")
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
