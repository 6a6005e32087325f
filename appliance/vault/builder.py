"""The one writer of dataset versions: a pending row, then `NAME@N` with its content hash, lineage and audit.

Ingest, synth and bundle import say what goes into a version; `VersionBuilder` owns the sequence. It starts
a pending `versions` row, takes records (blobs and their order), the source manifest, PII counts and tables,
and `commit` numbers the version, hashes it and records it in lineage and the audit log in one transaction.
An error before the commit ends removes every trace of the version: nothing half-written stays.

    with VersionBuilder(vault, "handbook", pii_mode="redact", validation_fraction=0.05,
                        previous=latest(vault.con, "handbook")) as b:
        b.add(record, text, digest, nbytes)
        b.source(path, "markdown", size, sha256, records=1, duplicates=0, status="ok")
        b.pii(path, {"EMAIL": 2})
        done = b.commit("vault.ingest", attrs={"files": 1}, details={"files": 1})

Two ways to write, chosen by `atomic`:
- streaming (ingest, the default): records land in batches as they come, each batch its own statement, so a
  large ingest stays inside its memory limit and DuckDB can checkpoint. An error in this process discards
  the version at once; a process killed meanwhile leaves a pending row that the next writable open discards
  (`discard_unfinished`).
- atomic (synth, bundle import): everything from the pending row to the commit is one transaction; an error
  rolls all of it back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from appliance.db_time import utcnow
from appliance.vault import lineage
from appliance.vault.audit import actor_of
from appliance.vault.readers import Record, meta_json

BATCH_BYTES = 8 << 20
_VERSION_TABLES = ("version_records", "version_sources", "version_pii", "version_pii_findings", "version_tables",
                   "versions")
FINDINGS_BATCH = 50_000  # findings kept for review are written in batches of this many


@dataclass(frozen=True)
class Totals:
    """What a version holds: its record count, bytes and content hash (sha256 over the record hashes in order)."""

    records: int
    bytes: int
    content_hash: str


@dataclass(frozen=True)
class Committed:
    """A committed version: its id `NAME@N` and totals."""

    version: str
    content_hash: str
    records: int
    bytes: int


def split_of(record_hash: str, fraction: float) -> str:
    """Deterministic split from the content hash: a record keeps its split in every version."""
    return "validation" if int(record_hash[:8], 16) < fraction * 0x100000000 else "train"


class RecordWriter:
    """Buffers records and writes them in batches: blobs (dedup by hash) and the version's record list."""

    def __init__(self, con, vid: int, ord_start: int, fraction: float):
        self.con, self.vid, self.ord, self.fraction = con, vid, ord_start, fraction
        self.rows: list[tuple] = []
        self.blobs: dict[str, tuple[str, int]] = {}  # hash -> (text, UTF-8 bytes)
        self.pending_bytes = 0

    def add(self, rec: Record, text: str, digest: str, nbytes: int) -> None:
        """`nbytes` is the UTF-8 length of `text`, which the caller already encoded to hash it."""
        self.add_row(rec.kind, rec.source, rec.path, rec.language, rec.title, meta_json(rec.meta), text, digest,
                     nbytes)

    def add_row(self, kind: str, source: str, path: str | None, language: str | None, title: str | None,
                meta: str | None, text: str, digest: str, nbytes: int) -> None:
        """A record given by its values, its metadata as `meta_json` wrote it (ingest's workers send records so,
        `scan.landing`)."""
        self.rows.append((self.vid, self.ord, digest, kind, source, path, language, title, meta,
                          split_of(digest, self.fraction), nbytes))
        self.blobs[digest] = (text, nbytes)
        self.ord += 1
        self.pending_bytes += nbytes
        if self.pending_bytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        texts, sizes = zip(*self.blobs.values())
        blobs = pa.table({"hash": list(self.blobs), "text": list(texts), "bytes": list(sizes)})
        cols = list(zip(*self.rows))
        recs = pa.table({n: pa.array(c, type=t) for n, c, t in zip(_REC_COLS, cols, _REC_TYPES)})
        self.con.register("_blobs", blobs)
        self.con.register("_recs", recs)
        try:
            self.con.execute("INSERT OR IGNORE INTO blobs SELECT * FROM _blobs")
            self.con.execute("INSERT INTO version_records SELECT * FROM _recs")
        finally:
            self.con.unregister("_blobs")
            self.con.unregister("_recs")
        self.rows, self.blobs, self.pending_bytes = [], {}, 0

    def rollback_from(self, ord_start: int) -> None:
        """Forget a file's records (it failed half way): buffered ones and already written ones."""
        for r in self.rows:
            if r[1] >= ord_start:
                self.blobs.pop(r[2], None)
        self.rows = [r for r in self.rows if r[1] < ord_start]
        self.pending_bytes = sum(r[10] for r in self.rows)
        self.con.execute("DELETE FROM version_records WHERE vid = ? AND ord >= ?", [self.vid, ord_start])
        self.ord = ord_start


_REC_COLS = ("vid", "ord", "hash", "kind", "source", "path", "language", "title", "meta", "split", "bytes")
_REC_TYPES = (pa.int32(), pa.int64(), pa.string(), pa.string(), pa.string(), pa.string(), pa.string(),
              pa.string(), pa.string(), pa.string(), pa.int64())


class VersionBuilder:
    """A new version of dataset `name`, pending until `commit`; see the module docstring.

    Args:
        vault: the unlocked, writable vault.
        name: the dataset (already validated).
        pii_mode: how its records were scrubbed, recorded with the version.
        validation_fraction: the share of records (by hash) in the validation split.
        previous: (vid, n) of the version this one starts from (its records are copied first), or None.
        actor: who makes it, for the version row (default: the vault's actor, else the process's).
        atomic: one transaction from start to commit (see the module docstring).
    """

    def __init__(self, vault, name: str, *, pii_mode: str, validation_fraction: float,
                 previous: tuple[int, int] | None = None, actor: str | None = None, atomic: bool = False):
        self.vault, self.con, self.name = vault, vault.con, name
        self.pii_mode, self.fraction, self.atomic = pii_mode, validation_fraction, atomic
        self._previous, self._actor = previous, actor
        self.previous = f"{name}@{previous[1]}" if previous else None  # NAME@N this version starts from
        self.vid: int | None = None
        self.inherited: set[str] = set()  # hashes of the records copied from `previous`
        self.tables: list[str] = []  # data tables this version named (a dropped one stays taken)
        self._data_tables: set[str] | None = None  # the vault's data tables when this version first named one
        self._writer: RecordWriter | None = None
        self._sources: list[tuple] = []
        self._pii: list[tuple] = []
        self._findings: list[tuple] = []
        self._table_rows: list[tuple] = []
        self._made: dict[str, tuple[int, list[list[str]]]] = {}  # rows and columns of the tables `create_table` wrote
        self._orphans: list[str] = []  # hashes of records dropped again (a file that failed half way)
        self._totals: Totals | None = None
        self._open = False
        self.committed: Committed | None = None

    # --- the sequence -----------------------------------------------------------------------------------
    def __enter__(self) -> VersionBuilder:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()  # an error, or a block left without `commit`: nothing of the version stays

    def start(self) -> VersionBuilder:
        """The pending version row, and the previous version's records copied in."""
        con = self.con
        if self.atomic:
            con.begin()
        self._open = True
        try:
            self.vid = con.execute("SELECT nextval('version_vid')").fetchone()[0]
            con.execute("INSERT INTO versions (vid, name, status, created, actor, pii_mode, validation_fraction) "
                        "VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                        [self.vid, self.name, utcnow(), self._actor or actor_of(self.vault),
                         self.pii_mode, self.fraction])
            if self._previous:
                con.execute("INSERT INTO version_records SELECT ?, ord, hash, kind, source, path, language, title, "
                            "meta, split, bytes FROM version_records WHERE vid = ?", [self.vid, self._previous[0]])
                self.inherited = {h for (h,) in con.execute("SELECT hash FROM version_records WHERE vid = ?",
                                                            [self.vid]).fetchall()}
                con.execute("INSERT INTO version_pii_findings SELECT ?, ord, source, field, type, detector, score, "
                            "pos, len FROM version_pii_findings WHERE vid = ?", [self.vid, self._previous[0]])
        except BaseException:
            self.discard()
            raise
        self._writer = RecordWriter(con, self.vid, len(self.inherited), self.fraction)
        return self

    def commit(self, action: str, *, parents: Iterable[tuple[str, str]] = (), attrs: dict | None = None,
               details: dict | None = None, duplicates: int = 0, skipped: int = 0,
               held_out: list[str] | None = None,
               on_commit: Callable[[object, str], None] | None = None) -> Committed:
        """Number, hash and record the version; on any error discard it (and raise).

        Args:
            action: the audit action (`vault.ingest`, `vault.synth`, `bundle.import`).
            parents: (id, role) lineage parents beside `previous`; listed in the version's parents too.
            attrs: the lineage node's attributes beside records, bytes and pii_mode.
            details: the audit entry's details beside records; its ids are the version and `parents`.
            duplicates, skipped: the version row's counts of duplicate records and skipped files.
            held_out: the hashes of the validation split, exactly (an import keeps the sender's splits);
                None gives each record the split of its hash and a version of two or more records at
                least one validation record.
            on_commit: `on_commit(con, version)` runs last inside the same transaction.
        """
        parents = list(parents)
        try:
            if self.atomic:
                done = self._commit(action, parents, attrs, details, duplicates, skipped, held_out, on_commit)
                self.con.commit()
            else:
                with self.vault.transaction():
                    done = self._commit(action, parents, attrs, details, duplicates, skipped, held_out, on_commit)
        except BaseException:
            self.discard()
            raise
        self._open = False
        self.committed = done
        return done

    def discard(self) -> None:
        """Remove the version and everything written for it (records, blobs no other version uses, tables).

        Never raises: it runs while another error is on its way, and what it cannot remove now the next
        writable open does (`discard_unfinished`)."""
        if not self._open:
            return
        self._open = False
        try:
            if self.atomic:
                self.con.rollback()  # the tables, records and version row all go with it
            elif self.vid is not None:
                with self.vault.transaction():
                    _drop_blobs(self.con, self._orphans, vid=self.vid)
                    discard_version(self.con, self.vid)
        except Exception:  # the error that led here is the one to report
            pass

    # --- what goes in ---------------------------------------------------------------------------------
    @property
    def next_ord(self) -> int:
        """The position the next record takes."""
        return self._writer.ord

    def add(self, rec: Record, text: str, digest: str, nbytes: int) -> None:
        """One record: `text` (as scrubbed), its sha256 `digest` and UTF-8 length `nbytes`."""
        self._totals = None
        self._writer.add(rec, text, digest, nbytes)

    def add_row(self, kind: str, source: str, path: str | None, language: str | None, title: str | None,
                meta: str | None, text: str, digest: str, nbytes: int) -> None:
        """One record by its values (`RecordWriter.add_row`)."""
        self._totals = None
        self._writer.add_row(kind, source, path, language, title, meta, text, digest, nbytes)

    def drop_from(self, ord_start: int, hashes: Iterable[str]) -> None:
        """Forget the records from position `ord_start` on (a file that failed half way); `hashes` are their
        texts, removed at the commit unless another version holds them."""
        self._totals = None
        self._orphans.extend(hashes)
        if ord_start >= self._writer.ord:
            return  # nothing added since (a file that failed or was skipped before its first record): no statement
        self._writer.rollback_from(ord_start)
        self._findings = [r for r in self._findings if r[1] is None or r[1] < ord_start]
        self.con.execute("DELETE FROM version_pii_findings WHERE vid = ? AND ord >= ?", [self.vid, ord_start])

    def source(self, path: str, kind: str | None, size: int | None, sha256: str | None, records: int,
               duplicates: int, status: str, reason: str | None = None) -> None:
        """One entry of the source manifest (status ok, skipped or failed)."""
        self._sources.append((self.vid, path, kind, size, sha256, records, duplicates, status, reason))

    def pii(self, path: str, counts: Mapping) -> None:
        """What PII scrubbing found in `path`: counts by type, or by (type, detector, confidence band)."""
        rows: dict[tuple, int] = {}
        for k, n in counts.items():
            key = tuple(k) if isinstance(k, tuple) else (k, None, None)
            rows[key] = rows.get(key, 0) + n
        self._pii.extend((self.vid, path, t, n, d, band) for (t, d, band), n in
                         sorted(rows.items(), key=lambda x: tuple(str(p) for p in x[0])) if n)

    def findings(self, path: str, found: Iterable[tuple]) -> None:
        """Findings of `path` kept for review: (record ord or None, `fields.Found` or its six values as a plain
        tuple), never their values."""
        self._findings.extend((self.vid, o, path, fld, typ, det, score, start, end - start)
                              for o, (fld, typ, det, score, start, end, *_) in found)
        if len(self._findings) >= FINDINGS_BATCH and not self.atomic:
            self._flush_findings()

    def _flush_findings(self) -> None:
        insert_rows(self.con, "version_pii_findings", self._findings)
        self._findings = []

    def table_name(self, stem: str | Path) -> str:
        """A new data table's name for this version, `t<vid>_<stem>`, free in the vault (`_2`, ... if not)."""
        from appliance.vault.readers.tables import table_name

        base = target = table_name(self.vid, Path(stem))
        if self._data_tables is None:  # the catalog, read once: a query per name costs ~10 ms, more with more tables
            self._data_tables = {t for (t,) in self.con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'data'").fetchall()}
        taken, i = self._data_tables.union(self.tables), 2  # every data table made since is in `tables`
        while target in taken:
            target, i = f"{base}_{i}", i + 1
        self.tables.append(target)
        return target

    def create_table(self, name: str, data: pa.Table) -> None:
        """Write `data` as the data table `name` (from `table_name`). A relation made from the Arrow table costs
        half of registering it as a view, creating from that and dropping the view again, and it knows the
        table's columns: `table` lists them from here instead of asking the vault."""
        rel = self.con.from_arrow(data)
        rel.create(f'data."{name}"')
        self._made[name] = (data.num_rows, [[n, str(t)] for n, t in zip(rel.columns, rel.types)])

    def drop_table(self, name: str) -> None:
        """Drop a data table this version started (its source failed); the name stays taken."""
        self.con.execute(f'DROP TABLE IF EXISTS data."{name}"')

    def table(self, name: str, source: str) -> None:
        """List the data table `name` as this version's, made from `source` (its rows and columns as now: as
        `create_table` wrote it, else read from the vault)."""
        from appliance.vault.readers.tables import table_columns

        made = self._made.pop(name, None)
        rows, columns = made or (self.con.execute(f'SELECT count(*) FROM data."{name}"').fetchone()[0],
                                 table_columns(self.con, name))
        self._table_rows.append((self.vid, name, source, rows, json.dumps(columns)))

    def totals(self) -> Totals:
        """Records, bytes and content hash of what was added so far (all of it written first)."""
        if self._totals is None:
            self._writer.flush()
            recs, nbytes, chash = self.con.execute(
                "SELECT count(*), coalesce(sum(bytes), 0), sha256(coalesce(string_agg(hash, '' ORDER BY ord), '')) "
                "FROM version_records WHERE vid = ?", [self.vid]).fetchone()
            self._totals = Totals(recs, nbytes, chash)
        return self._totals

    # --- inside the commit --------------------------------------------------------------------------
    def _commit(self, action, parents, attrs, details, duplicates, skipped, held_out, on_commit) -> Committed:
        con, vid = self.con, self.vid
        _drop_blobs(con, self._orphans)
        insert_rows(con, "version_sources", self._sources)
        insert_rows(con, "version_pii", self._pii)
        self._flush_findings()
        insert_rows(con, "version_tables", self._table_rows)
        t = self.totals()
        if held_out is not None:
            _set_splits(con, vid, held_out)
        elif t.records >= 2 and not con.execute(
                "SELECT 1 FROM version_records WHERE vid = ? AND split = 'validation' LIMIT 1", [vid]).fetchone():
            # a tiny dataset still needs one held-out record; pick it by hash so it is deterministic
            con.execute("UPDATE version_records SET split = 'validation' WHERE vid = ? AND hash = "
                        "(SELECT min(hash) FROM version_records WHERE vid = ?)", [vid, vid])
        n = con.execute("SELECT coalesce(max(n), 0) + 1 FROM versions WHERE name = ? AND status = 'committed'",
                        [self.name]).fetchone()[0]
        version = f"{self.name}@{n}"
        previous = [self.previous] if self.previous else []
        con.execute(
            "UPDATE versions SET n = ?, status = 'committed', committed = ?, content_hash = ?, records = ?, "
            "bytes = ?, duplicates = ?, skipped = ?, parents = ? WHERE vid = ?",
            [n, utcnow(), t.content_hash, t.records, t.bytes, duplicates, skipped,
             json.dumps(previous + [p for p, _ in parents]), vid])
        lineage.add_node(con, version, "dataset", [(p, "previous") for p in previous] + parents, t.content_hash,
                         {"records": t.records, "bytes": t.bytes, "pii_mode": self.pii_mode, **(attrs or {})})
        self.vault.audit(action, [version, *(p for p, _ in parents)], {"records": t.records, **(details or {})})
        if on_commit:
            on_commit(con, version)
        return Committed(version, t.content_hash, t.records, t.bytes)


def _set_splits(con, vid: int, held_out: list[str]) -> None:
    con.register("_held_out", pa.table({"hash": pa.array(held_out, pa.string())}))
    try:
        con.execute("UPDATE version_records SET split = CASE WHEN hash IN (SELECT hash FROM _held_out) "
                    "THEN 'validation' ELSE 'train' END WHERE vid = ?", [vid])
    finally:
        con.unregister("_held_out")


def _drop_blobs(con, hashes: list[str], vid: int | None = None) -> None:
    """Blobs of `hashes` (and of version `vid`'s records) that no other version's record uses."""
    if not hashes and vid is None:
        return
    con.register("_orphans", pa.table({"hash": pa.array(hashes, pa.string())}))
    try:
        if vid is None:
            con.execute("DELETE FROM blobs WHERE hash IN (SELECT hash FROM _orphans) "
                        "AND hash NOT IN (SELECT hash FROM version_records)")
        else:
            con.execute("DELETE FROM blobs WHERE hash IN (SELECT hash FROM _orphans UNION ALL "
                        "SELECT hash FROM version_records WHERE vid = ?) "
                        "AND hash NOT IN (SELECT hash FROM version_records WHERE vid <> ?)", [vid, vid])
    finally:
        con.unregister("_orphans")


def insert_rows(con, table: str, rows: list[tuple]) -> None:
    """Insert many rows through Arrow: DuckDB's executemany binds row by row and is ~100x slower."""
    if not rows:
        return
    cols = [c for (c,) in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                                      "AND table_catalog = current_database() ORDER BY ordinal_position",
                                      [table]).fetchall()]
    batch = pa.table({c: list(v) for c, v in zip(cols, zip(*rows))})
    con.register("_rows", batch)
    try:
        con.execute(f"INSERT INTO {table} SELECT * FROM _rows")
    finally:
        con.unregister("_rows")


def latest(con, dataset: str) -> tuple[int, int] | None:
    """(vid, n) of the newest committed version of `dataset`."""
    return con.execute("SELECT vid, n FROM versions WHERE name = ? AND status = 'committed' ORDER BY n DESC LIMIT 1",
                       [dataset]).fetchone()


def discard_unfinished(vault) -> int:
    """Remove what killed writers left behind (pending versions). Runs on every writable open; returns how many."""
    con = vault.con
    vids = [v for (v,) in con.execute("SELECT vid FROM versions WHERE status = 'pending'").fetchall()]
    if not vids:
        return 0
    with vault.transaction():
        for vid in vids:
            discard_version(con, vid)
        con.execute("DELETE FROM blobs WHERE hash NOT IN (SELECT hash FROM version_records)")
        vault.audit("vault.ingest.discarded", [], {"unfinished": len(vids)})
    return len(vids)


def discard_version(con, vid: int) -> None:
    """Delete version `vid`'s rows and data tables (not its blobs)."""
    for (t,) in con.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'data' "
                            "AND starts_with(table_name, ?)", [f"t{vid}_"]).fetchall():
        con.execute(f'DROP TABLE IF EXISTS data."{t}"')
    for table in _VERSION_TABLES:
        con.execute(f"DELETE FROM {table} WHERE vid = ?", [vid])
