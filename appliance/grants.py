"""Grants: what an agent may do, given by the operator as a scoped, expiring token.

`appliance grant --agent NAME --caps read,train,eval --hours 8` prints a token once; the vault keeps only
its hash. The MCP server (`appliance mcp`) checks the token on every call, so a revoked or expired grant
stops working mid-session, and every call lands in the audit log under `agent:NAME`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

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


class GrantError(ApplianceError):
    """A missing, wrong, expired or revoked grant, or a capability it does not hold."""


@dataclass(frozen=True)
class Grant:
    id: str
    agent: str
    caps: tuple[str, ...]
    expires: datetime

    @property
    def actor(self) -> str:
        return f"agent:{self.agent}"

    def require(self, cap: str) -> None:
        if cap not in self.caps:
            raise GrantError(f"{self.actor} is not granted {cap!r} ({CAPS[cap]})",
                             f"the operator can grant it: appliance grant --agent {self.agent} --caps "
                             f"{','.join((*self.caps, cap))}")

    def to_json(self) -> dict:
        return {"id": self.id, "agent": self.agent, "caps": list(self.caps), "expires": iso(self.expires)}


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(vault, agent: str, caps: list[str], hours: float) -> dict:
    """A new grant; the token is in the result and nowhere else."""
    from appliance.vault.ingest import validate_name

    validate_name(agent, "agent")
    unknown = sorted(set(caps) - set(CAPS))
    if unknown or not caps:
        raise UsageError(f"unknown capabilities: {', '.join(unknown)}" if unknown else "no capabilities given",
                         "choose from " + ", ".join(CAPS))
    if not 0 < hours <= MAX_HOURS:
        raise UsageError(f"--hours {hours:g} is out of range", f"grants last from minutes up to {MAX_HOURS} hours")
    con = vault.con
    with vault.transaction():
        n = con.execute("SELECT count(*) + 1 FROM grants").fetchone()[0]
        gid, secret = f"grant-{n}", secrets.token_urlsafe(32)
        expires = utcnow() + timedelta(hours=hours)
        ordered = [c for c in CAPS if c in caps]
        con.execute("INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?, NULL)",
                    [gid, agent, json.dumps(ordered), _hash(secret), utcnow(), expires])
        vault.audit("grant.create", [gid], {"agent": agent, "caps": ordered, "expires": iso(expires)})
    return {**Grant(gid, agent, tuple(ordered), expires).to_json(), "token": f"{PREFIX}{gid}.{secret}"}


def check(con, token: str | None) -> Grant:
    """The grant a token stands for, if it is valid right now."""
    if not token:
        raise GrantError("no grant token", "the operator creates one with `appliance grant`; pass it in "
                                           "APPLIANCE_GRANT_FILE or APPLIANCE_GRANT")
    gid, _, secret = token.removeprefix(PREFIX).partition(".")
    row = con.execute("SELECT agent, caps, secret_sha256, expires, revoked FROM grants WHERE id = ?",
                      [gid]).fetchone()
    if row is None or not token.startswith(PREFIX) or not secrets.compare_digest(row[2], _hash(secret)):
        raise GrantError("the grant token is not valid", "ask the operator for a new one (`appliance grant`)")
    agent, caps, _, expires, revoked = row
    if revoked is not None:
        raise GrantError(f"{gid} was revoked", "ask the operator for a new grant")
    if utcnow() >= expires:
        raise GrantError(f"{gid} expired at {iso(expires)}", "ask the operator for a new grant")
    return Grant(gid, agent, tuple(json.loads(caps)), expires)


def revoke(vault, gid: str) -> dict:
    con = vault.con
    if con.execute("SELECT 1 FROM grants WHERE id = ?", [gid]).fetchone() is None:
        raise UsageError(f"no grant {gid}", "list them with `appliance grant --list`")
    with vault.transaction():
        con.execute("UPDATE grants SET revoked = coalesce(revoked, ?) WHERE id = ?", [utcnow(), gid])
        vault.audit("grant.revoke", [gid], {})
    return {"id": gid, "revoked": True}


def listing(con) -> list[dict]:
    now = utcnow()
    return [{"id": g, "agent": a, "caps": json.loads(c), "created": iso(cr), "expires": iso(e),
             "revoked": iso(r), "active": r is None and now < e}
            for g, a, c, cr, e, r in con.execute("SELECT id, agent, caps, created, expires, revoked FROM grants "
                                                 "ORDER BY created").fetchall()]
