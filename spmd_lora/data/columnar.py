"""Columnar inputs through ``pyarrow`` (optional: ``pip install 'spmd_lora[data]'``).

* ``.parquet`` files, read one row group batch at a time;
* ``.arrow`` files (Arrow IPC, stream or file format);
* a directory written by Hugging Face ``datasets``' ``Dataset.save_to_disk``: its
  ``state.json`` lists the Arrow stream files (``data-0000N-of-0000M.arrow``) in order. A
  ``DatasetDict`` directory (``dataset_dict.json``) is refused with the names of its splits.

Every row becomes a :class:`~.rows.Record` with ``path`` (its file) and ``index`` = the row
number in that file (``line`` None), so field errors read ``file, row N``. Columns are converted with
``to_pylist`` (lists stay lists, structs become dicts, nulls become None).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .rows import Record

SUFFIXES = (".parquet", ".arrow")
#: Rows converted to Python objects at a time (bounds memory while streaming).
BATCH_ROWS = 4096


def _pyarrow(p: Path):
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(f"{p}: reading Parquet / Arrow / save_to_disk data needs pyarrow; "
                        "install it with: pip install 'spmd_lora[data]'") from None
    return pyarrow


def _rows(batches, p: Path) -> Iterator[Record]:
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield Record(row, path=str(p), index=index)
            index += 1


def iter_table_file(p: Path) -> Iterator[Record]:
    """Records of one ``.parquet`` or ``.arrow`` file, in row order."""
    pa = _pyarrow(p)
    try:
        if p.suffix.lower() == ".parquet":
            reader = pa.parquet.ParquetFile(str(p))
            batches = reader.iter_batches(batch_size=BATCH_ROWS)
        else:
            batches = _arrow_batches(pa, p)
        yield from _rows(batches, p)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{p}: not a readable {p.suffix} file ({str(e).splitlines()[0]}); "
                        "check the file or convert it to JSONL") from None


def _arrow_batches(pa, p: Path):
    source = pa.memory_map(str(p), "r")
    try:
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    return iter(reader)


def iter_saved_dataset(d: Path) -> Iterator[Record]:
    """Records of a ``datasets`` ``save_to_disk`` directory, across its Arrow files in order."""
    if (d / "dataset_dict.json").is_file():
        try:
            splits = json.loads((d / "dataset_dict.json").read_text()).get("splits", [])
        except (OSError, ValueError, AttributeError):
            splits = []
        raise DataError(f"{d} holds a DatasetDict with splits {splits}; pass one split's "
                        f"directory, e.g. --data {d / (splits[0] if splits else 'train')}")
    state = d / "state.json"
    if not state.is_file():
        raise DataError(f"data path {d} is a directory without state.json; pass a .json, "
                        ".jsonl, .parquet or .arrow file, or a directory written by "
                        "datasets' save_to_disk")
    try:
        files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state}: not a datasets save_to_disk state file ({e}); re-save the "
                        "dataset with save_to_disk") from None
    pa = _pyarrow(d)
    for name in files:
        path = d / name
        if not path.is_file():
            raise DataError(f"{d}: data file {name} listed in state.json is missing; re-save "
                            "the dataset with save_to_disk")
        try:
            yield from _rows(_arrow_batches(pa, path), path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: unreadable Arrow file ({str(e).splitlines()[0]}); re-save "
                            "the dataset with save_to_disk") from None
