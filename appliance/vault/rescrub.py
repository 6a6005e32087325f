"""Re-scrub a dataset version under the current policy: `appliance vault ingest --rescrub NAME@N`.

Every record of NAME@N goes through `fields.scrub_record` again (text, title, path, metadata, source; in
ingest's worker processes, as ingest's records do), its tables are copied with cells and column names scrubbed
again, and the result lands, through the one version builder, as a new version whose lineage parent is NAME@N
(role `rescrub`) and whose lineage attributes say why: the policy before and after. From then on
`lineage.less_scrubbed` warns about everything made from NAME@N (tokenizers, models, GGUFs): `appliance
lineage` and `vault show` print it.

Records keep their splits (a validation record stays one, whatever its new hash) and their order.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator

from appliance.errors import UsageError
from appliance.vault import lineage
from appliance.vault.builder import VersionBuilder
from appliance.vault.db import cursor
from appliance.vault.fields import (
    FieldScrubber,
    ReviewKeep,
    by_type,
    policy,
    scrub_reason,
    site_types,
)
from appliance.vault.readers import Record
from appliance.vault.readers.tables import BATCH_ROWS, render_row, rescrub_table
from appliance.vault.scan import Landed, field_findings, scan_each
from appliance.vault.versions import iter_records, resolve

STRICT = ("redact", "pseudonymize")  # a re-scrub replaces what it finds; flag and off would keep it


def rescrub(vault, ref: str, pii_mode: str | None = None, dataset: str | None = None,
            workers: int | None = None) -> dict:
    """A new version of `dataset` (default: the same dataset) holding `ref` scrubbed under the current policy.

    `pii_mode` defaults to the old version's mode when it replaced what it found, else `redact`. Records are
    scrubbed by `workers` processes as ingest's are (default: one per core, at most 8; none for a version
    under ingest's POOL_MIN_BYTES), and land in their order. Returns what `vault ingest` returns, with
    `rescrub_of`, `policy_before` and `policy_after`."""
    from appliance.vault.ingest import check_workers, validate_name, workers_for, write_settings

    check_workers(workers)
    con = vault.con
    vid, name, n = resolve(con, ref)
    old_id = f"{name}@{n}"
    old_mode, fraction, size = con.execute("SELECT pii_mode, validation_fraction, bytes FROM versions WHERE vid = ?",
                                           [vid]).fetchone()
    mode = pii_mode or (old_mode if old_mode in STRICT else "redact")
    if mode not in STRICT:
        raise UsageError(f"--rescrub cannot use --pii {mode}: it would keep what it finds",
                         f"use one of {', '.join(STRICT)}")
    target = validate_name(dataset or name)
    if target != name and con.execute("SELECT 1 FROM versions WHERE name = ? AND status = 'committed' LIMIT 1",
                                      [target]).fetchone():
        raise UsageError(f"dataset {target} exists: a re-scrub of {old_id} into it would make a version of {target} "
                         f"that holds only {old_id}'s records",
                         f"name a new dataset with --dataset, or leave it out to re-scrub into {name}")
    before = (lineage.node(con, old_id)["attrs"].get("pii_policy") if lineage.exists(con, old_id) else None) \
        or {"mode": old_mode}
    types = site_types(vault.home.root)
    after = policy(mode, types)
    if all(_same(p, after) for p in _policies(con, old_id, before)):
        raise UsageError(f"{old_id} was scrubbed under this very policy (mode {mode}, the same types and "
                         "detectors): a re-scrub would change nothing",
                         "change the site's policy (pii-policy.toml) or --pii, or re-scrub once the detectors change")
    with write_settings(con), VersionBuilder(vault, target, pii_mode=mode, validation_fraction=fraction) as b:
        run = _Rescrub(b, vid, (mode, vault.secrets.pseudonym_key, types))
        run.tables()
        run.records(f"{name}@{n}", workers_for(workers, size or 0))
        run.sources(keep_old_pii=old_mode in STRICT)
        found = by_type(run.new)
        done = b.commit("vault.rescrub", parents=[(old_id, lineage.RESCRUB)], held_out=run.held_out,
                        duplicates=run.dups,
                        attrs={"rescrub_of": old_id, "policy_before": before, "policy_after": after,
                               "pii_policy": after, "pii_found": dict(sorted(found.items()))},
                        details={"rescrub_of": old_id, "found": sum(found.values()), "duplicates": run.dups})
    return {"version": done.version, "content_hash": done.content_hash, "records": done.records,
            "new_records": done.records, "bytes": done.bytes, "duplicates": run.dups, "files": run.files,
            "partial": False, "parent": old_id, "pii": dict(sorted(found.items())), "tables": run.new_tables,
            "skipped": [], "failed": [], "rescrub_of": old_id, "policy_before": before, "policy_after": after}


def _policies(con, version: str, own: dict) -> Iterator[dict]:
    """The policies `version`'s records were scrubbed under: its own, and those of the versions it holds records
    of (lineage "previous", transitively: an ingest on top of a flag version keeps that version's plaintext).
    Not past a re-scrub, which scrubbed what it holds again."""
    yield own
    frontier, seen = [version], {version}
    while frontier:
        child = frontier.pop()
        for (parent,) in con.execute("SELECT parent FROM lineage_edges WHERE child = ? AND role = 'previous'",
                                     [child]).fetchall():
            if parent in seen:
                continue
            seen.add(parent)
            attrs = lineage.node(con, parent)["attrs"]
            yield attrs.get("pii_policy") or {"mode": attrs.get("pii_mode")}
            frontier.append(parent)


def _same(before: dict, after: dict) -> bool:
    """Whether two recorded policies (`fields.policy`) are one: mode, types and the detectors' fingerprint."""
    keys = ("mode", "types", "detectors")
    return all(k in before for k in keys) and all(
        (sorted(before[k]) if k == "types" else before[k]) == (sorted(after[k]) if k == "types" else after[k])
        for k in keys)


class _Rescrub:
    """The steps of one re-scrub, into builder `b`, from version `vid`, under the policy `scan`."""

    def __init__(self, b: VersionBuilder, vid: int, scan: tuple):
        self.b, self.vid, self.con = b, vid, b.con
        self.scan = scan  # (mode, key, types): the policy, for `fs` here and the workers' scrubbers
        self.fs = FieldScrubber(*scan)
        self.renamed: dict[str, str] = {}  # old table -> new table
        self.new_tables: list[str] = []
        self.new: Counter = Counter()  # what this re-scrub found, by (type, detector, band)
        self.per_source: dict[str, Counter] = {}
        self.review: dict[str, ReviewKeep] = {}  # scrubbed source -> its findings kept for review
        self.first: dict[str, int] = {}  # scrubbed source -> its first record's ord
        self.held_out: list[str] = []
        self._rows: dict[str, list] = {}  # re-scrubbed table -> [rows read, rows left of the batch, batches, columns]
        self.dups = 0
        self.files = 0

    def source(self, path: str | None) -> str:
        """A source path as it lands now; what is found in it counts once per file."""
        if not path:
            return path or ""
        out, counts, found = self.fs.path(path, "source")
        if out not in self.per_source:
            self.per_source[out] = Counter(counts)
            self.new.update(counts)
            keep = self.review[out] = ReviewKeep()
            for f in found:
                keep.add(None, f)
        return out

    def tables(self) -> None:
        for old, src in self.con.execute("SELECT table_name, source FROM version_tables WHERE vid = ? "
                                         "ORDER BY table_name", [self.vid]).fetchall():
            source = self.source(src)
            counts = self.per_source.setdefault(source, Counter())
            before = Counter(counts)
            # named after its file as it lands now (the old name may hold what the file name held, lower-cased)
            stem = source if "/" in source else self.fs.path(re.sub(r"^t\d+_", "", old), "table")[0]
            new = self.b.table_name(stem)
            rescrub_table(cursor(self.con), old, new, self.fs.cell, counts,
                          lambda c, counts=counts: self.fs.name(c, counts))
            self.new.update(counts - before)
            self.b.table(new, source)
            self.renamed[old] = new
            self.new_tables.append(f"data.{new}")

    def _scanned(self, ref: str, workers: int) -> Iterator[tuple[dict, Landed]]:
        """(row, its record scrubbed and ready to land) for each record of `ref` in order: scrubbed as ingest
        scrubs a large file's records (`scan.scan_each`, in batches), on its worker processes if any."""
        from appliance.vault.ingest import Pipeline, batches

        def finished(pipe: Pipeline) -> Iterator[tuple]:
            for rows in batches(iter_records(self.con, ref), lambda r: len(r["text"])):
                recs = [Record(r["kind"], r["source"], r["text"], r["path"], r["language"], r["title"], r["meta"] or {})
                        for r in rows]
                yield from pipe.submit("records", rows, scan_each, recs, *self.scan)
            yield from pipe.drain()

        pipe = Pipeline(workers)
        try:
            for _, rows, landed in finished(pipe):
                yield from zip(rows, landed)
        finally:
            pipe.close()

    def records(self, ref: str, workers: int) -> None:
        """Each record as ingest lands one (`ingest._Landing.records`), under its file's path as it lands now."""
        seen: set[str] = set()
        fields_seen: dict[str, set] = {}  # per file, as ingest keeps them per file
        for r, (counts, ((kind, path, language, title, meta, text, digest, nbytes, found, fields),)) in \
                self._scanned(ref, workers):
            source = self.source(r["source"])
            if kind == "table" and r["path"] in self.renamed:
                path = self.renamed[r["path"]]  # the row's table, as it is named now
                remade = self._row(path, title, (r["meta"] or {}).get("row"))
                if remade is not None:  # as ingest makes it: from its cells as scrubbed now, with their columns
                    text, found = remade, self.fs.table_found(remade)
                    data = text.encode("utf-8")
                    digest, nbytes = hashlib.sha256(data).hexdigest(), len(data)
            tally = self.per_source.setdefault(source, Counter())
            if kind != "table":  # a table row's findings were counted in its cells (`tables`)
                tally.update(counts)
                self.new.update(counts)
            if fields:
                more: Counter = Counter()
                found = found + field_findings(fields, fields_seen.setdefault(source, set()), more)
                tally.update(more)
                self.new.update(more)
            if digest in seen:
                self.dups += 1
                continue
            seen.add(digest)
            if r["split"] == "validation":
                self.held_out.append(digest)
            ord_ = self.b.next_ord
            self.first.setdefault(source, ord_)
            if found:
                self.review.setdefault(source, ReviewKeep()).extend(ord_, found)
            self.b.add_row(kind, source, path, language, title, meta, text, digest, nbytes)

    def _row(self, table: str, stem: str | None, n) -> str | None:
        """Row `n` (from 1) of the re-scrubbed `data.<table>` as its record's text (`render_row`). Read in order,
        one batch at a time, as the version's records come: a table row's record is made again from its cells
        as they were scrubbed now, so the rules that read a cell with its column ("signed_by", "given") reach
        it, where its old text read again as prose would not."""
        if not isinstance(n, int) or n < 1 or not stem:
            return None
        state = self._rows.get(table)
        if state is None or state[0] >= n:
            reader = cursor(self.con).execute(f'SELECT * FROM data."{table}"').fetch_record_batch(BATCH_ROWS)
            state = self._rows[table] = [0, iter(()), iter(reader), []]
        while state[0] < n:
            row = next(state[1], None)
            if row is None:
                batch = next(state[2], None)
                if batch is None:
                    return None
                state[1], state[3] = iter(batch.to_pylist()), batch.schema.names
                continue
            state[0] += 1
            if state[0] == n:
                return render_row(stem, n, row, state[3])
        return None

    def sources(self, keep_old_pii: bool) -> None:
        """The source manifest and PII report: the old ones with their paths scrubbed again, and what this
        re-scrub found (the old counts only where the old version replaced what it found)."""
        for path, kind, size, sha, recs, dups, status, reason in self.con.execute(
                "SELECT path, kind, bytes, sha256, records, duplicates, status, reason FROM version_sources "
                "WHERE vid = ? ORDER BY path", [self.vid]).fetchall():
            self.b.source(self.source(path), kind, size, sha, recs, dups, status, scrub_reason(self.fs, reason))
            self.files += status == "ok"
        if keep_old_pii:
            for path, typ, cnt, det, bnd in self.con.execute(
                    "SELECT path, type, count, detector, band FROM version_pii WHERE vid = ?", [self.vid]).fetchall():
                self.b.pii(self.source(path), {(typ, det, bnd) if det is not None else typ: cnt})
        for source, counts in self.per_source.items():
            self.b.pii(source, +counts)
            if source in self.review:
                self.b.findings(source, self.review[source].kept(self.first.get(source)))
