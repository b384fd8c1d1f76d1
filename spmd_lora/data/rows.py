"""One dataset row: :class:`Record` (a dict that remembers its file and line), where it came
from, and the JSON type names used in error messages."""
from __future__ import annotations

from typing import Any

from ..errors import DataError


class Record(dict):
    """A dataset row (a plain dict) that remembers where it came from, for error messages."""

    __slots__ = ("path", "line", "index")

    def __init__(self, data=(), path: str | None = None, line: int | None = None,
                 index: int | None = None):
        super().__init__(data)
        self.path, self.line, self.index = path, line, index

    @property
    def where(self) -> str:
        return where_of(self, self.index)


def where_of(rec: Any, i: int | None) -> str:
    """Where a record came from: ``file, line N (record i)`` for JSON inputs, ``file, row i``
    for columnar ones (no line), ``record i`` for plain dicts."""
    path = getattr(rec, "path", None)
    line = getattr(rec, "line", None)
    if path is not None:
        idx = getattr(rec, "index", None)
        if line is None:
            return f"{path}, row {idx}" if idx is not None else str(path)
        return f"{path}, line {line}" + (f" (record {idx})" if idx is not None else "")
    return f"record {i}" if i is not None else "record"


_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "true/false",
               list: "a list", dict: "an object", type(None): "null"}


def json_type(v: Any) -> str:
    return _JSON_TYPES.get(type(v), type(v).__name__)


def required_list(rec: dict, field: str, where: str, template: str, what: str) -> list:
    """``rec[field]``, which the ``template`` template needs as ``what`` (a list of ...);
    DataError naming the record and the field when it is missing or not a list."""
    if field not in rec:
        raise DataError(f"{where}: missing required field '{field}' for the {template} template "
                        f"(fields present: {sorted(rec)}); it must be {what}")
    value = rec[field]
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{field}' must be {what}, got {json_type(value)}")
    return value
