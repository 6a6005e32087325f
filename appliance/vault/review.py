"""`appliance vault pii-review`: the lowest-confidence findings of a version, in context, the value masked.

Ingest keeps each finding's place in the scrubbed field (`version_pii_findings`, inside the vault), never
the value; the context shown here is cut from the stored, scrubbed text around that place, and the finding
itself always shows as a placeholder. A `flag` or `off` version stores the values in the clear, so what the
context shows is masked again: every finding the detectors make in the whole field (names are found from
context far from the window: a role, a header, an earlier mention) and every finding kept for the field, each
masked whole even where the window cuts it.
"""

from __future__ import annotations

import json
import re

from appliance.errors import UsageError
from appliance.vault.fields import BANDS, band
from appliance.vault.pii import detect
from appliance.vault.versions import has_column, resolve

CONTEXT = 60  # characters of context either side
_PLACEHOLDER = re.compile(r"\[[A-Z][A-Z0-9]*(?:_[0-9a-f]+)?\]")
_SPACE = re.compile(r"\s+")


def review(con, ref: str, limit: int = 20, offset: int = 0, type_: str | None = None, band_: str | None = None,
           file: str | None = None, key: bytes | None = None) -> dict:
    """The findings of version `ref` kept for review, lowest score first, each in its masked context.

    `type_` keeps one PII type, `band_` one confidence band (high, medium, low), `file` one source file
    (whole, or its last components; as it landed, or as it was named on disk: the name is scrubbed as the
    version scrubbed it, with the vault's pseudonym `key` for a pseudonymized one). `total` counts every match;
    `summary` is the version's whole report by type, detector and band."""
    vid, name, n = resolve(con, ref)
    mode = con.execute("SELECT pii_mode FROM versions WHERE vid = ?", [vid]).fetchone()[0]
    files = None
    if file:
        files = {file}
        if mode in ("redact", "pseudonymize") and (key or mode == "redact"):
            from appliance.vault.fields import FieldScrubber

            files.add(FieldScrubber(mode, key).path(file, "source")[0])
    where, params = _filter(vid, type_, band_, sorted(files) if files else None)
    total, rows = 0, []
    if has_column(con, "version_pii_findings", "score"):  # an older vault opened read-only has none yet
        total = con.execute(f"SELECT count(*) FROM version_pii_findings WHERE {where}", params).fetchone()[0]
        rows = con.execute(
            f"SELECT ord, source, field, type, detector, score, pos, len FROM version_pii_findings WHERE {where} "
            "ORDER BY score, ord NULLS FIRST, field, pos LIMIT ? OFFSET ?", [*params, limit, offset]).fetchall()
    records = _records(con, vid, {r[0] for r in rows if r[0] is not None})
    kept = _kept(con, vid, rows)
    names = _names(con, vid, {r[1] for r in rows}) if mode not in ("redact", "pseudonymize") else {}
    masks: dict[tuple, list[tuple[int, int, str]]] = {}
    findings = []
    for ord_, source, field, typ, detector, score, pos, length in rows:
        value = source if field == "source" else _value(records.get(ord_), field)
        key = (ord_, source if ord_ is None else None, field)
        if key not in masks:
            masks[key] = _masks(value, kept.get(key, ()), names.get(source, ()))
        findings.append({
            "id": None if ord_ is None else f"{name}@{n}#{ord_}", "source": source, "field": field, "type": typ,
            "detector": detector or "", "score": round(float(score), 4), "band": band(score),
            "context": _context(value, pos, length, typ, masks[key])})
    cols = "detector, band" if has_column(con, "version_pii", "detector") else "NULL, NULL"
    summary = [{"type": t, "detector": d or "", "band": b or "", "count": c} for t, d, b, c in con.execute(
        f"SELECT type, {cols}, sum(count)::BIGINT FROM version_pii WHERE vid = ? GROUP BY ALL "
        "ORDER BY ALL NULLS FIRST", [vid]).fetchall()]
    return {"version": f"{name}@{n}", "pii_mode": mode, "total": total, "offset": offset, "findings": findings,
            "summary": summary}


def _filter(vid: int, type_: str | None, band_: str | None, files: list[str] | None) -> tuple[str, list]:
    """The WHERE clause (fixed text; values bound) of a version's findings matching the filters."""
    from appliance.vault.pii import TYPES

    where, params = "vid = ?", [vid]
    if type_:
        if type_.upper() not in TYPES:
            raise UsageError(f"unknown PII type {type_!r}", f"use one of {', '.join(TYPES)}")
        where += " AND type = ?"
        params.append(type_.upper())
    if band_:
        bounds = dict(BANDS)
        if band_ not in bounds:
            raise UsageError(f"unknown band {band_!r}", f"use one of {', '.join(b for b, _ in BANDS)}")
        upper = [floor for b, floor in BANDS if floor > bounds[band_]]
        where += " AND score >= ?" + (" AND score < ?" if upper else "")
        params += [bounds[band_]] + ([min(upper)] if upper else [])
    if files:
        where += " AND (" + " OR ".join(["source = ? OR ends_with(source, '/' || ?)"] * len(files)) + ")"
        for f in files:
            params += [f, f]
    return where, params


def _records(con, vid: int, ords: set[int]) -> dict[int, dict]:
    """The stored (scrubbed) fields of the records `ords` of version `vid`."""
    if not ords:
        return {}
    marks = ",".join("?" * len(ords))
    rows = con.execute(f"SELECT r.ord, b.text, r.title, r.path, r.meta FROM version_records r JOIN blobs b "
                       f"ON b.hash = r.hash WHERE r.vid = ? AND r.ord IN ({marks})", [vid, *sorted(ords)]).fetchall()
    return {o: {"text": t, "title": ti, "path": p, "meta": json.loads(m) if m else {}} for o, t, ti, p, m in rows}


def _value(rec: dict | None, field: str) -> str:
    if rec is None:
        return ""
    if field.startswith("meta."):
        value = rec["meta"].get(field[5:])
    else:
        value = rec.get(field)
    return value if isinstance(value, str) else ""


def _kept(con, vid: int, rows: list[tuple]) -> dict[tuple, list[tuple[int, int, str]]]:
    """Every finding kept for the fields shown: (record ord, source if no record, field) -> (start, end, type)."""
    ords = sorted({r[0] for r in rows if r[0] is not None})
    out: dict[tuple, list[tuple[int, int, str]]] = {}
    if ords:
        marks = ",".join("?" * len(ords))
        for o, f, t, p, n in con.execute(f"SELECT ord, field, type, pos, len FROM version_pii_findings WHERE vid = ? "
                                         f"AND ord IN ({marks})", [vid, *ords]).fetchall():
            out.setdefault((o, None, f), []).append((p, p + n, t))
    for source in {r[1] for r in rows if r[0] is None}:
        for f, t, p, n in con.execute("SELECT field, type, pos, len FROM version_pii_findings WHERE vid = ? "
                                      "AND ord IS NULL AND source = ?", [vid, source]).fetchall():
            out.setdefault((None, source, f), []).append((p, p + n, t))
    return out


def _masks(value: str, kept, hints: tuple[str, ...] = ()) -> list[tuple[int, int, str]]:
    """What to mask in `value`: the detectors' findings in the whole of it, with the names its file is known to
    hold (`hints`), and the findings kept for it."""
    return sorted({(f.start, f.end, f.type) for f in detect(value, hints)} | {(s, e, t) for s, e, t in kept})


def _names(con, vid: int, sources: set[str]) -> dict[str, tuple[str, ...]]:
    """The names each of `sources` is known to hold in a version that stores values (flag, off): the words of
    every PERSON finding kept for the file, read from its records. Ingest found some of them from context the
    review cannot see again (a mail's headers, a name an earlier part of the file gave): only some of a file's
    findings are kept, but the same names are."""
    from appliance.vault.pii_names import words_of

    out: dict[str, tuple[str, ...]] = {}
    for source in sources:
        spots = con.execute("SELECT ord, field, pos, len FROM version_pii_findings WHERE vid = ? AND source = ? "
                            "AND type = 'PERSON' AND ord IS NOT NULL LIMIT 2000", [vid, source]).fetchall()
        records = _records(con, vid, {o for o, *_ in spots})
        values = {_value(records.get(o), f)[p:p + n] for o, f, p, n in spots}
        values.discard("")
        out[source] = tuple(sorted(values | words_of(values)))
    return out


def _context(value: str, pos: int, length: int, typ: str, masks: list[tuple[int, int, str]]) -> str:
    """`value` around [pos, pos + length) on one line: the finding as its placeholder, marked »so«, every other
    finding in the window masked whole (`masks`, sorted)."""
    hit = value[pos:pos + length]
    shown = hit if _PLACEHOLDER.fullmatch(hit) else f"[{typ}]"  # a flag/off version stores the value itself
    start, end = max(0, pos - CONTEXT), min(len(value), pos + length + CONTEXT)
    line = ("…" if start else "") + _masked(value, start, pos, masks) + f"»{shown}«" + \
        _masked(value, pos + length, end, masks) + ("…" if end < len(value) else "")
    return _SPACE.sub(" ", line).strip()


def _masked(value: str, start: int, end: int, masks: list[tuple[int, int, str]]) -> str:
    """value[start:end] with each finding that reaches into it as its placeholder: a placeholder already there
    stays as it is, and a value cut by either edge is masked all the same."""
    out, at = [], start
    for s, e, t in masks:
        if e <= at or s >= end:
            continue
        out.append(value[at:max(at, s)])
        found = value[max(s, start):min(e, end)]
        out.append(found if _PLACEHOLDER.fullmatch(value[s:e]) and s >= start and e <= end else f"[{t}]")
        at = min(e, end)
    out.append(value[at:end])
    return "".join(out)
