"""Readers turn one input file into records. One module per kind; `detect` decides which applies.

Readers work in memory: nothing they decode or extract is written to disk. They open their input with
`open_input`, which never follows a link (see there).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

# Documents larger than this are cut into several records at line boundaries, so memory stays bounded.
MAX_RECORD_CHARS = 64 << 10


class ReadError(Exception):
    """This file cannot be read; the message says why and lands in the version's report."""


# (st_dev, st_ino) of a file as the walk saw it: the file opened later must be that very file
Ident = tuple[int, int]
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)


def open_input(path: Path, ident: Ident | None = None) -> BinaryIO:
    """Open an input file for reading, never through a link.

    `O_NOFOLLOW` refuses a link put at `path` after the walk listed it (`O_NONBLOCK`: a FIFO put there does
    not hang the open); the opened file must be a regular file and, when `ident` is given, the very file the
    walk saw, so a directory above it swapped for a link cannot lead elsewhere either. Nothing is read
    from a file that fails these checks.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ReadError("symbolic link (not followed)") from None
        raise ReadError(f"cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReadError("not a regular file")
        if ident is not None and (st.st_dev, st.st_ino) != tuple(ident):
            raise ReadError("changed since it was listed (a link or another file was put in its place)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def fd_path(fd: int) -> str:
    """A name that opens the file behind `fd` (for libraries that open by name, as DuckDB's readers do)."""
    return f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{fd}"


@dataclass
class Record:
    kind: str
    source: str
    text: str
    path: str | None = None  # repository-relative path for code, member name for archives
    language: str | None = None
    title: str | None = None
    meta: dict = field(default_factory=dict)
    name_hints: tuple[str, ...] = ()  # person names known from structure (mail headers)
    scrubbed: bool = False  # PII already handled by the reader (table cells, scrubbed with their column)
    found: list = field(default_factory=list)  # what scrubbing found (fields.Found: never the values)


def meta_json(meta: dict) -> str | None:
    """A record's metadata as the vault keeps it."""
    return json.dumps(meta, default=str) if meta else None


def split_long(text: str, limit: int = MAX_RECORD_CHARS) -> list[str]:
    """Cut `text` into pieces of at most `limit` characters, at line ends where possible."""
    if len(text) <= limit:
        return [text]
    parts, start = [], 0
    while start < len(text):
        end = min(len(text), start + limit)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            if nl > start:
                end = nl + 1
        parts.append(text[start:end])
        start = end
    return parts
