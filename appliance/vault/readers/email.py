"""Mail: single .eml files and mbox files. Headers, the body (plain text preferred, HTML stripped), and
text attachments, in one record per message. Display names in From/To/Cc become PII name hints.

Parsed with the `compat32` policy: the modern header registry is ~10x slower and ingest reads mail by the
million; headers are decoded explicitly instead.
"""

from __future__ import annotations

import email
import html
import re
from collections.abc import Iterator
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses
from pathlib import Path

from appliance.vault.readers import Ident, ReadError, Record, open_input, split_long

_HEADERS = ("From", "To", "Cc", "Date", "Subject")
_TAG = re.compile(r"<[^>]+>")
_SCRIPT = re.compile(r"(?is)<(script|style)\b.*?</\1>")


def read_eml(path: Path, ident: Ident | None = None) -> Iterator[Record]:
    try:
        with open_input(path, ident) as f:
            msg = email.message_from_binary_file(f)
    except OSError as e:
        raise ReadError(f"cannot read: {e.strerror}") from None
    if not msg.keys():
        raise ReadError("no mail headers found")
    yield from _records(msg, str(path), None)


def read_mbox(path: Path, ident: Ident | None = None) -> Iterator[Record]:
    """One record per message, split as `mailbox.mbox` splits (which opens by name, so it is not used)."""
    with open_input(path, ident) as f:
        n = 0
        try:
            for raw in _mbox_messages(f):
                n += 1
                yield from _records(email.message_from_bytes(raw), str(path), f"message {n}")
        except OSError as e:
            raise ReadError(f"cannot read mbox: {e}") from None
    if not n:
        raise ReadError("no messages in mbox")


def _mbox_messages(f) -> Iterator[bytes]:
    """Each message's bytes without its 'From ' line and the blank line before the next, as `mailbox.mbox`
    cuts them (`_generate_toc`, `get_bytes`); text before the first 'From ' line is ignored."""
    lines: list[bytes] | None = None
    last_was_empty = False
    for line in f:
        if line.startswith(b"From "):
            if lines is not None:
                yield b"".join(lines[:-1] if last_was_empty else lines)
            lines, last_was_empty = [], False
            continue
        if lines is not None:
            lines.append(line)
        last_was_empty = line == b"\n"
    if lines is not None:
        yield b"".join(lines[:-1] if last_was_empty else lines)


def _header(msg: Message, name: str) -> str | None:
    raw = msg.get(name)
    if raw is None:
        return None
    try:
        return str(make_header(decode_header(str(raw)))).strip()
    except (LookupError, UnicodeDecodeError, ValueError):
        return str(raw).strip()


def _records(msg: Message, source: str, member: str | None) -> Iterator[Record]:
    head, names = [], []
    for h in _HEADERS:
        value = _header(msg, h)
        if value is None:
            continue
        head.append(f"{h}: {value}")
        if h in ("From", "To", "Cc"):
            names += [n.strip() for n, _addr in getaddresses([value]) if n and " " in n.strip()]
    body, attachments = _parts(msg)
    text = "\n".join(head) + "\n\n" + body + ("\n\n" + "\n\n".join(attachments) if attachments else "")
    subject = _header(msg, "Subject") or None
    meta = {"attachments": len(attachments)}
    for i, piece in enumerate(split_long(text)):
        yield Record(kind="email", source=source, text=piece, path=member, title=subject,
                     meta=dict(meta, part=i) if i else meta, name_hints=tuple(names))


def _decode(part: Message) -> str:
    payload = part.get_payload(decode=True) or b""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        return payload.decode("utf-8", errors="replace")


def _parts(msg: Message) -> tuple[str, list[str]]:
    """(body, text attachments): the first inline text/plain part, else the first text/html, stripped."""
    plain = html_body = None
    attachments = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        disposition = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
        if disposition == "attachment" or (part.get_filename() and disposition != "inline"):
            if part.get_content_maintype() == "text":
                attachments.append(f"--- attachment: {part.get_filename() or 'unnamed'} ---\n{_decode(part)}")
        elif ctype == "text/plain" and plain is None:
            plain = _decode(part)
        elif ctype == "text/html" and html_body is None:
            html_body = _decode(part)
    if plain is not None:
        return plain.strip(), attachments
    if html_body is not None:
        return html.unescape(_TAG.sub(" ", _SCRIPT.sub(" ", html_body))).strip(), attachments
    return "", attachments
