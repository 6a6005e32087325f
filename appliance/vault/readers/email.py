"""Mail: single .eml files and mbox files. Headers, the body (plain text preferred, HTML stripped), and
text attachments, in one record per message. Display names in From/To/Cc become PII name hints.

Parsed with the `compat32` policy: the modern header registry is ~10x slower and ingest reads mail by the
million; headers are decoded explicitly instead. Most mail is one plain text part with plain headers; such a
message is read by `_plain` without the email package (two to three times faster), and gives exactly the record
the email package's parse would. Anything else (folded or encoded headers, multipart, base64, other
charsets, attachments, CR line ends, bytes outside ASCII in the headers) goes to the email package.
"""

from __future__ import annotations

import binascii
import email
import html
import io
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
            raw = f.read()
    except OSError as e:
        raise ReadError(f"cannot read: {e.strerror}") from None
    plain = _plain(raw)
    if plain is not None:
        yield from _plain_records(*plain, str(path), None)
        return
    msg = email.message_from_binary_file(io.BytesIO(raw))  # as from the file: CR line ends read as LF
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
                plain = _plain(raw)
                if plain is not None:
                    yield from _plain_records(*plain, str(path), f"message {n}")
                else:
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
    body, attachments = _parts(msg)
    yield from _assemble({h: _header(msg, h) for h in _HEADERS}, body, attachments, source, member)


def _plain_records(headers: dict[str, str], body: str, source: str, member: str | None) -> Iterator[Record]:
    values = {h: headers[h.lower()].strip() if h.lower() in headers else None for h in _HEADERS}
    yield from _assemble(values, body, [], source, member)


def _assemble(values: dict[str, str | None], body: str, attachments: list[str], source: str,
              member: str | None) -> Iterator[Record]:
    """The records of one message from its decoded headers (`_HEADERS`, None where absent) and parts."""
    head, names = [], []
    for h in _HEADERS:
        value = values[h]
        if value is None:
            continue
        head.append(f"{h}: {value}")
        if h in ("From", "To", "Cc"):
            names += _display_names(value)
    text = "\n".join(head) + "\n\n" + body + ("\n\n" + "\n\n".join(attachments) if attachments else "")
    subject = values["Subject"] or None
    meta = {"attachments": len(attachments)}
    for i, piece in enumerate(split_long(text)):
        yield Record(kind="email", source=source, text=piece, path=member, title=subject,
                     meta=dict(meta, part=i) if i else meta, name_hints=tuple(names))


# "Ana Okafor <ana@site.example>, ops@site.example": words of letters, `'` and `-` between single spaces, and
# addresses with no quotes, comments or routes. `getaddresses` reads such a list as these names exactly.
_ADDR = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+"
_SIMPLE_ITEM = rf"(?:[A-Za-z][A-Za-z'-]*(?: [A-Za-z][A-Za-z'-]*)* <{_ADDR}>|{_ADDR})"
_SIMPLE_ADDRESSES = re.compile(rf"{_SIMPLE_ITEM}(?:, {_SIMPLE_ITEM})*")
_DISPLAY_NAME = re.compile(rf"([A-Za-z][A-Za-z'-]*(?: [A-Za-z][A-Za-z'-]*)*) <{_ADDR}>")


def _display_names(value: str) -> list[str]:
    """The display names of two words or more in an address header's value."""
    if _SIMPLE_ADDRESSES.fullmatch(value):
        return [n for n in _DISPLAY_NAME.findall(value) if " " in n]
    return [n.strip() for n, _addr in getaddresses([value]) if n and " " in n.strip()]


# What `_plain` takes: header lines with a name and a colon, printable ASCII (tabs inside a value), no
# encoded words; one text/plain part in UTF-8 or ASCII, 7bit, 8bit or quoted-printable.
_HEADER_LINE = re.compile(rb"[!-9;-~]+:[ -~\t]*")
_PLAIN_TYPE = re.compile(r"[ \t]*text/plain[ \t]*(?:;[ \t]*charset=(\"?)(utf-8|us-ascii)\1[ \t]*)?", re.I)
_PLAIN_CTE = frozenset({"", "7bit", "8bit", "quoted-printable"})


def _plain(raw: bytes) -> tuple[dict[str, str], str] | None:
    """(the first value of each header, by lower-case name; the decoded body) of a plain single-part
    message, or None for any other: the email package reads those.

    What the email package does with such a message (`compat32`): a header's value is the line after the
    colon; the body is every byte after the blank line, quoted-printable decoded by `binascii.a2b_qp` (as
    `quopri.decodestring` does) and then by its charset, UTF-8 if none is named."""
    end = raw.find(b"\n\n")
    if end <= 0 or b"\r" in raw or raw.startswith(b"From ") or b"=?" in raw[:end]:
        return None
    headers: dict[str, str] = {}
    for line in raw[:end].split(b"\n"):
        if not _HEADER_LINE.fullmatch(line):
            return None  # a folded line, a stray "From ", control bytes or bytes outside ASCII
        name, _, value = line.decode("ascii").partition(":")
        headers.setdefault(name.lower(), value)
    if "content-disposition" in headers:
        return None
    ctype = _PLAIN_TYPE.fullmatch(headers.get("content-type", "text/plain"))
    cte = headers.get("content-transfer-encoding", "").lstrip(" \t").lower()
    if ctype is None or cte not in _PLAIN_CTE:
        return None
    body = raw[end + 2:]
    if cte == "quoted-printable":
        body = binascii.a2b_qp(body)
    return headers, body.decode((ctype.group(2) or "utf-8").lower(), errors="replace").strip()


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
