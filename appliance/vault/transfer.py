"""A dataset version as bundle files, and back: in memory only, so its text never lands on disk in plaintext.

Files: `dataset.json` (name, version, content hash, split fraction, PII mode, tables), `records.jsonl`
(every record with its hash, metadata, split and text, in order) and `tables/NAME.parquet` for the tables
its table rows come from. On import every record's text is hashed again and must match, the tables land
under new names (table records are re-pointed), and the new version's content hash must equal the
exported one: the same dataset, byte for byte, under a local name.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from appliance.db_time import utcnow
from appliance.errors import VaultError


def dataset_files(con, ref: str) -> tuple[list[tuple[str, bytes]], dict]:
    from appliance.vault.versions import iter_records, resolve

    vid, name, n = resolve(con, ref)
    chash, fraction, pii_mode = con.execute(
        "SELECT content_hash, validation_fraction, pii_mode FROM versions WHERE vid = ?", [vid]).fetchone()
    lines, tables = [], []
    for rec in iter_records(con, f"{name}@{n}"):
        lines.append(json.dumps({k: rec[k] for k in ("hash", "kind", "source", "path", "language", "title",
                                                     "meta", "split", "text")}, ensure_ascii=False))
        if rec["kind"] == "table" and rec["path"] not in tables:
            tables.append(rec["path"])
    files = [("records.jsonl", ("\n".join(lines) + "\n").encode())]
    for t in tables:
        buf = io.BytesIO()
        pq.write_table(con.execute(f'SELECT * FROM data."{t}"').fetch_arrow_table(), buf)
        files.append((f"tables/{t}.parquet", buf.getvalue()))
    info = {"name": name, "version": f"{name}@{n}", "content_hash": chash, "validation_fraction": fraction,
            "pii_mode": pii_mode, "records": len(lines), "tables": tables}
    return [("dataset.json", json.dumps(info, indent=2).encode())] + files, info


def import_dataset(vault, files: dict[str, bytes], name: str, provenance: dict,
                   on_commit: Callable[[object, str], None] = lambda con, version: None) -> dict:
    """Land the files as a new version of `name`; returns its summary. All or nothing: `on_commit(con,
    version)` runs inside the same transaction (the caller's own bookkeeping)."""
    from appliance.vault import lineage
    from appliance.vault.ingest import RecordWriter, insert_rows
    from appliance.vault.readers import Record
    from appliance.vault.readers.tables import table_columns, table_name

    info = json.loads(files["dataset.json"])
    con = vault.con
    con.begin()
    try:
        vid = con.execute("SELECT nextval('version_vid')").fetchone()[0]
        con.execute("INSERT INTO versions (vid, name, status, created, actor, pii_mode, validation_fraction) "
                    "VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                    [vid, name, utcnow(), "bundle", info["pii_mode"], info["validation_fraction"]])
        renamed, table_rows = {}, []
        for t in info["tables"]:
            new = table_name(vid, Path(re.sub(r"^t\d+_", "", t)))  # this version's own table
            con.register("_t", pq.read_table(io.BytesIO(files[f"tables/{t}.parquet"])))
            try:
                con.execute(f'CREATE TABLE data."{new}" AS SELECT * FROM _t')
            finally:
                con.unregister("_t")
            renamed[t] = new
            rows = con.execute(f'SELECT count(*) FROM data."{new}"').fetchone()[0]
            table_rows.append((vid, new, f"bundle:{t}", rows, json.dumps(table_columns(con, new))))
        writer = RecordWriter(con, vid, 0, info["validation_fraction"])
        held_out = []
        for line in files["records.jsonl"].decode("utf-8").splitlines():
            r = json.loads(line)
            if r["split"] == "validation":
                held_out.append(r["hash"])
            data = r["text"].encode("utf-8")
            digest = hashlib.sha256(data).hexdigest()
            if digest != r["hash"]:
                raise VaultError("a record in the bundle does not match its hash", "the bundle is damaged")
            path = renamed.get(r["path"], r["path"]) if r["kind"] == "table" else r["path"]
            writer.add(Record(r["kind"], r["source"], r["text"], path, r["language"], r["title"], r["meta"] or {}),
                       r["text"], digest, len(data))
        writer.flush()
        insert_rows(con, "version_tables", table_rows)
        recs, nbytes, chash = con.execute(
            "SELECT count(*), coalesce(sum(bytes), 0), sha256(coalesce(string_agg(hash, '' ORDER BY ord), '')) "
            "FROM version_records WHERE vid = ?", [vid]).fetchone()
        if chash != info["content_hash"]:
            raise VaultError("the imported dataset does not hash to the exported one", "the bundle is damaged")
        # the splits travel with the records: keep them exactly as they were exported
        con.register("_h", pa.table({"hash": pa.array(held_out, pa.string())}))
        try:
            con.execute("UPDATE version_records SET split = CASE WHEN hash IN (SELECT hash FROM _h) "
                        "THEN 'validation' ELSE 'train' END WHERE vid = ?", [vid])
        finally:
            con.unregister("_h")
        n = con.execute("SELECT coalesce(max(n), 0) + 1 FROM versions WHERE name = ? AND status = 'committed'",
                        [name]).fetchone()[0]
        version = f"{name}@{n}"
        con.execute("UPDATE versions SET n = ?, status = 'committed', committed = ?, content_hash = ?, records = ?, "
                    "bytes = ?, duplicates = 0, skipped = 0, parents = '[]' WHERE vid = ?",
                    [n, utcnow(), chash, recs, nbytes, vid])
        lineage.add_node(con, version, "dataset", [], chash, {"records": recs, "bytes": nbytes,
                                                              "pii_mode": info["pii_mode"], **provenance})
        vault.audit("bundle.import", [version], {"kind": "dataset", "records": recs, **{
            k: v for k, v in provenance.items() if k != "source_lineage"}})
        on_commit(con, version)
        con.commit()
    except BaseException:
        con.rollback()  # the tables, records and version row all go with it
        raise
    return {"version": version, "records": recs, "bytes": nbytes, "content_hash": chash,
            "tables": list(renamed.values())}
