"""Grants: what an agent may do, given by the operator as a scoped, expiring token.

`appliance grant --agent NAME --caps read,train,eval --hours 8` prints a token once; the vault keeps only
its hash. The MCP server (`appliance mcp`) checks the token on every call, so a revoked or expired grant
stops working mid-session, and every call lands in the audit log under `agent:NAME`.

A grant also bounds the jobs its agent queues: at most `max_gpus` GPUs and a priority of at most
`max_priority` (both 0 unless the operator says otherwise: CPU jobs that never jump the operator's queue).
Jobs queued under a grant are cancelled when it is revoked, and by the next dispatch once it has expired.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from appliance import grant_status
from appliance.db_time import iso, utcnow
from appliance.errors import ApplianceError, UsageError

CAPS = {
    "read": "list datasets, versions, models, jobs, logs, lineage and eval results (never record text)",
    "records": "read record text and run read-only SQL over the vault",
    "ingest": "ingest files into datasets",
    "train": "submit and cancel training jobs",
    "eval": "run eval suites on models (as jobs)",
    "quantize": "export models to GGUF (as jobs)",
    "export": "write signed bundles: models or data leave the box",
}
PREFIX = "apg_"
MAX_HOURS = 24 * 90
MAX_GPUS = 64  # as `jobs submit --gpus`
MAX_PRIORITY = 1000


class GrantError(ApplianceError):
    """A missing, wrong, expired or revoked grant, or a capability it does not hold."""


@dataclass(frozen=True)
class Grant:
    id: str
    agent: str
    caps: tuple[str, ...]
    expires: datetime
    max_gpus: int = 0
    max_priority: int = 0

    @property
    def actor(self) -> str:
        return f"agent:{self.agent}"

    def require(self, cap: str) -> None:
        if cap not in self.caps:
            raise GrantError(f"{self.actor} is not granted {cap!r} ({CAPS[cap]})",
                             f"the operator can grant it: appliance grant --agent {self.agent} --caps "
                             f"{','.join((*self.caps, cap))}")

    def bound(self, gpus: int, priority: int) -> None:
        """A job of `gpus` GPUs at `priority` is within this grant, or GrantError."""
        if isinstance(gpus, bool) or not isinstance(gpus, int) or not 0 <= gpus <= self.max_gpus:
            raise GrantError(f"gpus {gpus!r} is over {self.actor}'s grant (0 to {self.max_gpus})",
                             f"ask for fewer, or the operator grants more: appliance grant --agent {self.agent} "
                             f"--caps {','.join(self.caps)} --max-gpus N")
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= self.max_priority:
            raise GrantError(f"priority {priority!r} is over {self.actor}'s grant (0 to {self.max_priority})",
                             f"ask for less, or the operator grants more: appliance grant --agent {self.agent} "
                             f"--caps {','.join(self.caps)} --max-priority P")

    def to_json(self) -> dict:
        return {"id": self.id, "agent": self.agent, "caps": list(self.caps), "expires": iso(self.expires),
                "max_gpus": self.max_gpus, "max_priority": self.max_priority}


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(vault, agent: str, caps: list[str], hours: float, max_gpus: int = 0, max_priority: int = 0) -> dict:
    """A new grant; the token is in the result and nowhere else. Its jobs ask for at most `max_gpus` GPUs
    and a priority of at most `max_priority`."""
    from appliance.vault.ingest import validate_name

    validate_name(agent, "agent")
    unknown = sorted(set(caps) - set(CAPS))
    if unknown or not caps:
        raise UsageError(f"unknown capabilities: {', '.join(unknown)}" if unknown else "no capabilities given",
                         "choose from " + ", ".join(CAPS))
    if not 0 < hours <= MAX_HOURS:
        raise UsageError(f"--hours {hours:g} is out of range", f"grants last from minutes up to {MAX_HOURS} hours")
    if isinstance(max_gpus, bool) or not isinstance(max_gpus, int) or not 0 <= max_gpus <= MAX_GPUS:
        raise UsageError(f"--max-gpus {max_gpus} is out of range", f"from 0 (CPU jobs only) to {MAX_GPUS}")
    if isinstance(max_priority, bool) or not isinstance(max_priority, int) or not 0 <= max_priority <= MAX_PRIORITY:
        raise UsageError(f"--max-priority {max_priority} is out of range", f"from 0 to {MAX_PRIORITY}")
    con = vault.con
    with vault.transaction():
        n = con.execute("SELECT count(*) + 1 FROM grants").fetchone()[0]
        gid, secret = f"grant-{n}", secrets.token_urlsafe(32)
        expires = utcnow() + timedelta(hours=hours)
        ordered = [c for c in CAPS if c in caps]
        con.execute("INSERT INTO grants (id, agent, caps, secret_sha256, created, expires, revoked, max_gpus, "
                    "max_priority) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                    [gid, agent, json.dumps(ordered), _hash(secret), utcnow(), expires, max_gpus, max_priority])
        vault.audit("grant.create", [gid], {"agent": agent, "caps": ordered, "expires": iso(expires),
                                            "max_gpus": max_gpus, "max_priority": max_priority})
    grant = Grant(gid, agent, tuple(ordered), expires, max_gpus, max_priority)
    return {**grant.to_json(), "token": f"{PREFIX}{gid}.{secret}"}


def check(con, token: str | None) -> Grant:
    """The grant a token stands for, if it is valid right now."""
    if not token:
        raise GrantError("no grant token", "the operator creates one with `appliance grant`; pass it in "
                                           "APPLIANCE_GRANT_FILE or APPLIANCE_GRANT")
    gid, _, secret = token.removeprefix(PREFIX).partition(".")
    found = grant_status.rows(con, " WHERE id = ?", [gid])
    if not found or not token.startswith(PREFIX) or not secrets.compare_digest(found[0]["secret_sha256"],
                                                                              _hash(secret)):
        raise GrantError("the grant token is not valid", "ask the operator for a new one (`appliance grant`)")
    row = found[0]
    if ended := grant_status.ended_why(row):
        raise GrantError(f"{gid} {ended}", "ask the operator for a new grant")
    return Grant(gid, row["agent"], tuple(json.loads(row["caps"])), row["expires"], row["max_gpus"],
                 row["max_priority"])


def cancel_jobs(vault, gid: str | None = None) -> list[str]:
    """Cancel the active jobs queued under grant `gid` (every ended grant when None); the ids cancelled.

    A queued job ends now; a running one is asked to stop (a training run stops at a checkpoint). Called by
    `revoke`, by every dispatch (so an expired grant's jobs never start) and when the MCP server refuses a
    call because the grant has ended. Runs inside the caller's hold on the vault.
    """
    from appliance.jobs import queue  # lazy: the job rows pull in the vault (duckdb)

    return queue.cancel_for_ended_grants(vault, gid)


def revoke(vault, gid: str) -> dict:
    con = vault.con
    if con.execute("SELECT 1 FROM grants WHERE id = ?", [gid]).fetchone() is None:
        raise UsageError(f"no grant {gid}", "list them with `appliance grant --list`")
    with vault.transaction():
        con.execute("UPDATE grants SET revoked = coalesce(revoked, ?) WHERE id = ?", [utcnow(), gid])
        vault.audit("grant.revoke", [gid], {})
    cancelled = cancel_jobs(vault, gid)  # what the agent queued does not outlive its grant
    return {"id": gid, "revoked": True, "cancelled_jobs": cancelled}


def listing(con) -> list[dict]:
    return [{"id": r["id"], "agent": r["agent"], "caps": json.loads(r["caps"]), "created": iso(r["created"]),
             "expires": iso(r["expires"]), "revoked": iso(r["revoked"]), "active": grant_status.ended_why(r) is None,
             "max_gpus": r["max_gpus"], "max_priority": r["max_priority"]} for r in grant_status.rows(con)]
