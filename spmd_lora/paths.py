"""Output paths: checked before any work starts, and files written atomically.

* :func:`ensure_writable_dir` creates a directory (parents too) and proves it writable by
  creating, writing and removing a probe file in it. Any ``OSError`` on the way (a parent that
  is a regular file, a read-only or pseudo file system such as ``/proc``, an immutable parent,
  no permission) becomes one :class:`~spmd_lora.errors.ConfigError` naming the flag, the path
  and the operating system's reason, e.g. ``--output /proc/x/out: cannot create the directory:
  No such file or directory``. For directories that are kept whatever happens next: the
  tokenized-data cache, the demo's ``--output``, the dashboard's ``--new-runs-dir``.
* :func:`check_writable_dir` runs the same probe, then removes the directories it had to
  create: the writer creates them when it writes, so a run that stops at a later check leaves
  nothing behind (``train``'s ``output_dir``, ``export``'s output, plot's output directory).
* :func:`write_text_atomic` writes a text file through a temporary sibling and a rename, so
  readers see the old content or the new, never a part.
"""
from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from .errors import ConfigError


def ensure_writable_dir(path, what: str, hint: str = "") -> Path:
    """Create ``path`` (and its parents) and check that files can be written in it; returns
    ``Path(path)``. ``what`` names it in the error (a flag such as ``--output``, or the
    TrainConfig field, which the CLI shows as its flag); ``hint`` is appended to the error."""
    return _probe(Path(path), what, hint, keep=True)


def check_writable_dir(path, what: str, hint: str = "") -> Path:
    """:func:`ensure_writable_dir`, except that the directories created for the probe are
    removed again (an existing ``path`` is only probed); returns ``Path(path)``."""
    return _probe(Path(path), what, hint, keep=False)


def _probe(path: Path, what: str, hint: str, keep: bool) -> Path:
    suffix = f"; {hint}" if hint else ""

    def fail(doing: str, e: OSError):
        raise ConfigError(f"{what} {path}: {doing}: {e.strerror or e}{suffix}") from None

    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} exists and is not a directory{suffix}")
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    created = []
    try:
        for d in reversed(missing):                       # outermost first
            try:
                d.mkdir()
            except FileExistsError:
                if not d.is_dir():
                    raise
                continue                                  # made by someone else meanwhile
            except OSError as e:
                fail("cannot create the directory", e)
            created.append(d)
        try:
            fd, probe = tempfile.mkstemp(prefix=".spmd_lora_probe_", dir=path)
            try:
                os.write(fd, b"probe")
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as e:
            fail("cannot write in the directory", e)
    finally:
        if not keep:
            for d in reversed(created):                   # innermost first
                try:
                    d.rmdir()
                except OSError:
                    pass                                  # someone else wrote into it meanwhile
    return path


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename;
    on failure the temporary file is removed and ``path`` is unchanged."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)     # mode as open() gives
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
