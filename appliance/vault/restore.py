"""Restore: a backup (appliance.vault.backup) brought back as a home, checked whole before it takes the name.

Kept apart from writing backups because restoring opens the restored vault, and opening a vault may write a
backup first (a migration): each module then imports only what is below it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tarfile
import tempfile
import time
from pathlib import Path

from appliance.errors import BundleRefused, UsageError, bundle_errors
from appliance.home import Home, fsync_path
from appliance.vault.backup import FORMAT, MAGIC, MANIFEST, BackupError, Progress, _key
from bundles.safefile import create_new


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


@bundle_errors()
def restore(path: Path, home: Home, passphrase: str, force: bool = False,
            progress: Progress = lambda s, d, t: None) -> dict:
    """Bring a backup back as `home`; see the module docstring for what is checked before it takes the name."""
    from appliance.vault import audit
    from appliance.vault.keys import Keyring
    from appliance.vault.vault import Vault
    from bundles.crypt import DecryptingReader, check_header

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
                with bundle_errors():
                    check_header(header, key)
                    files = _unpack(DecryptingReader(f, key, bytes.fromhex(header["nonce"])), staging,
                                    int(header.get("files", 0)), progress)
            except BundleRefused as e:
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
