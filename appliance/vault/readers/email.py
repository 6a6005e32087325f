"""Mail: single .eml files and mbox files. Headers, the body (plain text preferred, HTML stripped), and
text attachments, in one record per message. Display names in From/To/Cc become PII name hints."""

from __future__ import annotations

import email
import email.policy
import html
import mailbox
import re
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import getaddresses
from pathlib import Path

from appliance.vault.readers import ReadError, Record, split_long

_HEADERS = ("From", "To", "Cc", "Date", "Subject")
_TAG = re.compile(r"<[^>]+>")
_SCRIPT = re.compile(r"(?is)<(script|style)\b.*?</\1>")


def read_eml(path: Path) -> Iterator[Record]:
    try:
        with open(path, "rb") as f:
            msg = email.message_from_binary_file(f, policy=email.policy.default)
    except OSError as e:
        raise ReadError(f"cannot read: {e.strerror}") from None
    if not msg.keys():
        raise ReadError("no mail headers found")
    yield from _records(msg, str(path), None)


def read_mbox(path: Path) -> Iterator[Record]:
    try:
        box = mailbox.mbox(str(path), factory=None, create=False)
        keys = box.keys()
    except (OSError, mailbox.Error) as e:
        raise ReadError(f"cannot read mbox: {e}") from None
    if not keys:
        raise ReadError("no messages in mbox")
    try:
        for i, key in enumerate(keys):
            raw = box.get_bytes(key)
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            yield from _records(msg, str(path), f"message {i + 1}")
    finally:
        box.close()


def _records(msg: EmailMessage, source: str, member: str | None) -> Iterator[Record]:
    head, names = [], []
    for h in _HEADERS:
        value = msg.get(h)
        if value is None:
            continue
        head.append(f"{h}: {value}")
        if h in ("From", "To", "Cc"):
            names += [n for n, _addr in getaddresses([str(value)]) if n and " " in n.strip()]
    body = _body(msg)
    attachments = []
    for part in msg.iter_attachments():
        if part.get_content_maintype() == "text":
            try:
                attachments.append(f"--- attachment: {part.get_filename() or 'unnamed'} ---\n{part.get_content()}")
            except (LookupError, UnicodeDecodeError):
                continue
    text = "\n".join(head) + "\n\n" + body + ("\n\n" + "\n\n".join(attachments) if attachments else "")
    subject = str(msg.get("Subject", "")) or None
    meta = {"attachments": len(attachments)}
    for i, piece in enumerate(split_long(text)):
        yield Record(kind="email", source=source, text=piece, path=member, title=subject,
                     meta=dict(meta, part=i) if i else meta, name_hints=tuple(names))


def _body(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain", "html"))
    if part is None:
        return ""
    try:
        content = part.get_content()
    except (LookupError, UnicodeDecodeError):
        payload = part.get_payload(decode=True) or b""
        content = payload.decode("utf-8", errors="replace")
    if part.get_content_subtype() == "html":
        content = html.unescape(_TAG.sub(" ", _SCRIPT.sub(" ", content)))
    return content.strip()
