"""The encrypted bundle stream opened a batch of chunks at a time, in parallel (bundles/crypt.py on
bundles/stream.py): the same bytes as the one-chunk-at-a-time construction it replaced, and every refusal
of that reader kept, wherever in a batch the damage lies.

Small batches (2-4 chunks of 1 MiB) put batch boundaries a few MiB apart, so each case is cheap.
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
from pathlib import Path

import pytest

from bundles import container, crypt, stream
from bundles.digest import CHUNK as LEAF
from bundles.digest import TreeHasher, root
from bundles.errors import BundleError
from bundles.keys import SecretKey
from bundles.trust import Trusted, TrustStore

C, S = crypt.CHUNK, crypt.SEALED
KEY, NONCE = bytes(range(32)), bytes(range(100, 116))


def old_seal(payload: bytes, file_key: bytes = KEY, nonce: bytes = NONCE) -> bytes:
    """The sequential writer this stream replaced, as it was (one chunk at a time, one byte kept back)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=nonce, info=b"appliance-bundle-v1 payload").derive(file_key)
    a, out, n, buf = ChaCha20Poly1305(key), [], 0, payload
    while len(buf) > C:
        out.append(a.encrypt(n.to_bytes(11, "big") + b"\x00", buf[:C], None))
        buf, n = buf[C:], n + 1
    out.append(a.encrypt(n.to_bytes(11, "big") + b"\x01", buf, None))
    return b"".join(out)


def seal(payload: bytes, batch: int = 3, pieces: int = 1) -> bytes:
    out = io.BytesIO()
    w = crypt.EncryptingWriter(out, KEY, NONCE, batch=batch)
    step = -(-len(payload) // pieces) or 1
    for at in range(0, len(payload), step):
        w.write(payload[at:at + step])
    w.close()
    return out.getvalue()


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def reader(sealed: bytes, tmp_path: Path | None, batch: int) -> crypt.DecryptingReader:
    """On a regular file (positioned reads in parallel) when `tmp_path`, else on BytesIO (read in turn)."""
    if tmp_path is None:
        return crypt.DecryptingReader(io.BytesIO(sealed), KEY, NONCE, batch=batch)
    p = tmp_path / "stream"
    p.write_bytes(b"HEAD" + sealed)
    f = open(p, "rb")
    assert f.read(4) == b"HEAD"  # the stream starts where the file object stands, past its buffer
    return crypt.DecryptingReader(f, KEY, NONCE, batch=batch)


def open_all(sealed: bytes, tmp_path: Path | None, batch: int, how: str = "readinto") -> bytes:
    r = reader(sealed, tmp_path, batch)
    if how == "read":
        out = r.read(-1)
    else:
        buf = bytearray(5 * C + 3)  # room for some batches whole, not for others: both paths taken
        parts = []
        while k := r.readinto(buf):
            parts.append(bytes(buf[:k]))
        out = b"".join(parts)
    assert r.at_end() and r.read(1) == b""
    return out


def test_the_format_is_pinned():
    """Bytes written before this change still open, and the writer writes them again byte for byte."""
    data = bytes(i * 7 % 251 for i in range(3 * C + 1000))
    old = old_seal(data)
    # computed with the sequential EncryptingWriter of bundles/crypt.py as of commit 28cf78e
    assert hashlib.sha256(old).hexdigest() == "cd9370139498e939b3535bcfb30b97cd7d4822f54fa136384502a43231b197dd"
    assert len(old) == stream.sealed_size(len(data)) == 3146792
    assert seal(data, batch=2) == old
    assert open_all(old, None, batch=2) == data


@pytest.mark.parametrize("size", [0, 1, C - 1, C, C + 1, 3 * C, 3 * C + 1, 4 * C - 1, 7 * C + 5])
def test_same_bytes_as_the_sequential_writer(size):
    data = payload(size, size)
    old = old_seal(data)
    for batch, pieces in ((3, 1), (3, 5), (1, 3), (crypt.BATCH, 2)):
        assert seal(data, batch, pieces) == old, (batch, pieces)


def test_pieces_of_every_size_give_the_same_bytes():
    """Writes smaller than a chunk are copied into the batch, larger ones sealed straight from the caller's
    buffer in whole chunks, the two mixed across chunk and batch boundaries: the stream is the same."""
    data = payload(9 * C + 11, 99)
    old = old_seal(data)
    rng = random.Random(7)
    for batch in (1, 2, 3):
        for _ in range(6):
            out, at = io.BytesIO(), 0
            w = crypt.EncryptingWriter(out, KEY, NONCE, batch=batch)
            while at < len(data):
                n = rng.choice((1, 511, C - 1, C, C + 1, 2 * C + 3, 5 * C))
                w.write(memoryview(data)[at:at + n])
                at += n
            w.close()
            assert out.getvalue() == old, batch


class _FailsAfter(io.BytesIO):
    def __init__(self, writes: int):
        super().__init__()
        self.left = writes

    def write(self, b) -> int:
        self.left -= 1
        if self.left < 0:
            raise OSError(28, "No space left on device")
        return super().write(b)


def test_a_write_that_fails_behind_the_sealing_is_raised():
    """Batches past the first are written by the writer's own thread: a failure there (a full disk) is raised
    to the caller by a later write or by close, never lost."""
    for writes in (0, 1, 2):
        w = crypt.EncryptingWriter(_FailsAfter(writes), KEY, NONCE, batch=1)
        with pytest.raises(OSError, match="No space"):
            for _ in range(6):
                w.write(payload(C, 1))
            w.close()
        with pytest.raises(OSError, match="No space"):
            w.close()  # the stream is broken for good: never closed as if whole
        w.abandon()  # once given up, nothing is left running
        assert w._thread is None and w._inflight is None


def test_a_closed_writer_holds_no_batch():
    """An import seals many files in turn and keeps their writers until it ends: a closed one lets its buffers
    go, or memory would grow by three batches a file."""
    w = crypt.EncryptingWriter(io.BytesIO(), KEY, NONCE, batch=2)
    w.write(payload(5 * C + 3, 5))
    w.close()
    assert len(w._plain) == 0 and [len(b) for b in w._outs] == [0, 0]


@pytest.mark.parametrize("size", [0, 5, C, 2 * C, 6 * C, 6 * C + 7])
def test_round_trip_every_way_of_reading(tmp_path, size):
    data = payload(size, size)
    sealed = old_seal(data)
    for batch in (2, 3, 16):
        for where in (None, tmp_path):
            assert open_all(sealed, where, batch) == data
            assert open_all(sealed, where, batch, "read") == data
    r = reader(sealed, tmp_path, 3)  # small reads, as tarfile does in restore
    got = b"".join(iter(lambda: r.read(10240), b""))
    assert got == data and r.at_end()


def test_writer_checks_its_phase():
    w = crypt.EncryptingWriter(io.BytesIO(), KEY, NONCE)
    w.write(b"x")
    w.close()
    w.close()  # once only: a second close does not add another last chunk
    with pytest.raises(ValueError, match="closed"):
        w.write(b"y")


TEN = payload(10 * C + 123, 10)  # 11 chunks: with batch 4, batches open 3 chunks and hold one back


def refused(sealed: bytes, match: str, tmp_path: Path, batch: int = 4) -> None:
    for where in (None, tmp_path):
        for how in ("readinto", "read"):
            with pytest.raises(BundleError, match=match):
                open_all(sealed, where, batch, how)


@pytest.mark.parametrize("chunk", [0, 4, 5, 10])
def test_a_chunk_altered_anywhere_in_a_batch_is_named(tmp_path, chunk):
    sealed = bytearray(old_seal(TEN))
    sealed[chunk * S + 50] ^= 1
    refused(bytes(sealed), f"encrypted chunk {chunk} of the bundle does not authenticate", tmp_path)
    sealed[chunk * S + 50] ^= 1
    sealed[chunk * S + min(S, len(sealed) - chunk * S) - 1] ^= 1  # the tag
    refused(bytes(sealed), f"encrypted chunk {chunk} of the bundle does not authenticate", tmp_path)


@pytest.mark.parametrize("chunks", [1, 3, 4, 6, 8, 10])
def test_a_stream_cut_at_a_chunk_or_batch_boundary(tmp_path, chunks):
    """Whole chunks, none flagged last: what a copy that stopped early leaves. 3, 6: where a batch of 4
    ends its opened chunks; 4, 8: where a read of 4 chunks ends."""
    refused(old_seal(TEN)[:chunks * S], r"truncated \(its encrypted stream ends without its last chunk\)", tmp_path)


def test_a_stream_cut_inside_a_chunk(tmp_path):
    sealed = old_seal(TEN)
    for at in (5 * S + 100, len(sealed) - 1, 5):
        refused(sealed[:at], "does not authenticate", tmp_path)


@pytest.mark.parametrize("extra", [b"\0", b"x" * 15, b"x" * 16, b"x" * (S + 1)])
def test_bytes_appended_are_refused(tmp_path, extra):
    exact = old_seal(payload(8 * C, 8))  # the last chunk is whole: bytes after it must not pass as more stream
    refused(exact + extra, "bytes after its last encrypted chunk", tmp_path)
    refused(old_seal(TEN) + extra, "chunk 10 of the bundle does not authenticate", tmp_path)


def test_a_last_chunk_repeated_or_moved_is_refused(tmp_path):
    sealed = old_seal(payload(8 * C, 8))
    chunks = [sealed[i:i + S] for i in range(0, len(sealed), S)]
    refused(b"".join(chunks + chunks[-1:]), "bytes after its last encrypted chunk", tmp_path)
    refused(b"".join(chunks[:2] + chunks[-1:] + chunks[2:-1]), "encrypted chunk 2 of the bundle does not", tmp_path)
    refused(b"".join(chunks[:3] + chunks[4:]), "encrypted chunk 3 of the bundle does not authenticate", tmp_path)


def test_another_key_opens_nothing(tmp_path):
    other = old_seal(TEN, file_key=bytes(32))
    refused(other, "encrypted chunk 0 of the bundle does not authenticate", tmp_path)


def test_a_bundle_altered_past_its_first_batch(tmp_path):
    """The real verify path, default batch: chunks past the first batch are checked, and named."""
    key, edge = SecretKey.generate("a"), SecretKey.generate("edge")
    trust = TrustStore([Trusted("a", key.public, ("model",))])
    src = tmp_path / "w.bin"
    src.write_bytes(payload((crypt.BATCH + 3) * C, 1))
    p = tmp_path / "e.bundle"
    container.create(p, "model", "x", 1, [("w.bin", src)], key, None, [edge.public])
    got: dict = {}
    container.verify(p, trust, [edge], collect=got)
    assert got["w.bin"] == src.read_bytes()
    raw = bytearray(p.read_bytes())
    start = len(container.ENC_MAGIC) + 8 + struct.unpack("<Q", raw[len(container.ENC_MAGIC):][:8])[0]
    for chunk in (crypt.BATCH - 1, crypt.BATCH + 1):
        raw[start + chunk * S + 7] ^= 4
        p.write_bytes(raw)
        with pytest.raises(BundleError, match=f"encrypted chunk {chunk} of the bundle does not authenticate"):
            container.verify(p, trust, [edge])
        raw[start + chunk * S + 7] ^= 4


def test_leaves_hash_in_parallel_to_the_same_digest():
    data = payload(3 * LEAF + 12345, 3)
    want = root(len(data), [hashlib.sha256(data[i:i + LEAF]).digest() for i in range(0, len(data), LEAF)])
    rng = random.Random(0)
    for pool in (None, stream.pool()):
        h, at = TreeHasher(pool), 0
        while at < len(data):
            k = rng.choice([1, 1000, LEAF // 3, LEAF, 2 * LEAF + 5])
            h.update(memoryview(data)[at:at + k])
            at += k
        assert h.digest() == want


def enc_bundle(tmp_path: Path, size: int):
    key, edge = SecretKey.generate("a"), SecretKey.generate("edge")
    trust = TrustStore([Trusted("a", key.public, ("model",))])
    (tmp_path / "w.bin").write_bytes(payload(size, 2))
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "c.json").write_bytes(b'{"a": 1}')
    p = tmp_path / "e.bundle"
    files = [("c.json", tmp_path / "c.json"), ("w.bin", tmp_path / "w.bin"), ("empty", tmp_path / "empty")]
    container.create(p, "model", "x", 1, files, key, None, [edge.public])
    raw = p.read_bytes()
    start = len(container.ENC_MAGIC) + 8 + struct.unpack("<Q", raw[len(container.ENC_MAGIC):][:8])[0]
    return p, trust, edge, raw, start


def test_verify_only_opens_in_parallel_and_refuses_as_before(tmp_path, monkeypatch):
    """`verify` without unpacking opens and hashes runs of leaves on every core; anything amiss sends it to
    the in-order path, which names the fault as before."""
    b = crypt.BATCH  # damage past the first batch, which opening the bundle reads (and checks) already
    p, trust, edge, raw, start = enc_bundle(tmp_path, (b + 6) * C + 77)
    in_order = []
    real = container._stream
    monkeypatch.setattr(container, "_stream", lambda *a, **k: (in_order.append(1), real(*a, **k))[1])
    assert container.verify(p, trust, [edge]).encrypted and in_order == []  # the parallel path passed it
    cases = [(b + 2, None, f"encrypted chunk {b + 2} of the bundle does not authenticate"),  # inside w.bin
             (b + 6, None, f"encrypted chunk {b + 6} of the bundle does not authenticate"),  # the last chunk
             (None, raw[:start + (b + 3) * S], r"truncated \(its encrypted stream ends without its last chunk\)"),
             (None, raw + b"\0", f"chunk {b + 6} of the bundle does not authenticate"),
             (None, raw + raw[-S:], "does not authenticate|after its last")]
    for chunk, data, match in cases:
        if chunk is not None:
            data = bytearray(raw)
            data[start + chunk * S + 40] ^= 0x10
        p.write_bytes(data)
        with pytest.raises(BundleError, match=match):
            container.verify(p, trust, [edge])
    assert len(in_order) == len(cases)


def test_verify_only_checks_every_digest(tmp_path):
    """Content changed under a valid encryption (a recipient holds the file key and can re-encrypt): every
    chunk opens, so the digests alone catch it."""
    import base64
    import json

    p, trust, edge, raw, start = enc_bundle(tmp_path, 3 * LEAF + 5)
    eh = json.loads(raw[len(container.ENC_MAGIC) + 8:start])
    file_key, nonce = crypt.unwrap(eh["recipients"], [edge]), base64.b64decode(eh["nonce"])
    inner = bytearray(crypt.DecryptingReader(io.BytesIO(raw[start:]), file_key, nonce).read(-1))
    inner[-(LEAF + 100)] ^= 1  # inside w.bin's last whole leaf
    out = io.BytesIO()
    w = crypt.EncryptingWriter(out, file_key, nonce)
    w.write(inner)
    w.close()
    p.write_bytes(raw[:start] + out.getvalue())
    with pytest.raises(BundleError, match=r"1 file\(s\) changed: w.bin"):
        container.verify(p, trust, [edge])
