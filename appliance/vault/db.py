"""The DuckDB connection: the signed OpenSSL crypto extension, encryption, and settings that keep it offline.

DuckDB encrypts with AES-GCM through the `httpfs` extension's OpenSSL; without it DuckDB refuses to write
encrypted files (its fallback is unsafe and is never forced here). The extension comes from a registry
package that ships the DuckDB-signed build for this exact DuckDB release and is loaded by path with
unsigned extensions disallowed, so DuckDB checks its signature.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import duckdb

from appliance.errors import VaultBusy, VaultError

DB_ALIAS = "vault"
# DuckDB rewrites a table's last, still-growing row group at every checkpoint. With the default 122,880
# rows and records of tens of KB that group holds gigabytes, and a large ingest turns quadratic (300 MB
# took 44 s). 2,048 rows bound each rewrite to about 2,048 records.
ROW_GROUP_SIZE = 2048


def httpfs_extension_path() -> str:
    """The signed httpfs build that matches the installed DuckDB."""
    try:
        import duckdb_ext  # the duckdb-ext-httpfs package
    except ImportError as e:
        raise VaultError("the DuckDB crypto extension package is missing",
                         "install duckdb-ext-httpfs matching the pinned duckdb") from e
    version = duckdb.__version__
    for base in duckdb_ext.__path__:
        hits = glob.glob(os.path.join(base, "extensions", f"v{version}", "*", "httpfs.duckdb_extension"))
        if hits:
            return hits[0]
    raise VaultError(f"no httpfs extension for DuckDB {version}",
                     "install the duckdb-ext-httpfs release built for this duckdb")


def _settings(tmp_dir: Path, memory_limit: str | None) -> dict[str, str]:
    cfg = {
        "allow_unsigned_extensions": "false",
        "allow_community_extensions": "false",
        # Both reach for the network (an encrypted ATTACH otherwise tries to fetch httpfs).
        "autoinstall_known_extensions": "false",
        "autoload_known_extensions": "false",
        "temp_directory": str(tmp_dir),
    }
    if memory_limit:
        cfg["memory_limit"] = memory_limit
    return cfg


def connect(path: Path, key_hex: str, tmp_dir: Path, read_only: bool = False,
            memory_limit: str | None = None, wait: float = 0.0) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the encrypted vault file attached as `vault` and made the default.

    DuckDB lets one process at a time attach the file. `wait` seconds are spent retrying while another
    appliance process (a job recording its progress, the console) holds it briefly.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            return _connect(path, key_hex, tmp_dir, read_only, memory_limit)
        except VaultBusy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _connect(path: Path, key_hex: str, tmp_dir: Path, read_only: bool,
             memory_limit: str | None) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:", config=_settings(tmp_dir, memory_limit))
    try:
        con.execute(f"LOAD '{httpfs_extension_path()}'")
        # Spill files would otherwise hold plaintext pages.
        con.execute("SET temp_file_encryption = true")
        mode = ", READ_ONLY" if read_only else ""
        con.execute(
            f"ATTACH '{_quote(path)}' AS {DB_ALIAS} (ENCRYPTION_KEY '{key_hex}', ENCRYPTION_CIPHER 'GCM', "
            f"ROW_GROUP_SIZE {ROW_GROUP_SIZE}{mode})"
        )
        con.execute(f"USE {DB_ALIAS}")
    except duckdb.Error as e:
        con.close()
        if "Could not set lock" in str(e):
            import re

            pid = re.search(r"\(PID (\d+)\)", str(e))
            raise VaultBusy(f"the vault is in use by another appliance process{f' (PID {pid[1]})' if pid else ''}",
                            "wait for it to finish (an ingest holds the vault until it ends)"
                            ) from None
        raise VaultError(f"cannot open the vault database: {first_line(e)}",
                         "run `appliance vault check`; restore from backup if it fails") from e
    return con


SCRATCH_MEMORY = "1GB"


def scratch() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB of one thread for reading input files in a worker process (`readers.tables`):
    offline like the vault's connection, and with no temporary directory, so nothing it reads can spill to
    disk in plaintext. A query that outgrows its memory (`SCRATCH_MEMORY`, one per worker) fails instead."""
    cfg = _settings(Path(), SCRATCH_MEMORY)
    # one file after another is read through /proc/self/fd/N names, which the next file reuses: DuckDB's cache
    # of external files, keyed by name, must not hand one file's bytes out for another (as for ingest's)
    cfg.update(temp_directory="", threads="1", enable_external_file_cache="false")
    return duckdb.connect(":memory:", config=cfg)


def cursor(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """A second connection to the same database (for a query that stays open), with the vault as default."""
    cur = con.cursor()
    cur.execute(f"USE {DB_ALIAS}")
    return cur


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


def first_line(e: BaseException) -> str:
    """A DuckDB error in one line: its first, or its kind where it says nothing."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
