"""Encryption to recipients: a random file key wrapped for each X25519 recipient, the bytes streamed in
authenticated chunks (age's construction: ChaCha20-Poly1305 STREAM with a counter and a last-chunk flag).

Memory stays bounded by one chunk whatever the size; a chunk that was changed, dropped, reordered or
added fails its tag; a file cut short lacks the last-chunk flag; bytes after the last chunk are refused.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

from bundles.errors import BundleError
from bundles.keys import PublicKey, SecretKey, b64, unb64

CHUNK = 1 << 20
TAG = 16
_INFO_WRAP = b"appliance-bundle-v1 file key"
_INFO_PAYLOAD = b"appliance-bundle-v1 payload"


def _hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(secret)


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def wrap(file_key: bytes, recipients: list[PublicKey]) -> list[dict]:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    out = []
    for r in recipients:
        eph = X25519PrivateKey.generate()
        epk = eph.public_key().public_bytes_raw()
        shared = eph.exchange(X25519PublicKey.from_public_bytes(r.x25519))
        key = _hkdf(shared, epk + r.x25519, _INFO_WRAP)
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
                return ChaCha20Poly1305(_hkdf(shared, epk + mine, _INFO_WRAP)).decrypt(
                    b"\x00" * 12, unb64(s["wrapped"], "recipient"), None)
            except (InvalidTag, KeyError, ValueError):
                raise BundleError("the bundle's key for this recipient does not open",
                                  "the bundle was altered or damaged") from None
    ids = ", ".join(str(s.get("key_id")) for s in stanzas if isinstance(s, dict))
    raise BundleError(f"this bundle is encrypted to other recipients ({ids})",
                      "import it where one of those keys lives, or ask for a bundle encrypted to your key")


class EncryptingWriter:
    """Writes the header's nonce-derived stream to `out`; `close()` writes the last chunk."""

    def __init__(self, out: BinaryIO, file_key: bytes, nonce: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, _INFO_PAYLOAD))
        self._out = out
        self._buf = bytearray()
        self._n = 0

    def write(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) > CHUNK:  # keep at least one byte back: the last chunk must be flagged
            self._emit(bytes(self._buf[:CHUNK]), last=False)
            del self._buf[:CHUNK]

    def close(self) -> None:
        self._emit(bytes(self._buf), last=True)
        self._buf.clear()

    def _emit(self, chunk: bytes, last: bool) -> None:
        self._out.write(self._aead.encrypt(_nonce(self._n, last), chunk, None))
        self._n += 1


class DecryptingReader:
    """Plaintext of the stream, read front to back; refuses a cut, extended or altered stream."""

    def __init__(self, f: BinaryIO, file_key: bytes, nonce: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, _INFO_PAYLOAD))
        self._f = f
        self._buf = b""
        self._pos = 0
        self._n = 0
        self.done = False

    def read(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n and not self.done:
            self._buf = self._buf[self._pos:] + self._next()
            self._pos = 0
        out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def at_end(self) -> bool:
        return self.done and self._pos >= len(self._buf)

    def _next(self) -> bytes:
        from cryptography.exceptions import InvalidTag

        blob = self._f.read(CHUNK + TAG)
        if not blob:
            raise BundleError("the bundle is truncated (its encrypted stream ends without its last chunk)",
                              "copy the file again")
        for last in (False, True) if len(blob) == CHUNK + TAG else (True,):
            try:
                plain = self._aead.decrypt(_nonce(self._n, last), blob, None)
            except InvalidTag:
                continue
            self._n += 1
            if last:
                self.done = True
                if self._f.read(1):
                    raise BundleError("the bundle has bytes after its last encrypted chunk",
                                      "the file was extended or altered")
            return plain
        raise BundleError(f"encrypted chunk {self._n} of the bundle does not authenticate",
                          "the file was altered, cut or damaged")


_INFO_HEADER = b"appliance-bundle-v1 header"


def _header_mac(fields: dict, file_key: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes, hmac

    from bundles.manifest import canonical

    h = hmac.HMAC(_hkdf(file_key, b"", _INFO_HEADER), hashes.SHA256())
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
