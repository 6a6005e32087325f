"""Append-only, hash-chained audit log inside the vault.

Each entry's MAC is HMAC-SHA256(audit key, previous MAC || canonical entry); a MAC'd head records the last
sequence number, so an edited, deleted, reordered or truncated entry breaks verification. The audit key
is one of the vault secrets, so forging a chain needs the passphrase, not just the database key.
"""

from __future__ import annotations

import contextvars
import getpass
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime

GENESIS = "0" * 64


# An agent's call in progress, in this thread only: it names the actor without touching the vault handle,
# which other threads (the operator's, the console's) may be using at the same moment.
ACTING: contextvars.ContextVar[str | None] = contextvars.ContextVar("appliance_acting", default=None)


def actor_of(vault) -> str:
    """Who acts through `vault` here: an agent call in this thread, else the handle's own actor, else the
    process's (`current_actor`)."""
    return ACTING.get() or getattr(vault, "actor", None) or current_actor()


def current_actor() -> str:
    """Who this process acts as: `APPLIANCE_ACTOR` (the operator's setting; a job runner's is set by its
    dispatcher), else the OS user. A vault handle opened for someone else carries its own (`Vault.actor`)."""
    if actor := os.environ.get("APPLIANCE_ACTOR"):
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def _canonical(seq: int, ts: str, actor: str, action: str, ids: str, details: str) -> bytes:
    return json.dumps([seq, ts, actor, action, ids, details], separators=(",", ":")).encode()


def _mac(key: bytes, prev: str, body: bytes) -> str:
    return hmac.new(key, prev.encode() + body, hashlib.sha256).hexdigest()


def _head_mac(key: bytes, seq: int, mac: str) -> str:
    return hmac.new(key, f"head:{seq}:{mac}".encode(), hashlib.sha256).hexdigest()


def append(con, key: bytes, action: str, ids: list[str] | None = None, details: dict | None = None,
           actor: str | None = None) -> int:
    """Add one entry; call inside the transaction of the action it records."""
    row = con.execute("SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
    ts = datetime.now(UTC).isoformat(timespec="microseconds")
    who = actor or current_actor()
    ids_s = json.dumps(ids or [], separators=(",", ":"))
    det_s = json.dumps(details or {}, separators=(",", ":"), sort_keys=True, default=str)
    mac = _mac(key, prev, _canonical(seq, ts, who, action, ids_s, det_s))
    con.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)", [seq, ts, who, action, ids_s, det_s, mac])
    con.execute(
        "INSERT OR REPLACE INTO meta VALUES ('audit_head', ?)", [f"{seq}:{_head_mac(key, seq, mac)}"]
    )
    return seq


@dataclass
class AuditReport:
    ok: bool
    entries: int
    problems: list[str]

    def to_json(self) -> dict:
        return {"ok": self.ok, "entries": self.entries, "problems": self.problems}


def verify(con, key: bytes) -> AuditReport:
    problems: list[str] = []
    prev, expected, last_mac = GENESIS, 1, GENESIS
    rows = con.execute("SELECT seq, ts, actor, action, ids, details, mac FROM audit ORDER BY seq").fetchall()
    for seq, ts, actor, action, ids, details, mac in rows:
        if seq != expected:
            problems.append(f"entry {expected} is missing (next is {seq})")
        good = _mac(key, prev, _canonical(seq, ts, actor, action, ids, details))
        if not hmac.compare_digest(good, mac):
            problems.append(f"entry {seq} ({action}) was altered or its predecessor was removed")
        prev, expected, last_mac = mac, seq + 1, mac
    if not rows:
        problems.append("the log is empty, but every vault records at least its creation: entries were removed")
    head = con.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
    last_seq = rows[-1][0] if rows else 0
    seq_s, _, hmac_s = (head[0] or "").partition(":") if head else ("", "", "")
    if not seq_s.isascii() or not seq_s.isdigit():
        problems.append("the audit head is missing or malformed")
    elif int(seq_s) != last_seq or not hmac.compare_digest(_head_mac(key, int(seq_s), last_mac), hmac_s):
        problems.append(f"the log ends at entry {last_seq} but its head says {seq_s}: entries were removed")
    return AuditReport(not problems, len(rows), problems)


def entries(con, limit: int = 50, action: str | None = None) -> list[dict]:
    sql = "SELECT seq, ts, actor, action, ids, details FROM audit"
    params: list = []
    if action:
        sql += " WHERE action LIKE ?"
        params.append(action.replace("*", "%"))
    sql += " ORDER BY seq DESC LIMIT ?"
    params.append(limit)
    return [
        {"seq": s, "ts": t, "actor": a, "action": ac, "ids": json.loads(i), "details": json.loads(d)}
        for s, t, a, ac, i, d in con.execute(sql, params).fetchall()
    ][::-1]
