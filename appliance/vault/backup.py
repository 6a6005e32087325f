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
import struct
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from appliance import logs
from appliance.errors import ApplianceError, UsageError, VaultError, bundle_errors
from appliance.home import Home, atomic_file

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


@bundle_errors()
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
        with EncryptingWriter(f, key, nonce) as enc:  # closed when the tar is, abandoned if the backup fails
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
    progress("backup", len(files), len(files))
    logs.event("vault.backup", files=len(manifest), bytes=total)
    return {"out": str(out), "vault_id": header["vault_id"], "created": header["created"], "files": len(manifest),
            "bytes": total, "size": out.stat().st_size, "checkpoints": checkpoints}
