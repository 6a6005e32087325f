"""One file per bundle: create it, open it, verify it, unpack it.

Plain layout: MAGIC, u64 header length, header JSON {"manifest": canonical manifest text, "signature"},
then every file's bytes in manifest order, and nothing after. Encrypted layout: ENC_MAGIC, u64 header
length, header JSON {"recipients", "nonce", "chunk"}, then the plain layout as an encrypted stream.
The signature is Ed25519 over a domain tag and the exact manifest bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from bundles import crypt, digest, manifest, safefile, stream
from bundles.digest import ALGORITHM, LeafHasher, TreeHasher, digest_file, digest_range
from bundles.errors import BundleError
from bundles.keys import PublicKey, SecretKey, b64, unb64
from bundles.trust import Trusted, TrustStore

MAGIC = b"APPLIANCE-BUNDLE-1\n"
ENC_MAGIC = b"APPLIANCE-BUNDLE-1-ENC\n"
SIGN_DOMAIN = b"appliance-bundle-manifest-v1\x00"
MAX_HEADER = 64 << 20
DEFAULT_MAX_SIZE = 1 << 40
COPY = 4 << 20


@dataclass
class Opened:
    path: Path
    encrypted: bool
    manifest: dict
    manifest_bytes: bytes
    signature: bytes
    data_offset: int = 0  # plain bundles: where the first file starts
    recipients: list[str] = field(default_factory=list)
    reader: crypt.DecryptingReader | None = None
    handle: BinaryIO | None = None

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


@dataclass
class Verified:
    manifest: dict
    signer: Trusted
    size: int
    encrypted: bool
    manifest_sha256: str = ""  # identifies the release: the signed bytes name every file's digest


def create(out: Path, kind: str, name: str, version: int, files: list[tuple[str, Path | bytes]], signer: SecretKey,
           lineage: dict | None = None, recipients: list[PublicKey] | None = None, expires_days: float = 365,
           progress: Callable[[int], None] = lambda n: None) -> dict:
    """Write a signed (and, with recipients, encrypted) bundle of `files`: (bundle path, source file or bytes).

    Bytes never touch the disk but inside the bundle: with recipients, only encrypted."""
    now = datetime.now(UTC).replace(microsecond=0)
    entries = []
    with ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 32))) as pool:
        for rel, src in files:
            if isinstance(src, bytes):
                h = TreeHasher()
                h.update(src)
                entries.append({"path": rel, "type": "file", "size": len(src), "digest": str(h.digest())})
                continue
            if not os.path.isfile(src) or os.path.islink(src):
                raise BundleError(f"{src} is not a regular file", "bundles carry regular files only")
            entries.append({"path": rel, "type": "file", "size": os.lstat(src).st_size,
                            "digest": str(digest_file(src, pool))})
    m = {"format": manifest.FORMAT, "kind": kind, "name": name, "version": version, "created": now.isoformat(),
         "expires": (now + timedelta(days=expires_days)).isoformat(), "signer": signer.public.key_id,
         "digest": ALGORITHM, "files": entries, "lineage": lineage or {},
         "recipients": sorted(r.key_id for r in recipients or [])}
    manifest.check(m, DEFAULT_MAX_SIZE)
    mbytes = manifest.canonical(m)
    header = manifest.canonical({"manifest": mbytes.decode(), "signature": b64(signer.sign(SIGN_DOMAIN + mbytes))})
    out.parent.mkdir(parents=True, exist_ok=True)
    with safefile.atomic_create(out, 0o600) as f:
        sink: contextlib.AbstractContextManager = contextlib.nullcontext(f)
        if recipients:
            key, nonce = crypt.new_key_and_nonce()
            eh = crypt.seal_header({"recipients": crypt.wrap(key, recipients), "nonce": b64(nonce),
                                    "chunk": crypt.CHUNK}, key)
            f.write(ENC_MAGIC + struct.pack("<Q", len(eh)) + eh)
            sink = crypt.EncryptingWriter(f, key, nonce)  # closed with the block, abandoned if the export fails
        with sink as w:
            w.write(MAGIC + struct.pack("<Q", len(header)) + header)
            for (_, src), e in zip(files, entries):
                if isinstance(src, bytes):
                    w.write(src)
                    progress(len(src))
                    continue
                h = TreeHasher()
                with open(src, "rb") as s:
                    while chunk := s.read(COPY):
                        h.update(chunk)
                        w.write(chunk)
                        progress(len(chunk))
                if str(h.digest()) != e["digest"] or h.size != e["size"]:
                    raise BundleError(f"{src} changed while it was being bundled", "run the export again")
    return m


def open_bundle(path: Path, identities: list[SecretKey] | None = None) -> Opened:
    """Read the header (decrypting with one of `identities` when the bundle is encrypted)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise BundleError(f"{path} does not exist", "check the path") from None
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror}", "check the path and its permissions") from None
    try:
        head = f.read(len(ENC_MAGIC))
        if head == ENC_MAGIC:
            eh = _header(f.read, "encryption header")
            if eh.get("chunk") != crypt.CHUNK:
                raise BundleError(f"unsupported encryption chunk size {eh.get('chunk')!r}", "the bundle is damaged")
            recips = [str(s.get("key_id")) for s in eh.get("recipients", []) if isinstance(s, dict)]
            if not identities:
                raise BundleError(f"this bundle is encrypted (to {', '.join(recips)})",
                                  "it needs a secret key it was encrypted to")
            file_key = crypt.unwrap(eh.get("recipients"), identities)
            crypt.check_header(eh, file_key)  # every byte of the encryption header is authenticated
            reader = crypt.DecryptingReader(f, file_key, unb64(eh.get("nonce"), "encryption nonce"))
            if reader.read(len(MAGIC)) != MAGIC:
                raise BundleError("the decrypted bundle is not a bundle", "the bundle is damaged")
            o = _parse(path, _header(reader.read, "header"), True)
            o.recipients, o.reader, o.handle = recips, reader, f
            if sorted(recips) != o.manifest.get("recipients"):
                raise BundleError("the bundle was re-encrypted: its recipients are not the ones its signer chose",
                                  "ask the signer for a bundle encrypted to your key")
            return o
        if not head.startswith(MAGIC):
            raise BundleError(f"{path} is not an appliance bundle", "pass a file written by `appliance bundle export`")
        f.seek(len(MAGIC))
        o = _parse(path, _header(f.read, "header"), False)
        o.data_offset = f.tell()
        o.handle = f
        if o.manifest.get("recipients"):
            raise BundleError("the bundle was signed to be encrypted but arrives in the clear",
                              "it was decrypted and re-packed on the way; refuse it")
        return o
    except BaseException:
        f.close()
        raise


def _header(read: Callable[[int], bytes], what: str) -> dict:
    raw = read(8)
    if len(raw) != 8:
        raise BundleError(f"the bundle is truncated (in its {what})", "copy the file again")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER:
        raise BundleError(f"the bundle's {what} claims {n:,} bytes", "the bundle is damaged")
    data = read(n)
    if len(data) != n:
        raise BundleError(f"the bundle is truncated (in its {what})", "copy the file again")
    try:
        h = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BundleError(f"the bundle's {what} is not valid JSON", "the bundle is damaged") from None
    if not isinstance(h, dict) or manifest.canonical(h) != data:
        raise BundleError(f"the bundle's {what} is not in canonical form", "the bundle was altered or damaged")
    return h


def _parse(path: Path, h: dict, encrypted: bool) -> Opened:
    if not isinstance(h.get("manifest"), str):
        raise BundleError("the bundle has no manifest", "the bundle is damaged")
    try:
        mbytes = h["manifest"].encode()
    except UnicodeEncodeError:
        raise BundleError("the manifest is not valid text", "the bundle is damaged") from None
    sig = unb64(h.get("signature"), "signature")
    return Opened(path, encrypted, manifest.parse(mbytes), mbytes, sig)


def check_signature(o: Opened, trust: TrustStore) -> Trusted:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    signer = trust.signer(str(o.manifest.get("signer")), str(o.manifest.get("kind")))
    try:
        Ed25519PublicKey.from_public_bytes(signer.key.ed25519).verify(o.signature, SIGN_DOMAIN + o.manifest_bytes)
    except (InvalidSignature, ValueError):
        raise BundleError(f"the manifest's signature does not verify with {signer.name}'s key",
                          "the manifest was changed after signing, or the bundle is forged") from None
    return signer


def check_policy(m: dict, now: datetime | None, last_version: int | None, allow_downgrade: bool) -> None:
    now = now or datetime.now(UTC)
    if now >= manifest.utc(m["expires"], "expires"):
        raise BundleError(f"bundle {m['name']} v{m['version']} expired on {m['expires']}",
                          "ask the sender for a fresh export")
    if last_version is not None and m["version"] <= last_version and not allow_downgrade:
        raise BundleError(f"bundle {m['name']} v{m['version']} is not newer than v{last_version}, the last one "
                          "imported", "an older release replayed is refused; --allow-downgrade overrides it "
                                      "(audited)")


@dataclass
class Plan:
    """What to do with a bundle, decided from its verified manifest (never from a second read)."""

    last_version: int | None = None
    unpack_to: Path | None = None
    collect: dict | None = None
    before_publish: Callable[[], None] | None = None  # runs after every check, before the files appear
    # Or each file's bytes into `sink(path)` (an object with write and close) as they are read, then
    # `publish()` once every byte checked, `discard()` on any failure: a receiver that writes them its own way
    # (the appliance seals them into its artifacts as they stream, holding none of them in memory).
    sink: Callable[[str], object] | None = None
    publish: Callable[[], None] | None = None
    discard: Callable[[], None] | None = None


def verify(path: Path, trust: TrustStore, identities: list[SecretKey] | None = None, now: datetime | None = None,
           last_version: int | None = None, allow_downgrade: bool = False, max_size: int = DEFAULT_MAX_SIZE,
           unpack_to: Path | None = None, collect: dict | None = None,
           decide: Callable[[dict, Trusted], Plan] | None = None) -> Verified:
    """Signature, trust, manifest, expiry, rollback, sizes and every digest, from one open of the file.

    With `unpack_to`, also write the files there (a temp directory renamed in only when everything
    checked); with `collect`, put them in that dict (path -> bytes) instead, for content that must not
    touch the disk. `decide` chooses these from the signed, checked manifest.
    """
    o = open_bundle(path, identities)
    try:
        signer = check_signature(o, trust)
        total = manifest.check(o.manifest, max_size)
        plan = decide(o.manifest, signer) if decide else Plan(last_version, unpack_to, collect)
        try:
            check_policy(o.manifest, now, plan.last_version, allow_downgrade)
        except BaseException:
            if plan.discard is not None:
                plan.discard()
            raise
        only_verify = plan.unpack_to is None and plan.collect is None and plan.sink is None
        if only_verify and not o.encrypted:
            _verify_plain(o, total)  # raises on any fault
        if not only_verify or (o.encrypted and not _verify_sealed(o, total)):
            # unpacking, or an encrypted bundle the parallel check did not pass: this path names the fault
            _stream(o, total, plan.unpack_to, plan.collect, plan.before_publish, plan)
        elif plan.before_publish is not None:
            plan.before_publish()
        return Verified(o.manifest, signer, total, o.encrypted, hashlib.sha256(o.manifest_bytes).hexdigest())
    finally:
        o.close()


def _verify_plain(o: Opened, total: int) -> None:
    size = os.fstat(o.handle.fileno()).st_size
    if size < o.data_offset + total:
        raise BundleError(f"the bundle is truncated ({size:,} of {o.data_offset + total:,} bytes)",
                          "copy the file again")
    if size > o.data_offset + total:
        raise BundleError(f"the bundle has {size - o.data_offset - total:,} bytes more than its manifest lists",
                          "the file was extended or altered")
    changed = []
    offset = o.data_offset
    with ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 32))) as pool:
        for e in o.manifest["files"]:
            try:
                got = str(digest_range(o.handle.fileno(), offset, e["size"], pool))
            except EOFError:
                raise BundleError("the bundle shrank while it was being verified", "copy it again") from None
            if got != e["digest"]:
                changed.append(e["path"])
            offset += e["size"]
    if changed:
        raise BundleError(f"{len(changed)} file(s) changed: {', '.join(changed[:5])}"
                          f"{', ...' if len(changed) > 5 else ''}", "the bundle was altered or damaged")


def _verify_sealed(o: Opened, total: int) -> bool:
    """Verify an encrypted bundle in a regular file on every core, as `_verify_plain` does a plain one.

    Each task takes a run of leaves of one file, reads and opens the chunks under them (a chunk between two
    runs is opened by both) and hashes the plaintext while it is in the core's cache. True when every chunk
    opened and every digest matched; False when the file is not a regular one or anything is amiss, so that
    `_stream` reads it in order and names the fault as it always has."""
    r = o.reader
    try:
        if r is None or r.payload_size() != r.tell() + total:
            return False
    except stream.StreamError:
        return False
    jobs = []  # (file index, its first byte in the stream, its size, first leaf, leaves)
    leaves = sum(-(-e["size"] // digest.CHUNK) for e in o.manifest["files"])
    group = max(1, min(4, leaves // (4 * stream.workers())))  # few chunks opened twice, every core busy
    at = r.tell()
    for k, e in enumerate(o.manifest["files"]):
        n = -(-e["size"] // digest.CHUNK)
        jobs += [(k, at, e["size"], i, min(group, n - i)) for i in range(0, n, group)]
        at += e["size"]

    def run(job: tuple[int, int, int, int, int]) -> list[bytes]:
        _, at, size, first, count = job
        h = LeafHasher()
        r.open_range(at + first * digest.CHUNK, at + min((first + count) * digest.CHUNK, size), h.update)
        return h.leaves()

    futures = [stream.pool().submit(run, job) for job in jobs]
    wait(futures)  # none still reading the file when it is closed or read again in order
    found: list[list[bytes]] = [[] for _ in o.manifest["files"]]
    try:
        for job, f in zip(jobs, futures):
            found[job[0]] += f.result()
    except stream.StreamError:
        return False
    return all(str(digest.root(e["size"], f)) == e["digest"] for e, f in zip(o.manifest["files"], found))


def _read_size() -> int:
    """How much `_stream` reads at once: whole leaves, about two for each core to hash in parallel (64-128 MiB)."""
    return min(16, max(8, 2 * stream.workers())) * digest.CHUNK


def _stream(o: Opened, total: int, dest: Path | None, collect: dict | None = None,
            before_publish: Callable[[], None] | None = None, plan: Plan | None = None) -> None:
    """Read every file front to back (decrypting if need be), hash it, and write it under a temp dir.

    Reads are large and start on a leaf of the file's digest tree, so an encrypted bundle's batches open
    straight into the read buffer and the leaves hash in parallel (both on `stream.pool()`)."""
    readinto = o.reader.readinto if o.reader else o.handle.readinto
    tmp = None
    if dest is not None:
        if os.path.lexists(dest):
            raise BundleError(f"{dest} already exists", "unpack into a new directory")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        changed = []
        got: dict[str, bytes] = {}
        with memoryview(bytearray(max(1, min(_read_size(), total)))) as buf:
            sink = plan.sink if plan is not None else None
            for e in o.manifest["files"]:
                out = _create(tmp, e["path"]) if tmp else None
                into = sink(e["path"]) if sink is not None else None
                kept = bytearray() if collect is not None else None
                h = TreeHasher(stream.pool())
                left = e["size"]
                while left:
                    with buf[:min(len(buf), left)] as piece:
                        if crypt.read_fully(readinto, piece) < len(piece):
                            raise BundleError(f"the bundle is truncated (inside {e['path']})", "copy the file again")
                        h.update(piece)
                        if out is not None:
                            _write_all(out, piece)
                        if into is not None:
                            into.write(piece)
                        if kept is not None:
                            kept += piece
                        left -= len(piece)
                if out is not None:
                    os.fsync(out)
                    os.close(out)
                if into is not None:
                    into.close()
                if str(h.digest()) != e["digest"]:
                    changed.append(e["path"])
                if kept is not None:
                    got[e["path"]] = bytes(kept)
        if o.reader is not None:
            if o.reader.read(1) or not o.reader.at_end():
                raise BundleError("the bundle has bytes more than its manifest lists", "the file was altered")
        elif o.handle.read(1):
            raise BundleError("the bundle has bytes more than its manifest lists", "the file was extended or altered")
        if changed:
            raise BundleError(f"{len(changed)} file(s) changed: {', '.join(changed[:5])}"
                              f"{', ...' if len(changed) > 5 else ''}", "the bundle was altered or damaged")
        if before_publish is not None:
            before_publish()
        if tmp is not None:
            if os.path.lexists(dest):
                raise BundleError(f"{dest} appeared while unpacking", "unpack into a new directory")
            os.rename(tmp, dest)
        if collect is not None:
            collect.update(got)  # only once every byte checked
        if plan is not None and plan.sink is not None and plan.publish is not None:
            plan.publish()
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if plan is not None and plan.discard is not None:
            plan.discard()
        raise


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked; what was hashed must be exactly what lands."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _create(root: Path, rel: str) -> int:
    """A new file at root/rel; never follows a link, never replaces anything (the manifest was checked)."""
    parent = root
    for part in rel.split("/")[:-1]:
        parent = parent / part
        if not parent.exists():
            os.mkdir(parent, 0o700)
        elif parent.is_symlink() or not parent.is_dir():
            raise BundleError(f"entry {rel!r} would pass through a non-directory", "the bundle is crafted")
    return os.open(root / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
