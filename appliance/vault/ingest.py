"""Ingest: files -> records -> PII scrubbing -> content-addressed blobs -> a new immutable dataset version.

Records stream through in bounded batches. The version row stays 'pending' until the final transaction
gives it its number, so a killed ingest leaves nothing visible; the next open discards its leftovers.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from appliance.db_time import utcnow
from appliance.errors import IngestError, UsageError
from appliance.vault import lineage
from appliance.vault.db import cursor
from appliance.vault.pii import MODES, Scrubber
from appliance.vault.readers import ReadError, Record, open_input
from appliance.vault.readers.detect import Item, plan
from appliance.vault.readers.tables import ingest_table, table_columns, table_name
from appliance.vault.scan import Scanned, Skip, read_item, scan_files, scrub_records

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
BATCH_BYTES = 8 << 20
SMALL_FILE = 4 << 20  # files up to this size are read and scrubbed whole in a worker
SCAN_BATCH_CHARS = 1 << 20  # larger files are read here and their records scrubbed in batches of this size
POOL_MIN_BYTES = 16 << 20
INGEST_SETTINGS = {
    # DuckDB spills (encrypted) beyond this; with batches and readers' buffers ingest stays under 1 GB RSS.
    "memory_limit": "512MB",
    # Data not yet checkpointed cannot be evicted, so checkpoints must come well before the memory limit;
    # each rewrites at most one small row group (db.ROW_GROUP_SIZE). 128 MB measured fastest with the
    # lowest RSS: 300 MB ingested in 7.4 s at 426 MB RSS (16 MB: 21 s; 1 GB: out of memory on 1.2 GB).
    "checkpoint_threshold": "128MB",
    # tables are read through /proc/self/fd/N names (readers.open_input), which the next file reuses:
    # DuckDB's cache of external files, keyed by name, must not hand one file's bytes out for another
    "enable_external_file_cache": "false",
}
DEFAULT_VALIDATION = 0.05

Progress = Callable[[int, str], None]


@dataclass
class IngestResult:
    version: str
    content_hash: str
    records: int
    new_records: int
    bytes: int
    duplicates: int
    files: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    pii: dict[str, int] = field(default_factory=dict)
    tables: list[str] = field(default_factory=list)
    parent: str | None = None

    @property
    def partial(self) -> bool:
        return bool(self.failed)

    def to_json(self) -> dict:
        return {
            "version": self.version, "content_hash": self.content_hash, "records": self.records,
            "new_records": self.new_records, "bytes": self.bytes, "duplicates": self.duplicates,
            "files": self.files, "partial": self.partial, "parent": self.parent, "pii": self.pii,
            "tables": self.tables,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
        }


def validate_name(name: str, what: str = "dataset") -> str:
    """The one naming rule for everything that becomes an id NAME@N (datasets, tokenizers, ...)."""
    if not NAME_RE.match(name):
        raise UsageError(f"invalid {what} name {name!r}",
                         "use lowercase letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


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
        self.rows.append((self.vid, self.ord, digest, rec.kind, rec.source, rec.path, rec.language, rec.title,
                          json.dumps(rec.meta, default=str) if rec.meta else None,
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


def ingest(vault, paths: list[Path], dataset: str, pii_mode: str = "redact",
           validation_fraction: float = DEFAULT_VALIDATION, replace: bool = False,
           progress: Progress | None = None, on_plan: Callable[[int, int], None] | None = None,
           workers: int | None = None, follow_links: bool = False) -> IngestResult:
    """Create `dataset@N+1` from the previous version (unless `replace`) plus everything under `paths`.

    `workers` processes read and scrub files in parallel (default: one per core, at most 8); records
    still land in a deterministic order. Links below `paths` are reported as skipped, not followed, unless
    `follow_links` (an operator's choice, never an agent's); nothing inside the home is read either way.
    """
    if workers is not None and workers < 1:
        raise UsageError("--workers must be at least 1", "pass e.g. --workers 4")
    validate_name(dataset)
    if pii_mode not in MODES:
        raise UsageError(f"unknown --pii mode {pii_mode!r}", f"use one of {', '.join(MODES)}")
    if not 0.0 <= validation_fraction < 1.0:
        raise UsageError("validation fraction must be in [0, 1)", "pass e.g. 0.05")
    if not paths:
        raise UsageError("no paths to ingest", "name one or more files or directories")
    con = vault.con
    saved = {k: con.execute(f"SELECT current_setting('{k}')").fetchone()[0] for k in INGEST_SETTINGS}
    for k, value in INGEST_SETTINGS.items():
        con.execute(f"SET {k} = '{value}'")
    try:
        return _ingest(vault, paths, dataset, pii_mode, validation_fraction, replace, progress, on_plan,
                       workers or default_workers(), follow_links)
    finally:
        for k, value in saved.items():
            con.execute(f"SET {k} = '{value}'")


class _Pipeline:
    """Scan tasks on a process pool (or inline), results handed back in submission order.

    At most `window` entries wait at a time, so memory stays bounded whatever the input size.
    """

    def __init__(self, workers: int):
        self.pool = None
        if workers > 1:
            # spawn, not fork: this process holds DuckDB's threads, and forking them is unsafe
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_die_with_parent)
        self.window = 2 * workers if workers > 1 else 1
        self.queue: deque = deque()

    def submit(self, event: str, state, fn, *args) -> Iterator[tuple]:
        """Queue `fn(*args)`; yield the entries that had to finish to keep the window."""
        job = self.pool.submit(fn, *args) if self.pool else _Done(fn(*args))
        return self.put(event, state, job)

    def put(self, event: str, state, job=None) -> Iterator[tuple]:
        self.queue.append((event, state, job or _Done(None)))
        while len(self.queue) > self.window:
            yield self._pop()

    def drain(self) -> Iterator[tuple]:
        while self.queue:
            yield self._pop()

    def _pop(self) -> tuple:
        event, state, job = self.queue.popleft()
        return event, state, job.result()

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(cancel_futures=True)


def _die_with_parent() -> None:
    """A worker ends with the ingest that started it: after a kill -9 it would otherwise wait for work forever."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the line above
        os._exit(1)


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


@dataclass
class _ItemState:
    item: Item
    target: str | None = None  # the data table of a table item
    file_ord: int | None = None
    added: list[str] = field(default_factory=list)
    dups: int = 0
    counts: Counter = field(default_factory=Counter)
    reported: int = 0


def _produce(vault, items: list[Item], pipe: _Pipeline, vid: int, mode: str, tables: list[str]) -> Iterator[tuple]:
    """Walk the items in order and feed the pipeline; yields finished entries in order."""
    con, key = vault.con, vault.secrets.pseudonym_key
    scrubber = Scrubber(mode, key)
    group: list[_ItemState] = []  # consecutive small files go to a worker together: fewer round trips

    def send_group():
        if group:
            yield from pipe.submit("files", list(group), scan_files, [g.item for g in group], mode, key)
            group.clear()

    for item in items:
        state = _ItemState(item)
        if pipe.pool is not None and item.kind not in ("skip", "table") and item.size <= SMALL_FILE:
            group.append(state)
            if sum(g.item.size for g in group) >= SCAN_BATCH_CHARS or len(group) >= 64:
                yield from send_group()
            continue
        yield from send_group()
        if item.kind == "skip":
            yield from pipe.put("skip", state)
        elif item.kind == "table":
            state.target = _unique_table(con, table_name(vid, item.path), tables)
            tables.append(state.target)
            try:  # the table is written here, in order; its rows come back already scrubbed
                for batch in _batches(ingest_table(cursor(con), item.path, state.target, scrubber.scrub_cell,
                                                   state.counts, item.ident)):
                    yield from pipe.put("records", state, _Done([(r, {}) for r in batch]))
                yield from pipe.put("end", state)
            except ReadError as e:
                yield from pipe.put("fail", state, _Done((str(e), False)))
        else:  # large files stream through here; their records are scrubbed in batches
            try:
                for batch in _batches(read_item(item)):
                    yield from pipe.submit("records", state, scrub_records, batch, mode, key)
                yield from pipe.put("end", state)
            except (ReadError, Skip) as e:
                yield from pipe.put("fail", state, _Done((str(e), isinstance(e, Skip))))
    yield from send_group()
    yield from pipe.drain()


def _batches(records: Iterator[Record]) -> Iterator[list[Record]]:
    batch, size = [], 0
    for rec in records:
        batch.append(rec)
        size += len(rec.text)
        if size >= SCAN_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _ingest(vault, paths, dataset, pii_mode, validation_fraction, replace, progress, on_plan,
            workers, follow_links) -> IngestResult:
    con = vault.con
    items = list(plan([p.expanduser() for p in paths], follow_links, vault.home.root))
    total = sum(i.size for i in items)
    if on_plan:
        on_plan(len(items), total)

    parent = None if replace else latest(con, dataset)
    vid = con.execute("SELECT nextval('version_vid')").fetchone()[0]
    con.execute("INSERT INTO versions (vid, name, status, created, actor, pii_mode, validation_fraction) "
                "VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                [vid, dataset, utcnow(), actor(), pii_mode, validation_fraction])
    seen: set[str] = set()
    start_ord = 0
    if parent:
        con.execute("INSERT INTO version_records SELECT ?, ord, hash, kind, source, path, language, title, meta, "
                    "split, bytes FROM version_records WHERE vid = ?", [vid, parent[0]])
        seen = {h for (h,) in con.execute("SELECT hash FROM version_records WHERE vid = ?", [vid]).fetchall()}
        start_ord = len(seen)
    writer = RecordWriter(con, vid, start_ord, validation_fraction)
    res = IngestResult(version="", content_hash="", records=0, new_records=0, bytes=0, duplicates=0, files=0,
                       parent=f"{dataset}@{parent[1]}" if parent else None)
    totals: Counter = Counter()
    sources, pii_rows, table_rows, table_names = [], [], [], []
    orphans: list[str] = []  # hashes of records from files that failed half way
    # a pool only pays for its start-up (about a second) on large inputs
    pipe = _Pipeline(workers if total >= POOL_MIN_BYTES else 1)
    try:
        def consume(event: str, state: _ItemState, value) -> None:
            item, src = state.item, str(state.item.path)
            if state.file_ord is None:
                state.file_ord = writer.ord
            if event == "file":
                scanned, reason, skipped = value
                if reason is not None:
                    event, value = "fail", (reason, skipped)
                else:
                    _write(state, scanned, writer, seen, progress)
                    event = "end"
            if event == "records":
                _write(state, value, writer, seen, progress)
            elif event == "skip":
                (res.failed if item.explicit else res.skipped).append((src, item.reason or "skipped"))
                sources.append((vid, src, None, item.size, None, 0, 0, "failed" if item.explicit else "skipped",
                                item.reason))
                _tick(progress, item)
            elif event == "fail":
                reason, skipped = value
                writer.rollback_from(state.file_ord)
                seen.difference_update(state.added)
                orphans.extend(state.added)
                if state.target:
                    con.execute(f'DROP TABLE IF EXISTS data."{state.target}"')
                (res.skipped if skipped else res.failed).append((src, reason))
                sources.append((vid, src, item.kind, item.size, None, 0, 0, "skipped" if skipped else "failed",
                                reason))
                _tick(progress, item, state.reported)
            elif event == "end":
                res.files += 1
                res.duplicates += state.dups
                res.new_records += len(state.added)
                totals.update(state.counts)
                pii_rows.extend((vid, src, t, n) for t, n in sorted(state.counts.items()))
                sources.append((vid, src, item.kind, item.size, _file_sha256(item), len(state.added),
                                state.dups, "ok", None))
                if state.target:
                    rows = con.execute(f'SELECT count(*) FROM data."{state.target}"').fetchone()[0]
                    table_rows.append((vid, state.target, src, rows,
                                       json.dumps(table_columns(con, state.target))))
                    res.tables.append(f"data.{state.target}")
                _tick(progress, item, state.reported)

        for event, state, value in _produce(vault, items, pipe, vid, pii_mode, table_names):
            if event == "files":
                for st, result in zip(state, value):
                    consume("file", st, result)
            else:
                consume(event, state, value)
    finally:
        pipe.close()
    writer.flush()
    if res.files == 0 or (res.new_records == 0 and not parent):
        discard_version(con, vid)
        _drop_orphans(con, orphans)
        why = "; ".join(f"{p}: {r}" for p, r in res.failed[:3]) or "no readable records under the given paths"
        raise IngestError(f"nothing ingested ({why})", "check the paths and file types")
    _drop_orphans(con, orphans)
    insert_rows(con, "version_sources", sources)
    insert_rows(con, "version_pii", pii_rows)
    insert_rows(con, "version_tables", table_rows)
    res.pii = dict(sorted(totals.items()))
    commit_version(vault, vid, dataset, parent, res, pii_mode)
    return res


def _write(state: _ItemState, scanned: Scanned, writer: RecordWriter, seen: set[str], progress) -> None:
    for rec, counts in scanned:
        state.reported += _advance(progress, state.item, state.reported, len(rec.text))
        state.counts.update(counts)
        data = rec.text.encode("utf-8")
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            state.dups += 1
            continue
        seen.add(digest)
        state.added.append(digest)
        writer.add(rec, rec.text, digest, len(data))


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


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def commit_version(vault, vid: int, dataset: str, parent: tuple | None, res: IngestResult, pii_mode: str,
                   parents: list[tuple[str, str]] = (), attrs: dict | None = None, action: str = "vault.ingest"
                   ) -> None:
    """Number the pending version `vid`, hash it, and record it in lineage (with `parents` and `attrs` beside
    the previous version) and in the audit log under `action`."""
    con = vault.con
    with vault.transaction():
        recs, nbytes, chash = con.execute(
            "SELECT count(*), coalesce(sum(bytes), 0), sha256(coalesce(string_agg(hash, '' ORDER BY ord), '')) "
            "FROM version_records WHERE vid = ?", [vid]).fetchone()
        if recs >= 2 and not con.execute(
                "SELECT 1 FROM version_records WHERE vid = ? AND split = 'validation' LIMIT 1", [vid]).fetchone():
            # a tiny dataset still needs one held-out record; pick it by hash so it is deterministic
            con.execute("UPDATE version_records SET split = 'validation' WHERE vid = ? AND hash = "
                        "(SELECT min(hash) FROM version_records WHERE vid = ?)", [vid, vid])
        n = con.execute("SELECT coalesce(max(n), 0) + 1 FROM versions WHERE name = ? AND status = 'committed'",
                        [dataset]).fetchone()[0]
        version = f"{dataset}@{n}"
        previous = [res.parent] if res.parent else []
        con.execute(
            "UPDATE versions SET n = ?, status = 'committed', committed = ?, content_hash = ?, records = ?, "
            "bytes = ?, duplicates = ?, skipped = ?, parents = ? WHERE vid = ?",
            [n, utcnow(), chash, recs, nbytes, res.duplicates, len(res.skipped) + len(res.failed),
             json.dumps(previous + [p for p, _ in parents]), vid])
        lineage.add_node(con, version, "dataset", [(p, "previous") for p in previous] + list(parents), chash,
                         {"records": recs, "bytes": nbytes, "pii_mode": pii_mode, "files": res.files, **(attrs or {})})
        vault.audit(action, [version, *(p for p, _ in parents)],
                    {"records": recs, "new_records": res.new_records, "duplicates": res.duplicates,
                     "files": res.files, "failed": len(res.failed), "skipped": len(res.skipped)})
    res.version, res.content_hash, res.records, res.bytes = version, chash, recs, nbytes


def latest(con, dataset: str) -> tuple[int, int] | None:
    """(vid, n) of the newest committed version of `dataset`."""
    return con.execute("SELECT vid, n FROM versions WHERE name = ? AND status = 'committed' ORDER BY n DESC LIMIT 1",
                       [dataset]).fetchone()


def discard_unfinished(vault) -> int:
    """Remove what killed ingests left behind. Runs on every writable open; returns how many."""
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
    for (t,) in con.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'data' "
                            "AND starts_with(table_name, ?)", [f"t{vid}_"]).fetchall():
        con.execute(f'DROP TABLE IF EXISTS data."{t}"')
    for table in ("version_records", "version_sources", "version_pii", "version_tables", "versions"):
        con.execute(f"DELETE FROM {table} WHERE vid = ?", [vid])


def _drop_orphans(con, hashes: list[str]) -> None:
    """Blobs written for a file that then failed, unless another record still uses them."""
    if hashes:
        con.register("_orphans", pa.table({"hash": hashes}))
        try:
            con.execute("DELETE FROM blobs WHERE hash IN (SELECT hash FROM _orphans) "
                        "AND hash NOT IN (SELECT hash FROM version_records)")
        finally:
            con.unregister("_orphans")


def _unique_table(con, target: str, taken: list[str]) -> str:
    names = set(taken)
    base, i = target, 2
    while target in names or con.execute(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = 'data' AND table_name = ?",
            [target]).fetchone():
        target, i = f"{base}_{i}", i + 1
    return target


def _file_sha256(item: Item) -> str | None:
    """SHA-256 of the file the walk saw (no link followed), in 1 MiB pieces."""
    h = hashlib.sha256()
    try:
        with open_input(item.path, item.ident) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except (OSError, ReadError):
        return None
    return h.hexdigest()


def _tick(progress: Progress | None, item: Item, reported: int = 0) -> None:
    """Report what is left of `item`'s bytes once it is done."""
    if progress:
        progress(max(0, item.size - reported), str(item.rel or item.path.name))


def _advance(progress: Progress | None, item: Item, reported: int, nchars: int) -> int:
    """Progress inside a large file: characters read so far stand in for bytes, capped at its size."""
    step = max(0, min(nchars, item.size - reported))
    if progress and step:
        progress(step, str(item.rel or item.path.name))
    return step


def actor() -> str:
    from appliance.vault.audit import current_actor
    return current_actor()



