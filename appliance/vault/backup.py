"""Backup and restore of a whole home: the vault, its wrapped keys, the models and everything made from them.

A backup file is

    MAGIC | u64 header length | header (canonical JSON) | encrypted stream

The header carries the keyring as it is on disk (keys wrapped under the passphrase: nothing secret in the
clear), the vault id, the time and a random nonce, with a MAC under the backup key. The stream is a tar of
the home, encrypted in authenticated chunks (the bundles' STREAM construction) under a key derived from the
vault's data key and the nonce: so restoring needs the passphrase and nothing else, and a changed, cut or
extended file is refused. The tar ends with a manifest of every file's SHA-256, checked as files land.

The database is copied while this process holds it attached, after a CHECKPOINT: no other process can
write it meanwhile, so the copy is consistent. Restoring unpacks into a private staging directory beside
the target, checks every hash, opens the restored vault and checks its records and audit chain, and only
then gives it the target's name. A non-empty target is never replaced without `force`; with it, the old
home is kept beside the new one, renamed, for the operator to remove.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from appliance import logs
from appliance.errors import ApplianceError, UsageError, VaultError
from appliance.home import Home, atomic_file, fsync_path
from bundles.safefile import create_new

MAGIC = b"APPLIANCE-BACKUP-1\n"
FORMAT = 1
_INFO = b"appliance-backup-v1"
# what a home holds that is not worth keeping: DuckDB's spill files, lock files, the demo's marker
SKIP_DIRS = {"tmp", "backups"}  # backups/: the ones made before migrations (a backup never holds backups)
SKIP_FILES = {".vault.lock", ".detached.lock", ".export.lock", ".appliance-demo"}
MANIFEST = "MANIFEST.json"

Progress = Callable[[str, int, int], None]


class BackupError(ApplianceError):
    """A backup file that cannot be restored as it is."""


def _key(data_key: bytes, nonce: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=nonce, info=_INFO).derive(data_key)


def _files(home: Home, checkpoints: bool) -> list[Path]:
    """The home's files to keep, relative, in a stable order; the database and keyring come first."""
    out = [Path("keyring.json"), Path("vault.duckdb")]
    for dirpath, dirnames, filenames in os.walk(home.root):
        rel = Path(dirpath).relative_to(home.root)
        dirnames[:] = sorted(d for d in dirnames if not (rel == Path(".") and d in SKIP_DIRS)
                             and (checkpoints or not (rel.parent.name == "runs" and d == "checkpoints")))
        for f in sorted(filenames):
            p = rel / f
            if p in out or (rel == Path(".") and (f in SKIP_FILES or f.startswith("vault.duckdb"))):
                continue
            if f.startswith(".") and ".tmp-" in f:  # a file being written (atomic_write's temp name)
                continue
            if (home.root / p).is_file() and not (home.root / p).is_symlink():
                out.append(p)
    return out


class _Hashing(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.h.update(b)
        return b


def backup(vault, out: Path, checkpoints: bool = True, force: bool = False,
           progress: Progress = lambda s, d, t: None, vault_only: bool = False, audit: bool = True) -> dict:
    """Write the encrypted snapshot of `vault`'s home to `out` (0600, streamed under a temp name, renamed).

    `vault_only`: the database and keyring alone (what a migration changes). `audit`: record the backup in
    the vault first (a migration records it in its own entry instead)."""
    from bundles.crypt import EncryptingWriter, seal_header

    out = Path(out).absolute()
    home = vault.home
    if out.exists() and not force:
        raise UsageError(f"{out} exists", "pass --force to overwrite it, or choose another --out")
    if home.root.resolve() in out.resolve().parents and (home.root / "backups").resolve() not in out.resolve().parents:
        raise UsageError(f"{out} is inside the home it backs up", "write the backup outside the home")
    if out.is_dir() or not out.parent.is_dir():
        why = "it is a directory" if out.is_dir() else f"no directory {out.parent}"
        raise UsageError(f"cannot write {out}: {why}", "pass --out FILE in an existing directory")
    if vault.read_only:
        raise VaultError("the vault is open read-only", "open it for writing to back it up")
    if audit:
        with vault.transaction():
            vault.audit("vault.backup", [], {"file": out.name, "checkpoints": checkpoints})
    vault.con.execute("CHECKPOINT")  # everything in the file itself; we hold it attached: nobody else writes
    files = [Path("keyring.json"), Path("vault.duckdb")] if vault_only else _files(home, checkpoints)
    nonce = os.urandom(16)
    key = _key(vault.secrets.data_key, nonce)
    header = {"format": FORMAT, "vault_id": vault.keyring.vault_id, "created": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "nonce": nonce.hex(), "files": len(files),
        "keyring": json.loads(home.keyring.read_bytes())}
    sealed = seal_header(header, key)
    manifest: dict[str, dict] = {}
    total = 0
    with atomic_file(out) as f:
        f.write(MAGIC + struct.pack("<Q", len(sealed)) + sealed)
        enc = EncryptingWriter(f, key, nonce)
        with tarfile.open(fileobj=enc, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[arg-type]
            for i, rel in enumerate(files):
                progress("backup", i, len(files))
                try:
                    fh = open(home.root / rel, "rb")
                except FileNotFoundError:  # a checkpoint pruned or a temp renamed since the listing: gone
                    continue
                with fh:
                    st = os.fstat(fh.fileno())  # the size of the file we hold open, not of its name
                    info = tarfile.TarInfo(str(rel))
                    info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o600
                    hashing = _Hashing(fh)
                    tar.addfile(info, hashing)  # type: ignore[arg-type]
                manifest[str(rel)] = {"sha256": hashing.h.hexdigest(), "size": info.size}
                total += info.size
            body = json.dumps({"vault_id": header["vault_id"], "files": manifest}, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode = len(body), 0o600
            tar.addfile(info, io.BytesIO(body))
        enc.close()
    progress("backup", len(files), len(files))
    logs.event("vault.backup", files=len(manifest), bytes=total)
    return {"out": str(out), "vault_id": header["vault_id"], "created": header["created"], "files": len(manifest),
            "bytes": total, "size": out.stat().st_size, "checkpoints": checkpoints}


def _read_header(f) -> dict:
    if f.read(len(MAGIC)) != MAGIC:
        raise BackupError("not an appliance backup (its first bytes are wrong)", "pass a file made by "
                                                                                  "`appliance vault backup`")
    raw = f.read(8)
    n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
    if not 0 < n < 1 << 24:
        raise BackupError("the backup's header is damaged", "use another copy of the backup")
    try:
        header = json.loads(f.read(n))
    except ValueError:
        raise BackupError("the backup's header is damaged", "use another copy of the backup") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BackupError(f"backup format {header.get('format') if isinstance(header, dict) else '?'} is not "
                          "supported", "restore it with the appliance release that wrote it")
    nonce = header.get("nonce")
    if not (isinstance(nonce, str) and len(nonce) == 32 and all(c in "0123456789abcdef" for c in nonce)) \
            or not isinstance(header.get("keyring"), dict):
        raise BackupError("the backup's header is damaged", "use another copy of the backup")
    return header


def restore(path: Path, home: Home, passphrase: str, force: bool = False,
            progress: Progress = lambda s, d, t: None) -> dict:
    """Bring a backup back as `home`; see the module docstring for what is checked before it takes the name."""
    from appliance.vault import Vault, audit
    from appliance.vault.keys import Keyring
    from bundles.crypt import DecryptingReader, check_header
    from bundles.errors import BundleError

    path = Path(path)
    target = home.root
    if target.exists() and any(target.iterdir()) and not force:
        raise UsageError(f"{target} is not empty", "restore into a new --home, or pass --force (the old home is "
                                                   "kept beside it, renamed)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.restore-", dir=target.parent))
    try:
        try:
            f = open(path, "rb")
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror or e}", "pass the backup file") from None
        with f:
            header = _read_header(f)
            ring_path = staging / "keyring.json"
            with create_new(ring_path) as o:
                o.write(json.dumps(header.get("keyring")).encode())
            ring = Keyring.load(ring_path)
            kdf = ring.kdf if isinstance(ring.kdf, dict) else {}
            if not (isinstance(kdf.get("memory_kib"), int) and kdf["memory_kib"] <= 4096 * 1024
                    and isinstance(kdf.get("iterations"), int) and kdf["iterations"] <= 100):
                raise BackupError("the backup's key settings are out of bounds", "use another copy of the backup")
            secrets, _ = ring.unlock(passphrase)  # WrongPassphrase before anything else
            key = _key(secrets.data_key, bytes.fromhex(str(header.get("nonce", ""))))
            try:
                check_header(header, key)
                files = _unpack(DecryptingReader(f, key, bytes.fromhex(header["nonce"])), staging,
                                int(header.get("files", 0)), progress)
            except BundleError as e:
                raise BackupError(e.message.replace("bundle", "backup"), "use another copy of the backup") from None
        if json.loads((staging / "keyring.json").read_bytes()) != header["keyring"]:
            raise BackupError("the backup's keyring differs from its header", "use another copy of the backup")
        for d in ("tmp", "logs", "artifacts"):
            (staging / d).mkdir(mode=0o700, exist_ok=True)
        with Vault.open(Home(staging), passphrase) as v:
            rep = v.check()
            chain = audit.verify(v.con, v.secrets.audit_key)
            if not rep.ok or not chain.ok:
                found = (rep.problems + chain.problems)[:3]
                raise BackupError("the restored vault does not check: " + "; ".join(found),
                                  "use another copy of the backup")
            with v.transaction():
                v.audit("vault.restore", [], {"file": path.name, "created": header["created"], "files": files})
        os.chmod(staging, 0o700)
        for d in sorted({p.parent for p in staging.rglob("*")}, key=lambda p: -len(p.parts)):
            fsync_path(d)
        replaced = None
        if target.exists():
            if any(target.iterdir()):
                _not_in_use(target)
                replaced = target.with_name(f"{target.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                os.rename(target, replaced)
            else:
                target.rmdir()
        try:
            os.rename(staging, target)
        except OSError as e:
            if replaced is not None:
                os.rename(replaced, target)  # the old home back where it was
            raise BackupError(f"cannot put the restored home at {target}: {e.strerror or e}",
                              "check the directory and try again; nothing was changed") from None
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"home": str(target), "vault_id": header["vault_id"], "created": header["created"], "files": files,
            "records": rep.blobs, "versions": rep.versions, "audit_entries": chain.entries,
            "replaced": str(replaced) if replaced else None}


def _not_in_use(root: Path) -> None:
    """A home that a job or the console holds (detached, or with the database attached) is not replaced."""
    import fcntl

    for name, lock in ((".detached.lock", fcntl.flock), ("vault.duckdb", fcntl.lockf)):  # DuckDB: POSIX locks
        if not (root / name).is_file():
            continue
        fd = os.open(root / name, os.O_RDWR)
        try:
            lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(f"{root} is in use by another appliance process (a job, the console)",
                             "stop them, then restore again") from None
        finally:
            os.close(fd)


def _unpack(stream, dest: Path, expected: int, progress: Progress) -> int:
    """Regular files only, inside `dest`, each hashed as it lands; then the manifest must match them all."""
    hashes: dict[str, str] = {}
    manifest = None
    with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[arg-type]
        for member in tar:
            name = member.name
            p = Path(name)
            if not member.isfile() or p.is_absolute() or ".." in p.parts or not name:
                raise BackupError(f"the backup holds an entry it should not ({name!r})", "use another copy")
            src = tar.extractfile(member)
            if name == MANIFEST:
                manifest = json.loads(src.read())
                continue
            out = dest / p
            out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            h = hashlib.sha256()
            if name not in hashes:  # the keyring the header carried lands first; the archive's replaces it
                out.unlink(missing_ok=True)
            with create_new(out) as o:  # exclusive, no link followed: a repeated name is refused
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    o.write(chunk)
                o.flush()
                os.fsync(o.fileno())
            hashes[name] = h.hexdigest()
            progress("restore", len(hashes), expected)
    while chunk := stream.read(1 << 16):  # the archive's end is padded to a whole record: zeros, then the end
        if chunk.strip(b"\0"):
            raise BackupError("the backup has data after its archive", "use another copy of the backup")
    if not stream.at_end():
        raise BackupError("the backup has data after its archive", "use another copy of the backup")
    if manifest is None or {k: v["sha256"] for k, v in manifest.get("files", {}).items()} != hashes:
        raise BackupError("the backup's files do not match its manifest", "use another copy of the backup")
    return len(hashes)
