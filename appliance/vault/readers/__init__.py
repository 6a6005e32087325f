"""Readers turn one input file into records. One module per kind; `detect` decides which applies.

Readers work in memory: nothing they decode or extract is written to disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Documents larger than this are cut into several records at line boundaries, so memory stays bounded.
MAX_RECORD_CHARS = 64 << 10


class ReadError(Exception):
    """This file cannot be read; the message says why and lands in the version's report."""


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
