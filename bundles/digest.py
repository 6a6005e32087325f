"""File digests that hash in parallel: a SHA-256 tree over fixed chunks.

`sha256-tree-8MiB`: every 8 MiB chunk is hashed on its own (in threads; hashlib releases the GIL on large
buffers, so chunks hash on all cores at once), and the digest is SHA-256 over a domain tag, the file size
and the chunk digests in order. The algorithm name records every parameter; a sequential `TreeHasher`
gives the same value for a stream (an encrypted bundle is read front to back).
"""

from __future__ import annotations

import hashlib
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

CHUNK = 8 << 20
ALGORITHM = "sha256-tree-8MiB"
_TAG = b"appliance-bundle-tree-v1\x00"


@dataclass(frozen=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        algorithm, _, value = text.partition(":")
        return cls(algorithm, value)


def _root(size: int, leaves: list[bytes]) -> Digest:
    h = hashlib.sha256(_TAG + struct.pack("<Q", size))
    for leaf in leaves:
        h.update(leaf)
    return Digest(ALGORITHM, h.hexdigest())


class TreeHasher:
    """The same digest, fed sequentially."""

    def __init__(self) -> None:
        self.size = 0
        self._leaves: list[bytes] = []
        self._buf = bytearray()

    def update(self, data: bytes) -> None:
        self.size += len(data)
        self._buf += data
        while len(self._buf) >= CHUNK:
            self._leaves.append(hashlib.sha256(self._buf[:CHUNK]).digest())
            del self._buf[:CHUNK]

    def digest(self) -> Digest:
        leaves = self._leaves + ([hashlib.sha256(self._buf).digest()] if self._buf else [])
        return _root(self.size, leaves)


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 32)))


def digest_range(fd: int, offset: int, size: int, pool: ThreadPoolExecutor | None = None) -> Digest:
    """Digest of `size` bytes at `offset` of an open file, chunks hashed in parallel."""

    def leaf(i: int) -> bytes:
        n = min(CHUNK, size - i * CHUNK)
        data = os.pread(fd, n, offset + i * CHUNK)
        if len(data) != n:
            raise EOFError("file ended early")
        return hashlib.sha256(data).digest()

    count = -(-size // CHUNK)
    if count <= 1:
        return _root(size, [leaf(0)] if count else [])
    own = pool is None
    pool = pool or _pool()
    try:
        return _root(size, list(pool.map(leaf, range(count))))
    finally:
        if own:
            pool.shutdown()


def digest_file(path: str | os.PathLike, pool: ThreadPoolExecutor | None = None) -> Digest:
    fd = os.open(path, os.O_RDONLY)
    try:
        return digest_range(fd, 0, os.fstat(fd).st_size, pool)
    finally:
        os.close(fd)
