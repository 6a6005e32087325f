"""The one STREAM construction, sealing whole buffers on every core: encrypted bundles and sealed artifacts.

A payload is cut into 1 MiB chunks, each sealed with ChaCha20-Poly1305 under a nonce that is the chunk's
index (11 bytes) and a last-chunk flag (age's STREAM). A chunk changed, dropped, moved or added fails its
tag; a stream cut short lacks the flagged last chunk; a payload that is an exact number of chunks still
ends in a flagged one (the writer keeps at least one byte back), so an empty payload is one empty chunk.

Since each chunk's nonce is its index, chunks seal and open independently: `seal_into` and `open_into` run
them on a thread pool (`encrypt_into`/`decrypt_into` release the GIL, so threads use every core) from one
buffer into another, which may be a memory map of an anonymous in-memory file (`memfiles`). The sizes
follow from each other: `sealed_size(n)` bytes of stream for `n` bytes of payload, and `payload_size`
back, refusing a length no writer produces.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

CHUNK = 1 << 20
TAG = 16


class StreamError(ValueError):
    """A stream that does not open: altered, cut, extended or under another key."""


def nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(secret)


def aead(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return ChaCha20Poly1305(key)


def chunks(size: int) -> int:
    """How many chunks a payload of `size` bytes is sealed in."""
    return max(1, -(-size // CHUNK))


def sealed_size(size: int) -> int:
    return size + chunks(size) * TAG


def payload_size(stream: int) -> int:
    """The payload's size for a stream of `stream` bytes; a length no writer makes is refused."""
    n = -(-stream // (CHUNK + TAG))
    size = stream - n * TAG
    if n == 0 or size < 0 or chunks(size) != n:
        raise StreamError(f"an encrypted stream of {stream:,} bytes is cut or extended")
    return size


def workers() -> int:
    return max(1, min(os.cpu_count() or 1, 32))


# Chunks a writer seals at once: enough to keep every core busy, few enough that its buffers (three batches) stay
# small and are reused while a large file is written, rather than filled fresh.
BATCH = min(64, max(16, workers() * 8))
_POOL: ThreadPoolExecutor | None = None


def pool() -> ThreadPoolExecutor:
    """One process-wide pool: sealing is called from many places and starting threads each time costs."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="stream")
    return _POOL


def _parallel(fn: Callable[[int], bool], n: int) -> list[bool]:
    if n <= 2:
        return [fn(i) for i in range(n)]
    futures = [pool().submit(fn, i) for i in range(n)]
    wait(futures)  # all done before any error is raised: no task still holds or writes the caller's buffers
    return [f.result() for f in futures]


def seal_into(key: bytes, src, dst, first: int = 0, total: int | None = None) -> None:
    """Seal the payload `src` (a buffer) into `dst` (a writable buffer of `sealed_size(len(src))` bytes).

    `first`/`total` seal a run of chunks of a longer stream: `src` starts at chunk `first` of `total`."""
    a = aead(key)
    with memoryview(src) as s0, memoryview(dst) as d0, s0.cast("B") as src, d0.cast("B") as dst:
        n = chunks(len(src)) if total is None else -(-len(src) // CHUNK) or 1
        total = n if total is None else total
        if len(dst) != len(src) + n * TAG:
            raise ValueError(f"the output holds {len(dst):,} bytes, the sealed payload {len(src) + n * TAG:,}")

        def one(i: int) -> bool:
            at = i * (CHUNK + TAG)
            with src[i * CHUNK:(i + 1) * CHUNK] as piece, dst[at:at + len(piece) + TAG] as out:
                a.encrypt_into(nonce(first + i, first + i == total - 1), piece, None, out)
            return True

        _parallel(one, n)


def open_into(key: bytes, src, dst, first: int = 0, total: int | None = None) -> None:
    """Open the stream `src` into `dst` (`payload_size(len(src))` bytes); refuses any chunk that does not
    authenticate, naming it. `first`/`total` open a run of whole chunks of a longer stream."""
    from cryptography.exceptions import InvalidTag

    a = aead(key)
    bad: list[int] = []
    with memoryview(src) as s0, memoryview(dst) as d0, s0.cast("B") as src, d0.cast("B") as dst:
        n = -(-len(src) // (CHUNK + TAG))
        if total is None:
            total = n
            payload_size(len(src))
        if len(dst) != len(src) - n * TAG:
            raise StreamError(f"an encrypted stream of {len(src):,} bytes does not hold {len(dst):,} payload bytes")

        def one(i: int) -> bool:
            with src[i * (CHUNK + TAG):(i + 1) * (CHUNK + TAG)] as piece, \
                    dst[i * CHUNK:i * CHUNK + len(piece) - TAG] as out:
                try:
                    a.decrypt_into(nonce(first + i, first + i == total - 1), piece, None, out)
                except InvalidTag:
                    return False
            return True

        bad = [first + i for i, ok in zip(range(n), _parallel(one, n)) if not ok]
    if bad:
        raise StreamError(f"encrypted chunk {bad[0]} does not authenticate")


class Writer:
    """A stream written front to back to the binary file `out`: `write` pieces of any size, `close` seals the
    last chunk (flagged). Encrypted bundles, backups and sealed artifacts all write through it.

    Whole chunks are sealed straight from what `write` is given, `batch` at a time on every core; only the
    pieces of a chunk (small writes, and the ends of large ones) are copied, into a batch that is sealed once
    it is full. A chunk is sealed only once a byte after it has arrived, so the last chunk (flagged) holds at
    least one byte unless the payload is empty. Every batch but a lone last one is written by a thread of the
    writer's own while the next is sealed, so the file's writes overlap the sealing and the caller's own
    work; `close` (or `abandon`, when the stream is given up) waits for the last of them, and a write that
    failed raises at the next call and at every one after. As a context manager it closes when its block
    ends, or abandons the stream when the block raises."""

    def __init__(self, out, key: bytes, batch: int = BATCH):
        self._aead_key = key
        self._out = out
        self._cap = max(1, batch) * CHUNK
        self._plain = bytearray()  # pieces of the next batch, copied
        self._fill = 0  # bytes of _plain in use (always less than a chunk past a whole chunk, or _cap)
        self._outs = [bytearray(), bytearray()]  # sealed batches: one being written while the other is sealed
        self._turn = 0
        self._inflight = None  # the write of a sealed batch still running (a Future)
        self._thread = None  # this writer's thread, made when a batch that is not the last is sealed
        self._n = 0  # chunks sealed
        self._size = 0  # payload bytes given
        self._closed = False
        self._failed: BaseException | None = None  # a write that failed: the stream is broken for good

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self.close()
        finally:
            self.abandon()  # a failed block, or a failed close: nothing left writing, no batch held

    def tell(self) -> int:
        """Payload bytes written so far."""
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data) -> int:
        if self._closed:
            raise ValueError("write to a closed stream writer")
        if self._failed is not None:
            raise self._failed
        with memoryview(data) as v0, v0.cast("B") as view:
            n, pos = len(view), 0
            while pos < n:
                if self._fill == self._cap:  # a full batch, and more bytes follow: none of it is the last
                    self._seal_buffered(last=False)
                elif self._fill % CHUNK == 0 and n - pos > CHUNK:  # whole chunks, and more after them
                    if self._fill:
                        self._seal_buffered(last=False)
                    k = min(self._cap, (n - pos - 1) // CHUNK * CHUNK)
                    with view[pos:pos + k] as piece:
                        self._seal(piece, last=False)
                    pos += k
                else:  # a piece of a chunk: copied, up to the chunk's end when whole ones follow it
                    k = min(self._cap - self._fill, n - pos)
                    if n - pos > CHUNK:
                        k = min(k, CHUNK - self._fill % CHUNK)
                    with view[pos:pos + k] as piece:
                        self._plain[self._fill:self._fill + k] = piece
                    self._fill += k
                    pos += k
            self._size += n
            return n

    def close(self) -> None:
        """Seal what is left as the last chunk(s) and wait until everything is written."""
        if self._closed:
            return
        if self._failed is not None:
            raise self._failed
        self._seal_buffered(last=True)
        self._closed = True
        self._finish()

    def abandon(self) -> None:
        """Stop without sealing the rest (the stream is being given up): waits for a write still running, so
        that nothing writes to `out` once this returns, and lets the buffers go."""
        self._closed = True
        try:
            self._finish()
        except Exception:  # noqa: BLE001 - the stream is given up: the caller's own error is the one to see
            pass

    def _seal_buffered(self, last: bool) -> None:
        with memoryview(self._plain) as plain, plain[:self._fill] as piece:
            self._seal(piece, last)
        self._fill = 0

    def _seal(self, piece, last: bool) -> None:
        k = chunks(len(piece)) if last else len(piece) // CHUNK
        size = len(piece) + k * TAG
        out = self._outs[self._turn]  # not the one being written
        if len(out) < size:
            out = self._outs[self._turn] = bytearray(size)
        with memoryview(out) as o, o[:size] as sealed:
            seal_into(self._aead_key, piece, sealed, self._n, self._n + k + (not last))
        self._n += k
        self._wait()
        if last and self._thread is None:  # the only batch: written here, no thread needed
            try:
                self._out.write(memoryview(out)[:size])
            except BaseException as e:
                self._failed = e
                raise
            return
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-write")
        self._inflight = self._thread.submit(self._out.write, memoryview(out)[:size])
        self._turn ^= 1

    def _wait(self) -> None:
        if self._inflight is not None:
            done, self._inflight = self._inflight, None
            try:
                done.result()  # a failed write raises here, and at every later write or close
            except BaseException as e:
                self._failed = e
                raise

    def _finish(self) -> None:
        try:
            self._wait()
        finally:
            if self._thread is not None:
                self._thread.shutdown(wait=True)
                self._thread = None
            self._plain, self._outs = bytearray(), [bytearray(), bytearray()]  # a closed writer holds no batch
