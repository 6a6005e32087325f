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
from concurrent.futures import Executor, ThreadPoolExecutor
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


def root(size: int, leaves: list[bytes]) -> Digest:
    """The digest of a file of `size` bytes from its leaves' SHA-256 digests, in order."""
    h = hashlib.sha256(_TAG + struct.pack("<Q", size))
    for leaf in leaves:
        h.update(leaf)
    return Digest(ALGORITHM, h.hexdigest())


class TreeHasher:
    """The same digest, fed sequentially; whole leaves of a large update hash in parallel on `pool`."""

    def __init__(self, pool: Executor | None = None) -> None:
        self.size = 0
        self._leaves: list[bytes] = []
        self._buf = bytearray()  # the start of a leaf, < CHUNK bytes
        self._pool = pool

    def update(self, data) -> None:
        with memoryview(data) as v0, v0.cast("B") as view:
            self.size += len(view)
            at = 0
            if self._buf:
                at = min(CHUNK - len(self._buf), len(view))
                self._buf += view[:at]
                if len(self._buf) < CHUNK:
                    return
                self._leaves.append(hashlib.sha256(self._buf).digest())
                self._buf.clear()
            whole = (len(view) - at) // CHUNK
            with view[at:at + whole * CHUNK] as leaves:
                self._leaves += _hash_leaves(leaves, self._pool)
            self._buf += view[at + whole * CHUNK:]

    def digest(self) -> Digest:
        leaves = self._leaves + ([hashlib.sha256(self._buf).digest()] if self._buf else [])
        return root(self.size, leaves)


class LeafHasher:
    """The leaf digests of consecutive whole leaves (the last may be short), fed in pieces of any size."""

    def __init__(self) -> None:
        self._done: list[bytes] = []
        self._h = hashlib.sha256()
        self._fill = 0

    def update(self, data) -> None:
        with memoryview(data) as v0, v0.cast("B") as view:
            at = 0
            while at < len(view):
                k = min(CHUNK - self._fill, len(view) - at)
                with view[at:at + k] as piece:
                    self._h.update(piece)
                self._fill += k
                at += k
                if self._fill == CHUNK:
                    self._done.append(self._h.digest())
                    self._h, self._fill = hashlib.sha256(), 0

    def leaves(self) -> list[bytes]:
        return self._done + ([self._h.digest()] if self._fill else [])


def _hash_leaves(view: memoryview, pool: Executor | None) -> list[bytes]:
    """SHA-256 of each CHUNK of `view` (whole leaves), on `pool` when there are several."""

    def leaf(i: int) -> bytes:
        with view[i * CHUNK:(i + 1) * CHUNK] as piece:
            return hashlib.sha256(piece).digest()

    count = len(view) // CHUNK
    if pool is None or count < 2:
        return [leaf(i) for i in range(count)]
    return list(pool.map(leaf, range(count)))


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
        return root(size, [leaf(0)] if count else [])
    own = pool is None
    pool = pool or _pool()
    try:
        return root(size, list(pool.map(leaf, range(count))))
    finally:
        if own:
            pool.shutdown()


def digest_file(path: str | os.PathLike, pool: ThreadPoolExecutor | None = None) -> Digest:
    fd = os.open(path, os.O_RDONLY)
    try:
        return digest_range(fd, 0, os.fstat(fd).st_size, pool)
    finally:
        os.close(fd)
