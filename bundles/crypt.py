"""Encryption to recipients: a random file key wrapped for each X25519 recipient, the bytes streamed in
authenticated chunks (age's construction: ChaCha20-Poly1305 STREAM with a counter and a last-chunk flag,
`bundles.stream`).

Chunks are sealed and opened a batch at a time on every core (each chunk's nonce is its index), so memory
stays bounded by two batches whatever the size; a chunk that was changed, dropped, reordered or added fails
its tag; a file cut short lacks the last-chunk flag; bytes after the last chunk are refused.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable
from typing import BinaryIO

from bundles import stream
from bundles.errors import BundleError
from bundles.keys import PublicKey, SecretKey, b64, unb64

CHUNK = stream.CHUNK
TAG = stream.TAG
SEALED = CHUNK + TAG  # one chunk as it lies in the file
BATCH = stream.BATCH  # chunks per batch: enough to keep every core busy, <= 64 MiB
_INFO_WRAP = b"appliance-bundle-v1 file key"
_INFO_PAYLOAD = b"appliance-bundle-v1 payload"


def wrap(file_key: bytes, recipients: list[PublicKey]) -> list[dict]:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    out = []
    for r in recipients:
        eph = X25519PrivateKey.generate()
        epk = eph.public_key().public_bytes_raw()
        shared = eph.exchange(X25519PublicKey.from_public_bytes(r.x25519))
        key = stream.hkdf(shared, epk + r.x25519, _INFO_WRAP)
        out.append({"key_id": r.key_id, "epk": b64(epk),
                    "wrapped": b64(ChaCha20Poly1305(key).encrypt(b"\x00" * 12, file_key, None))})
    return out


def unwrap(stanzas: list, identities: list[SecretKey]) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    if not isinstance(stanzas, list) or not stanzas:
        raise BundleError("the encrypted bundle names no recipients", "the bundle is damaged")
    for ident in identities:
        me = X25519PrivateKey.from_private_bytes(ident.x25519)
        mine = me.public_key().public_bytes_raw()
        for s in stanzas:
            if not isinstance(s, dict) or s.get("key_id") != ident.public.key_id:
                continue
            try:
                epk = unb64(s["epk"], "recipient")
                shared = me.exchange(X25519PublicKey.from_public_bytes(epk))
                return ChaCha20Poly1305(stream.hkdf(shared, epk + mine, _INFO_WRAP)).decrypt(
                    b"\x00" * 12, unb64(s["wrapped"], "recipient"), None)
            except (InvalidTag, KeyError, ValueError):
                raise BundleError("the bundle's key for this recipient does not open",
                                  "the bundle was altered or damaged") from None
    ids = ", ".join(str(s.get("key_id")) for s in stanzas if isinstance(s, dict))
    raise BundleError(f"this bundle is encrypted to other recipients ({ids})",
                      "import it where one of those keys lives, or ask for a bundle encrypted to your key")


class EncryptingWriter(stream.Writer):
    """Writes the header's nonce-derived stream to `out` (`stream.Writer`: batches of `batch` chunks sealed on
    every core); `close()` writes the last chunk."""

    def __init__(self, out: BinaryIO, file_key: bytes, nonce: bytes, batch: int = BATCH):
        super().__init__(out, stream.hkdf(file_key, nonce, _INFO_PAYLOAD), batch)


class DecryptingReader:
    """Plaintext of the stream, read front to back; refuses a cut, extended or altered stream.

    The stream is read a batch of chunks at a time and opened in parallel, straight into the caller's buffer
    when `readinto` is given room for the whole batch, else into a batch buffer that `read` serves from.
    The last chunk read is held back until the bytes after it (or the end) show whether it is the last."""

    def __init__(self, f: BinaryIO, file_key: bytes, nonce: bytes, batch: int = BATCH):
        self._key = stream.hkdf(file_key, nonce, _INFO_PAYLOAD)
        self._f = f
        self._sealed = bytearray(max(2, batch) * SEALED)
        self._held = 0  # sealed bytes at the front of _sealed, read but not yet opened (one chunk at most)
        self._plain = bytearray()  # the batch buffer, allocated at its full size when first needed
        self._pos = self._end = 0  # _plain[_pos:_end] is opened and not yet read
        self._n = 0  # chunks opened
        self._told = 0  # plaintext bytes handed out
        self.done = False
        self._fd = None  # a regular file is read at `_off` by positioned reads in parallel, `f` kept in step
        try:
            if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                self._fd, self._off = f.fileno(), f.tell()
                self._start = self._off  # where the stream begins in the file
        except (AttributeError, OSError, ValueError):
            pass

    def tell(self) -> int:
        """Plaintext bytes read so far."""
        return self._told

    def read(self, n: int = -1) -> bytes:
        n = (1 << 62) if n is None or n < 0 else n
        parts = []
        while n and not self.at_end():
            if self._pos == self._end:
                self._next_batch(None)
                continue
            k = min(n, self._end - self._pos)
            with memoryview(self._plain) as plain:
                parts.append(bytes(plain[self._pos:self._pos + k]))
            self._pos += k
            self._told += k
            n -= k
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto(self, b) -> int:
        """Fill `b` (short only at the end of the stream); the number of bytes written."""
        with memoryview(b) as v0, v0.cast("B") as out:
            got = 0
            while got < len(out) and not self.at_end():
                if self._pos < self._end:
                    k = min(len(out) - got, self._end - self._pos)
                    with memoryview(self._plain) as plain:
                        out[got:got + k] = plain[self._pos:self._pos + k]
                    self._pos += k
                    got += k
                else:
                    with out[got:] as room:
                        got += self._next_batch(room)
            self._told += got
            return got

    def at_end(self) -> bool:
        return self.done and self._pos >= self._end

    def _next_batch(self, into: memoryview | None) -> int:
        """Read and open the next batch: into `into` when it fits (the bytes written), else into _plain (0)."""
        room = len(into) // CHUNK if into is not None else 0
        limit = len(self._sealed) if room < 1 else min(len(self._sealed), (room + 1) * SEALED)
        with memoryview(self._sealed) as sealed:
            with sealed[self._held:limit] as space:
                got = self._held + self._read_into(space)
            if got == 0:
                raise BundleError("the bundle is truncated (its encrypted stream ends without its last chunk)",
                                  "copy the file again")
            eof = got < limit
            n = -(-got // SEALED)
            count = n if eof else n - 1  # a full read holds its last chunk back: more may follow it
            size = got if eof else count * SEALED
            plain = size - count * TAG
            if size - (count - 1) * SEALED < TAG:
                self._refuse(sealed[:size], count, eof)
            direct = into is not None and plain <= len(into)
            if not direct and not self._plain:
                self._plain = bytearray(len(self._sealed) // SEALED * CHUNK)
            with memoryview(self._plain) as buf, (into if direct else buf)[:plain] as dst:
                try:
                    stream.open_into(self._key, sealed[:size], dst, self._n, self._n + n)
                except stream.StreamError:
                    self._refuse(sealed[:size], count, eof)
            self._n += count
            if eof:
                self.done, self._held = True, 0
            else:
                sealed[:SEALED] = sealed[size:size + SEALED]
                self._held = SEALED
        if direct:
            return plain
        self._pos, self._end = 0, plain
        return 0

    def payload_size(self) -> int | None:
        """The plaintext size the file's length gives (None unless a regular file); StreamError for a length no
        writer makes."""
        if self._fd is None:
            return None
        return stream.payload_size(os.fstat(self._fd).st_size - self._start)

    def open_range(self, start: int, stop: int, sink: Callable[[memoryview], object]) -> None:
        """Pass plaintext bytes [start, stop) of a stream in a regular file to `sink`, in order: each chunk is read
        at its place and opened on the calling thread, so callers run ranges in parallel (the chunks a range
        touches are authenticated, the last one by its flag). StreamError for any chunk that does not open.

        For a stream `payload_size` accepted; the reader's own position is left as it is."""
        length = os.fstat(self._fd).st_size - self._start
        size = stream.payload_size(length)
        if not 0 <= start <= stop <= size:
            raise stream.StreamError(f"bytes {start:,} to {stop:,} are not in a stream of {size:,}")
        from cryptography.exceptions import InvalidTag

        total, aead = stream.chunks(size), stream.aead(self._key)
        sealed, plain = bytearray(SEALED), bytearray(CHUNK)
        with memoryview(sealed) as sv, memoryview(plain) as pv:
            for c in range(start // CHUNK, -(-stop // CHUNK)):
                n = min(SEALED, length - c * SEALED)
                with sv[:n] as piece, pv[:n - TAG] as out:
                    try:  # on this thread: callers run ranges on the pool, which must not wait on itself
                        if _pread_fully(self._fd, piece, self._start + c * SEALED) < n:
                            raise InvalidTag
                        aead.decrypt_into(stream.nonce(c, c == total - 1), piece, None, out)
                    except InvalidTag:
                        raise stream.StreamError(f"encrypted chunk {c} does not authenticate") from None
                    with out[max(start - c * CHUNK, 0):stop - c * CHUNK] as wanted:
                        sink(wanted)

    def _read_into(self, view: memoryview) -> int:
        """Fill `view` from the file (short only at its end): a regular file in pieces read in parallel."""
        if self._fd is None:
            return read_fully(self._f.readinto, view)
        piece = 2 * SEALED

        def one(at: int) -> int:
            with view[at:at + piece] as part:
                return _pread_fully(self._fd, part, self._off + at)

        got = 0
        for at, k in zip(range(0, len(view), piece), stream.pool().map(one, range(0, len(view), piece))):
            got = at + k
            if k < min(piece, len(view) - at):
                break  # the file ends here
        self._off += got
        self._f.seek(self._off)
        return got

    def _refuse(self, sealed: memoryview, count: int, eof: bool):
        """Name what is wrong with a batch that did not open, as a one-chunk-at-a-time reader would."""
        for j in range(count):
            piece, i = sealed[j * SEALED:(j + 1) * SEALED], self._n + j
            final = eof and j == count - 1
            if self._opens(piece, i, final):
                continue
            if len(piece) == SEALED and self._opens(piece, i, not final):
                if final:
                    raise BundleError("the bundle is truncated (its encrypted stream ends without its last chunk)",
                                      "copy the file again")
                raise BundleError("the bundle has bytes after its last encrypted chunk",
                                  "the file was extended or altered")
            raise BundleError(f"encrypted chunk {i} of the bundle does not authenticate",
                              "the file was altered, cut or damaged")
        raise BundleError(f"encrypted chunks {self._n} to {self._n + count - 1} of the bundle do not authenticate",
                          "the file was altered, cut or damaged")  # each opens alone: not reached

    def _opens(self, piece: memoryview, i: int, last: bool) -> bool:
        try:
            stream.open_into(self._key, piece, bytearray(max(0, len(piece) - TAG)), i, i + 1 if last else i + 2)
        except stream.StreamError:
            return False
        return True


def read_fully(readinto, view: memoryview) -> int:
    """Read into all of `view` unless the file ends first; how many bytes were read."""
    got = 0
    while got < len(view):
        with view[got:] as rest:
            k = readinto(rest)
        if not k:
            break
        got += k
    return got


def _pread_fully(fd: int, view: memoryview, offset: int) -> int:
    got = 0
    while got < len(view):
        with view[got:] as rest:
            k = os.preadv(fd, [rest], offset + got)
        if not k:
            break
        got += k
    return got


_INFO_HEADER = b"appliance-bundle-v1 header"


def _header_mac(fields: dict, file_key: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes, hmac

    from bundles.manifest import canonical

    h = hmac.HMAC(stream.hkdf(file_key, b"", _INFO_HEADER), hashes.SHA256())
    h.update(canonical({k: v for k, v in fields.items() if k != "mac"}))
    return h.finalize()


def seal_header(fields: dict, file_key: bytes) -> bytes:
    """The encryption header as canonical JSON with a MAC under the file key over all its other fields."""
    from bundles.manifest import canonical

    return canonical({**fields, "mac": b64(_header_mac(fields, file_key))})


def check_header(fields: dict, file_key: bytes) -> None:
    from cryptography.hazmat.primitives import constant_time

    if not constant_time.bytes_eq(_header_mac(fields, file_key), unb64(fields.get("mac"), "header MAC")):
        raise BundleError("the encryption header was altered", "the bundle was altered or damaged")


def new_key_and_nonce() -> tuple[bytes, bytes]:
    return os.urandom(32), os.urandom(16)


def pack_len(n: int) -> bytes:
    return struct.pack("<Q", n)
