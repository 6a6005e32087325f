"""Reading dataset versions: list, show, resolve `NAME[@N]`, iterate records, export, read-only SQL."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import duckdb

from appliance.db_time import iso
from appliance.errors import NotFound, UsageError, VaultError, bundle_errors
from appliance.vault.db import cursor


def resolve(con, ref: str) -> tuple[int, str, int]:
    """`name@n` or `name` (the newest) -> (vid, name, n); the rule of `appliance.refs` for dataset versions,
    kept here so the vault's own readers share it. A miss is the UsageError `refs` gives for any kind."""
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
        raise NotFound(f"no dataset version {ref}", _missing_hint(con, name))
    return row


def _missing_hint(con, name: str) -> str:
    """What exists instead, worded as `appliance.refs` words it for every kind: the versions of `name`, else
    the newest of the other datasets."""
    same = [f"{name}@{n}" for (n,) in con.execute(
        "SELECT n FROM versions WHERE name = ? AND status = 'committed' ORDER BY n", [name]).fetchall()]
    if same:
        return f"{name} has {', '.join(same[-6:])}; list them with `appliance vault datasets`"
    latest = [r["latest"] for r in sorted(datasets(con), key=lambda r: r["updated"] or "", reverse=True)]
    if not latest:
        return "the vault has no datasets yet; ingest one with `appliance vault ingest`"
    more = ", ..." if len(latest) > 5 else ""
    return f"datasets here: {', '.join(latest[:5])}{more}; list them with `appliance vault datasets`"


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


def _record_filter(vid: int, grep: str | None, file: str | None) -> tuple[str, list]:
    """The WHERE clause (fixed text; the values are bound) of a version's records matching `grep` and `file`.

    `grep` matches the record's text, case-insensitively; `file` its source file or repository path, whole or
    by its last components (`handbook/permits.md` matches `/data/handbook/permits.md`)."""
    where, params = "r.vid = ?", [vid]
    if grep:
        where += " AND strpos(lower(b.text), lower(?)) > 0"
        params.append(grep)
    if file:
        where += (" AND (r.source = ? OR r.path = ? OR ends_with(r.source, '/' || ?) "
                  "OR ends_with(r.path, '/' || ?))")
        params += [file] * 4
    return where, params


def records_page(con, ref: str, offset: int = 0, limit: int = 200, grep: str | None = None,
                 file: str | None = None) -> list[dict]:
    """One page of a version's records without their text: for browsing (optionally only those matching)."""
    vid, name, n = resolve(con, ref)
    where, params = _record_filter(vid, grep, file)
    rows = con.execute("SELECT r.ord, r.kind, r.split, r.path, r.title, r.bytes, r.source FROM version_records r "
                       "JOIN blobs b ON b.hash = r.hash WHERE " + where + " ORDER BY r.ord LIMIT ? OFFSET ?",
                       [*params, limit, offset]).fetchall()
    return [{"ord": o, "kind": k, "split": sp, "path": p, "title": t, "bytes": b, "source": src,
             "id": f"{name}@{n}#{o}"} for o, k, sp, p, t, b, src in rows]


def count_records(con, ref: str, grep: str | None = None, file: str | None = None) -> int:
    """How many of a version's records match `grep` and `file` (see `records_page`)."""
    vid, _, _ = resolve(con, ref)
    where, params = _record_filter(vid, grep, file)
    return con.execute("SELECT count(*) FROM version_records r JOIN blobs b ON b.hash = r.hash WHERE " + where,
                       params).fetchone()[0]


def record_id(text: str) -> tuple[str, int]:
    """`NAME@N#ORD` (or `NAME#ORD`, the newest version) -> (version ref, ord)."""
    ref, sep, ord_ = text.rpartition("#")
    if not sep or not ref or not (ord_.isascii() and ord_.isdigit()):
        raise UsageError(f"bad record id {text!r}", "write NAME@N#ORD, as `appliance vault records NAME@N` lists")
    return ref, int(ord_)


def origin(r: dict) -> str:
    """Where a record came from: its source file, and the path inside it (a repository file, a mail member)."""
    src, path = r.get("source") or "", r.get("path") or ""
    return f"{src} :: {path}" if src and path and not src.endswith(path) else src or path


def totals(con) -> dict:
    """The vault's committed datasets and versions; `records` sums the versions' record counts (a record kept
    in two versions counts twice), `distinct_records` counts each stored text once."""
    d, v, r = con.execute("SELECT count(DISTINCT name), count(*), coalesce(sum(records), 0)::BIGINT FROM versions "
                          "WHERE status = 'committed'").fetchone()
    return {"datasets": d, "versions": v, "records": r,
            "distinct_records": con.execute("SELECT count(*) FROM blobs").fetchone()[0]}


def record(con, ref: str, ord_: int) -> dict:
    """One record of a version, text included (as scrubbed at ingest)."""
    vid, name, n = resolve(con, ref)
    row = con.execute("SELECT r.kind, r.path, r.title, r.meta, b.text, r.source, r.split FROM version_records r "
                      "JOIN blobs b ON b.hash = r.hash WHERE r.vid = ? AND r.ord = ?", [vid, ord_]).fetchone()
    if row is None:
        raise UsageError(f"{name}@{n} has no record {ord_}", "pick one from the list")
    return {"version": f"{name}@{n}", "ord": ord_, "kind": row[0], "path": row[1], "title": row[2],
            "meta": json.loads(row[3]) if row[3] else {}, "text": row[4], "source": row[5], "split": row[6],
            "id": f"{name}@{n}#{ord_}"}


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
    for path, typ, cnt in con.execute("SELECT path, type, sum(count)::BIGINT FROM version_pii WHERE vid = ? "
                                      "GROUP BY path, type ORDER BY path, type", [vid]).fetchall():
        pii_files.setdefault(path, {})[typ] = cnt
    # a vault made before the report kept detectors, opened read-only, has no such columns yet
    cols = "detector, band" if has_column(con, "version_pii", "detector") else "NULL, NULL"
    detectors = [{"path": p, "type": t, "detector": d, "band": bd, "count": c} for p, t, d, bd, c in con.execute(
        f"SELECT path, type, {cols}, sum(count)::BIGINT FROM version_pii WHERE vid = ? "
        "GROUP BY ALL ORDER BY ALL NULLS FIRST", [vid]).fetchall()]
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
        "kinds": kinds, "pii": {"total": pii_total, "per_file": pii_files, "by_detector": detectors},
        "sources": sources, "tables": tables, "warnings": _rescrub_warnings(con, f"{name}@{n}"),
    }


def has_column(con, table: str, column: str) -> bool:
    """Whether the vault's `table` has `column` (a vault made by an older release, opened read-only, may not)."""
    return con.execute("SELECT 1 FROM information_schema.columns WHERE table_name = ? AND column_name = ? "
                       "AND table_catalog = current_database()", [table, column]).fetchone() is not None


def _rescrub_warnings(con, version: str) -> list[str]:
    """What `lineage.less_scrubbed` says of this version: rescrubbed since, and what was made from it."""
    from appliance.vault import lineage

    return [w["message"] for w in lineage.less_scrubbed(con, version)]


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
    from bundles.safefile import atomic_create  # exclusive random temp name, no links followed (item 7)

    n = nbytes = 0
    with bundle_errors(), atomic_create(out, 0o600, replace=force) as f:
        for rec in iter_records(con, ref, split):
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            f.write(line.encode("utf-8"))
            n += 1
            nbytes += len(line)
        _vid, name, ver = resolve(con, ref)
        summary = {"version": f"{name}@{ver}", "out": str(out), "records": n, "bytes": nbytes,
                   "split": split or "all"}
        if before_publish:
            before_publish(summary)
    return summary


# Read-only SQL runs only what DuckDB's own parser says is a side-effect-free read: one SELECT (or a plain
# EXPLAIN of one), whose parse tree (json_serialize_sql) names no table function outside this list, no
# side-effecting scalar, and no table that is not in the catalog (a file name would be a replacement scan).
# The connection is locked down as well (`_lock_down`), so a hole in one layer still writes no file.
TABLE_FUNCTIONS = frozenset({
    # The catalog and settings, as views of in-memory state; none opens a file or changes anything.
    "duckdb_columns", "duckdb_constraints", "duckdb_databases", "duckdb_dependencies", "duckdb_functions",
    "duckdb_indexes", "duckdb_keywords", "duckdb_memory", "duckdb_optimizers", "duckdb_schemas",
    "duckdb_sequences", "duckdb_settings", "duckdb_tables", "duckdb_types", "duckdb_variables", "duckdb_views",
    "pragma_collations", "pragma_database_size", "pragma_platform", "pragma_show", "pragma_table_info",
    "pragma_version",
    # Values computed from their arguments alone.
    "range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree",
})
# Scalars DuckDB marks VOLATILE are refused unless listed here: these read a clock, a random source or
# session state and change nothing. setseed, nextval and write_log (the rest) change state or write logs.
HARMLESS_VOLATILE = frozenset({
    "now", "today", "current_date", "get_current_time", "get_current_timestamp", "transaction_timestamp",
    "random", "uuid", "uuidv4", "uuidv7", "gen_random_uuid", "current_schema", "current_schemas",
    "current_database", "current_query", "current_connection_id", "current_query_id", "current_transaction_id",
    "txid_current", "in_search_path", "currval", "error", "stats",
})
SHOW_TABLES = frozenset({"", "tables", "__show_tables_expanded", "databases"})  # SHOW TABLES, SHOW DATABASES
_READ_ONLY_HINT = "the SQL panel is read-only: one SELECT over the vault's tables"


def query(vault, text: str, limit: int = 1000) -> dict:
    """Read-only SQL as an operator runs it (CLI, console, MCP): checked, audited, then run on a locked-down attach.

    The check only parses (nothing of `text` runs), so a refused query leaves the vault as it was.
    """
    statement = checked(vault.con, text)
    with vault.transaction():
        vault.audit("vault.sql", [], {"query": text})
    was_read_only = vault.read_only
    vault.reopen(read_only=True)
    try:
        _lock_down(vault.con)
        return _run(vault.con, statement, limit)
    finally:  # a fresh, unlocked attach as before: the handle goes on working for its caller (API, console)
        vault.reopen(read_only=was_read_only)


def _lock_down(con) -> None:
    """No file can be opened by name from here on, and no setting changed.

    enable_external_access=false alone still lets SQL write the temp directory and the attached vault file
    itself (DuckDB allows both); disabling the local file system closes those too. The vault's pages are
    read through the handle opened at ATTACH, which keeps working; a query too large for memory fails
    instead of spilling. Spill encryption stays on (set at connect) and cannot be turned off once locked.
    """
    con.execute("SET python_enable_replacements = false")  # no scanning the caller's Python variables
    con.execute("SET enable_external_access = false")
    con.execute("SET disabled_filesystems = 'LocalFileSystem'")
    con.execute("SET lock_configuration = true")


def sql(con, query: str, limit: int = 1000) -> dict:
    """Run one side-effect-free SELECT (checked with DuckDB's parser); user text goes through `query`."""
    return _run(con, checked(con, query), limit)


def _run(con, statement: str, limit: int) -> dict:
    try:
        cur = con.execute(statement)
        cols = [d[0] for d in cur.description]
        rows = cur.fetchmany(limit + 1)
    except duckdb.PermissionException:
        raise VaultError("SQL may not read or write files (nor spill a query too large for memory)",
                         "query the vault's own tables; aggregate or add a LIMIT") from None
    except duckdb.Error as e:
        raise VaultError(f"SQL failed: {_line(e)}",
                         "check table and column names (SELECT * FROM duckdb_tables() lists them)") from None
    truncated = len(rows) > limit
    return {"columns": cols, "rows": [[_jsonable(v) for v in r] for r in rows[:limit]], "truncated": truncated}


def checked(con, text: str) -> str:
    """The one statement in `text` to run, if it only reads; else UsageError/VaultError saying why."""
    try:
        stmts = con.extract_statements(text)
    except duckdb.Error as e:
        raise UsageError(f"SQL does not parse: {_line(e)}", "check the query") from None
    if not stmts:
        raise UsageError("empty SQL", "pass a SELECT statement")
    for s in stmts:
        if s.type not in (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN):
            raise VaultError(f"only SELECT is allowed here, not {s.type.name}", _READ_ONLY_HINT)
    if len(stmts) > 1:
        raise VaultError(f"only one statement is allowed here, not {len(stmts)}", "run them one at a time")
    stmt = stmts[0].query.strip()
    if stmts[0].type == duckdb.StatementType.EXPLAIN:
        inner = _explained(con, stmt)
        _check_select(con, inner)
        return f"EXPLAIN {inner}"  # rebuilt: what runs is what was checked
    _check_select(con, stmt)
    return stmt


def _explained(con, stmt: str) -> str:
    """The SELECT inside a plain `EXPLAIN SELECT ...`; ANALYZE (any spelling) or options are refused."""
    tokens = duckdb.tokenize(stmt)  # comments are not tokens
    refuse = VaultError("EXPLAIN ANALYZE is not allowed here, nor EXPLAIN options or EXPLAIN of anything "
                        "but a SELECT", "use EXPLAIN SELECT ..., or run the SELECT itself")
    if len(tokens) < 2 or stmt[tokens[0][0]:tokens[0][0] + 7].upper() != "EXPLAIN":
        raise refuse
    inner = stmt[tokens[1][0]:]
    try:
        inner_stmts = con.extract_statements(inner)
    except duckdb.Error:
        raise refuse from None
    if len(inner_stmts) != 1 or inner_stmts[0].type != duckdb.StatementType.SELECT:
        raise refuse
    return inner.strip()


def _check_select(con, stmt: str) -> None:
    """Walk the SELECT's parse tree: every table function allowed, every scalar harmless, every table real."""
    tree = json.loads(con.execute("SELECT json_serialize_sql(?::VARCHAR)", [stmt]).fetchone()[0])
    if tree.get("error"):
        raise VaultError(f"this form of query cannot be checked, so it does not run here "
                         f"({tree.get('error_message', 'no parse tree')})", "write it as a plain SELECT")
    found = _Found()
    _walk(tree["statements"], found)
    for name in found.table_functions:
        if name not in TABLE_FUNCTIONS:
            if _reads_files(name):
                raise VaultError(f"SQL may not read or write files: {name}() is not allowed here",
                                 "query the vault's own tables; duckdb_tables() lists them")
            raise VaultError(f"table function {name}() is not allowed here",
                             "only catalog views (duckdb_tables() ...) and range/unnest-style generators are")
    refused = _side_effect_functions(con) & found.functions
    if refused:
        raise VaultError(f"SQL may not call {', '.join(sorted(refused))}() here: it changes state",
                         _READ_ONLY_HINT)
    for show in found.show_refs:
        if show not in SHOW_TABLES:
            raise VaultError(f"SHOW {show} is not allowed here", "use DESCRIBE table or SHOW TABLES")
    _check_tables(con, found)


class _Found:
    def __init__(self) -> None:
        self.table_functions: list[str] = []
        self.functions: set[str] = set()
        self.tables: list[tuple[str, str, str]] = []  # (catalog, schema, name), lower case, not a WITH name
        self.show_refs: list[str] = []


def _walk(node, found: _Found, ctes: frozenset[str] = frozenset()) -> None:
    """Collect what the tree names; `ctes` are the WITH names in scope here (a name out of scope is a table)."""
    if isinstance(node, list):
        for x in node:
            _walk(x, found, ctes)
        return
    if not isinstance(node, dict):
        return
    ctes = ctes | {str(e["key"]).lower() for e in (node.get("cte_map") or {}).get("map", [])}
    kind = node.get("type")
    if kind == "TABLE_FUNCTION":
        found.table_functions.append(str(node["function"]["function_name"]).lower())
    elif kind == "BASE_TABLE":
        ref = (node.get("catalog_name", "").lower(), node.get("schema_name", "").lower(),
               str(node["table_name"]).lower())
        if ref[0] or ref[1] or ref[2] not in ctes:
            found.tables.append(ref)
    elif kind == "SHOW_REF":
        found.show_refs.append(str(node.get("table_name") or "").strip('"').lower())
    if node.get("class") in ("FUNCTION", "WINDOW") and "function_name" in node:  # scalars, aggregates, windows
        found.functions.add(str(node["function_name"]).lower())
    for value in node.values():
        _walk(value, found, ctes)


def _reads_files(name: str) -> bool:
    return name.startswith(("read_", "parquet_", "sniff_")) or name == "glob"


def _side_effect_functions(con) -> set[str]:
    rows = con.execute("SELECT DISTINCT lower(function_name) FROM duckdb_functions() "
                       "WHERE stability = 'VOLATILE'").fetchall()
    return {n for (n,) in rows} - HARMLESS_VOLATILE


def _check_tables(con, found: _Found) -> None:
    """Every table named is a CTE or in the catalog; anything else would be a file (a replacement scan)."""
    if not found.tables:
        return
    catalog = con.execute(
        "SELECT lower(database_name), lower(schema_name), lower(table_name) FROM duckdb_tables() UNION ALL "
        "SELECT lower(database_name), lower(schema_name), lower(view_name) FROM duckdb_views()").fetchall()
    for cat, schema, name in found.tables:
        if not any(n == name and (not schema or schema in (s, d)) and (not cat or cat == d)
                   for d, s, n in catalog):
            shown = ".".join(p for p in (cat, schema, name) if p)
            raise VaultError(f"no table or view {shown!r} in the vault (files cannot be read here)",
                             "SELECT * FROM duckdb_tables() lists them")


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
