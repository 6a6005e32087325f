"""Vault schema migrations: a newer appliance opens a vault made by an older one and brings it up to date.

The vault's schema version is in `meta.schema_version`. Opening a vault for writing whose version is
older than `schema.SCHEMA_VERSION` first writes an encrypted backup of the whole home to
HOME/backups/ (`appliance vault restore` brings it back), then runs every step from the stored version
to the current one in a single transaction, with the new version and a `vault.migrate` audit entry in
the same transaction. A step that fails rolls all of it back: the vault is as it was, and the error says
where the backup is. A read-only open of an older vault is refused (it cannot migrate) with what to do.

A step is a function of the DuckDB connection, registered for the version it starts from:

    @step(1)
    def _add_review_column(con):
        con.execute("ALTER TABLE versions ADD COLUMN reviewed_by VARCHAR")

Each schema version keeps a committed vault fixture in tests/fixtures/ that the current code must open.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from appliance.errors import VaultError

STEPS: dict[int, Callable] = {}


def step(from_version: int):
    def deco(fn: Callable) -> Callable:
        if from_version in STEPS:
            raise ValueError(f"a migration from schema {from_version} is registered twice")
        STEPS[from_version] = fn
        return fn
    return deco


def stored_version(con) -> int | None:
    import duckdb

    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except duckdb.CatalogException:
        return None  # an empty database: the DDL creates it at the current version
    return int(row[0]) if row else None


def migrate(vault, target: int) -> dict | None:
    """Bring `vault` (open for writing) from its stored schema to `target`; None when already there."""
    from appliance.vault.backup import backup

    current = stored_version(vault.con)
    if current is None or current >= target:
        return None
    missing = [v for v in range(current, target) if v not in STEPS]
    if missing:
        raise VaultError(f"no migration from schema {missing[0]} (the vault has {current}, this appliance "
                         f"{target})", "upgrade through the appliance release that introduced the next schema")
    import fcntl
    import os

    # A process that let go of the vault for a while (a job, the console's quantize) would attach again
    # expecting the old schema: like a rekey, a migration waits until none holds it detached.
    fd = os.open(vault.home.root / ".detached.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VaultError(f"the vault needs migrating from schema {current} to {target}, and a job or the "
                             "console is using it", "let them finish (or stop them), then run the command again"
                             ) from None
        stem = vault.home.root / "backups" / f"before-schema-{target}-{time.strftime('%Y%m%d-%H%M%S')}"
        stem.parent.mkdir(mode=0o700, exist_ok=True)
        out, n = stem.with_name(stem.name + ".backup"), 1
        while out.exists():  # a retry within the same second keeps the earlier backup too
            n += 1
            out = stem.with_name(f"{stem.name}-{n}.backup")
        # the vault as it was (database and keyring: the models do not change), restorable with `vault restore`;
        # no audit entry is written into the old schema: the migration's own entry names the backup
        backup(vault, out, checkpoints=False, vault_only=True, audit=False)
        try:
            with vault.transaction() as con:
                for v in range(current, target):
                    STEPS[v](con)
                con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(target)])
                vault.audit("vault.migrate", [], {"from": current, "to": target, "backup": str(out)})
        except Exception as e:  # noqa: BLE001 - any failing step: rolled back, reported in one line
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise VaultError(f"migrating the vault from schema {current} to {target} failed ({first}); the vault "
                             "is unchanged", f"report it; the backup written first is {out}") from None
        vault.con.execute("CHECKPOINT")
    finally:
        os.close(fd)
    return {"from": current, "to": target, "backup": str(out)}


# --- steps -------------------------------------------------------------------------------------------
@step(1)
def _artifact_keys_manifested(con):
    """Schema 2: `artifact_keys.manifested`, so a sealed artifact whose manifest was deleted no longer opens as one
    made before manifests. Keys already there stay NULL (their artifacts may predate manifests)."""
    con.execute("CREATE TABLE IF NOT EXISTS artifact_keys (artifact VARCHAR PRIMARY KEY, key BLOB NOT NULL, "
                "created TIMESTAMP NOT NULL)")
    con.execute("ALTER TABLE artifact_keys ADD COLUMN IF NOT EXISTS manifested BOOLEAN")
