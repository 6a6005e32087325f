"""Ingest: files -> records -> PII scrubbing -> content-addressed blobs -> a new immutable dataset version.

Records stream through in bounded batches into a `VersionBuilder` (appliance/vault/builder.py), which
keeps the version 'pending' until the final transaction gives it its number: an error discards it at once,
and a killed ingest leaves nothing visible (the next open discards its leftovers).
"""

from __future__ import annotations

import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from appliance.errors import IngestError, UsageError
from appliance.vault.builder import (
    RecordWriter,  # noqa: F401  (benchmarks/vault_ingest.py times it here)
    VersionBuilder,
    latest,
)
from appliance.vault.db import cursor
from appliance.vault.fields import (
    FieldScrubber,
    ReviewKeep,
    by_type,
    policy,
    scrub_reason,
    scrub_record,
    scrub_source,
    site_types,
)
from appliance.vault.pii import MODES
from appliance.vault.readers import ReadError, Record
from appliance.vault.readers.detect import Item, plan
from appliance.vault.readers.tables import ingest_table, unreadable
from appliance.vault.scan import (
    Landed,
    Skip,
    field_findings,
    file_sha256,
    landing,
    read_item,
    scan_files,
    scan_records,
    scan_table,
)
from appliance.vault.scan import pool as scan_pool

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SMALL_FILE = 4 << 20  # files up to this size are read and scrubbed whole in a worker
TABLE_BYTES = 16 << 20  # a table a worker holds whole (its rows and records as read); one that expands past it
# once read goes back to the ingest process, which streams it into the vault. With the pipeline's window of two
# entries per worker, tables in flight hold at most 32 MB per worker.
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


def ingest(vault, paths: list[Path], dataset: str, pii_mode: str = "redact",
           validation_fraction: float = DEFAULT_VALIDATION, replace: bool = False,
           progress: Progress | None = None, on_plan: Callable[[int, int], None] | None = None,
           workers: int | None = None, follow_links: bool = False) -> IngestResult:
    """Create `dataset@N+1` from the previous version (unless `replace`) plus everything under `paths`.

    `workers` processes read and scrub files in parallel (default: one per core, at most 8); records
    still land in a deterministic order. Links below `paths` are reported as skipped, not followed, unless
    `follow_links` (an operator's choice, never an agent's); nothing inside the home is read either way.
    """
    _check_args(paths, dataset, pii_mode, validation_fraction, workers)
    types = site_types(vault.home.root)  # the site's policy file: a bad one is refused before anything is read
    with write_settings(vault.con):
        return _ingest(vault, paths, dataset, pii_mode, validation_fraction, replace, progress, on_plan,
                       workers, follow_links, types)


def check_workers(workers: int | None) -> None:
    """UsageError for fewer than one scan process (`--workers`), before anything is read."""
    if workers is not None and workers < 1:
        raise UsageError("--workers must be at least 1", "pass e.g. --workers 4")


def workers_for(workers: int | None, nbytes: int) -> int:
    """Scan processes for `nbytes` of input: `workers` (default: one per core, at most 8), or just this one
    below POOL_MIN_BYTES, where a pool's start costs more than it saves."""
    return (workers or default_workers()) if nbytes >= POOL_MIN_BYTES else 1


def _check_args(paths: list[Path], dataset: str, pii_mode: str, validation_fraction: float,
                workers: int | None) -> None:
    """UsageError for a call that cannot ingest anything, before anything is read."""
    check_workers(workers)
    validate_name(dataset)
    if pii_mode not in MODES:
        raise UsageError(f"unknown --pii mode {pii_mode!r}", f"use one of {', '.join(MODES)}")
    if not 0.0 <= validation_fraction < 1.0:
        raise UsageError("validation fraction must be in [0, 1)", "pass e.g. 0.05")
    if not paths:
        raise UsageError("no paths to ingest", "name one or more files or directories")


@contextmanager
def write_settings(con) -> Iterator[None]:
    """DuckDB set for a long write (INGEST_SETTINGS: ingest, a re-scrub) inside the block, as it was after it."""
    saved = {k: con.execute(f"SELECT current_setting('{k}')").fetchone()[0] for k in INGEST_SETTINGS}
    for k, value in INGEST_SETTINGS.items():
        con.execute(f"SET {k} = '{value}'")
    try:
        yield
    finally:
        for k, value in saved.items():
            con.execute(f"SET {k} = '{value}'")


class Pipeline:
    """Scan tasks on a process pool (or inline), results handed back in submission order.

    At most `window` entries wait at a time, so memory stays bounded whatever the input size.
    """

    def __init__(self, workers: int):
        self.pool = None
        if workers > 1:
            self.pool = scan_pool(workers)
        self.window = 2 * workers if workers > 1 else 1
        self.queue: deque = deque()

    def submit(self, event: str, state, fn, *args) -> Iterator[tuple]:
        """Queue `fn(*args)`; yield the entries that had to finish to keep the window."""
        if not self.pool:
            return self.put(event, state, _Done(fn(*args)))
        try:
            job = self.pool.submit(fn, *args)
        except (BrokenProcessPool, EOFError, OSError) as e:  # EOFError: the fork server died as it started
            raise _broken(e) from e
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
        try:
            return event, state, job.result()
        except BrokenProcessPool as e:
            raise _broken(e) from e

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(cancel_futures=True)


def _broken(e: BaseException) -> IngestError:
    return IngestError(f"a scan worker process ended before its work was done ({type(e).__name__})",
                       "nothing was kept; run it again, or with --workers 1 to scan in this process alone")


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


@dataclass
class _ItemState:
    item: Item
    source: str = ""  # the item's path as it lands (scrubbed, `_label`)
    target: str | None = None  # the data table of a table item
    file_ord: int | None = None
    added: list[str] = field(default_factory=list)
    dups: int = 0
    counts: Counter = field(default_factory=Counter)  # by (type, detector, band)
    reported: int = 0
    review: ReviewKeep = field(default_factory=ReviewKeep)  # findings kept for review
    fields_seen: set = field(default_factory=set)  # (field, value): a title repeated in each part counts once


def _label(state: _ItemState, fs: FieldScrubber) -> _ItemState:
    """Scrub what the walk knows of an item before anything is read: its path (the records' source) and, in
    a repository, its path there and the repository's name. Counted once, as the file's own findings."""
    item = state.item
    state.source, counts, found = scrub_source(fs, item.path)
    state.counts.update(counts)
    found = list(found)  # the scrubber remembers what it returned
    if item.rel:  # the records' path and title
        item.rel, c, f = fs.path(item.rel)
        state.counts.update(c)
        found += f
    if item.repo:
        item.repo, c, f = fs.path(item.repo, "meta.repo")  # a directory's name
        state.counts.update(c)
        found += f
    for f in found:  # kept with the file's first record, whose fields show them
        state.review.add(None, f)
    return state


def _produce(vault, items: list[Item], pipe: Pipeline, b: VersionBuilder, mode: str,
             types: tuple[str, ...] | None) -> Iterator[tuple]:
    """Walk the items in order and feed the pipeline; yields finished entries in order.

    Each item becomes entries for `_Landing`: "skip"; or "records" batches then "end" (or "fail"); or, for
    small files grouped for a worker, one "files" entry with an outcome per file."""
    key = vault.secrets.pseudonym_key
    fs = FieldScrubber(mode, key, types)
    group: list[_ItemState] = []  # consecutive small files go to a worker together: fewer round trips
    for item in items:
        state = _label(_ItemState(item), fs)
        if pipe.pool is not None and item.kind not in ("skip", "table") and item.size <= SMALL_FILE:
            group.append(state)
            if sum(g.item.size for g in group) >= SCAN_BATCH_CHARS or len(group) >= 64:
                yield from _send_files(pipe, group, mode, key, types)
            continue
        yield from _send_files(pipe, group, mode, key, types)
        if item.kind == "skip":
            yield from pipe.put("skip", state)
        elif item.kind == "table":
            state.target = b.table_name(state.source)
            if pipe.pool is not None and item.size <= SMALL_FILE:  # read and scrubbed by a worker; written here
                yield from pipe.submit("table", state, scan_table, item, state.target, mode, key, types,
                                       TABLE_BYTES)
            else:
                yield from _read_table(vault.con, pipe, state, fs)
        else:
            yield from _read_large(pipe, state, mode, key, types)
    yield from _send_files(pipe, group, mode, key, types)
    yield from pipe.drain()


def _send_files(pipe: Pipeline, group: list[_ItemState], mode: str, key: bytes,
                types: tuple[str, ...] | None) -> Iterator[tuple]:
    """The grouped small files to one worker, read and scrubbed whole; empties `group`."""
    if group:
        yield from pipe.submit("files", list(group), scan_files, [g.item for g in group], mode, key,
                              types)
        group.clear()


def _read_table(con, pipe: Pipeline, state: _ItemState, fs: FieldScrubber) -> Iterator[tuple]:
    """A table file, written here in order into `state.target`; its rows come back already scrubbed, as do
    its name and column names."""
    for event, value in _table_here(con, state, fs):
        yield from pipe.put(event, state, _Done(value))


def _table_here(con, state: _ItemState, fs: FieldScrubber) -> Iterator[tuple[str, object]]:
    """A table read, scrubbed and written into `state.target` by this process, batch by batch, so that memory
    stays bounded however far its rows expand: ("records", scanned) entries, then ("end", None) or ("fail",
    (reason, False))."""
    item = state.item
    try:
        for batch in batches(ingest_table(cursor(con), item.path, state.target, fs.cell, state.counts,
                                           item.ident, lambda n: fs.name(n, state.counts))):
            yield "records", landing([(r, _scrubbed(fs, r)) for r in batch])
        yield "end", None
    except ReadError as e:
        yield "fail", (str(e), False)


def _scrubbed(fs: FieldScrubber, rec: Record) -> dict:
    """A record whose reader scrubbed its text (a table row) still goes through `scrub_record` for its fields."""
    counts, rec.found = scrub_record(fs, rec)
    return dict(counts)


def _read_large(pipe: Pipeline, state: _ItemState, mode: str, key: bytes,
                types: tuple[str, ...] | None) -> Iterator[tuple]:
    """A large file, streamed through here; its records are scrubbed in batches (on the pool, if any)."""
    try:
        for batch in batches(read_item(state.item)):
            yield from pipe.submit("records", state, scan_records, batch, mode, key, types)
        yield from pipe.put("end", state)
    except (ReadError, Skip) as e:
        yield from pipe.put("fail", state, _Done((str(e), isinstance(e, Skip))))


def batches(records: Iterator, size_of: Callable = lambda rec: len(rec.text)) -> Iterator[list]:
    """Records (or anything `size_of` measures) in lists of about SCAN_BATCH_CHARS: one scan task each."""
    batch, size = [], 0
    for rec in records:
        batch.append(rec)
        size += size_of(rec)
        if size >= SCAN_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _ingest(vault, paths, dataset, pii_mode, validation_fraction, replace, progress, on_plan,
            workers, follow_links, types) -> IngestResult:
    items = list(plan([p.expanduser() for p in paths], follow_links, vault.home.root))
    total = sum(i.size for i in items)
    if on_plan:
        on_plan(len(items), total)

    parent = None if replace else latest(vault.con, dataset)
    with VersionBuilder(vault, dataset, pii_mode=pii_mode, validation_fraction=validation_fraction,
                        previous=parent) as b:
        res = IngestResult(version="", content_hash="", records=0, new_records=0, bytes=0, duplicates=0, files=0,
                           parent=b.previous)
        totals = _scan_into(vault, b, items, res, pii_mode, types, progress,
                            workers_for(workers, total))
        if res.files == 0 or (res.new_records == 0 and not parent):
            why = "; ".join(f"{p}: {r}" for p, r in res.failed[:3]) or "no readable records under the given paths"
            raise IngestError(f"nothing ingested ({why})", "check the paths and file types")  # the builder discards
        res.pii = dict(sorted(by_type(totals).items()))
        done = b.commit("vault.ingest", attrs={"files": res.files, "pii_policy": policy(pii_mode, types)},
                        duplicates=res.duplicates,
                        skipped=len(res.skipped) + len(res.failed),
                        details={"new_records": res.new_records, "duplicates": res.duplicates, "files": res.files,
                                 "failed": len(res.failed), "skipped": len(res.skipped)})
    res.version, res.content_hash, res.records, res.bytes = done.version, done.content_hash, done.records, done.bytes
    return res


def _scan_into(vault, b: VersionBuilder, items: list[Item], res: IngestResult, pii_mode: str,
               types: tuple[str, ...] | None, progress,
               workers: int) -> Counter:
    """Read, scrub and add every item to the version in order; the PII found, by type."""
    landing = _Landing(b, res, progress, FieldScrubber(pii_mode, vault.secrets.pseudonym_key, types))
    pipe = Pipeline(workers)
    try:
        for event, state, value in _produce(vault, items, pipe, b, pii_mode, types):
            landing.land(event, state, value)
    finally:
        pipe.close()
    return landing.totals


class _Landing:
    """Puts the pipeline's entries into the version, in order, and keeps the result's counts.

    An item's records land as they come; its last entry says how it ended: "end" (kept), "fail" (its records
    taken out again: failed, or skipped when the reader skipped it) or "skip" (the walk left it out)."""

    def __init__(self, b: VersionBuilder, res: IngestResult, progress: Progress | None, fs: FieldScrubber):
        self.b, self.res, self.progress, self.fs = b, res, progress, fs
        self.seen = b.inherited  # every text the version holds: a repeated one counts as a duplicate
        self.totals: Counter = Counter()

    def land(self, event: str, state, value) -> None:
        """One entry from `_produce`; for "files", `state` and `value` are lists, one per small file."""
        if event == "files":
            for st, (landed, reason, skipped, sha256) in zip(state, value):
                self.file(st, landed, reason, skipped, sha256)
            return
        self._start(state)
        if event == "records":
            self.records(state, value)
        elif event == "table":
            self.table(state, value)
        elif event == "skip":
            self.skip(state)
        elif event == "fail":
            self.fail(state, *value)
        elif event == "end":
            self.end(state)
        else:
            raise ValueError(event)

    def _start(self, state: _ItemState) -> None:
        if state.file_ord is None:  # where the item's records begin, to take them out if it fails
            state.file_ord = self.b.next_ord

    def file(self, state: _ItemState, landed: Landed, reason: str | None, skipped: bool,
             sha256: str | None) -> None:
        """A small file scanned whole by a worker: all its records and its outcome at once."""
        self._start(state)
        if reason is not None:
            self.fail(state, reason, skipped)
        else:
            self.records(state, landed)
            self.end(state, sha256)

    def records(self, state: _ItemState, landed: Landed) -> None:
        """A batch of an item's scrubbed records (`scan.landing`); a text the version already holds counts as a
        duplicate."""
        counts, rows = landed
        state.counts.update(counts)
        item, source, b = state.item, state.source, self.b
        for kind, path, language, title, meta, text, digest, nbytes, found, fields in rows:
            state.reported += _advance(self.progress, item, state.reported, len(text))
            if fields:
                found = found + field_findings(fields, state.fields_seen, state.counts)
            if digest in self.seen:
                state.dups += 1
                continue
            self.seen.add(digest)
            state.added.append(digest)
            if found:
                state.review.extend(b.next_ord, found)
            b.add_row(kind, source, path, language, title, meta, text, digest, nbytes)

    def table(self, state: _ItemState, read) -> None:
        """A table a worker read and scrubbed whole (`scan.scan_table`): written here as its data table, then
        its records land. One the worker gave back (its rows expand past what a worker holds, or it could not
        read it) is read here instead, streamed batch by batch as a large table is."""
        if read is None:
            for event, value in _table_here(self.b.con, state, self.fs):
                self.land(event, state, value)
            return
        rows, landed = read
        try:
            self.b.create_table(state.target, rows)
        except duckdb.Error as e:
            self.fail(state, unreadable(e), False)
            return
        self.records(state, landed)
        self.end(state)

    def skip(self, state: _ItemState) -> None:
        """An item the walk did not read: failed if it was named explicitly, else skipped."""
        item, src = state.item, state.source
        reason = scrub_reason(self.fs, item.reason)
        (self.res.failed if item.explicit else self.res.skipped).append((src, reason or "skipped"))
        self.b.source(src, None, item.size, None, 0, 0, "failed" if item.explicit else "skipped", reason)
        _tick(self.progress, item)

    def fail(self, state: _ItemState, reason: str, skipped: bool) -> None:
        """An item that could not be read to the end: what it added is taken out again."""
        item, src = state.item, state.source
        reason = scrub_reason(self.fs, reason) or ""
        self.b.drop_from(state.file_ord, state.added)
        self.seen.difference_update(state.added)
        if state.target:
            self.b.drop_table(state.target)
        (self.res.skipped if skipped else self.res.failed).append((src, reason))
        self.b.source(src, item.kind, item.size, None, 0, 0, "skipped" if skipped else "failed", reason)
        _tick(self.progress, item, state.reported)

    def end(self, state: _ItemState, sha256: str | None = None) -> None:
        """An item read to the end: counted, with its source entry, PII counts and table. `sha256`: the file's,
        if a worker hashed it already (`scan.scan_file`)."""
        item, src, res = state.item, state.source, self.res
        res.files += 1
        res.duplicates += state.dups
        res.new_records += len(state.added)
        self.totals.update(state.counts)
        self.b.pii(src, state.counts)
        self.b.findings(src, state.review.kept(state.file_ord if state.added else None))
        self.b.source(src, item.kind, item.size, sha256 or file_sha256(item), len(state.added), state.dups, "ok")
        if state.target:
            self.b.table(state.target, src)
            res.tables.append(f"data.{state.target}")
        _tick(self.progress, item, state.reported)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


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
