"""Reading dataset versions: list, show, resolve `NAME[@N]`, iterate records, export, read-only SQL."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import duckdb

from appliance.db_time import iso
from appliance.errors import UsageError, VaultError
from appliance.vault.db import cursor


def resolve(con, ref: str) -> tuple[int, str, int]:
    """`name@n` or `name` (the newest) -> (vid, name, n)."""
    name, _, n = ref.partition("@")
    if n:
        if not (n.isascii() and n.isdigit()):
            raise UsageError(f"bad version {ref!r}", "write NAME@N with N a number, e.g. handbook@2")
        row = con.execute("SELECT vid, name, n FROM versions WHERE name = ? AND n = ? AND status = 'committed'",
                          [name, int(n)]).fetchone()
    else:
        row = con.execute("SELECT vid, name, n FROM versions WHERE name = ? AND status = 'committed' "
                          "ORDER BY n DESC LIMIT 1", [name]).fetchone()
    if row is None:
        raise VaultError(f"no dataset version {ref}", "list them with `appliance vault datasets`")
    return row


def datasets(con) -> list[dict]:
    rows = con.execute("""
        SELECT name, count(*), max(n), arg_max(records, n), arg_max(bytes, n), arg_max(content_hash, n),
               max(committed)
        FROM versions WHERE status = 'committed' GROUP BY name ORDER BY name""").fetchall()
    return [{"name": r[0], "versions": r[1], "latest": f"{r[0]}@{r[2]}", "records": r[3], "bytes": r[4],
             "content_hash": r[5], "updated": iso(r[6])} for r in rows]


def all_versions(con) -> list[dict]:
    """Every committed version, newest first per dataset."""
    rows = con.execute("SELECT name, n, records, bytes, pii_mode, committed, content_hash FROM versions "
                       "WHERE status = 'committed' ORDER BY name, n DESC").fetchall()
    return [{"version": f"{a}@{n}", "records": r, "bytes": b, "pii_mode": p, "committed": iso(c),
             "content_hash": h} for a, n, r, b, p, c, h in rows]


def records_page(con, ref: str, offset: int = 0, limit: int = 200) -> list[dict]:
    """One page of a version's records without their text: for browsing."""
    vid, _, _ = resolve(con, ref)
    rows = con.execute("SELECT ord, kind, split, path, title, bytes FROM version_records WHERE vid = ? "
                       "ORDER BY ord LIMIT ? OFFSET ?", [vid, limit, offset]).fetchall()
    return [{"ord": o, "kind": k, "split": sp, "path": p, "title": t, "bytes": b} for o, k, sp, p, t, b in rows]


def record(con, ref: str, ord_: int) -> dict:
    """One record of a version, text included (as scrubbed at ingest)."""
    vid, name, n = resolve(con, ref)
    row = con.execute("SELECT r.kind, r.path, r.title, r.meta, b.text FROM version_records r JOIN blobs b "
                      "ON b.hash = r.hash WHERE r.vid = ? AND r.ord = ?", [vid, ord_]).fetchone()
    if row is None:
        raise UsageError(f"{name}@{n} has no record {ord_}", "pick one from the list")
    return {"version": f"{name}@{n}", "ord": ord_, "kind": row[0], "path": row[1], "title": row[2],
            "meta": json.loads(row[3]) if row[3] else {}, "text": row[4]}


def show(con, ref: str) -> dict:
    vid, name, n = resolve(con, ref)
    v = con.execute("SELECT created, committed, actor, pii_mode, content_hash, records, bytes, duplicates, "
                    "skipped, validation_fraction, parents FROM versions WHERE vid = ?", [vid]).fetchone()
    splits = dict(con.execute("SELECT split, count(*) FROM version_records WHERE vid = ? GROUP BY split",
                              [vid]).fetchall())
    kinds = dict(con.execute("SELECT kind, count(*) FROM version_records WHERE vid = ? GROUP BY kind ORDER BY kind",
                             [vid]).fetchall())
    pii_total = dict(con.execute("SELECT type, sum(count)::BIGINT FROM version_pii WHERE vid = ? GROUP BY type "
                                 "ORDER BY type", [vid]).fetchall())
    pii_files: dict[str, dict[str, int]] = {}
    for path, typ, cnt in con.execute("SELECT path, type, count FROM version_pii WHERE vid = ? ORDER BY path, type",
                                      [vid]).fetchall():
        pii_files.setdefault(path, {})[typ] = cnt
    sources = [{"path": p, "kind": k, "bytes": b, "sha256": s, "records": r, "duplicates": d, "status": st,
                "reason": why} for p, k, b, s, r, d, st, why in con.execute(
        "SELECT path, kind, bytes, sha256, records, duplicates, status, reason FROM version_sources "
        "WHERE vid = ? ORDER BY path", [vid]).fetchall()]
    tables = [{"table": f"data.{t}", "source": s, "rows": r, "columns": json.loads(c)} for t, s, r, c in con.execute(
        "SELECT table_name, source, rows, columns FROM version_tables WHERE vid = ? ORDER BY table_name",
        [vid]).fetchall()]
    return {
        "version": f"{name}@{n}", "created": iso(v[0]), "committed": iso(v[1]), "actor": v[2],
        "pii_mode": v[3], "content_hash": v[4], "records": v[5], "bytes": v[6], "duplicates": v[7],
        "skipped_files": v[8], "validation_fraction": v[9], "parents": json.loads(v[10] or "[]"),
        "splits": {"train": splits.get("train", 0), "validation": splits.get("validation", 0)},
        "kinds": kinds, "pii": {"total": pii_total, "per_file": pii_files}, "sources": sources, "tables": tables,
    }


def iter_records(con, ref: str, split: str | None = None, batch: int = 1000) -> Iterator[dict]:
    """Records of a version in order, text included. Streams; the cursor keeps its own connection."""
    vid, _, _ = resolve(con, ref)
    cur = cursor(con)
    sql = ("SELECT r.ord, r.hash, r.kind, r.source, r.path, r.language, r.title, r.meta, r.split, b.text "
           "FROM version_records r JOIN blobs b ON b.hash = r.hash WHERE r.vid = ?")
    params: list = [vid]
    if split:
        sql += " AND r.split = ?"
        params.append(split)
    cur.execute(sql + " ORDER BY r.ord", params)
    try:
        while rows := cur.fetchmany(batch):
            for o, h, k, s, p, lang, t, m, sp, text in rows:
                yield {"ord": o, "hash": h, "kind": k, "source": s, "path": p, "language": lang, "title": t,
                       "meta": json.loads(m) if m else {}, "split": sp, "text": text}
    finally:
        cur.close()


def held_out(con, ref: str) -> tuple[str, Iterator[dict]]:
    """(split, its records, streamed): the validation split, or the train split when it has none."""
    vid, _, _ = resolve(con, ref)
    has = con.execute("SELECT 1 FROM version_records WHERE vid = ? AND split = 'validation' LIMIT 1", [vid]).fetchone()
    split = "validation" if has else "train"
    return split, iter_records(con, ref, split=split)


def export(con, ref: str, out: Path, split: str | None = None, force: bool = False,
           before_publish: Callable[[dict], None] | None = None) -> dict:
    """Write a version as JSONL, plaintext, to `out` (0600, temp name then rename). Explicit by design.

    `before_publish(summary)` runs before the file takes its name (the CLI commits the audit entry there),
    so no export exists under its name without its audit record.
    """
    if split not in (None, "train", "validation"):
        raise UsageError(f"unknown split {split!r}", "use train or validation")
    out = out.expanduser()
    if out.is_dir():
        raise VaultError(f"{out} is a directory", "give a file name, e.g. --out data.jsonl")
    if out.exists() and not force:
        raise VaultError(f"{out} exists", "pick another --out or pass --force")
    if not out.parent.is_dir():
        raise VaultError(f"directory {out.parent} does not exist", "create it first")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    n = nbytes = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in iter_records(con, ref, split):
                line = json.dumps(rec, ensure_ascii=False) + "\n"
                f.write(line)
                n += 1
                nbytes += len(line)
        _vid, name, ver = resolve(con, ref)
        summary = {"version": f"{name}@{ver}", "out": str(out), "records": n, "bytes": nbytes,
                   "split": split or "all"}
        if before_publish:
            before_publish(summary)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return summary


_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def query(vault, text: str, limit: int = 1000) -> dict:
    """Read-only SQL as an operator runs it: audited first, then on a read-only attach with no file access."""
    with vault.transaction():
        vault.audit("vault.sql", [], {"query": text})
    vault.reopen(read_only=True)
    vault.con.execute("SET enable_external_access = false")  # no reading or writing files from SQL
    vault.con.execute("SET lock_configuration = true")  # nor turning off spill encryption from the query
    return sql(vault.con, text, limit)


def sql(con, query: str, limit: int = 1000) -> dict:
    """Run read-only SQL. The vault is attached READ_ONLY and external file access is off as well."""
    try:
        stmts = con.extract_statements(query)
    except duckdb.Error as e:
        raise UsageError(f"SQL does not parse: {_line(e)}", "check the query") from None
    if not stmts:
        raise UsageError("empty SQL", "pass a SELECT statement")
    for s in stmts:
        if s.type not in _ALLOWED:
            raise VaultError(f"only SELECT is allowed here, not {s.type.name}", "the SQL panel is read-only")
        if s.type.name == "EXPLAIN" and "ANALYZE" in s.query.upper():  # it would run the statement inside
            raise VaultError("EXPLAIN ANALYZE is not allowed here", "use EXPLAIN, or run the SELECT itself")
    try:
        for s in stmts[:-1]:
            con.execute(s)
        cur = con.execute(stmts[-1])
        cols = [d[0] for d in cur.description]
        rows = cur.fetchmany(limit + 1)
    except duckdb.PermissionException:
        raise VaultError("SQL may not read or write files", "query the vault's own tables") from None
    except duckdb.Error as e:
        raise VaultError(f"SQL failed: {_line(e)}",
                         "check table and column names (SELECT * FROM duckdb_tables() lists them)") from None
    truncated = len(rows) > limit
    return {"columns": cols, "rows": [[_jsonable(v) for v in r] for r in rows[:limit]], "truncated": truncated}


def _jsonable(v):
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (int, float, str, bool)):
        return v
    return str(v)


def _line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
