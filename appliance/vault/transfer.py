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

import pyarrow.parquet as pq

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
    from appliance.vault.builder import VersionBuilder
    from appliance.vault.fields import FieldScrubber, scrub_record, site_types
    from appliance.vault.readers import Record

    info = json.loads(files["dataset.json"])
    # the text must stay as hashed; its fields (title, path, source, metadata) land scrubbed like everywhere
    fs = FieldScrubber(info["pii_mode"], vault.secrets.pseudonym_key, site_types(vault.home.root))
    with VersionBuilder(vault, name, pii_mode=info["pii_mode"], validation_fraction=info["validation_fraction"],
                        actor="bundle", atomic=True) as b:
        renamed = {}
        for t in info["tables"]:
            new = b.table_name(re.sub(r"^t\d+_", "", t))  # this version's own table
            b.create_table(new, pq.read_table(io.BytesIO(files[f"tables/{t}.parquet"])))
            b.table(new, f"bundle:{t}")
            renamed[t] = new
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
            rec = Record(r["kind"], r["source"], r["text"], path, r["language"], r["title"], r["meta"] or {},
                         scrubbed=True)
            scrub_record(fs, rec)
            if rec.source:
                rec.source = fs.path(rec.source, "source")[0]
            b.add(rec, r["text"], digest, len(data))
        if b.totals().content_hash != info["content_hash"]:
            raise VaultError("the imported dataset does not hash to the exported one", "the bundle is damaged")
        # the splits travel with the records: keep them exactly as they were exported
        done = b.commit("bundle.import", attrs=provenance, held_out=held_out, on_commit=on_commit,
                        details={"kind": "dataset", **{k: v for k, v in provenance.items() if k != "source_lineage"}})
    return {"version": done.version, "records": done.records, "bytes": done.bytes,
            "content_hash": done.content_hash, "tables": list(renamed.values())}
