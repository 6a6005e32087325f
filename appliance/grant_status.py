"""Whether a grant still holds: the rows of the grants table and the rule for an ended grant.

Below both `grants` (tokens, checks, revoking) and `jobs` (a job queued under a grant ends with it), so
neither has to import the other to know which grants have ended.
"""

from __future__ import annotations

from appliance.db_time import iso, utcnow


def rows(con, where: str = "", params: list | None = None) -> list[dict]:
    """Grant rows as dicts; the bounds read as 0 where a vault made before them has no such column yet."""
    cur = con.execute(f"SELECT * FROM grants{where} ORDER BY created", params or [])
    names = [d[0] for d in cur.description]
    found = [dict(zip(names, r)) for r in cur.fetchall()]
    for r in found:
        r["max_gpus"], r["max_priority"] = r.get("max_gpus") or 0, r.get("max_priority") or 0
    return found


def ended_why(row: dict) -> str | None:
    """Why a grant row no longer holds ("was revoked", "expired at ..."), or None while it does."""
    if row["revoked"] is not None:
        return "was revoked"
    if utcnow() >= row["expires"]:
        return f"expired at {iso(row['expires'])}"
    return None


def ended(con, gid: str | None = None) -> dict[str, str]:
    """Grant id -> why it ended, for grant `gid` (every grant when None) if it has ended."""
    return {r["id"]: why for r in rows(con, *((" WHERE id = ?", [gid]) if gid else ())) if (why := ended_why(r))}
