"""The CPU-bound half of ingest: read a file and scrub its records. Runs in worker processes.

Nothing here touches the vault or the disk besides reading the input; results travel back to the ingest
process through pipes, in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

from appliance.vault.fields import FieldScrubber, band, by_type, field_value, scrub_record
from appliance.vault.pii_names import words_of
from appliance.vault.readers import ReadError, Record, meta_json, open_input
from appliance.vault.readers.detect import Item
from appliance.vault.readers.documents import read_docx, read_pdf
from appliance.vault.readers.email import read_eml, read_mbox
from appliance.vault.readers.text import read_text

if TYPE_CHECKING:  # tables bring DuckDB and pyarrow, imported by the first table a worker reads
    import pyarrow as pa

KNOWN_NAMES = 64  # name words carried from a file's records to its later ones (more: a slower scan per record)
Scanned = list[tuple[Record, dict[tuple[str, str, str], int]]]  # counts by (type, detector, band)
# What lands of a batch of scrubbed records, in plain values, as the ingest's workers send it (`landing`)
Landed = tuple[dict[tuple[str, str, str], int], list[tuple]]


class Skip(Exception):
    """A file left out by policy (binary in a repository): reported, but not a failure."""


def read_item(item: Item) -> Iterator[Record]:
    """The records of `item`, read from the very file the walk saw, no link followed (`open_input`)."""
    if item.kind == "text":
        return read_text(item.path, ident=item.ident)
    if item.kind == "email":
        return read_eml(item.path, item.ident)
    if item.kind == "mbox":
        return read_mbox(item.path, item.ident)
    if item.kind == "pdf":
        return read_pdf(item.path, item.ident)
    if item.kind == "docx":
        return read_docx(item.path, item.ident)
    if item.kind == "code":
        return _code_records(item)
    raise ValueError(item.kind)


def _code_records(item: Item) -> Iterator[Record]:
    try:
        for rec in read_text(item.path, kind="code", ident=item.ident):
            rec.path, rec.language = item.rel, item.language
            rec.meta["repo"] = item.repo
            rec.title = item.rel
            yield rec
    except ReadError as e:
        if "binary" in str(e) or "UTF-8" in str(e):
            raise Skip("binary file") from None
        raise


def scrub_records(records: list[Record], mode: str, key: bytes, types: tuple[str, ...] | None = None) -> Scanned:
    """Scrub in place, text and every field (`fields.scrub_record`); each record with its text's PII counts
    by (type, detector, band), its findings in `rec.found`. 'flag' notes the counts in the record's meta.

    The names found in a record are looked for in the later records of the same file (its pieces past 64 KiB,
    the messages of a mailbox): "Okonkwo" alone, where the first piece said "Patient Margaret Okonkwo". Within
    this batch of records only (a large file's batches go to different workers), the most recent
    `KNOWN_NAMES` words."""
    fs = FieldScrubber(mode, key, types)
    out: Scanned = []
    known: dict[str, dict[str, None]] = {}  # per source file, the name words its records showed so far
    for rec in records:
        seen = known.get(rec.source)
        counts, rec.found = scrub_record(fs, rec, tuple(seen) if seen else ())
        if fs.record_people:
            seen = known.setdefault(rec.source, {})
            for w in sorted(words_of(fs.record_people)):
                seen.pop(w, None)
                seen[w] = None  # the most recent last
            while len(seen) > KNOWN_NAMES:
                del seen[next(iter(seen))]
        if mode == "flag" and counts:
            rec.meta["pii"] = dict(by_type(counts))
        out.append((rec, dict(counts)))
    return out


def landing(scanned: Scanned, counts: Counter | None = None) -> Landed:
    """Scrubbed records as the ingest process lands them (`ingest._Landing.records`): the batch's PII counts
    summed (added to `counts`, if given: a table's cells and names), and per record a plain tuple

        (kind, path, language, title, metadata as JSON, text, sha256 of its UTF-8, UTF-8 bytes,
         findings in the text, findings in other fields)

    with each finding the plain tuple of a `Found`'s six values, one in another field followed by that field's
    value (`scrub_record` gives those after the text's, and they keep that order).

    The ingest process writes what its workers scan, and on many cores its own time bounds the ingest: what it
    would otherwise do per record (unpickle a record and its findings as objects, hash the text, write the
    metadata as JSON, add up its counts) is done here, in the worker."""
    total: Counter = counts if counts is not None else Counter()
    rows = []
    for rec, c in scanned:
        total.update(c)
        data = rec.text.encode("utf-8")
        text = [tuple(f) for f in rec.found if f[0] == "text"]
        fields = [(*f, field_value(rec, f[0])) for f in rec.found if f[0] != "text"]
        rows.append((rec.kind, rec.path, rec.language, rec.title, meta_json(rec.meta), rec.text,
                     hashlib.sha256(data).hexdigest(), len(data), text, fields))
    return dict(total), rows


def scan_records(records: list[Record], mode: str, key: bytes, types: tuple[str, ...] | None = None) -> Landed:
    """A batch of a large file's records, scrubbed (`scrub_records`) and made ready to land (`landing`)."""
    return landing(scrub_records(records, mode, key, types))


def scan_each(records: list[Record], mode: str, key: bytes, types: tuple[str, ...] | None = None) -> list[Landed]:
    """`scan_records`, each record with its own counts: a re-scrub's batches hold the records of many files,
    whose reports are kept apart."""
    return [landing([one]) for one in scrub_records(records, mode, key, types)]


def field_findings(found: list[tuple], seen: set, counts: Counter) -> list[tuple]:
    """Of a record's findings in fields other than its text (`landing`: each with the field's value), those to
    keep: in each field value the first time its file shows it (a title repeated in every part of a file is one
    finding, counted once), counted into `counts` by (type, detector, band), without the value. `seen` holds the
    file's (field, start, end, value) so far."""
    keep = []
    for fld, typ, det, score, start, end, value in found:
        key = (fld, start, end, value)
        if key in seen:
            continue
        seen.add(key)
        counts[(typ, det, band(score))] += 1
        keep.append((fld, typ, det, score, start, end))
    return keep


def scan_files(items: list[Item], mode: str, key: bytes, types: tuple[str, ...] | None = None
               ) -> list[tuple[Landed, str | None, bool, str | None]]:
    return [scan_file(item, mode, key, types) for item in items]


def scan_file(item: Item, mode: str, key: bytes, types: tuple[str, ...] | None = None
              ) -> tuple[Landed, str | None, bool, str | None]:
    """A whole (small) file: (its records ready to land, failure reason or None, skipped by policy, the file's
    sha256 for the source manifest)."""
    try:
        landed = landing(scrub_records(list(read_item(item)), mode, key, types))
    except Skip as e:
        return ({}, []), str(e), True, None
    except ReadError as e:
        return ({}, []), str(e), False, None
    return landed, None, False, file_sha256(item)


def file_sha256(item: Item) -> str | None:
    """SHA-256 of the file the walk saw (no link followed), in 1 MiB pieces; None if it cannot be read."""
    h = hashlib.sha256()
    try:
        with open_input(item.path, item.ident) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except (OSError, ReadError):
        return None
    return h.hexdigest()


def scan_table(item: Item, target: str, mode: str, key: bytes, types: tuple[str, ...] | None,
               limit: int) -> tuple[pa.Table, Landed] | None:
    """A whole (small) table read and scrubbed here, for the ingest process to write as `data.<target>`
    (`VersionBuilder.create_table`): (its rows as they land, its rows' records ready to land, `landing`, with
    what its cells and names held in their counts).
    None gives it back to the ingest process, which then reads it itself, streamed into the vault batch by
    batch: a table whose rows and records pass `limit` bytes as read (ingest's TABLE_BYTES; a small file can
    hold a great many: compressed Parquet, repeated values, wide rows whose records repeat every column's name),
    and one that cannot be read here (the ingest process says why, as it always has).

    Read by an in-memory DuckDB of this process (`db.scratch`): nothing it reads can spill to disk in
    plaintext, and its memory is bounded. Runs only in the ingest's worker processes, which end with the
    ingest: each keeps its DuckDB and one scrubber for the policy, so a table pays neither a new database
    (about 10 ms) nor cold caches (tables repeat their cells' values from file to file)."""
    import pyarrow as pa

    from appliance.vault.readers.tables import read_table

    fs = _worker_scrubber(mode, key, types)
    counts: Counter = Counter()
    batches: list[pa.RecordBatch] = []
    out: Scanned = []
    held = 0
    con = _worker_db().cursor()
    try:
        for batch, records in read_table(con, item.path, target, fs.cell, counts, item.ident,
                                         lambda n: fs.name(n, counts)):
            batches.append(batch)
            held += batch.nbytes
            if held > limit:
                return None
            for rec in records:  # each batch's records now, while the scrubber still holds its cells' findings
                held += len(rec.text)
                if held > limit:  # checked as each row is rendered: a wide row repeats every column's name
                    return None
                found_counts, rec.found = scrub_record(fs, rec)
                out.append((rec, dict(found_counts)))
    except ReadError:
        return None
    finally:
        con.close()
    return pa.Table.from_batches(batches), landing(out, counts)


_WORKER: dict = {}  # this worker process's DuckDB, and its scrubber with the policy it was made for


def _worker_db():
    if "db" not in _WORKER:
        from appliance.vault.db import scratch

        _WORKER["db"] = scratch()
    return _WORKER["db"]


def _worker_scrubber(mode: str, key: bytes, types: tuple[str, ...] | None) -> FieldScrubber:
    policy = (mode, key, types)
    if _WORKER.get("policy") != policy:
        _WORKER["policy"], _WORKER["fs"] = policy, FieldScrubber(mode, key, types)
    return _WORKER["fs"]


def pool(workers: int) -> ProcessPoolExecutor:
    """`workers` scan processes, forked from a fork server that has loaded the scanner and its name lists
    (`scan_preload`) once, instead of each worker loading them again (about 0.3 s of CPU apiece).

    Not forked from the ingest process itself: it holds DuckDB's threads, and forking them is unsafe. The fork
    server is a fresh interpreter with no threads, started on the first pool and kept by this process for
    later ones; its workers end when this process does (`die_with`), and then so does the server. Like every
    Python program the ingest process starts, it imports nothing from the current directory
    (`hardening.protect_process`, which opening the vault did)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["appliance.vault.scan_preload"])  # only if the server is not running yet
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=die_with, initargs=(os.getpid(),))


def die_with(ingest: int) -> None:
    """A worker ends with the ingest process that started it: after a kill -9 it would otherwise wait for work
    forever, and so would the fork server, which stays up while any worker does. The pool's initializer, so it
    lives here: a worker imports what it unpickles, and the scanner is all it needs.

    A thread waits on the ingest process itself (a pidfd, readable once it has ended), not on whichever of its
    threads made the pool; the worker also ends with the fork server, its parent (PR_SET_PDEATHSIG)."""
    import ctypes
    import signal
    import threading

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the fork server died before the line above
        os._exit(1)
    try:
        fd = os.pidfd_open(ingest)
    except (AttributeError, OSError):  # no pidfds (Linux before 5.3), or the ingest has ended already
        fd = None
    threading.Thread(target=_end_with, args=(ingest, fd), name="end-with-ingest", daemon=True).start()


def _end_with(pid: int, fd: int | None) -> None:
    import select
    import time

    if fd is not None:
        select.select([fd], [], [])
    else:
        while True:
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError):  # gone, or the number is another user's process now
                break
            time.sleep(0.5)
    os._exit(1)
