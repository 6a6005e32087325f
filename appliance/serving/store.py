"""Deployments, serving records and feedback in the vault: every statement over those tables is here.

A deployment names the model in service, optionally a candidate and the share of requests it gets, and
whether (and how much) is recorded and for how long. Records hold only scrubbed text; their id is the id
the server gave the response (`chatcmpl-...`, or `cmpl-...` for a completion), which clients quote when they
send feedback.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from appliance.db_time import iso, utcnow
from appliance.errors import UsageError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RECORD_ID = re.compile(r"(?:chat)?cmpl-[0-9a-f]{8,64}")
ARMS = ("model", "candidate")
ASKED = ("user", "prompt")  # the roles of what was asked in a record: a chat's user messages, a completion's prompt


@dataclass
class Deployment:
    """One deployment: what is served under a name, and what is kept of it."""

    name: str
    """The deployment's name (letters, digits, `_.-`)."""
    model: str
    """The model in service: a GGUF id (`NAME@K:q4_k_m`) or a .gguf path."""
    candidate: str | None = None
    """The model on trial, or None."""
    split: float = 0.0
    """The share of conversations (0..1) the candidate answers."""
    record: bool = False
    """Whether requests and responses are kept (scrubbed) in the vault."""
    sample_rate: float = 1.0
    """The share of requests (0..1) recorded when recording is on."""
    retention_days: int = 30
    """Records older than this are deleted when the server next writes."""
    created: str | None = None
    updated: str | None = None
    verdict: dict | None = None
    """The last `eval ab` verdict on this deployment, if any."""

    def __post_init__(self) -> None:
        problems = []
        if not NAME.fullmatch(self.name or ""):
            problems.append(f"deployment name {self.name!r} must be letters, digits, '_', '.' or '-' (at most 64)")
        if not self.model:
            problems.append("--model is required")
        if not 0.0 <= self.split <= 1.0:
            problems.append(f"--split {self.split} must be between 0 and 1")
        if self.split > 0 and not self.candidate:
            problems.append("--split needs --candidate")
        if not 0.0 <= self.sample_rate <= 1.0:
            problems.append(f"--sample-rate {self.sample_rate} must be between 0 and 1")
        if self.retention_days < 1:
            problems.append(f"--retention-days {self.retention_days} must be at least 1")
        if problems:
            raise UsageError("; ".join(problems), "see `appliance deploy create --help`")

    def to_json(self) -> dict:
        return asdict(self)


def _tables_exist(con) -> bool:
    import duckdb  # here, not above: the vault-less A/B server (an edge device) never loads duckdb

    try:
        con.execute("SELECT 1 FROM deployments LIMIT 0")
        return True
    except duckdb.CatalogException:  # a vault opened read-only before it was first opened for writing
        return False


def get(con, name: str) -> Deployment:
    row = con.execute("SELECT name, model, candidate, split, record, sample_rate, retention_days, created, updated, "
                      "verdict FROM deployments WHERE name = ?", [name]).fetchone() if _tables_exist(con) else None
    if row is None:
        raise UsageError(f"no deployment {name}", "list them with `appliance deploy list`")
    return _from_row(row)


def find(con, name: str) -> Deployment | None:
    try:
        return get(con, name)
    except UsageError:
        return None


def _from_row(row) -> Deployment:
    return Deployment(row[0], row[1], row[2], float(row[3]), bool(row[4]), float(row[5]), int(row[6]), iso(row[7]),
                      iso(row[8]), json.loads(row[9]) if row[9] else None)


def all_deployments(con) -> list[Deployment]:
    if not _tables_exist(con):
        return []
    return [_from_row(r) for r in con.execute(
        "SELECT name, model, candidate, split, record, sample_rate, retention_days, created, updated, verdict "
        "FROM deployments ORDER BY name").fetchall()]


def put(vault, d: Deployment) -> Deployment:
    """Create or update a deployment (audited)."""
    con, now = vault.con, utcnow()
    with vault.transaction():
        old = find(con, d.name)
        con.execute("INSERT OR REPLACE INTO deployments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [d.name, d.model, d.candidate, d.split, d.record, d.sample_rate, d.retention_days,
                     now if old is None else datetime.fromisoformat(old.created.rstrip("Z")), now,
                     json.dumps(old.verdict) if old and old.verdict and _same_arms(old, d) else None])
        vault.audit("deploy.create" if old is None else "deploy.update", [d.name],
                    {k: v for k, v in d.to_json().items() if k not in ("created", "updated", "verdict")})
    return get(con, d.name)


def _same_arms(a: Deployment, b: Deployment) -> bool:
    return (a.model, a.candidate) == (b.model, b.candidate)


def set_verdict(con, name: str, verdict: dict) -> None:
    con.execute("UPDATE deployments SET verdict = ? WHERE name = ?", [json.dumps(verdict), name])


def promote(vault, name: str, verdict: dict) -> Deployment:
    """The candidate becomes the model in service; the split ends (audited)."""
    d = get(vault.con, name)
    if not d.candidate:
        raise UsageError(f"deployment {name} has no candidate to promote", "give it one with `deploy create`")
    with vault.transaction() as con:
        con.execute("UPDATE deployments SET model = candidate, candidate = NULL, split = 0, updated = ?, "
                    "verdict = ? WHERE name = ?", [utcnow(), json.dumps(verdict), name])
        vault.audit("deploy.promote", [name, d.candidate], {"from": d.model, "to": d.candidate})
    return get(vault.con, name)


# --- records ------------------------------------------------------------------------------------------------
@dataclass
class Served:
    """One request and its response, scrubbed, as it goes into the vault."""

    id: str
    deployment: str
    arm: str
    model: str
    created: datetime
    messages: str
    """The request's messages as JSON, every content scrubbed; a completion's prompt is one message of role
    `prompt`. The last user (or prompt) message may hold the request's `reference` answer and its `expect`."""
    answer: str
    """The answer, scrubbed."""
    input_chars: int
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float
    status: str
    """`ok`, or `error` (the model failed; the answer is empty)."""
    finish_reason: str | None
    pii: dict
    """What scrubbing replaced, counts per type (never the values)."""


@dataclass
class Feedback:
    record: str
    created: datetime
    rating: int | None
    correction: str | None
    """Scrubbed."""
    actor: str | None = None


def write(vault, records: list[Served], feedback: list[Feedback]) -> dict:
    """One batch into the vault in one transaction, then the retention of every deployment written to."""
    con = vault.con
    with vault.transaction():
        if records:
            con.executemany("INSERT INTO serving_records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [[r.id, r.deployment, r.arm, r.model, r.created, r.messages, r.answer, r.input_chars,
                              r.prompt_tokens, r.completion_tokens, r.latency_ms, r.status, r.finish_reason,
                              json.dumps(r.pii)] for r in records])
        insert_feedback(con, feedback)
        expired = 0
        for name in sorted({r.deployment for r in records}):
            expired += expire(vault, name)
        if records or feedback:
            vault.audit("serve.record", sorted({r.deployment for r in records}),
                        {"records": len(records), "feedback": len(feedback), "expired": expired})
    return {"records": len(records), "feedback": len(feedback), "expired": expired}


def insert_feedback(con, feedback: list[Feedback]) -> None:
    if feedback:
        con.executemany("INSERT INTO serving_feedback VALUES (?, ?, ?, ?, ?)",
                        [[f.record, f.created, f.rating, f.correction, f.actor] for f in feedback])


def expire(vault, name: str, now: datetime | None = None) -> int:
    """Delete the deployment's records (and their feedback) older than its retention; inside a transaction."""
    d = find(vault.con, name)
    if d is None:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=d.retention_days)
    con = vault.con
    con.execute("DELETE FROM serving_feedback WHERE record IN (SELECT id FROM serving_records WHERE deployment = ? "
                "AND created < ?)", [name, cutoff])
    n = con.execute("DELETE FROM serving_records WHERE deployment = ? AND created < ?", [name, cutoff]).fetchone()[0]
    return int(n)


def record_exists(con, record_id: str, deployment: str | None = None) -> bool:
    """Whether `record_id` is recorded (by `deployment`, when given)."""
    if not _tables_exist(con):
        return False
    return con.execute("SELECT 1 FROM serving_records WHERE id = ? AND (? IS NULL OR deployment = ?)",
                       [record_id, deployment, deployment]).fetchone() is not None


def check_record_id(record_id: str) -> str:
    if not RECORD_ID.fullmatch(record_id or ""):
        raise UsageError(f"{record_id!r} is not a response id", "ids look like chatcmpl-0123abcd... (cmpl-... for a "
                         "completion); list them with `appliance deploy records DEPLOYMENT`")
    return record_id


def delete_record(vault, record_id: str) -> dict:
    """Erase one record and its feedback (a person's right to erasure); audited with the id only."""
    check_record_id(record_id)
    con = vault.con
    row = con.execute("SELECT deployment FROM serving_records WHERE id = ?", [record_id]).fetchone() \
        if _tables_exist(con) else None
    if row is None:
        raise UsageError(f"no serving record {record_id}", "list them with `appliance deploy records DEPLOYMENT`")
    with vault.transaction():
        fb = con.execute("DELETE FROM serving_feedback WHERE record = ?", [record_id]).fetchone()[0]
        con.execute("DELETE FROM serving_records WHERE id = ?", [record_id])
        vault.audit("serve.record.delete", [record_id, row[0]], {"feedback": int(fb)})
    con.execute("CHECKPOINT")  # the rows leave the database file now, not at some later checkpoint
    return {"id": record_id, "deployment": row[0], "deleted": True, "feedback_deleted": int(fb)}


def records(con, name: str, limit: int = 50, offset: int = 0, text: bool = False,
            since: datetime | None = None, until: datetime | None = None) -> tuple[int, list[dict]]:
    """(total, rows) of a deployment's records, newest first; `text` adds the scrubbed messages and answer."""
    get(con, name)
    where, args = "deployment = ?", [name]
    if since is not None:
        where, args = where + " AND created >= ?", [*args, since]
    if until is not None:
        where, args = where + " AND created < ?", [*args, until]
    total = con.execute(f"SELECT count(*) FROM serving_records WHERE {where}", args).fetchone()[0]
    rows = con.execute(
        "SELECT id, arm, model, created, input_chars, prompt_tokens, completion_tokens, latency_ms, status, "
        f"finish_reason, messages, answer, (SELECT count(*) FROM serving_feedback f WHERE f.record = r.id) "
        f"FROM serving_records r WHERE {where} ORDER BY created DESC, id LIMIT ? OFFSET ?",
        [*args, limit, offset]).fetchall()
    out = []
    for r in rows:
        d = {"id": r[0], "arm": r[1], "model": r[2], "created": iso(r[3]), "input_chars": r[4],
             "prompt_tokens": r[5], "completion_tokens": r[6], "latency_ms": r[7], "status": r[8],
             "finish_reason": r[9], "feedback": int(r[12])}
        if text:
            d.update(messages=json.loads(r[10]), answer=r[11])
        out.append(d)
    return int(total), out


def served(con, name: str, models: tuple[str, ...] | None = None, since: datetime | None = None,
           until: datetime | None = None) -> list[dict]:
    """Every record of a deployment (oldest first) with its mean rating, for comparisons and drift."""
    where, args = "r.deployment = ?", [name]
    if models:
        where += f" AND r.model IN ({', '.join('?' for _ in models)})"
        args += list(models)
    if since is not None:
        where, args = where + " AND r.created >= ?", [*args, since]
    if until is not None:
        where, args = where + " AND r.created < ?", [*args, until]
    rows = con.execute(
        "SELECT r.id, r.model, r.created, r.messages, r.answer, r.input_chars, r.completion_tokens, r.latency_ms, "
        "r.status, (SELECT avg(rating) FROM serving_feedback f WHERE f.record = r.id AND rating IS NOT NULL) "
        f"FROM serving_records r WHERE {where} ORDER BY r.created, r.id", args).fetchall()
    return [{"id": r[0], "model": r[1], "created": r[2], "messages": json.loads(r[3]), "answer": r[4],
             "input_chars": r[5], "completion_tokens": r[6], "latency_ms": r[7], "status": r[8],
             "rating": None if r[9] is None else float(r[9])} for r in rows]


def corrections(con, name: str) -> list[dict]:
    """The feedback with a correction on a deployment's records: prompt messages, served answer, correction."""
    rows = con.execute(
        "SELECT r.id, r.model, r.messages, r.answer, f.correction, f.rating FROM serving_feedback f "
        "JOIN serving_records r ON r.id = f.record WHERE r.deployment = ? AND f.correction IS NOT NULL "
        "AND length(trim(f.correction)) > 0 ORDER BY f.created, r.id", [name]).fetchall()
    return [{"id": r[0], "model": r[1], "messages": json.loads(r[2]), "answer": r[3], "correction": r[4],
             "rating": r[5]} for r in rows]


def counts(con, name: str) -> dict:
    row = con.execute("SELECT count(*), min(created), max(created) FROM serving_records WHERE deployment = ?",
                      [name]).fetchone()
    fb = con.execute("SELECT count(*) FROM serving_feedback f JOIN serving_records r ON r.id = f.record "
                     "WHERE r.deployment = ?", [name]).fetchone()[0]
    return {"records": int(row[0]), "first": iso(row[1]), "last": iso(row[2]), "feedback": int(fb)}
