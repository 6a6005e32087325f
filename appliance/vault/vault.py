"""The unlocked vault: keys in memory, the encrypted DuckDB attached, and the operations on the whole file."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from appliance import logs
from appliance.errors import ApplianceError, VaultBusy, VaultError
from appliance.hardening import protect_process
from appliance.home import Home, fsync_path
from appliance.vault import audit, db
from appliance.vault.keys import Keyring, Secrets
from appliance.vault.schema import DDL, SCHEMA_VERSION

REKEY_SUFFIX = ".rekey"
BUSY_WAIT = 10.0  # seconds to wait for another process's brief hold on the vault
OLD_SUFFIX = ".old"


class Vault:
    """An unlocked vault. Use as a context manager; the data key lives only in this object."""

    def __init__(self, home: Home, keyring: Keyring, secrets: Secrets, con: duckdb.DuckDBPyConnection,
                 read_only: bool):
        self.home = home
        self.keyring = keyring
        self.secrets = secrets
        self.con = con
        self.read_only = read_only
        self.migrated: dict | None = None  # what a migration at open did (from, to, backup), if one ran
        # Who acts through this handle, for the audit log, job and version rows: set by whoever opened it for
        # someone else (an agent's session: `agent:NAME`); None is the process's actor (audit.current_actor).
        self.actor: str | None = None
        self._lock = threading.RLock()
        self._closed = False
        from appliance import sealed

        self.store = sealed.register(sealed.store(self))  # the artifacts' keys are in this vault

    # --- lifecycle ------------------------------------------------------------------------------
    @classmethod
    def init(cls, home: Home, passphrase: str, kdf: dict | None = None) -> Vault:
        if home.exists():
            raise VaultError(f"a vault already exists at {home.root}", "use it, or pick another --home")
        if home.database.exists():
            raise VaultError(f"{home.database} exists without a keyring",
                             "move it away (an interrupted init leaves it) and run init again")
        protect_process()  # no core dump, no /proc reading of the keys from here on
        home.create_dirs()
        secrets = Secrets.generate()
        ring = Keyring.create(passphrase, secrets, kdf)
        con = db.connect(home.database, secrets.duckdb_key, home.tmp)
        vault = cls(home, ring, secrets, con, read_only=False)
        vault._ensure_schema()
        with vault.transaction():
            vault.audit("vault.init", [], {"vault_id": ring.vault_id, "kdf": {
                k: v for k, v in ring.kdf.items() if k != "salt"}, "schema": SCHEMA_VERSION})
        con.execute("CHECKPOINT")
        ring.save(home.keyring)  # last: a vault without a keyring is an interrupted init
        return vault

    @classmethod
    def open(cls, home: Home, passphrase: str, read_only: bool = False,
             memory_limit: str | None = None, wait: float = BUSY_WAIT) -> Vault:
        ring = Keyring.load(home.keyring)
        secrets, pending = ring.unlock(passphrase)  # raises WrongPassphrase before anything is touched
        return cls._attach(home, ring, secrets, pending, read_only, memory_limit, wait)

    @classmethod
    def from_secrets(cls, home: Home, secrets: Secrets, read_only: bool = False, wait: float = BUSY_WAIT) -> Vault:
        """Open with secrets handed over by the process that unlocked (a job runner gets them on a pipe)."""
        ring = Keyring.load(home.keyring)
        if ring.pending_rekey is not None:
            raise VaultError("the vault is half-way through a rekey", "open it once with the passphrase")
        return cls._attach(home, ring, secrets, None, read_only, None, wait)

    @classmethod
    def _attach(cls, home, ring, secrets, pending, read_only, memory_limit, wait) -> Vault:
        protect_process()  # every holder of the keys comes through here (CLI, API, jobs, MCP, console)
        with _home_lock(home, wait):  # a rekey in another process is finished (or not started) here
            if Keyring.load(home.keyring).wrapped != ring.wrapped:
                raise VaultError("the vault was rekeyed while opening", "open it again")
            if ring.pending_rekey is not None:
                secrets = _finish_rekey(home, ring, secrets, pending)
            else:  # a copy whose key never reached the keyring: unreadable by anyone, remove it
                _remove_db(home.database.with_name(home.database.name + REKEY_SUFFIX))
            _drop_old(home)
            if not home.database.exists():
                raise VaultError(f"the vault database {home.database} is missing", "restore it from a backup")
            t0 = time.perf_counter()
            con = db.connect(home.database, secrets.duckdb_key, home.tmp, read_only, memory_limit, wait)
            logs.debug("vault.attach", read_only=read_only, seconds=round(time.perf_counter() - t0, 3))
        vault = cls(home, ring, secrets, con, read_only)
        try:
            if read_only and vault._older():  # a read-only open cannot migrate: migrate once, then read
                con.close()
                writable = cls._attach(home, ring, secrets, pending, False, memory_limit, wait)
                writable.close()
                return cls._attach(home, Keyring.load(home.keyring), writable.secrets, None, True, memory_limit,
                                   wait)
            vault._check_schema()
            if not read_only:
                from appliance.vault.migrate import migrate

                vault.migrated = migrate(vault, SCHEMA_VERSION)
                if vault.migrated:
                    logs.event("vault.migrate", **vault.migrated)
                vault._ensure_schema()
                from appliance.vault.builder import discard_unfinished
                discard_unfinished(vault)
                from appliance.memfiles import sweep

                sweep(home.tmp)  # a killed process's in-memory directories (links) and import staging
        except BaseException:
            con.close()
            raise
        return vault

    def close(self) -> None:
        """Detach for good, and let go of the artifacts' keys: sealed artifacts no longer open through this vault
        (a holder that only lets the database go between uses calls `detach`)."""
        from appliance import sealed

        sealed.unregister(self.store)
        self.store.keys.forget()
        self._closed = True
        self._detach()

    def detach(self) -> None:
        """Free the database for other processes; the keys stay in memory (a session attaches again)."""
        self._detach()

    def _detach(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None  # type: ignore[assignment]

    def reopen(self, read_only: bool, wait: float = BUSY_WAIT) -> None:
        """Re-attach the database, e.g. read-only after writing an audit entry; no new unlock."""
        with self._lock:
            if self._closed:
                raise VaultError("this vault handle was closed", "open the vault again")
            self._detach()
            with _home_lock(self.home, wait):
                self.con = db.connect(self.home.database, self.secrets.duckdb_key, self.home.tmp, read_only,
                                      wait=wait)
            from appliance import sealed

            sealed.register(self.store)
            self.read_only = read_only
            try:  # a newer appliance may have migrated the vault meanwhile: refuse to write an unknown schema
                self._check_schema()
            except VaultError:
                self.close()
                raise

    @contextmanager
    def session(self, read_only: bool = False, wait: float = BUSY_WAIT):
        """Attached for the length of a block, then free for other processes; as is if already attached.

        DuckDB lets one process at a time attach the file, so long-lived holders (the console, a training
        job) attach only while they read or write.
        """
        with self._lock:  # threads of one process take turns (two attaches of one file would corrupt it)
            if self.con is not None:
                yield self
                return
            self.reopen(read_only, wait)
            try:
                yield self
            finally:
                self._detach()

    @contextmanager
    def released(self, wait: float = 3600.0):
        """Detached for the length of a block (a training run, a quantize), then attached again as it was.

        A shared lock on the home is held meanwhile: a rekey refuses to swap the key under a process that
        will attach again with the old one."""
        import fcntl

        attached, read_only = self.con is not None, self.read_only
        self._detach()  # the artifacts still open: their keys attach for a moment (`sealed.VaultKeys`)
        fd = os.open(self.home.root / ".detached.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield self
        finally:
            try:
                if attached:
                    self.reopen(read_only, wait)
            finally:
                os.close(fd)

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- helpers --------------------------------------------------------------------------------
    @contextmanager
    def transaction(self):
        self.con.begin()
        try:
            yield self.con
        except BaseException:
            self.con.rollback()
            raise
        self.con.commit()

    def audit(self, action: str, ids: list[str] | None = None, details: dict | None = None) -> int:
        return audit.append(self.con, self.secrets.audit_key, action, ids, details, actor=audit.actor_of(self))

    def _ensure_schema(self) -> None:
        for stmt in DDL:
            self.con.execute(stmt)
        self.con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
        self.con.execute("INSERT OR IGNORE INTO meta VALUES ('vault_id', ?)", [self.keyring.vault_id])

    def _check_schema(self) -> None:
        try:
            row = self.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except duckdb.CatalogException:
            return  # an empty database: _ensure_schema creates it
        if row and int(row[0]) > SCHEMA_VERSION:
            raise VaultError(f"this vault has schema {row[0]}, newer than this appliance's {SCHEMA_VERSION}",
                             "upgrade the appliance")
        if row and int(row[0]) < SCHEMA_VERSION and self.read_only:  # reopened read-only, not yet migrated
            raise VaultError(f"this vault has schema {row[0]}, older than this appliance's {SCHEMA_VERSION}",
                             "open it once for writing (e.g. `appliance vault check`): it is backed up and migrated")

    def _older(self) -> bool:
        from appliance.vault.migrate import stored_version

        stored = stored_version(self.con)
        return stored is not None and stored < SCHEMA_VERSION

    # --- keys -----------------------------------------------------------------------------------
    def passwd(self, passphrase: str, new_passphrase: str) -> None:
        """Re-wrap the same secrets under a new passphrase; no data is re-encrypted, the data key stays.

        `passphrase`, the current one, must open the keyring on disk to this vault's keys: a wrong one raises
        WrongPassphrase and nothing is written.
        """
        with _home_lock(self.home, BUSY_WAIT):
            ring = Keyring.load(self.home.keyring)
            if not ring.rewrap(passphrase, new_passphrase).same(self.secrets):
                raise VaultError("the keyring holds other keys than this open vault",
                                 "another process rekeyed it: open the vault again")
            if self.read_only:
                raise VaultError("the vault is open read-only", "open it for writing to change the passphrase")
            with self.transaction():
                self.audit("vault.passwd", [], {})
            self.con.execute("CHECKPOINT")
            ring.save(self.home.keyring)
            self.keyring = ring

    def rekey(self, passphrase: str) -> None:
        """Copy everything into a database under a fresh data key and swap it in atomically.

        `passphrase` must be the current one (the new key is wrapped under it): a wrong one raises
        WrongPassphrase before anything is written. Crash-safe: the keyring holds the next key as pending
        until the swap is done; `open` finishes or rolls back a half-done rekey. The old file is overwritten
        before it is unlinked, and its key is gone.
        """
        ring = Keyring.load(self.home.keyring)
        ring.check(passphrase, self.secrets)  # a typo here would wrap the new key under a passphrase nobody knows
        self.keyring = ring
        self.check_rekeyable()
        import fcntl

        with _home_lock(self.home, BUSY_WAIT):
            fd = os.open(self.home.root / ".detached.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # a run or an export let go of the vault and will attach again
                    raise VaultError("a training run, quantize or eval is working on this vault",
                                     "rekey when it has ended") from None
                self._rekey(passphrase)
            finally:
                os.close(fd)

    def check_rekeyable(self) -> None:
        """Refuse a rekey that could not run now (so `passwd --rekey` refuses before it changes anything)."""
        if self.read_only:
            raise VaultError("the vault is open read-only", "open it for writing to rekey")
        running = [j for (j,) in self.con.execute("SELECT id FROM jobs WHERE status = 'running'").fetchall()]
        if running:  # their processes hold the current key
            raise VaultError(f"jobs are running ({', '.join(running)})", "rekey when they have ended "
                             "(`appliance jobs list`)")

    def _rekey(self, passphrase: str) -> None:
        nxt = Secrets(os.urandom(32), self.secrets.pseudonym_key, self.secrets.audit_key)
        new_path = self.home.database.with_name(self.home.database.name + REKEY_SUFFIX)
        _remove_db(new_path)
        with self.transaction():
            self.audit("vault.rekey", [], {"phase": "start"})
        self.con.execute(
            f"ATTACH '{db._quote(new_path)}' AS rekeyed (ENCRYPTION_KEY '{nxt.duckdb_key}', ENCRYPTION_CIPHER 'GCM')"
        )
        try:
            self.con.execute(f"COPY FROM DATABASE {db.DB_ALIAS} TO rekeyed")
            self.con.execute("CHECKPOINT rekeyed")
        finally:
            self.con.execute("DETACH rekeyed")
        self._detach()  # the artifacts' keys move with the database: nothing under artifacts/ changes
        self.keyring.wrap_pending(passphrase, nxt, new_path.name)
        self.keyring.save(self.home.keyring)
        old = self.home.database.with_name(self.home.database.name + OLD_SUFFIX)
        os.link(self.home.database, old)
        os.replace(new_path, self.home.database)
        fsync_path(self.home.root)
        self.keyring.wrapped = self.keyring.pending_rekey["wrapped"]
        self.keyring.pending_rekey = None
        self.keyring.save(self.home.keyring)
        _shred(old)
        self.secrets = nxt
        self.con = db.connect(self.home.database, nxt.duckdb_key, self.home.tmp)
        with self.transaction():
            self.audit("vault.rekey", [], {"phase": "done"})

    # --- integrity ------------------------------------------------------------------------------
    def check(self) -> CheckReport:
        """Every record's hash against its text, every version's content hash against its records."""
        rep = CheckReport()
        c = self.con
        rep.blobs = c.execute("SELECT count(*) FROM blobs").fetchone()[0]
        for h, in c.execute("SELECT hash FROM blobs WHERE sha256(text) <> hash OR strlen(text) <> bytes "
                            "ORDER BY hash LIMIT 20").fetchall():
            rep.problems.append(f"record {h[:12]} does not match its hash")
        for vid, n_missing in c.execute(
            "SELECT r.vid, count(*) FROM version_records r ANTI JOIN blobs b ON r.hash = b.hash GROUP BY r.vid"
        ).fetchall():
            rep.problems.append(f"version vid={vid} lacks {n_missing} records")
        rows = c.execute("""
            SELECT v.name, v.n, v.content_hash, v.records, v.bytes,
                   sha256(coalesce(string_agg(r.hash, '' ORDER BY r.ord), '')), count(r.hash), coalesce(sum(r.bytes), 0)
            FROM versions v LEFT JOIN version_records r ON r.vid = v.vid
            WHERE v.status = 'committed' GROUP BY ALL ORDER BY v.name, v.n""").fetchall()
        for name, n, want, recs, nbytes, got, count, total in rows:
            rep.versions += 1
            vid = f"{name}@{n}"
            if got != want:
                rep.problems.append(f"{vid}: content hash {got[:12]} differs from recorded {want[:12]}")
            if count != recs or total != nbytes:
                rep.problems.append(f"{vid}: {count} records / {total} bytes, recorded {recs} / {nbytes}")
        rep.audit = audit.verify(c, self.secrets.audit_key)
        rep.problems += [f"audit: {p}" for p in rep.audit.problems]
        self._check_artifacts(rep)
        return rep

    def _check_artifacts(self, rep: CheckReport) -> None:
        """Every sealed artifact opens with its key (each file in memory, dropped at once); files in the clear
        under artifacts/ (an older appliance's) are listed, for `vault seal`."""
        from appliance import sealed

        root = self.home.artifacts
        stray = [p.relative_to(root).as_posix() for p in root.rglob("*") if (p.is_file() or p.is_symlink())
                 and not p.name.endswith(sealed.SUFFIX) and p.name != ".senders.json"] if root.is_dir() else []
        by_artifact: dict[str, list[str]] = {}
        for rel in stray:  # made by an older appliance, or put there by hand: said (never loaded), not failed
            parts = rel.split("/")
            where, name = ("/".join(parts[:2]), "/".join(parts[2:])) if len(parts) > 2 else (rel, parts[-1])
            by_artifact.setdefault(where, []).append(name)
        for a, fs in sorted(by_artifact.items()):
            top = root / a
            if top.is_dir() and not top.is_symlink() and len(a.split("/")) == 2 and sealed.planted(self.store, top):
                rep.problems.append(f"artifact {a}: {len(fs)} file(s) in the clear that the appliance did not write "
                                    f"({fs[0]}); they are never loaded: remove them, or restore the artifact from a "
                                    "backup")
            else:
                rep.unsealed.append(f"{a}: {len(fs)} file(s) in the clear ({fs[0]})")
        for kind in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
            for d in sorted(p for p in kind.iterdir() if p.is_dir() and not p.name.startswith(".")):
                rel = d.relative_to(root).as_posix()
                if not sealed.is_sealed(d):
                    continue
                try:
                    if not self.store.check(d):  # made before manifests: its set of files is not bound
                        rep.unmanifested.append(rel)
                    else:  # whole: from now on its manifest missing is an attack (a key made before schema 2)
                        self.store.keys.mark_manifested(rel)
                    rep.artifact_bytes += self.store.verify(d)
                    rep.artifacts += 1
                except ApplianceError as e:
                    rep.problems.append(f"artifact {rel}: {e.message}")


@dataclass
class CheckReport:
    blobs: int = 0
    versions: int = 0
    problems: list[str] = field(default_factory=list)
    audit: audit.AuditReport | None = None
    artifacts: int = 0  # sealed artifact directories opened
    artifact_bytes: int = 0
    unsealed: list[str] = field(default_factory=list)  # artifacts with files in the clear (`vault seal`)
    unmanifested: list[str] = field(default_factory=list)  # sealed artifacts without a manifest (older ones)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"ok": self.ok, "records": self.blobs, "versions": self.versions,
                "audit_entries": self.audit.entries if self.audit else 0, "artifacts": self.artifacts,
                "artifact_bytes": self.artifact_bytes, "unsealed": self.unsealed, "unmanifested": self.unmanifested,
                "problems": self.problems}


@contextmanager
def _home_lock(home: Home, wait: float):
    """Held while attaching and for a whole rekey, so nobody attaches a file that is being swapped."""
    import fcntl
    import time

    fd = os.open(home.root / ".vault.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise VaultBusy("the vault is being rekeyed", "wait for the rekey to finish") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _finish_rekey(home: Home, ring: Keyring, current: Secrets, pending: Secrets | None) -> Secrets:
    """Roll a rekey interrupted before the swap back, or one interrupted after it forward."""
    new_path = home.database.with_name(home.database.name + REKEY_SUFFIX)
    if new_path.exists() or pending is None:
        _remove_db(new_path)
        chosen = current
    else:
        ring.wrapped = ring.pending_rekey["wrapped"]
        chosen = pending
    ring.pending_rekey = None
    ring.save(home.keyring)
    return chosen


def _drop_old(home: Home) -> None:
    """Remove the pre-rekey file. Before the swap it is a second name of the live database: unlink only."""
    old = home.database.with_name(home.database.name + OLD_SUFFIX)
    if not old.exists():
        return
    if home.database.exists() and os.path.samefile(old, home.database):
        old.unlink()
        fsync_path(home.root)
    else:
        _shred(old)


def _remove_db(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".wal")):
        p.unlink(missing_ok=True)


def _shred(path: Path) -> None:
    """Overwrite then unlink. The file is ciphertext under a destroyed key; this removes even that."""
    if not path.exists():
        return
    size = path.stat().st_size
    with open(path, "r+b") as f:
        chunk = 1 << 20
        for off in range(0, size, chunk):
            f.write(os.urandom(min(chunk, size - off)))
        f.flush()
        os.fsync(f.fileno())
    path.unlink()
    fsync_path(path.parent)
