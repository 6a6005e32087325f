"""`appliance synth`: new dataset versions made from the site's own data, marked synthetic in lineage.

Generators:
- documents: a local model (a model or GGUF id) writes a question and its answer for each passage of a
  version's records; a pair is kept when its answer is grounded in the passage (most of its content words
  appear there) and its question is new.
- tables: template questions and answers over real rows of a table ("What is the risk class of
  {asset_id}?" -> "{asset_id} is {risk_class}."), as instruction/response rows ready for SFT.
- edge-cases: rows that cover the long tail of a table: pairs of categorical values that never occur
  together in the data (or occur least), numeric fields at and just past their observed extremes, and the
  rarest value of each categorical field; every other field is taken from a real row.

Whatever is generated passes the same PII scrubbing as ingest (each cell, its column as context) and the
site policy (`--policy FILE.toml`: `banned` terms drop a row, a `disclaimer` is appended to every answer)
before it lands. It lands like an ingested table: a real table in the vault, one record per row, a
content-hashed version NAME@N, and a lineage node with `synthetic = true`, the generator and its settings,
and the source version as parent. Nothing is written outside the vault; a failure lands nothing.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import random
import re
import string
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import UsageError

PLACEHOLDER = string.Formatter()
MAX_CATEGORIES = 50  # a column with more distinct values is not treated as categorical by edge-cases


@dataclass
class Policy:
    banned: list[str] = field(default_factory=list)
    disclaimer: str = ""
    path: str | None = None

    @classmethod
    def load(cls, path: Path | None) -> Policy:
        if path is None:
            return cls()
        raw = _toml(path, "policy")
        unknown = set(raw) - {"banned", "disclaimer"}
        banned, disclaimer = raw.get("banned", []), raw.get("disclaimer", "")
        if unknown or not isinstance(banned, list) or not all(isinstance(b, str) and b.strip() for b in banned) \
                or not isinstance(disclaimer, str):
            raise UsageError(f"policy {path}: expected banned = [\"term\", ...] and disclaimer = \"...\""
                             + (f"; unknown key(s) {', '.join(sorted(unknown))}" if unknown else ""),
                             "fix the policy file")
        return cls([b.strip() for b in banned], disclaimer.strip(), str(path))

    def banned_in(self, row: dict) -> str | None:
        text = " ".join(str(v) for v in row.values() if v is not None).lower()
        return next((b for b in self.banned if re.search(rf"(?<!\w){re.escape(b.lower())}(?!\w)", text)), None)

    def to_json(self) -> dict:
        return {"banned": len(self.banned), "disclaimer": bool(self.disclaimer), "file": self.path}


def _toml(path: Path, what: str) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"no {what} file {path}", f"pass an existing {what} TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {path} is not valid TOML: {e}", "fix the file and run again") from None


def template(path: Path) -> dict:
    """The [[qa]] templates file (checked against the table's columns when it is used)."""
    raw = _toml(path, "template")
    if not isinstance(raw.get("qa"), list) or not raw["qa"]:
        raise UsageError(f"template {path} has no [[qa]] entries", "add [[qa]] tables with question and answer")
    return raw


# --- reading the source table --------------------------------------------------------------------------
def source_table(con, ref: str, table: str | None) -> tuple[str, str, list[str], list[dict]]:
    """(version NAME@N, vault table name, columns, rows) of one table of a version: the rows of its train
    split only, so nothing held out for validation is turned into training data."""
    from appliance.vault.versions import resolve

    vid, name, n = resolve(con, ref)
    tables = [t for (t,) in con.execute("SELECT DISTINCT path FROM version_records WHERE vid = ? AND kind = 'table' "
                                        "ORDER BY path", [vid]).fetchall()]
    if not tables:
        raise UsageError(f"{name}@{n} has no tables", "synthesize from a version made by ingesting CSV, Parquet or "
                                                      "JSONL tables")
    stems = {t.split("_", 1)[1]: t for t in tables}
    if table is None:
        if len(tables) > 1:
            raise UsageError(f"{name}@{n} has {len(tables)} tables", f"pick one with --table ({', '.join(stems)})")
        target = tables[0]
    elif table in stems or table in tables:
        target = stems.get(table, table)
    else:
        raise UsageError(f"{name}@{n} has no table {table!r}", f"its tables are {', '.join(stems)}")
    train = {json.loads(m)["row"] for (m,) in con.execute(
        "SELECT meta FROM version_records WHERE vid = ? AND kind = 'table' AND path = ? AND split = 'train'",
        [vid, target]).fetchall()}
    cur = con.execute(f'SELECT rowid + 1, * FROM data."{target}"')
    cols = [d[0] for d in cur.description][1:]
    return f"{name}@{n}", target, cols, [dict(zip(cols, r[1:])) for r in cur.fetchall() if r[0] in train]


def scrubbed(rows: list[dict], scrubber) -> tuple[list[dict], Counter]:
    """The rows with every cell scrubbed in its own column's context, before anything is made from them
    (a name in an `owner` column is a person; inside a sentence the context is gone). Typed cells that hold
    PII (an integer SSN, a date of birth) become their scrubbed text, as at ingest."""
    counts: Counter = Counter()
    out = []
    for row in rows:
        clean = {}
        for c, v in row.items():
            if v is not None and not isinstance(v, bool | list | dict):
                text, found = scrubber.scrub_cell(c, str(v))
                if found:
                    counts.update(found)
                    v = text
            clean[c] = v
        out.append(clean)
    return out, counts


# --- generators ----------------------------------------------------------------------------------------
def from_template(rows: list[dict], columns: list[str], template: dict, path: str, limit: int | None,
                  seed: int) -> tuple[list[dict], int]:
    """instruction/response rows from each [[qa]] of the template over the table's rows; (rows, skipped)."""
    qas = template.get("qa")
    if not isinstance(qas, list) or not qas or not all(isinstance(q, dict) for q in qas):
        raise UsageError(f"template {path} has no [[qa]] entries", "add [[qa]] tables with question and answer")
    problems = []
    for i, qa in enumerate(qas, 1):
        for key in ("question", "answer"):
            if not isinstance(qa.get(key), str) or not qa[key].strip():
                problems.append(f"[[qa]] #{i} needs a {key}")
                continue
            try:
                used = {f for _, f, _, _ in PLACEHOLDER.parse(qa[key]) if f is not None}
            except ValueError as e:
                problems.append(f"[[qa]] #{i} {key}: {e}")
                continue
            if unknown := sorted(used - set(columns)):
                problems.append(f"[[qa]] #{i} {key} uses {', '.join('{' + u + '}' for u in unknown)}, not a column")
    if problems:
        raise UsageError(f"template {path}: " + "; ".join(problems), f"the table's columns are {', '.join(columns)}")
    out, skipped = [], 0
    for row in rows:
        for qa in qas:
            used = {f for _, f, _, _ in PLACEHOLDER.parse(qa["question"] + qa["answer"]) if f is not None}
            if any(row.get(c) in (None, "") for c in used):
                skipped += 1
                continue
            vals = {c: str(row[c]) for c in used}
            out.append({"instruction": qa["question"].format(**vals), "response": qa["answer"].format(**vals)})
    if limit is not None and len(out) > limit:
        out = random.Random(seed).sample(out, limit)
    return out, skipped


def edge_cases(rows: list[dict], columns: list[str], n: int, seed: int) -> list[dict]:
    """Rows for the long tail; see the module docstring. Deterministic for a seed."""
    rng = random.Random(seed)
    if not rows:
        raise UsageError("the table has no rows to start from", "pick a table with data")
    numeric = [c for c in columns if all(isinstance(r[c], int | float) and not isinstance(r[c], bool)
                                         for r in rows if r[c] is not None) and any(r[c] is not None for r in rows)]
    hashable = [c for c in columns if c not in numeric
                and all(isinstance(r[c], str | int | float | bool | type(None)) for r in rows)]
    values = {c: Counter(r[c] for r in rows if r[c] not in (None, "")) for c in hashable}
    # categorical: a few values, repeated (an id or a free-text column has about one row per value)
    categorical = [c for c, cnt in values.items()
                   if 2 <= len(cnt) <= min(MAX_CATEGORIES, max(2, len(rows) // 2)) and max(cnt.values()) >= 2]
    candidates: list[tuple[str, dict]] = []
    for a, b in itertools.combinations(categorical, 2):
        seen = Counter((r[a], r[b]) for r in rows)
        pairs = heapq.nsmallest(3, itertools.product(values[a], values[b]), key=lambda p: (seen[p], str(p)))
        candidates += [("unseen pair" if seen[p] == 0 else "rare pair", {a: p[0], b: p[1]}) for p in pairs]
    for c in numeric:
        xs = [r[c] for r in rows if r[c] is not None]
        lo, hi = min(xs), max(xs)
        span = (hi - lo) or abs(hi) or 1
        beyond = [lo, hi, lo - span * 0.1, hi + span * 0.1]
        cast = int if all(isinstance(x, int) for x in xs) else float
        candidates += [("numeric extreme", {c: cast(round(v)) if cast is int else round(v, 6)}) for v in beyond]
    for c in categorical:
        rare = min(values[c].items(), key=lambda kv: (kv[1], str(kv[0])))[0]
        candidates.append(("rarest value", {c: rare}))
    if not candidates:
        raise UsageError("the table has no categorical or numeric fields to vary",
                         "edge cases need repeated values (a class, a location) or numbers")
    out = []
    for i in range(n):
        why, change = candidates[i % len(candidates)] if i < len(candidates) else rng.choice(candidates)
        base = dict(rng.choice(rows))
        base.update(change)
        base["edge_case"] = f"{why}: " + ", ".join(f"{k}={v}" for k, v in change.items())
        out.append(base)
    return out


_STOP = frozenset("the and for are but not you all any can had her was one our out has his how its may new now "
                  "see two who did get let put say she too use with that this from they will have what when which "
                  "there their would about into than then them these your been were more also each".split())
PASSAGE_CHARS = 600


def passages(con, ref: str, limit: int) -> tuple[str, list[tuple[int, str]]]:
    """(NAME@N, [(record position, passage)]): paragraphs of the version's train records, in order."""
    from appliance.vault.versions import iter_records, resolve

    _, name, n = resolve(con, ref)
    out: list[tuple[int, str]] = []
    for rec in iter_records(con, f"{name}@{n}", split="train"):
        for para in re.split(r"\n\s*\n", rec["text"]):
            para = " ".join(para.split())
            if len(para) >= 40 and not para.startswith("["):
                out.append((rec["ord"], para[:PASSAGE_CHARS]))
                if len(out) >= limit:
                    return f"{name}@{n}", out
    if not out:
        raise UsageError(f"{name}@{n} has no passages of text to write questions about",
                         "use a version of documents (handbooks, procedures, reports)")
    return f"{name}@{n}", out


def content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"\w+", text.lower()) if len(w) >= 3 and w not in _STOP]


def grounding(answer: str, passage: str) -> float:
    """The share of the answer's content words that appear in the passage (0 when it has none)."""
    words = content_words(answer)
    if not words:
        return 0.0
    have = set(re.findall(r"\w+", passage.lower()))
    return sum(w in have for w in words) / len(words)


def from_documents(complete, items: list[tuple[int, str]], min_grounding: float, max_tokens: int,
                   progress=lambda done, total: None) -> tuple[list[dict], Counter]:
    """One question/answer pair per passage, written by `complete(prompt, max_tokens) -> text`.

    The model continues "PASSAGE / Q:" with a question, then "... A:" with its answer (plain completion,
    so any model can do it); each stops at the end of its line."""
    rows, dropped, seen = [], Counter(), set()
    for i, (pos, passage) in enumerate(items):
        progress(i, len(items))
        prompt = f"{passage}\n\nQ:"
        q = complete(prompt, max_tokens).strip().split("\n")[0].strip()
        a = complete(f"{prompt} {q}\nA:", max_tokens).strip().split("\n")[0].strip() if q else ""
        if not q or not a:
            dropped["empty"] += 1
            continue
        g = grounding(a, passage)
        if g < min_grounding:
            dropped["ungrounded"] += 1
            continue
        key = " ".join(content_words(q))
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        rows.append({"instruction": q, "response": a, "grounding": round(g, 3), "source_record": pos})
    progress(len(items), len(items))
    return rows, dropped


def _check_dataset(con, dataset: str) -> None:
    """Synthetic versions go to a dataset of their own: never on top of ingested data."""
    from appliance.vault import lineage
    from appliance.vault.builder import latest

    if (last := latest(con, dataset)) is None:
        return
    node = lineage.node(con, f"{dataset}@{last[1]}")
    if not (node and node["attrs"].get("synthetic")):
        raise UsageError(f"dataset {dataset} holds ingested data; synthetic rows never join it",
                         "pick another --dataset (e.g. {dataset}-synth)".replace("{dataset}", dataset))


# --- landing -------------------------------------------------------------------------------------------
@dataclass
class SynthResult:
    version: str
    content_hash: str
    records: int
    table: str
    generator: str
    source: str
    generated: int
    dropped: dict
    pii: dict
    policy: dict

    def to_json(self) -> dict:
        return dict(self.__dict__)


def land(vault, dataset: str, stem: str, rows: list[dict], source: str, generator: str, settings: dict,
         policy: Policy, pii_mode: str = "redact", validation: float = 0.05, dropped: Counter | None = None,
         extra_parents: list[tuple[str, str]] = (), source_pii: Counter | None = None) -> SynthResult:
    """`source_pii`: what scrubbing the source rows found (see `scrubbed`), reported with the rest."""
    """Scrub, apply the policy, and commit `rows` as a new version of `dataset` (a table `stem`)."""
    import pyarrow as pa

    from appliance.vault.builder import VersionBuilder
    from appliance.vault.ingest import validate_name
    from appliance.vault.pii import Scrubber
    from appliance.vault.readers import Record
    from appliance.vault.readers.tables import render_row

    validate_name(dataset)
    _check_dataset(vault.con, dataset)
    scrubber = Scrubber(pii_mode, vault.secrets.pseudonym_key)
    counts: Counter = Counter(source_pii or {})
    kept, dropped, unique = [], Counter(dropped or {}), set()
    generated = len(rows) + sum(dropped.values())  # the generator's own drops (ungrounded, ...) count too
    for row in rows:
        clean, found = {}, Counter()
        for c, v in row.items():
            if isinstance(v, str):
                v, n = scrubber.scrub_cell(c, v)
                found.update(n)
            clean[c] = v
        if policy.banned_in(clean):
            dropped["policy"] += 1
            continue
        counts.update(found)  # what the landed rows had
        if policy.disclaimer and "response" in clean and policy.disclaimer not in clean["response"]:
            clean["response"] = f"{clean['response'].rstrip()} {policy.disclaimer}"
        key = json.dumps(clean, sort_keys=True, default=str)
        if key in unique:
            dropped["duplicate"] += 1
            continue
        unique.add(key)
        kept.append(clean)
    if not kept:
        why = ", ".join(f"{n} {'by the policy' if k == 'policy' else k}" for k, n in dropped.items())
        raise UsageError(f"nothing to land: all {generated} generated row(s) were dropped"
                         + (f" ({why})" if why else ""),
                         "loosen the policy or the generator's settings")
    src = f"synth:{generator}:{source}"
    with VersionBuilder(vault, dataset, pii_mode=pii_mode, validation_fraction=validation, atomic=True) as b:
        target = b.table_name(stem)
        cols = list(kept[0])
        b.create_table(target, pa.Table.from_pylist(kept))
        nbytes = 0
        for i, row in enumerate(kept, 1):
            text = render_row(stem, i, row, cols)
            data = text.encode("utf-8")
            nbytes += len(data)
            b.add(Record(kind="table", source=src, text=text, path=target, title=stem,
                         meta={"row": i, "synthetic": True}, scrubbed=True), text, hashlib.sha256(data).hexdigest(),
                  len(data))
        b.source(src, "table", nbytes, None, len(kept), dropped["duplicate"], "ok")
        b.pii(src, counts)
        b.table(target, src)
        done = b.commit("vault.synth", parents=[(source, "source"), *extra_parents], duplicates=dropped["duplicate"],
                        attrs={"files": 0, "synthetic": True, "generator": generator, "settings": settings,
                               "policy": policy.to_json(), "pii": dict(counts)},
                        details={"new_records": len(kept), "duplicates": dropped["duplicate"], "files": 0,
                                 "failed": 0, "skipped": 0})
    return SynthResult(done.version, done.content_hash, done.records, f"data.{target}", generator, source, generated,
                       dict(dropped), dict(sorted(counts.items())), policy.to_json())
