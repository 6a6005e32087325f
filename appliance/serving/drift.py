"""`appliance eval drift --deployment D --window 7d`: what a deployment served lately against the window before.

Inputs: the mean length of the users' messages (relative change), the Jensen-Shannon divergence of the
word distributions of the two windows (base 2: 0 the same, 1 nothing shared), and the unseen-vocabulary
rate (the share of recent words never seen in the earlier window). Outputs: the refusal rate and the error
rate (absolute change). Drift is any of them past its limit; with fewer than `min_records` in a window
nothing is judged (`enough` false) and the check passes. All of it is computed from the scrubbed records
in the vault.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from datetime import datetime, timedelta

from appliance.db_time import iso, utcnow
from appliance.errors import UsageError
from appliance.serving import store
from appliance.serving.ab import refused

WORD = re.compile(r"\[[A-Z_0-9]+\]|\w+", re.UNICODE)
UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DEFAULT_LIMITS = {"js_divergence": 0.2, "unseen_rate": 0.2, "length_change": 0.5, "refusal_change": 0.1,
                  "error_change": 0.05}


def parse_window(text: str) -> timedelta:
    """`7d`, `12h`, `30m`, `2w` as a timedelta."""
    m = re.fullmatch(r"\s*(\d+)\s*([mhdw])\s*", text or "")
    if not m or int(m.group(1)) == 0:
        raise UsageError(f"--window {text!r} is not a length of time", "write NUMBER and m, h, d or w: 7d, 12h, 2w")
    return timedelta(seconds=int(m.group(1)) * UNITS[m.group(2)])


def words(rows: list[dict]) -> Counter:
    c: Counter = Counter()
    for r in rows:
        for m in r["messages"]:
            if m.get("role") == "user":
                c.update(w.lower() for w in WORD.findall(m.get("content") or ""))
    return c


def js_divergence(p: Counter, q: Counter) -> float:
    """Jensen-Shannon divergence (base 2) of two word counts: 0 for the same distribution, 1 for disjoint."""
    np_, nq = sum(p.values()), sum(q.values())
    if not np_ or not nq:
        return 0.0
    total = 0.0
    for w in set(p) | set(q):
        a, b = p.get(w, 0) / np_, q.get(w, 0) / nq
        m = (a + b) / 2
        if a:
            total += 0.5 * a * math.log2(a / m)
        if b:
            total += 0.5 * b * math.log2(b / m)
    return min(1.0, max(0.0, total))


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    n = len(rows)
    return {"records": n, "mean_input_chars": (sum(r["input_chars"] or 0 for r in rows) / n) if n else None,
            "refusal_rate": (sum(refused(r["answer"]) for r in ok) / len(ok)) if ok else None,
            "error_rate": (sum(r["status"] != "ok" for r in rows) / n) if n else None}


def check(con, name: str, window: timedelta, limits: dict[str, float] | None = None, min_records: int = 20,
          now: datetime | None = None) -> dict:
    store.get(con, name)
    lim = {**DEFAULT_LIMITS, **(limits or {})}
    end = now or utcnow()
    start, base_start = end - window, end - 2 * window
    recent = store.served(con, name, since=start, until=end)
    base = store.served(con, name, since=base_start, until=start)
    r, b = summary(recent), summary(base)
    wr, wb = words(recent), words(base)
    enough = r["records"] >= min_records and b["records"] >= min_records
    unseen = sum(n for w, n in wr.items() if w not in wb) / max(1, sum(wr.values())) if wb else None
    values = {
        "js_divergence": js_divergence(wb, wr) if wb and wr else None,
        "unseen_rate": unseen,
        "length_change": (r["mean_input_chars"] - b["mean_input_chars"]) / b["mean_input_chars"]
        if r["mean_input_chars"] is not None and b["mean_input_chars"] else None,
        "refusal_change": (r["refusal_rate"] - b["refusal_rate"])
        if r["refusal_rate"] is not None and b["refusal_rate"] is not None else None,
        "error_change": (r["error_rate"] - b["error_rate"]) if r["error_rate"] is not None and b["error_rate"]
        is not None else None,
    }
    drifted = [k for k, v in values.items() if enough and v is not None and abs(v) > lim[k]]
    return {"deployment": name, "window": {"start": iso(start), "end": iso(end)},
            "baseline_window": {"start": iso(base_start), "end": iso(start)}, "recent": r, "earlier": b,
            "metrics": values, "limits": lim, "drifted": drifted, "enough": enough, "min_records": min_records,
            "recorded": False, "ok": not drifted}
