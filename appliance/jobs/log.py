"""A job's log: one line per event, each sealed with AES-GCM, so progress lines never sit on disk in the clear.

The key is derived from the vault's data key; whoever can open the vault can read the logs, and nobody
else. Lines are appended with O_APPEND (one write per line), so a reader following the file sees whole
lines only.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

INFO = b"appliance job log v1"


def _key(data_key: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=INFO).derive(data_key)


def path_of(logs_dir: Path, job_id: str) -> Path:
    return logs_dir / "jobs" / f"{job_id}.log"


class JobLog:
    """Append and read one job's sealed lines."""

    def __init__(self, logs_dir: Path, job_id: str, data_key: bytes):
        self.path = path_of(logs_dir, job_id)
        self.aad = job_id.encode()
        self.aead = AESGCM(_key(data_key))

    def write(self, text: str) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = time.strftime("%H:%M:%S")
        for line in text.splitlines() or [""]:
            nonce = os.urandom(12)
            sealed = base64.b64encode(nonce + self.aead.encrypt(nonce, f"{stamp} {line}".encode(), self.aad))
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, sealed + b"\n")
            finally:
                os.close(fd)

    def lines(self, start: int = 0) -> list[str]:
        """Lines from the `start`-th on; a line that does not open reads as a marker, never as garbage."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes().split(b"\n")
        complete = raw[:-1]  # the part after the last newline is still being written
        return [self._open(r) for r in complete[start:]]

    def follow(self, done, poll: float = 0.3) -> Iterator[str]:
        """Yield lines as they come until `done()` says the job has ended (then the rest, and stop)."""
        seen = 0
        while True:
            finished = done()
            new = self.lines(seen)
            seen += len(new)
            yield from new
            if finished:
                return
            time.sleep(poll)

    def _open(self, raw: bytes) -> str:
        try:
            blob = base64.b64decode(raw, validate=True)
            return self.aead.decrypt(blob[:12], blob[12:], self.aad).decode()
        except (InvalidTag, ValueError):
            return "[a line that does not open with this vault's key]"
