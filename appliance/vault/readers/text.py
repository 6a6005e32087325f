"""Plain text, markdown and reStructuredText, streamed in pieces so a huge file never sits whole in memory."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from pathlib import Path

from appliance.vault.readers import MAX_RECORD_CHARS, Ident, ReadError, Record, open_input

_HEADING = re.compile(r"^(?:#{1,6}\s+(.+)|(.+)\n[=\-~^]{3,}\s*$)", re.M)
_CHUNK_BYTES = 1 << 20


def looks_binary(head: bytes) -> bool:
    return b"\0" in head


def read_text(path: Path, kind: str = "text", ident: Ident | None = None) -> Iterator[Record]:
    """Records of at most MAX_RECORD_CHARS characters, cut at line ends; UTF-8 (with or without BOM).

    `ident`: the file the walk saw (`open_input`)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
    buf, part, title = "", 0, None
    try:
        with open_input(path, ident) as f:
            head = f.read(8192)
            if looks_binary(head):
                raise ReadError("binary file (contains NUL bytes)")
            chunk = head
            while chunk:
                buf += decoder.decode(chunk)
                while len(buf) >= MAX_RECORD_CHARS:
                    cut = buf.rfind("\n", 0, MAX_RECORD_CHARS)
                    cut = cut + 1 if cut > 0 else MAX_RECORD_CHARS
                    if title is None:
                        title = _title(buf[:cut], path)
                    yield _record(path, kind, buf[:cut], title, part)
                    buf, part = buf[cut:], part + 1
                chunk = f.read(_CHUNK_BYTES)
            buf += decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise ReadError(f"not UTF-8 text (byte {e.start} of a chunk)") from None
    except OSError as e:
        raise ReadError(f"cannot read: {e.strerror}") from None
    if buf.strip():
        yield _record(path, kind, buf, title or _title(buf, path), part)
    elif part == 0:
        raise ReadError("empty file")


def _title(text: str, path: Path) -> str:
    m = _HEADING.search(text[:4096])
    return (m.group(1) or m.group(2)).strip() if m else path.stem


def _record(path: Path, kind: str, text: str, title: str | None, part: int) -> Record:
    meta = {"part": part} if part else {}
    return Record(kind=kind, source=str(path), text=text, title=title, meta=meta)
