"""Every field that lands is scrubbed, under the one policy of its version.

A record's text, and with it its title (a heading, a mail subject, a document's properties), its path (a
repository path, a mail member), its string metadata and its source path; a table's name and column names
as well as its cells; the paths and reasons in the source manifest. `scrub_record` is the one function every
reader's records go through; paths are scrubbed a component at a time, so a path stays a path.

What scrubbing found is kept for review (`appliance vault pii-review`) as `Found`: the field, the type, the
detector that found it, its score and where its placeholder sits in the scrubbed value. Never the value.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from appliance.errors import UsageError
from appliance.vault import pii, pii_names
from appliance.vault.pii import Scrubber
from appliance.vault.pii_base import YYYYMMDD

# Confidence bands of a finding's score (the detector's own 0..1), highest first.
BANDS = (("high", 0.9), ("medium", 0.6), ("low", 0.0))
REVIEW_KEEP = 50  # findings kept for review per file, type and detector: the lowest scores
PATH_META = frozenset({"repo"})  # metadata that names a file or directory: scrubbed as a path
_CACHE = 4096  # distinct short field values remembered per scrubber (a file's title repeats in every part)
# cells with findings remembered for their rows' records: more than a table batch of rows (2,048) can hold, so
# every row still finds its cells when the batch's records are scrubbed after it
_CELL_FINDINGS = 65536
# The path of code (and its build and packaging files), where words are joined in names ("max_pool.py",
# "xlm_roberta/modeling.py"); any other file's path, a directory's included, may be named after a person
# ("patients/margaret.okonkwo/scan.png", "Okonkwo-Margaret-notes.docx").
_CODE = re.compile(r"(?i)\.(?:py|pyc|pyi|pyx|pxd|js|mjs|cjs|ts|tsx|jsx|c|h|cc|cpp|cxx|hpp|hh|cu|cuh|java|kt|kts"
                   r"|scala|go|rs|rb|php|pl|pm|sh|bash|zsh|ps1|swift|m|mm|cs|fs|lua|r|jl|sql|so|dll|dylib|o|a|whl"
                   r"|egg|class|jar|ipynb|proto|toml|cfg|ini|ya?ml|lock|cmake|gradle|mk|pth|typed)$")
# `_`, and `-` or `.` between a letter and a digit: word separators in a file name, spaces to the detectors
_SEPARATORS = re.compile(r"_|(?<=[^\W\d_])[-.](?=\d)|(?<=\d)[-.](?=[^\W\d_])")


# A run of digits joined to a name in a file's name: "OKONKWO_MARGARET_19450312.pdf", "okonkwo-00448812"
_PATH_ID = re.compile(r"(?<![\w])\d{6,12}(?![\w])")


def _ids_beside_names(seen: str, found: list) -> list:
    """The runs of 6 to 12 digits in a path component (its separators read as blanks) right beside a name
    found in it: the person's birth date (a valid YYYYMMDD: DATE) or record number (MRN)."""
    people = [(f.start, f.end) for f in found if f.type == "PERSON"]
    taken = [(f.start, f.end) for f in found]
    out = []
    for m in _PATH_ID.finditer(seen) if people else ():
        s, e = m.span()
        if any(a < e and s < b for a, b in taken) or not any(b == s - 1 or a == e + 1 for a, b in people):
            continue
        v = m.group()
        typ = "DATE" if _YYYYMMDD.fullmatch(v) else "MRN"
        out.append(pii.Finding(typ, s, e, v, "path-id"))
    return out


_YYYYMMDD = re.compile(YYYYMMDD)


def band(score: float) -> str:
    """The confidence band of `score`: high (>= 0.9), medium (>= 0.6) or low."""
    for name, floor in BANDS:  # a loop, not next() over a generator: this runs for every finding
        if score >= floor:
            return name
    raise ValueError(f"score {score!r} is below every band")


class Found(NamedTuple):
    """One finding as it is kept: where its placeholder sits in the scrubbed field, never the value.

    `field` is `text`, `title`, `path`, `source`, `meta.KEY`, `column` or `table`; `start`/`end` index the
    field's scrubbed value (in `flag` mode, the value as stored, which still holds it). A tuple: findings travel
    from the ingest's workers in their tens of thousands as plain tuples of these six values (`scan.landing`),
    and what keeps them for review (`ReviewKeep`, `VersionBuilder.findings`) takes either."""

    field: str
    type: str
    detector: str
    score: float
    start: int
    end: int

    @property
    def key(self) -> tuple[str, str, str]:
        """(type, detector, band): how the report counts it."""
        return self.type, self.detector, band(self.score)


class _Recording(Scrubber):
    """The site's scrubber, noting each finding as it puts a placeholder in (values stay in memory here)."""

    def __init__(self, mode: str, key: bytes | None, types: tuple[str, ...] | None = None):
        super().__init__(mode, key, **({"types": types} if types is not None else {}))
        self.seen: list = []

    def replacement(self, f, person: str = "") -> str:
        tok = super().replacement(f, person)
        self.seen.append((f, tok))
        return tok


class FieldScrubber:
    """One policy for every field: `scrub` (text), `path`, `cell` and `name` (a table's or column's name).

    Each returns what `Scrubber` returns, with counts keyed by (type, detector, band) and, where asked,
    the findings (`Found`). `flag` finds what `redact` would and keeps the value; `off` does nothing.
    `types`: the PII types the site's policy scrubs (`site_types`); None for every type."""

    def __init__(self, mode: str, key: bytes | None = None, types: tuple[str, ...] | None = None):
        self.mode = mode
        self._s = _Recording("redact" if mode in ("flag", "off") else mode, key, types)
        self._cache: dict[tuple[str, str], tuple[str, Counter, list[Found]]] = {}
        self.spans: list[tuple[int, int]] = []  # where the last `scrub` found something, in its input
        self.people: list[str] = []  # the names the last `scrub` found (values: they stay in this process)
        self.record_people: list[str] = []  # the names the last `scrub_record` found in its record's text
        # (column, cell as it lands) -> its findings, at their places in that value: a table row's record
        # (`table_found`) takes them from here, so cells are reviewed as text is
        self._cells: dict[tuple[str, str], list[Found]] = {}
        self._cell_results: dict[tuple[str, str], tuple[str, Counter, list[Found]]] = {}  # (column, cell) -> `cell`

    # --- the field kinds ------------------------------------------------------------------------------
    def scrub(self, text: str, hints: tuple[str, ...] = (), field: str = "text") -> tuple[str, Counter, list[Found]]:
        """(scrubbed text, counts by (type, detector, band), findings) of one field's value."""
        self.spans, self.people = [], []
        if self.mode == "off" or not text:
            return text, Counter(), []
        self._s.seen = []
        out, counts = self._s.scrub(text, hints)
        self.spans = [(f.start, f.end) for f, _ in self._s.seen]
        self.people = [f.value for f, _ in self._s.seen if f.type == "PERSON"]
        found = self._located(out, field)
        return (text if self.mode == "flag" else out), _detail(counts, found), found

    def field(self, value: str, field: str, hints: tuple[str, ...] = ()) -> tuple[str, Counter, list[Found]]:
        """A short field (title, metadata), remembered: the same value repeats across a file's records. A
        title is often a file's name ("Derek_Hollis_notes"), so it is read as one (`_component`)."""
        if len(value) > 512:
            return self.scrub(value, hints, field)
        key = (field, value, hints) if hints else (field, value)
        if key not in self._cache:
            if len(self._cache) >= _CACHE:
                self._cache.clear()
            self._cache[key] = self._component(value, field, hints)
        return self._cache[key]

    def path(self, value: str, field: str = "path") -> tuple[str, Counter, list[Found]]:
        """A path, one component at a time (names with an SSN in them are common), so it stays a path."""
        if self.mode == "off" or not value:
            return value, Counter(), []
        key = ("/" + field, value)
        if key in self._cache:
            return self._cache[key]
        parts, counts, found, pos = [], Counter(), [], 0
        # a document's path: its words may join a person's name (not a column's or a repository's name: data
        # and code join words so, "max_pool")
        named = field in ("path", "source") and _CODE.search(value) is None
        for comp in value.split("/"):
            out, c, f = self._remembered(comp, field, named) if comp else (comp, Counter(), [])
            counts.update(c)
            found += [Found(x.field, x.type, x.detector, x.score, x.start + pos, x.end + pos) for x in f]
            parts.append(out)
            pos += len(out) + 1
        if len(self._cache) >= _CACHE:
            self._cache.clear()
        self._cache[key] = result = ("/".join(parts), counts, found)
        return result

    def _remembered(self, comp: str, field: str, named: bool = False) -> tuple[str, Counter, list[Found]]:
        """`_component`, remembered: the directories above a file repeat for every file in them."""
        key = ("/" if named else "//", field + "/" + comp)
        if key not in self._cache:
            if len(self._cache) >= _CACHE:
                self._cache.clear()
            self._cache[key] = self._component(comp, field, named=named)
        return self._cache[key]

    def _component(self, comp: str, field: str, hints: tuple[str, ...] = (), named: bool = False
                   ) -> tuple[str, Counter, list[Found]]:
        """One path component. Names join words with `_`, `-` and `.` ("tools-123-45-6789", "jane_doe"):
        the detectors see those as spaces, and the placeholders go into the component as it was. In a path
        that is not code's (`_CODE`: code joins words so, "max_pool"), a given name and a surname joined so, in
        either order and any case, are a name (`pii_names.path_names`)."""
        seen = _SEPARATORS.sub(" ", comp)  # same length: the findings' places hold in `comp`
        if named and self.mode != "off":
            hints = hints + tuple(pii_names.path_names(seen))  # "margaret.okonkwo", "Okonkwo-Margaret"
        if seen == comp or self.mode == "off":
            return self.scrub(comp, hints, field)
        self._s.seen = []
        scrubbed, counts = self._s.scrub(seen, hints)
        if named and self.mode != "off" and self._s.seen:
            for f in _ids_beside_names(seen, [f for f, _ in self._s.seen]):
                if self._s.types is None or f.type in self._s.types:
                    self._s.replacement(f)  # noted in `seen` with its placeholder, as the scan's own
                    counts[f.type] += 1
        hits = sorted(self._s.seen, key=lambda x: x[0].start)
        if counts and not hits:  # a scrubber that replaced without telling: its output, separators lost
            return (comp if self.mode == "flag" else scrubbed), _detail(counts, []), []
        out, pos = [], 0
        for f, tok in hits:
            out.append(comp[pos:f.start])
            joined = comp[f.start:f.end]
            if " " in tok and " " not in joined:  # a surrogate name joined as the name was: "Quigley_Kincer"
                tok = tok.replace(" ", next((c for c in joined if c in "_-."), "_"))
            out.append(tok)
            pos = f.end
        out.append(comp[pos:])
        found = self._located("".join(out), field)
        return (comp if self.mode == "flag" else "".join(out)), _detail(counts, found), found

    def cell(self, column: str, value: str) -> tuple[str, Counter]:
        """A table cell, with its column name as context ("ssn", "date_of_birth", "owner"). Its findings are
        kept (by column and value as it lands) for the row's record: `table_found`.

        Columns repeat their values from row to row and table to table, so the result of the most recent
        cells is remembered whole: the counts returned are shared between equal cells, to be read and never
        changed."""
        key = (column, value)
        hit = self._cell_results.get(key)
        if hit is None:
            hit = self._cell(column, value)
            if len(self._cell_results) >= pii.CELL_CACHE:  # the oldest goes: no cliff past the cache's size
                del self._cell_results[next(iter(self._cell_results))]
            self._cell_results[key] = hit
        landed, counts, found = hit
        if found and (column, landed) not in self._cells:  # remembered longer here than there
            self._keep_cell(column, landed, found)
        return landed, counts

    def _cell(self, column: str, value: str) -> tuple[str, Counter, list[Found]]:
        if self.mode == "off":
            return value, Counter(), []
        self._s.seen = []
        out, counts = self._s.scrub_cell(column, value)
        if not counts:  # most cells: nothing found, so nothing replaced, located or kept
            return value, counts, []
        landed = value if self.mode == "flag" else out
        prefix = self._s.label(column)
        found = [Found("text", f.type, f.detector, f.score, f.start - len(prefix), f.end - len(prefix))
                 for f in self._located(prefix + landed, "cell") if f.start >= len(prefix)]
        if found:
            self._keep_cell(column, landed, found)
        return landed, _detail(counts, found), found

    def _keep_cell(self, column: str, landed: str, found: list[Found]) -> None:
        if len(self._cells) >= _CELL_FINDINGS:
            del self._cells[next(iter(self._cells))]
        self._cells[(column, landed)] = found

    def table_found(self, text: str) -> list[Found]:
        """The findings of a table row's record (`render_row`: a "[table row N]" line, then "column: value"
        lines), from its cells as `cell` scrubbed them, at their places in `text`."""
        pos = text.find("\n") + 1  # past the "[table row N]" line
        if self.mode == "redact" and text.find("[", pos) < 0:
            return []  # every cell with a finding holds its placeholder, "[TYPE]", once redacted
        out = []
        while pos:
            end = text.find("\n", pos)
            line = text[pos:] if end < 0 else text[pos:end]
            column, sep, value = line.partition(": ")
            for f in self._cells.get((column, value), ()) if sep else ():
                at = pos + len(column) + 2
                out.append(Found("text", f.type, f.detector, f.score, f.start + at, f.end + at))
            pos = end + 1
        return out

    def name(self, value: str, counts: Counter, field: str = "column") -> str:
        """A table's or column's name, scrubbed as a file name is; what was found goes into `counts`."""
        out, c, _ = self.path(value, field)
        counts.update(c)
        return out

    # --- where the findings went ------------------------------------------------------------------------
    def _located(self, out: str | None, field: str) -> list[Found]:
        """The findings the scrubber replaced, at their placeholders' places in `out` (in the original text
        in flag mode, where nothing was replaced); None: only their kinds are wanted."""
        found, shift = [], 0
        for f, tok in sorted(self._s.seen, key=lambda x: x[0].start):
            det, score = str(getattr(f, "detector", "") or ""), float(getattr(f, "score", 1.0))
            if self.mode == "flag" or out is None:
                start, end = f.start, f.end
            else:
                start = f.start + shift
                if out[start:start + len(tok)] != tok:  # a scrubber that replaced otherwise: find the token
                    start = out.find(tok, max(0, start - 64))
                    if start < 0:
                        continue
                end = start + len(tok)
                shift += len(tok) - (f.end - f.start)
            found.append(Found(field, f.type, det, score, start, end))
        self._s.seen = []
        return found


def _detail(counts: Counter, found: list[Found]) -> Counter:
    """Counts by (type, detector, band); findings the recorder did not see count with an unknown detector."""
    detail = Counter(f.key for f in found)
    unseen = dict(counts)  # per type, the count less the findings seen: plain dicts, once per field scrubbed
    for f in found:
        unseen[f.type] = unseen.get(f.type, 0) - 1
    for typ, n in unseen.items():
        if n > 0:
            detail[(typ, "", band(1.0))] += n
    return detail


def by_type(detail: Counter) -> Counter:
    """Counts by (type, detector, band) -> counts by type (the shape `pii` has in ingest results)."""
    out: Counter = Counter()
    for k, n in detail.items():
        out[k[0] if isinstance(k, tuple) else k] += n
    return out


def scrub_record(fs: FieldScrubber, rec, known: tuple[str, ...] = ()) -> tuple[Counter, list[Found]]:
    """Scrub a record whole, in place: text (unless its reader scrubbed it already), title, path and string
    metadata. Returns the text's counts and every finding (those in fields too, with their field named).

    The names found in the text are looked for in its title and metadata too ("Subject: RE: [PERSON]
    incident", found from the message's "SPC Tillery", is the record's title), as are `known`: names found in
    the file's earlier records (`scan.scrub_records`). The source path is the ingest's to scrub (once per file,
    `scrub_source`), not each record's."""
    counts, found, clean = Counter(), [], None
    hints = rec.name_hints + known if known else rec.name_hints
    fs.record_people = []
    if not rec.scrubbed:
        text = rec.text
        rec.text, counts, found = fs.scrub(text, hints)
        clean = _clean_in(text, str(rec.title or ""), fs)
        fs.record_people = fs.people  # before the fields' scrubs below set `people` again
        if fs.people:  # each name's words, and a name of several words whole ("Nguyen Thi Lan": "Lan" is a word)
            more = pii_names.words_of(fs.people) | {p for p in fs.people if " " in p and "\n" not in p}
            hints = hints + tuple(sorted(more - set(hints)))
    elif getattr(rec, "kind", "") == "table":  # counted as its cells were scrubbed; kept for review here
        found = fs.table_found(rec.text)
    if rec.title and not clean:
        rec.title, _, f = fs.field(str(rec.title), "title", hints)
        found += f
    if rec.path:
        rec.path, _, f = fs.path(rec.path)
        found += f
    for k, v in list(rec.meta.items()):
        if isinstance(v, str) and v:
            rec.meta[k], _, f = fs.path(v, f"meta.{k}") if k in PATH_META else fs.field(v, f"meta.{k}", hints)
            found += f
    return counts, found


def _clean_in(text: str, title: str, fs: FieldScrubber) -> bool:
    """Whether `title` is a line of `text` (a heading, a mail's Subject: header) in which scrubbing the text
    found nothing: then it was scanned there, in its context, and needs no scan of its own. A title
    with `_`, `-` or `.` joining words is a file's name, and is scanned as one."""
    i = text.find(title) if title and len(title) <= 512 else -1
    if i < 0 or _SEPARATORS.search(title):
        return False
    end = i + len(title)
    before = text[text.rfind("\n", 0, i) + 1:i]  # the line up to the title: nothing, "# " or "Subject: "
    if before.strip("# \t") not in ("", "Subject:") or (end < len(text) and text[end] not in "\r\n"):
        return False
    return not any(s < end and e > i for s, e in fs.spans)


class ReviewKeep:
    """The findings of one file kept for review: per type and detector the REVIEW_KEEP lowest scores (the
    counts keep every one). Memory stays bounded however many a file holds."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str], list[tuple[float, int, int | None, Found]]] = {}
        self.n = 0  # arrival order: equal scores keep the earliest

    def add(self, ord_: int | None, f: tuple) -> None:
        """A finding: a `Found`, or the plain tuple of its six values."""
        self.extend(ord_, (f,))

    def extend(self, ord_: int | None, found) -> None:
        """A record's findings (`add`)."""
        groups = self.groups
        for f in found:
            group = groups.get((f[1], f[2]))  # (type, detector)
            if group is None:
                group = groups[(f[1], f[2])] = []
            group.append((f[3], self.n, ord_, f))  # its score first: the lowest are kept
            self.n += 1
            if len(group) >= 2 * REVIEW_KEEP:
                group.sort(key=lambda x: x[:2])
                del group[REVIEW_KEEP:]

    def kept(self, first: int | None) -> list[tuple[int | None, tuple]]:
        """(record ord, finding), in record order; one with no record (in the file's path) goes with
        `first`, the file's first record, if it has one."""
        out = []
        for group in self.groups.values():
            group.sort(key=lambda x: x[:2])
            out += [(first if o is None else o, f) for _, _, o, f in group[:REVIEW_KEEP]]
        return sorted(out, key=lambda x: (-1 if x[0] is None else x[0], x[1][0], x[1][4]))  # field, start


def field_value(rec, field: str) -> str | None:
    """The (scrubbed) value of `field` in record `rec` (a `Record` or a stored record's dict)."""
    get = (lambda k: rec.get(k)) if isinstance(rec, dict) else (lambda k: getattr(rec, k, None))
    if field.startswith("meta."):
        meta = get("meta") or {}
        value = meta.get(field[5:])
        return value if isinstance(value, str) else None
    value = get(field)
    return value if isinstance(value, str) else None


def scrub_source(fs: FieldScrubber, path: Path | str) -> tuple[str, Counter, list[Found]]:
    """A source file's path as it lands (records' `source`, the manifest, the PII report)."""
    return fs.path(str(path), "source")


def scrub_reason(fs: FieldScrubber, reason: str | None) -> str | None:
    """Why a file was skipped or failed: a parser's message can quote the file's content."""
    return fs.scrub(reason, (), "reason")[0] if reason else reason


def policy(mode: str, types: tuple[str, ...] | None = None) -> dict:
    """What a version was scrubbed under: the mode, the types scrubbed and a fingerprint of the detectors
    (their code), so a later, stricter policy can be told from it."""
    return {"mode": mode, "types": list(types if types is not None else getattr(pii, "TYPES", ())),
            "detectors": detectors_fingerprint()}


def site_types(home_root: Path) -> tuple[str, ...] | None:
    """The PII types the site's policy scrubs (its policy file in the home); None for every type. A file
    that does not parse is a UsageError, before anything is read."""
    load = getattr(pii, "site_policy", None)
    if load is None:
        return None
    try:
        types = tuple(load(home_root).types)
    except ValueError as e:
        raise UsageError(str(e), "fix the policy file, or remove it to scrub every type") from None
    return None if set(types) == set(pii.TYPES) else types


def detectors_fingerprint() -> str:
    """sha256 (first 16 hex digits) of the PII detectors' source: changes whenever the detectors do."""
    h = hashlib.sha256()
    here = Path(pii.__file__).parent
    for p in sorted(here.glob("pii*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]
